"""`AttributionStreamer`: live visual attribution out of ``model.generate``.

A transformers streamer (``BaseStreamer``): iterate over it, sync or async, to get as the model thinks

* one :class:`TokenAttribution` per generated token: its text and a score per image region (the
  estimator's prediction of how much the token's log-prob would drop if the region were ablated), and
* one :class:`SpanAttribution` per finished reasoning step, scored by the mean of its tokens' scores
  (the estimator is linear, so this equals scoring the step's mean features).

The safe way runs generation in a thread the streamer owns, so every failure reaches the loop::

    for event in AttributionStreamer(model, processor, inputs=inputs, estimator=est).generate(**inputs):
        ...

``model.generate(**inputs, streamer=streamer)`` in a thread of your own is fully supported too.

Why it cannot hang or leak: every failure becomes a :class:`GenerationError` in the consumer, with
the original exception as its ``__cause__``. Failures inside a forward are seen by a forward hook;
threads that die before the first token are seen through ``threading.excepthook`` (chained, and only
while a streamer waits for its generate call); a ``generate`` that leaves without calling ``end()``
(an error in a logits processor, Ctrl-C) is noticed by a watchdog within a fraction of a second.
All patches live in an :class:`~hf_vattr.session.AttributionSession` and are released on every exit.

Producer-consumer: inside the decode loop ``put`` only takes the captured features, scores them
on the model's device and enqueues a reference; a worker thread decodes text, splits spans and
moves scores to the host, so the decode loop never waits for the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import gc
import queue
import sys
import threading
import time
import weakref
from typing import Any, Iterator, Sequence

import torch
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging

from .errors import AttributionError
from .estimator import INHERITING_SECTIONS
from .events import AttributionTrace, SpanAttribution, TokenAttribution
from .layouts import VisualLayout
from .regions import PromptRegions, RegionMap
from .session import AttributionSession
from .spans import ReasoningStepSplitter, SpanSplitter
from .text import TokenTextDecoder

logger = logging.get_logger(__name__)

__all__ = [
    "AttributionStreamer",
    "TokenAttribution",
    "SpanAttribution",
    "AttributionTrace",
    "GenerationError",
    "AttributionTimeout",
    "StreamerStateError",
]

_END = object()
_WATCH_INTERVAL = 0.1  # seconds between checks that generate() is still running
_POLL_INTERVAL = 0.01  # seconds the worker sleeps when it has nothing to do (events lag tokens by at most this)


class GenerationError(AttributionError, RuntimeError):
    """``generate`` failed while the streamer was attached; the original error is the ``__cause__``."""


class AttributionTimeout(AttributionError, TimeoutError):
    """No event arrived within the consumer timeout while generation was still running."""


class StreamerStateError(AttributionError, RuntimeError):
    """The streamer was used out of order: reused for a second ``generate``, or started twice."""


class GenerationCancelled(AttributionError, RuntimeError):
    """Raised inside ``generate`` at the next token after :meth:`AttributionStreamer.close`, to stop it."""


class _Failure:
    def __init__(self, error: BaseException | None, message: str) -> None:
        self.error, self.message = error, message


# ----------------------------------------------------------------------------- failures before the first token


def _references(traceback: Any, streamer: "AttributionStreamer") -> bool:
    """Whether a traceback passes through a call that was given ``streamer=streamer`` (i.e. its generate)."""
    while traceback is not None:
        if traceback.tb_frame.f_locals.get("streamer") is streamer:
            return True
        traceback = traceback.tb_next
    return False


_ARMED: "weakref.WeakSet[AttributionStreamer]" = weakref.WeakSet()  # built, waiting for their generate call
_ARMED_LOCK = threading.Lock()
_PREVIOUS_EXCEPTHOOK: list[Any] = []


def _thread_excepthook(args: Any) -> None:
    """A thread died: if it was running generate for a waiting streamer, that streamer's consumer learns why."""
    for streamer in list(_ARMED):
        if _references(args.exc_traceback, streamer):
            streamer._fail(args.exc_value, f"generate raised {args.exc_type.__name__}: {args.exc_value}")
    previous = _PREVIOUS_EXCEPTHOOK[0] if _PREVIOUS_EXCEPTHOOK else threading.__excepthook__
    previous(args)  # the usual traceback on stderr


