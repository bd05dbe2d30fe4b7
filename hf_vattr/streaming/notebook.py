"""Watch attribution live in Jupyter: one call turns a running streamer into a display that updates in place.

    streamer = AttributionStreamer(model, processor, inputs=inputs, estimator=estimator, images=images)
    streamer.generate(**inputs, max_new_tokens=512)    # decoding runs in its own thread
    trace = hf_vattr.streaming.notebook.live(streamer)           # the cell shows the thinking as it happens

:func:`live` consumes the streamer's events in the notebook's thread and updates two IPython display
handles: the *current* view (text so far, the running step's overlay) and the table of finished steps.
Rendering costs CPU (and the GIL), so updates are throttled: at most one every ``interval`` seconds, and
never more than ``max_busy`` of the wall time (a slow render stretches the interval). Each finished step
is rendered once and cached. IPython is imported when :func:`live` runs, never at import.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch

from .events import AttributionTrace, SpanAttribution, TokenAttribution

__all__ = ["live", "LiveView"]


class LiveView:
    """The state behind :func:`live`: the trace being followed, and the two display handles it updates."""

    def __init__(self, trace: AttributionTrace, *, top: int = 3, interval: float = 0.5, max_busy: float = 0.2,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        from IPython.display import HTML, display

        self._HTML = HTML
        self.trace = trace
        self.top = top
        self.interval = float(interval)
        self.max_busy = float(max_busy)
        self.clock = clock
        self.updates = 0  # how many times the display was redrawn (for tests and benchmarks)
        self.render_seconds = 0.0
        self._rows: list[str] = []  # cached HTML of each finished step
        self._evidence: list[str] = []  # the evidence label each cached row was drawn with
        self._rows_shown = 0
        self._last = float("-inf")
        self._next_gap = self.interval
        self._started = clock()
        self._seen = self._started
        self.current = display(HTML(self._current_html(done=False)), display_id=True)
        self.table = display(HTML(self._table_html()), display_id=True)

    # ------------------------------------------------------------------ HTML pieces
    def _current_scores(self) -> torch.Tensor | None:
        """Mean token scores of the step being written (what its span score will be), else the last step's."""
        from ..viz import mean_scores

        trace = self.trace
        start = trace.spans[-1].token_range[1] if trace.spans else 0
        running = trace.tokens[start:]
        if running:
            return mean_scores([t.region_scores for t in running])
        return trace.spans[-1].region_scores if trace.spans else None

    def _current_picture(self, done: bool) -> tuple[str, str, str]:
        """(PNG data URI, alt text, style) of the current view's picture: the trajectory plot once done, the
        running step's overlay before; empty strings when there is nothing to draw yet."""
        from ..viz import png_data_uri, score_units, step_overlay, trajectory_plot

        trace = self.trace
        if trace.regions is None:
            return "", "", ""
        if done and trace.spans:
            return png_data_uri(trajectory_plot(trace)), "reasoning path and concentration", ""
        scores = self._current_scores()
        if scores is None:
            return "", "", ""
        images = trace.images if trace.images is not None else [None] * len(trace.regions.maps)
        ov = step_overlay(trace.regions, images, scores, top=self.top, caption="current step",
                          units=score_units(trace))
        return png_data_uri(ov), "current step overlay", "max-height:260px"

    def _current_html(self, done: bool) -> str:
        from ..viz import UNCALIBRATED_NOTE
        from ..viz.templating import macros

        trace = self.trace
        n, elapsed = len(trace.tokens), max((self.clock() if not done else self._seen) - self._started, 1e-9)
        status = (f"{'done' if done else 'generating'}: {n} tokens, {len(trace.spans)} finished steps, "
                  f"{n / elapsed:.1f} tokens/s")
        note = "" if getattr(trace, "calibrated", True) else UNCALIBRATED_NOTE
        picture, alt, style = self._current_picture(done)
        return str(macros("notebook.html").current(status, note, picture, alt, style, trace.text[-2000:]))

    def _table_html(self) -> str:
        from markupsafe import Markup

        from ..viz import table_html, uncalibrated_banner_html
        from ..viz.templating import macros

        calibrated = getattr(self.trace, "calibrated", True)
        if not self._rows:
            return str(macros("notebook.html").no_steps(Markup("" if calibrated else uncalibrated_banner_html())))
        return table_html(self._rows, calibrated=calibrated)

    # ------------------------------------------------------------------ updates
    def follow(self, trace: AttributionTrace) -> None:
        """Switch to the streamer's current trace object (the streamer makes new ones when generation starts)."""
        if trace is not self.trace:
            self.trace = trace
            self._rows, self._evidence, self._rows_shown = [], [], -1

    def update(self, force: bool = False, done: bool = False) -> bool:
        """Redraw if the throttle allows (or ``force``); returns whether it drew."""
        now = self.clock()
        if not done:
            self._seen = now  # tokens/s counts generation time, not the final redraw
        if not force and now - self._last < self._next_gap:
            return False
        from ..viz import span_evidence, span_row_html

        began = time.perf_counter()
        while len(self._rows) < len(self.trace.spans):
            span = self.trace.spans[len(self._rows)]
            self._rows.append(span_row_html(span, self.trace, top_k=self.top))
            self._evidence.append(span_evidence(span, self.trace))
        if done:  # evidence is relative to the trace's steps: relabel rows that changed once all are in
            for i, span in enumerate(self.trace.spans):
                if span_evidence(span, self.trace) != self._evidence[i]:
                    self._rows[i] = span_row_html(span, self.trace, top_k=self.top)
                    self._evidence[i] = span_evidence(span, self.trace)
        self.current.update(self._HTML(self._current_html(done)))
        if self._rows_shown != len(self._rows) or done:
            self.table.update(self._HTML(self._table_html()))
            self._rows_shown = len(self._rows)
        spent = time.perf_counter() - began
        self.render_seconds += spent
        self._next_gap = max(self.interval, spent / max(self.max_busy, 1e-3))
        self._last = self.clock()
        self.updates += 1
        return True


def _trace_of(streamer: Any, sequence: int) -> AttributionTrace:
    traces = getattr(streamer, "traces", None)
    if traces is not None:
        return traces[sequence]
    return streamer.trace


def live(streamer: Iterable[Any], *, sequence: int = 0, top: int = 3, interval: float = 0.5,
         max_busy: float = 0.2) -> AttributionTrace:
    """Show a streamer's progress in the notebook cell, updated in place; return the finished trace.

    Iterates ``streamer`` (start its ``generate`` first), so it returns when generation ends and
    re-raises the streamer's errors. ``sequence`` picks which sequence of a batch to show. Updates
    come at most every ``interval`` seconds and take at most ``max_busy`` of the time; the final view
    (all steps, the trajectory plot) is always drawn.
    """
    try:
        import IPython.display  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("hf_vattr.streaming.notebook.live needs IPython (pip install ipython, or run it in Jupyter).") from err
    view = LiveView(_trace_of(streamer, sequence), top=top, interval=interval, max_busy=max_busy)
    try:
        for event in streamer:
            if isinstance(event, (TokenAttribution, SpanAttribution)) and event.sequence != sequence:
                continue
            view.follow(_trace_of(streamer, sequence))
            view.update()
    except BaseException:
        view.follow(_trace_of(streamer, sequence))
        try:  # show what was generated before the failure, but let the failure itself reach the cell
            view.update(force=True, done=True)
        except Exception:  # noqa: BLE001 - the original error matters more than a failed redraw
            pass
        raise
    view.follow(_trace_of(streamer, sequence))
    view.update(force=True, done=True)
    return view.trace
