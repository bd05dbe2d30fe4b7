"""Trace-level outputs: the step table (HTML, what Jupyter shows), the self-contained HTML report and one
overlay PNG per step. Every picture comes from :func:`~hf_vattr.viz.overlays.step_overlay` and
:func:`~hf_vattr.viz.path_plot.trajectory_plot`; the HTML from the templates in ``viz/templates``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from markupsafe import Markup
from PIL import Image, ImageDraw

from ..layouts import ImageTokens

from .evidence import evidence_wording, span_evidence
from .images import as_pil, font, png_data_uri
from .locations import describe_location, format_seconds
from .overlays import group_frame, step_overlay
from .path_plot import trajectory_plot
from .protocols import SpanLike, TraceLike
from .scores import UNCALIBRATED_NOTE, format_score, score_units, top_positive_regions
from .templating import macros, render

__all__ = ["render_html", "trace_table_html", "span_row_html", "table_html", "uncalibrated_banner_html",
           "save_overlays", "video_frames_strip"]


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


def video_frames_strip(video: Any, item: ImageTokens, *, height: int = 110) -> Image.Image:
    """The frames a video's filmstrip is drawn over (each frame group's first, :func:`group_frame`), colours
    untouched, side by side at ``height`` pixels, each under its seconds: the report's picture of an input video."""
    frames = [as_pil(group_frame(video, g, item.frames_per_group)) for g in range(item.num_frame_groups)]
    frames = [f.resize((max(1, round(f.width * height / f.height)), height), Image.BOX) for f in frames]
    gap, label = 6, 16
    strip = Image.new("RGB", (sum(f.width for f in frames) + gap * (len(frames) - 1), label + height), "white")
    draw, x = ImageDraw.Draw(strip), 0
    for group, frame in enumerate(frames):
        span = item.frame_group_span(group)
        draw.text((x + 2, 2), format_seconds(span) if span else f"group {group + 1}", fill=(40, 40, 40),
                  font=font(12))
        strip.paste(frame, (x, label))
        x += frame.width + gap
    return strip


def _originals(trace: TraceLike, imgs: Sequence[Any]) -> list[tuple[str, str]]:
    """(alt text, PNG data URI) of each input picture the report shows: an image as it is, a video as the
    strip of its frame groups' first frames (:func:`video_frames_strip`); size-only entries are left out."""
    items = [m.image for m in trace.regions.maps] if trace.regions is not None else [None] * len(imgs)
    mixed = any(item is not None and item.is_video for item in items)  # then images are counted apart
    out = []
    for i, (im, item) in enumerate(zip(imgs, items)):
        if im is None or isinstance(im, tuple):
            continue
        if item is not None and item.is_video:
            out.append((f"input video {item.kind_index + 1}", png_data_uri(video_frames_strip(im, item))))
        else:
            out.append((f"input image {(item.kind_index if mixed else i) + 1}", png_data_uri(as_pil(im))))
    return out


def render_html(trace: TraceLike, images: Sequence[Any] | None = None, path: str | Path | None = None, *,
                title: str = "hf_vattr report", question: str | None = None, top_k: int = 3) -> str:
    """A self-contained HTML page (images inlined): the prompt image(s), how to read the pictures,
    the step table (:func:`trace_table_html`) and the trajectory plot. ``images`` default to
    ``trace.images``."""
    imgs = _trace_images(trace, images) if trace.regions is not None else list(images or trace.images or [])
    originals = _originals(trace, imgs)
    calibrated = getattr(trace, "calibrated", True)
    has_video = trace.regions is not None and any(m.image.is_video for m in trace.regions.maps)
    page = render("report.html", title=title, question=question, originals=originals, has_video=has_video,
                  banner_html=Markup("" if calibrated else uncalibrated_banner_html()), units=score_units(trace),
                  table_html=Markup(trace_table_html(trace, imgs if trace.regions is not None else None, top_k=top_k)),
                  trajectory=png_data_uri(trajectory_plot(trace)) if trace.spans else None)
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