def _arm(streamer: "AttributionStreamer") -> None:
    with _ARMED_LOCK:
        _ARMED.add(streamer)
        if threading.excepthook is not _thread_excepthook:
            _PREVIOUS_EXCEPTHOOK[:] = [threading.excepthook]
            threading.excepthook = _thread_excepthook


def _disarm(streamer: "AttributionStreamer | None" = None) -> None:
    with _ARMED_LOCK:
        if streamer is not None:
            _ARMED.discard(streamer)
        if not _ARMED and threading.excepthook is _thread_excepthook:
            threading.excepthook = _PREVIOUS_EXCEPTHOOK.pop() if _PREVIOUS_EXCEPTHOOK else threading.__excepthook__


def _exception_of(thread_id: int | None) -> BaseException | None:
    """The exception a thread is handling right now (e.g. unwinding out of generate), if any."""
    if thread_id is None:
        return None
    info = sys._current_exceptions().get(thread_id)
    return info[1] if isinstance(info, tuple) else info


# ----------------------------------------------------------------------------- the streamer


class AttributionStreamer(BaseStreamer):
    """Streams ``(token, region_scores)`` and per-step attributions out of ``model.generate``.

    Args:
        model: the VLM (``*ForConditionalGeneration``) that will generate.
        processor: its processor (or tokenizer): used to decode tokens.
        inputs: the processor outputs passed to ``generate`` (``input_ids``, ``image_grid_thw``; batches
            with left padding allowed).
        estimator: a :class:`~hf_vattr.estimator.LinearEstimator` for this model. ``None`` scores with raw
            attention (mean over layers and heads), which is *not* causal; a warning says so.
        images: the original images (or their ``(height, width)``), to map regions onto original pixels;
            for batches one list per row, or one flat list in batch order.
        regions: region maps (a :class:`PromptRegions`, a list of :class:`RegionMap` per image, or one map),
            or a method name for :func:`hf_vattr.regions.build_regions` (``"auto"``, ``"vlm"``, ``"dinov3"``, ...);
            default: a regular grid of ``grid_k`` regions per image. ``"prefill"``: the same regions as
            ``"vlm"``, built from the vision tower's output of ``generate``'s own prefill (no extra vision
            pass); ``streamer.regions`` is then set once generation has started. Batches: a method name,
            or one region spec per row.
        splitter: span splitter; default :class:`ReasoningStepSplitter` (one copy per sequence).
        print_text: also print the text as it is generated, like ``TextStreamer`` (sequence 0). Off by
            default: a streamer is meant to be iterated, and printing besides would double every line.
        timeout: seconds a consumer waits for the next event while generation runs, before
            :class:`AttributionTimeout`; ``None`` waits as long as generation runs.
        start_timeout: seconds a consumer waits for a ``generate`` call to start using this streamer,
            before :class:`GenerationError` (a loop over a streamer nobody generates with never hangs).
        keep_features: attach the (L, H, K) features to each token event (for analysis and training).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        inputs: Any,
        estimator: Any | None = None,
        images: Sequence[Any] | None = None,
        regions: PromptRegions | Sequence[RegionMap] | RegionMap | str | None = None,
        grid_k: int = 16,
        splitter: SpanSplitter | None = None,
        print_text: bool = False,
        timeout: float | None = None,
        start_timeout: float = 60.0,
        keep_features: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = getattr(processor, "tokenizer", processor)
        this = weakref.ref(self)  # the session's hooks must not keep the streamer alive

        def on_error(error: BaseException) -> None:
            streamer = this()
            if streamer is not None:
                streamer._fail(error, f"generate raised {type(error).__name__}: {error}")

        self.session = AttributionSession(model, inputs, estimator=estimator, images=images, regions=regions,
                                          grid_k=grid_k, owner=self, on_error=on_error)
        weakref.finalize(self, self.session.close)  # a streamer dropped unused leaves no hook behind
        self.estimator = self.session.estimator
        self._splitter = splitter or ReasoningStepSplitter()
        self.print_text = print_text
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.keep_features = keep_features
        self.traces = [AttributionTrace(r, sequence=i, images=self.session.images[i])
                       for i, r in enumerate(self.session.regions)]
        self.result: Any = None  # generate's return value, when run by :meth:`generate`
        # A plain deque polled by the worker: appending wakes no thread, so the decode loop never hands the GIL
        # to the worker in the middle of a step (a Queue's notify did, costing ~2 ms a token on a busy CPU).
        self._work: collections.deque = collections.deque()
        self._wake = threading.Event()  # set only for the end of the stream, so the last events are not late
        self._events: queue.Queue = queue.Queue()
        self._state = "new"  # new -> running -> done | failed | closed
        self._lock = threading.Lock()
        self._failure: _Failure | None = None
        self._reuse_error: StreamerStateError | None = None
        self._worker: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._producer_id: int | None = None
        self._generate_frame: Any = None  # generate's frame while it streams (the watchdog looks for it)
        self._eos_ids = self._eos_token_ids(model)
        _arm(self)
        weakref.finalize(self, _disarm)

    # ------------------------------------------------------------------ views
    @property
    def trace(self) -> AttributionTrace:
        """The trace of sequence 0 (``traces`` holds one per sequence)."""
        return self.traces[0]

    @property
    def layout(self) -> VisualLayout:
        return self.session.layouts[0]

    @property
    def layouts(self) -> list[VisualLayout]:
        return self.session.layouts

    @property
    def regions(self) -> PromptRegions | None:
        return self.session.regions[0]

    @property
    def capture(self) -> Any:
        return self.session.capture

    @staticmethod
    def _eos_token_ids(model: Any) -> set[int]:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    # ------------------------------------------------------------------ the safe way
    def generate(self, **generate_kwargs: Any) -> "AttributionStreamer":
        """Run ``model.generate(**generate_kwargs, streamer=self)`` in a thread this streamer owns; returns self.

        Any exception of that call, from argument checks to the last token, reaches the loop as
        :class:`GenerationError`. After the loop, ``streamer.result`` holds generate's return value.
        """
        if "streamer" in generate_kwargs:
            raise TypeError("streamer.generate(...) passes itself as the streamer; drop the streamer= argument.")
        if self._state != "new" or self._thread is not None:
            raise StreamerStateError("This AttributionStreamer already served a generate() call; create a new "
                                     "streamer for each call.")
        for name in ("eos_token_id",):
            if generate_kwargs.get(name) is not None:
                value = generate_kwargs[name]
                self._eos_ids = {int(e) for e in (value if isinstance(value, (list, tuple)) else [value])}

        def run() -> None:
            try:
                self.result = self.model.generate(**generate_kwargs, streamer=self)
            except BaseException as error:  # noqa: BLE001 - every failure goes to the consumer
                if self._state != "closed":
                    self._fail(error, f"generate raised {type(error).__name__}: {error}")
            else:
                if self._state == "new":
                    self._fail(None, "generate() returned without streaming any token")

        self._thread = threading.Thread(target=run, daemon=True, name="hf_vattr-generate")
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> Any:
        """Wait for the thread started by :meth:`generate`; returns generate's output."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def close(self) -> None:
        """Stop attributing now: release every patch, end the stream, and stop a generation this streamer runs.

        Called on leaving a ``with`` block; use it after ``break`` so the model is free for the next streamer.
        """
        with self._lock:
            if self._state in ("done", "failed", "closed"):
                state_was_final = True
            else:
                state_was_final = False
                self._state = "closed"
        self._release()
        if not state_was_final:
            self._end_stream(_END)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()  # it stops at its next token (put raises once closed)

    def __enter__(self) -> "AttributionStreamer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ producer side (generate's thread)
    def put(self, value: torch.Tensor) -> None:
        state = self._state
        if state == "running":
            try:
                features, scores = self.session.scores()
            except BaseException as error:
                self._fail(error, f"attention capture failed: {error}")
                raise
            self._work.append((value.reshape(-1).tolist(), scores, features if self.keep_features else None))
        elif state == "new":
            self._begin(value)
        elif state == "closed":
            raise GenerationCancelled("The AttributionStreamer was closed; generation stopped.")
        elif value.dim() == 2:  # a prompt after the stream ended: a second generate() with this streamer
            self._reuse_error = StreamerStateError(
                "This AttributionStreamer already served a generate() call; create a new streamer for each call.")
            self._events.put(_Failure(self._reuse_error, str(self._reuse_error)))
            raise self._reuse_error

    def _begin(self, prompt_ids: torch.Tensor) -> None:
        """First put (the prompt): find our generate call, open the session, start the worker."""
        with self._lock:
            if self._state != "new":
                return
            self._state = "running"
        self._producer_id = threading.get_ident()
        self._generate_frame = self._find_generate_frame()
        prompt_ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
        try:
            self.session.open(prompt_ids.shape[0], stale=self._generate_exited, on_evicted=self._on_evicted)
        except BaseException as error:
            self._fail(error, f"attribution could not start: {error}")
            raise
        rows = self.session.row_of_sequence
        self.traces = [AttributionTrace(self.session.regions[r], sequence=s, images=self.session.images[r])
                       for s, r in enumerate(rows)]
        self._decoders = [TokenTextDecoder(self.tokenizer, self._tag_texts()) for _ in rows]
        self._splitters = [self._splitter if s == 0 else copy.deepcopy(self._splitter) for s in range(len(rows))]
        self._ended = [False] * len(rows)
        for s, splitter in enumerate(self._splitters):
            text = self.tokenizer.decode(prompt_ids[s].tolist(), skip_special_tokens=False)
            self.traces[s].prompt_text = text
            splitter.reset(text)
        worker = threading.Thread(target=self._work_loop, name="hf_vattr-attribution", daemon=True)
        worker.start()
        self._worker = worker  # only once alive: the consumer's liveness check must not see it unstarted

    def _tag_texts(self) -> tuple[str, str]:
        return (getattr(self._splitter, "think_open", "<think>"), getattr(self._splitter, "think_close", "</think>"))

    def _find_generate_frame(self) -> Any:
        """The frame of the generate call that was given this streamer (held until the stream ends)."""
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_locals.get("streamer") is self:
                return frame
            frame = frame.f_back
        return None  # put() called by hand: no watchdog

    def _generate_exited(self) -> bool:
        """Whether the generate call that started this stream is no longer on its thread's stack."""
        target = self._generate_frame
        if target is None or self._state != "running":
            return False
        frame = sys._current_frames().get(self._producer_id)
        while frame is not None:
            if frame is target:
                return False
            frame = frame.f_back
        return True

    def _on_evicted(self) -> None:
        """A new capture on the model found this stream's generate gone and took over: fail it now."""
        error = self._exception_that_left_generate()
        self._fail(error, "generate() ended without finishing the stream"
                   + (f": {type(error).__name__}: {error}" if error is not None else ""))

    def _exception_that_left_generate(self) -> BaseException | None:
        """The exception that unwound our generate call, if it is still alive anywhere (a caller's except
        block, a dying thread, pytest's ExceptionInfo): the one whose traceback holds generate's frame."""
        error = _exception_of(self._producer_id)
        if error is not None:
            return error
        target = self._generate_frame
        for obj in gc.get_objects():
            if issubclass(type(obj), BaseException):  # type(): some objects warn on __class__ access
                traceback = obj.__traceback__
                while traceback is not None:
                    if traceback.tb_frame is target:
                        return obj
                    traceback = traceback.tb_next
        return None

    def end(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            self._state = "done"
        self._release()
        self._end_stream(_END)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()  # generation is over: let text and spans catch up before generate returns

    def _fail(self, error: BaseException | None, message: str) -> None:
        """Record the first failure, release everything, and wake the consumer."""
        with self._lock:
            if self._state in ("failed", "done", "closed"):
                return
            self._state = "failed"
            self._failure = _Failure(error, message)
        self._release()
        self._end_stream(self._failure)

    def _release(self) -> None:
        """Undo everything this stream patched or holds: session hooks, the thread excepthook, generate's frame."""
        self.session.close()
        _disarm(self)
        self._generate_frame = None

    def _end_stream(self, item: Any) -> None:
        """Queue the stream's last item (end or failure): through the worker once it runs, so that events
        already decoded come first and it wakes at once; straight to the consumer before that."""
        if self._worker is not None:
            self._work.append(item)
            self._wake.set()
        else:
            self._events.put(item)

    # ------------------------------------------------------------------ worker thread
    def _work_loop(self) -> None:
        last_check = time.monotonic()
        try:
            while True:
                if not self._work:
                    self._wake.wait(_POLL_INTERVAL)
                    if time.monotonic() - last_check >= _WATCH_INTERVAL:
                        last_check = time.monotonic()
                        if self._generate_exited():
                            error = self._exception_that_left_generate()
                            self._fail(error, "generate() ended without finishing the stream"
                                       + (f": {type(error).__name__}: {error}" if error is not None else
                                          " (it raised outside a forward pass; see its traceback)"))
                    continue
                item = self._work.popleft()
                if item is _END:
                    for s in range(len(self._splitters)):
                        self._emit_spans(s, self._splitters[s].flush())
                    if self.print_text:
                        self.on_finalized_text("", stream_end=True)
                    self._events.put(_END)
                    return
                if isinstance(item, _Failure):
                    self._events.put(item)
                    return
                self._handle_step(*item)
        except BaseException as error:  # never leave the consumer waiting
            self._events.put(_Failure(error, f"attribution worker failed: {error}"))

    def _handle_step(self, token_ids: list[int], scores: torch.Tensor, features: torch.Tensor | None) -> None:
        scores = scores.detach().float().cpu()
        for s, token_id in enumerate(token_ids):
            if self._ended[s]:
                continue  # a finished sequence of a batch: generate pads it, a batch-1 run would have stopped
            trace = self.traces[s]
            if trace.regions is None:
                trace.regions = self.session.regions[self.session.row_of_sequence[s]]
            k = trace.regions.num_regions
            index = len(trace.tokens)
            piece = self._decoders[s].push(token_id)
            closed = self._splitters[s].push(index, piece)
            section = self._splitters[s].section()
            event = TokenAttribution(
                index=index, token_id=token_id, text=piece, region_scores=self._with_inherited(trace, section,
                                                                                             scores[s, :k].clone()),
                section=section,
                features=None if features is None else features[s, ..., :k].detach().cpu(), sequence=s,
            )
            trace.tokens.append(event)
            self._events.put(event)
            if self.print_text and piece and s == 0:
                self.on_finalized_text(piece)
            self._emit_spans(s, closed)
            if token_id in self._eos_ids and len(token_ids) > 1:
                self._ended[s] = True

    def _inherits(self, trace: AttributionTrace, section: str) -> bool:
        """Do this section's scores include the thinking steps' (an answer after steps, an inheriting estimator)?"""
        estimator = self.session.estimator
        return (estimator is not None and bool(estimator.inherit_weight) and section in INHERITING_SECTIONS
                and any(span.section not in INHERITING_SECTIONS for span in trace.spans))

    def _with_inherited(self, trace: AttributionTrace, section: str, scores: torch.Tensor) -> torch.Tensor:
        """An answer token's scores plus what it inherits from the thinking steps (``LinearEstimator.inherited``)."""
        if not self._inherits(trace, section):
            return scores
        steps = [span.region_scores for span in trace.spans if span.section not in INHERITING_SECTIONS]
        return self.session.estimator.with_inherited(scores, torch.stack(steps).to(scores))

    def _emit_spans(self, sequence: int, closed: Sequence[Any]) -> None:
        trace = self.traces[sequence]
        for span in closed:
            scores = torch.stack([t.region_scores for t in trace.tokens[span.start:span.end]]).mean(0)
            event = SpanAttribution(len(trace.spans), span.text, (span.start, span.end), scores, span.section,
                                    sequence=sequence, inherited=self._inherits(trace, span.section))
            trace.spans.append(event)
            self._events.put(event)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Prints like ``TextStreamer`` when ``print_text`` is on; override to send text elsewhere."""
        print(text, flush=True, end="" if not stream_end else None)

    # ------------------------------------------------------------------ consumer side
    def _next_event(self) -> TokenAttribution | SpanAttribution:
        waited = 0.0
        while True:
            if self._reuse_error is not None:
                raise GenerationError(str(self._reuse_error)) from self._reuse_error
            try:
                item = self._events.get(timeout=_WATCH_INTERVAL)
                break
            except queue.Empty:
                waited += _WATCH_INTERVAL
                self._check_producer()
                if self._state == "new" and waited >= self.start_timeout:
                    raise GenerationError(
                        f"No generate() call used this streamer within {self.start_timeout:g} s. Start one with "
                        "streamer.generate(**inputs) or model.generate(**inputs, streamer=streamer) in another "
                        "thread before iterating (or raise start_timeout)."
                    )
                if self.timeout is not None and waited >= self.timeout and self._state == "running":
                    raise AttributionTimeout(
                        f"No attribution event within {self.timeout} s while generate() is still running; "
                        "raise the streamer's timeout."
                    ) from None
        if item is _END:
            self._events.put(_END)  # later calls keep ending
            raise StopIteration
        if isinstance(item, _Failure):
            self._events.put(item)
            raise GenerationError(item.message) from item.error
        return item

    def _check_producer(self) -> None:
        """From the consumer's poll: notice a generate that failed in a thread we cannot hook."""
        if self._state == "new":  # failing before the first token in the caller's thread, while being handled
            for info in sys._current_exceptions().values():
                error = info[1] if isinstance(info, tuple) else info
                if error is not None and _references(error.__traceback__, self):
                    self._fail(error, f"generate raised {type(error).__name__}: {error}")
                    return
        elif self._state == "running" and self._worker is not None and not self._worker.is_alive():
            self._fail(None, "the attribution worker stopped unexpectedly")

    def __iter__(self) -> Iterator[TokenAttribution | SpanAttribution]:
        return self

    def __next__(self) -> TokenAttribution | SpanAttribution:
        return self._next_event()

    def __aiter__(self) -> "AttributionStreamer":
        return self

    async def __anext__(self) -> TokenAttribution | SpanAttribution:
        # StopIteration cannot cross a Future boundary, so the executor returns a sentinel instead.
        event = await asyncio.get_running_loop().run_in_executor(None, self._next_or_end)
        if event is _END:
            raise StopAsyncIteration
        return event

    def _next_or_end(self) -> Any:
        try:
            return self._next_event()
        except StopIteration:
            return _END

    def generate_in_thread(self, **generate_kwargs: Any) -> threading.Thread:
        """Start :meth:`generate` and return its thread (kept for compatibility; prefer ``generate``)."""
        self.generate(**generate_kwargs)
        assert self._thread is not None
        return self._thread
