"""The one rendering path of the report, the notebook and the app: step overlays with a colour scale, region
locations in words, evidence labels, the trajectory plot and the HTML report.

One job per module: :mod:`.scores` (units, number format, top regions, step means), :mod:`.colours` (the
ramp, rank colours, the colour bar), :mod:`.locations` (regions in words; a video's also in seconds),
:mod:`.evidence` (how far a step's heatmap is evidence, and its wording), :mod:`.overlays` (the step picture;
a video's filmstrip), :mod:`.path_plot` (the trajectory plot), :mod:`.report` (the step table, the HTML
report, PNGs per step), with :mod:`.images`,
:mod:`.identity`, :mod:`.protocols` and :mod:`.templating` underneath. The names below are the public ones.
"""

from .colours import RANK_COLOURS, colour_bar, colormap, rank_colour, rank_colour_hex, scale_ticks
from .evidence import EVIDENCE_LEVELS, WEAK_FRACTION, EvidenceWording, evidence_wording, span_evidence
from .images import as_pil, png_data_uri
from .locations import describe_location, describe_regions, format_seconds
from .overlays import OverlayRenderer, clear_cache, group_frame, overlay, overlay_renderer, span_overlays, step_overlay
from .path_plot import trajectory_plot
from .protocols import SpanLike, TraceLike
from .report import (
    render_html,
    save_overlays,
    span_row_html,
    table_html,
    trace_table_html,
    uncalibrated_banner_html,
    video_frames_strip,
)
from .scores import (
    SCORE_UNITS,
    UNCALIBRATED_NOTE,
    UNCALIBRATED_UNITS,
    GroupScore,
    format_score,
    frame_group_scores,
    mean_scores,
    ranked_regions,
    score_units,
    step_concentrations,
    top_positive_regions,
)

__all__ = [
    "describe_location",
    "describe_regions",
    "step_overlay",
    "OverlayRenderer",
    "overlay_renderer",
    "clear_cache",
    "overlay",
    "span_overlays",
    "span_evidence",
    "evidence_wording",
    "EvidenceWording",
    "EVIDENCE_LEVELS",
    "WEAK_FRACTION",
    "trajectory_plot",
    "colour_bar",
    "colormap",
    "scale_ticks",
    "RANK_COLOURS",
    "rank_colour",
    "rank_colour_hex",
    "render_html",
    "trace_table_html",
    "span_row_html",
    "table_html",
    "uncalibrated_banner_html",
    "save_overlays",
    "as_pil",
    "png_data_uri",
    "SCORE_UNITS",
    "UNCALIBRATED_UNITS",
    "UNCALIBRATED_NOTE",
    "score_units",
    "format_score",
    "ranked_regions",
    "top_positive_regions",
    "mean_scores",
    "step_concentrations",
    "GroupScore",
    "frame_group_scores",
    "format_seconds",
    "group_frame",
    "video_frames_strip",
    "SpanLike",
    "TraceLike",
]
