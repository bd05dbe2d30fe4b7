"""Reading region-score vectors the same way in every view: units, number format, the top regions, the
running step's scores and each step's concentration.

The report, the notebook view, the web app and the demo's printout all call these, so a step's top regions
and numbers agree wherever they are shown. :func:`frame_group_scores` reads a score vector along a video's
time line (the web app's timeline).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from ..trajectory import concentration

__all__ = [
    "SCORE_UNITS",
    "UNCALIBRATED_UNITS",
    "UNCALIBRATED_NOTE",
    "score_units",
    "format_score",
    "scores_array",
    "ranked_regions",
    "top_positive_regions",
    "mean_scores",
    "step_concentrations",
    "GroupScore",
    "frame_group_scores",
]

SCORE_UNITS = "predicted log-prob drop (nats) if the region were removed"
#: Units of a trace scored without an estimator (``trace.calibrated`` is False): rankings, not nats.
UNCALIBRATED_UNITS = "uncalibrated score (raw value-norm attention, no estimator)"
#: The sentence shown with every table, report, summary and page of such a trace (docs/streaming.md).
UNCALIBRATED_NOTE = ("uncalibrated: raw value-norm attention (no estimator), a ranking of regions, not a predicted "
                     "drop in nats")


def score_units(trace: Any) -> str:
    """What a trace's scores are: :data:`SCORE_UNITS`, or :data:`UNCALIBRATED_UNITS` for a trace without estimator."""
    return SCORE_UNITS if getattr(trace, "calibrated", True) else UNCALIBRATED_UNITS


def format_score(v: float) -> str:
    """A score as a short label: 3 significant digits or so, scientific below 0.01."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.2f}"
    return f"{v:.1e}"


def scores_array(scores: Any, n: int) -> np.ndarray:
    """``scores`` as a float32 (n,) array; refused with the expected length otherwise."""
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float32).detach().cpu()).reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"Expected {n} region scores, got shape {tuple(s.shape)}.")
    return s


def ranked_regions(scores: Any, k: int) -> list[int]:
    """The ``k`` highest-scoring regions, best first; ties keep the lower region id first (a stable sort)."""
    s = _as_float64(scores)
    return [int(r) for r in np.argsort(-s, kind="stable")[:max(int(k), 0)]]


def top_positive_regions(scores: Any, k: int = 3) -> list[int]:
    """The ``k`` best regions that have a positive score (that support the step), best first.

    What every view outlines, names and lists as a step's top regions. ``scores`` is a score vector (ranked
    by :func:`ranked_regions`) or a span, anything with ``top_regions(k)`` and ``region_scores``: a span ranks
    itself, so a :class:`~hf_vattr.streaming.events.SpanAttribution` with non-finite scores is refused
    (``NonFiniteScoresError``) instead of naming arbitrary regions.
    """
    if hasattr(scores, "top_regions"):
        values = _as_float64(scores.region_scores)
        ranked = scores.top_regions(k)
    else:
        values = _as_float64(scores)
        ranked = ranked_regions(values, k)
    return [r for r in ranked if values[r] > 0]


def _as_float64(scores: Any) -> np.ndarray:
    """A flat float64 copy: exact for every float dtype (bfloat16 included), so ranking keeps the order."""
    return torch.as_tensor(scores).detach().cpu().double().numpy().reshape(-1)


def mean_scores(token_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of tokens' score vectors: a step's scores (the running step's, while it is written)."""
    return torch.stack(list(token_scores)).mean(0)


def step_concentrations(spans: Sequence[Any]) -> list[float]:
    """Each span's concentration (:func:`hf_vattr.trajectory.concentration`); ``nan`` where it has none (no
    positive score, or scores that are not finite)."""
    values = []
    for span in spans:
        try:
            values.append(concentration(np.asarray(span.region_scores, dtype=np.float64)))
        except ValueError:
            values.append(float("nan"))
    return values


class GroupScore(NamedTuple):
    """One frame group of a video and how much a score vector relies on it."""

    item: int  # index of the video among the prompt's items (images and videos, in prompt order)
    video: int  # index among the prompt's videos
    group: int  # frame group within the video
    start: float  # seconds the group covers, [start, end)
    end: float
    score: float  # the positive scores of the video's regions, each shared out by its tokens in this group


def frame_group_scores(regions: Any, scores: Any) -> list[GroupScore]:
    """Per frame group of every video of the prompt, the positive score that falls on it: which moments a step
    relies on.

    A region's positive score (negative ones support nothing, as in the pictures) is shared among the frame
    groups by the region's membership in each group's tokens (a grid cell lies in one group and gives it all;
    a region spanning three groups evenly gives each a third), so a video's group scores add up to the sum of
    its regions' positive scores. Images have no groups: an image-only prompt gives ``[]``.
    """
    s = scores_array(scores, regions.num_regions).astype(np.float64)
    out = []
    for item, (region_map, offset) in enumerate(zip(regions.maps, regions.region_offsets())):
        tokens = region_map.image
        if not tokens.is_video:
            continue
        positive = np.clip(s[offset:offset + region_map.num_regions], 0, None)
        membership = region_map.membership.detach().cpu().double().numpy()  # (tokens, K)
        per_group = membership.reshape(tokens.num_frame_groups, tokens.tokens_per_group, -1).sum(1)  # (t, K)
        share = per_group / np.maximum(per_group.sum(0, keepdims=True), 1e-12)
        for group, value in enumerate(share @ positive):
            start, end = tokens.frame_group_span(group)
            out.append(GroupScore(item, int(tokens.kind_index), group, start, end, float(value)))
    return out
