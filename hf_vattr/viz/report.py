"""Trace-level outputs: the step table (HTML, what Jupyter shows), the self-contained HTML report and one
overlay PNG per step. Every picture comes from :func:`~hf_vattr.viz.overlays.step_overlay` and
:func:`~hf_vattr.viz.path_plot.trajectory_plot`; the HTML from the templates in ``viz/templates``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from markupsafe import Markup

from .evidence import evidence_wording, span_evidence
from .images import as_pil, png_data_uri
from .locations import describe_location
from .overlays import step_overlay
from .path_plot import trajectory_plot
from .protocols import SpanLike, TraceLike
from .scores import UNCALIBRATED_NOTE, format_score, score_units, top_positive_regions
from .templating import macros, render

__all__ = ["render_html", "trace_table_html", "span_row_html", "table_html", "uncalibrated_banner_html",
           "save_overlays"]


def _trace_images(trace: TraceLike, images: Sequence[Any] | None) -> list[Any]:
    if images is None:
        images = getattr(trace, "images", None)
    if trace.regions is None:
        raise ValueError("The trace has no regions yet (generation has not started).")
    if images is None:
        return [None] * len(trace.regions.maps)  # grey canvases of the right size
    return list(images)


def save_overlays(trace: TraceLike, images: Sequence[Any] | None = None, out_dir: str | Path = ".",
                  prefix: str = "step", top: int = 3) -> list[Path]:
    """Write one PNG per span (``step_000.png``, ...) with :func:`step_overlay`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _trace_images(trace, images)
    paths = []
    for span in trace.spans:
        path = out_dir / f"{prefix}_{span.index:03d}.png"
        evidence = span_evidence(span, trace)
        step_overlay(trace.regions, images, span.region_scores, top=top, evidence=evidence,
                     caption=f"{span.section} {span.index}", units=score_units(trace)).save(path)
        paths.append(path)
    return paths


def span_row_html(span: SpanLike, trace: TraceLike, images: Sequence[Any] | None = None, *,
                  top_k: int = 3) -> str:
    """One ``<tr>`` of the step table: index, section, text, evidence label, overlay, top regions in words.
    Rendered once per finished step (the live notebook view caches it)."""
    images = _trace_images(trace, images)
    evidence = span_evidence(span, trace)
    units = score_units(trace)
    picture = step_overlay(trace.regions, images, span.region_scores, top=top_k, evidence=evidence, units=units)
    top = [(describe_location(trace.regions, r), format_score(float(span.region_scores[r])))
           for r in top_positive_regions(span, top_k)]
    return str(macros("steps.html").row(span, evidence, evidence_wording(evidence), span.text.strip(),
                                         png_data_uri(picture), top, units))


def uncalibrated_banner_html() -> str:
    """The line shown above every table or report of a trace scored without an estimator."""
    head, rest = UNCALIBRATED_NOTE.split(":", 1)
    return str(macros("steps.html").banner(head, rest))


def table_html(rows: Sequence[str], *, max_height: int = 300, calibrated: bool = True) -> str:
    """Wrap step rows (:func:`span_row_html`) in the table with its header and CSS; ``calibrated=False`` adds
    the "uncalibrated" banner and column label (a trace without an estimator)."""
    banner, score = ("", "score") if calibrated else (uncalibrated_banner_html(), "uncalibrated score")
    return str(macros("steps.html").table([Markup(row) for row in rows], max_height, Markup(banner), score))


def trace_table_html(trace: TraceLike, images: Sequence[Any] | None = None, *, top_k: int = 3,
                     max_height: int = 300) -> str:
    """The step table as an HTML fragment (inline CSS, PNGs as data URIs): one row per span with its
    text, evidence label, overlay and top regions in words. Used by the report and by Jupyter."""
    rows = []
    if trace.regions is not None:
        rows = [span_row_html(span, trace, images, top_k=top_k) for span in trace.spans]
    return table_html(rows, max_height=max_height, calibrated=getattr(trace, "calibrated", True))


def render_html(trace: TraceLike, images: Sequence[Any] | None = None, path: str | Path | None = None, *,
                title: str = "hf_vattr report", question: str | None = None, top_k: int = 3) -> str:
    """A self-contained HTML page (images inlined): the prompt image(s), how to read the pictures,
    the step table (:func:`trace_table_html`) and the trajectory plot. ``images`` default to
    ``trace.images``."""
    imgs = _trace_images(trace, images) if trace.regions is not None else list(images or trace.images or [])
    originals = [(i + 1, png_data_uri(as_pil(im))) for i, im in enumerate(imgs)
                 if im is not None and not isinstance(im, tuple)]
    calibrated = getattr(trace, "calibrated", True)
    page = render("report.html", title=title, question=question, originals=originals,
                  banner_html=Markup("" if calibrated else uncalibrated_banner_html()), units=score_units(trace),
                  table_html=Markup(trace_table_html(trace, imgs if trace.regions is not None else None, top_k=top_k)),
                  trajectory=png_data_uri(trajectory_plot(trace)) if trace.spans else None)
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
