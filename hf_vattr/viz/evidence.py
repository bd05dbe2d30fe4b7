"""How much a step's heatmap can be trusted as visual evidence, and how each view says so.

One rule (:func:`span_evidence`) and one set of words per label (:func:`evidence_wording`): the overlay's
caption, the report's badge and tooltip, the web app's step list and the demo's printout all read them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .protocols import SpanLike, TraceLike

__all__ = ["EVIDENCE_LEVELS", "WEAK_FRACTION", "MUTED_EVIDENCE", "EvidenceWording", "evidence_wording",
           "span_evidence"]

EVIDENCE_LEVELS = ("grounded", "weak", "indirect", "inherited")
#: Labels whose heatmaps are drawn muted (hatched, faint): they must not be read as grounding.
MUTED_EVIDENCE = ("weak", "indirect")
#: A thinking step is "weak" when its largest predicted region effect is below this fraction of the
#: median largest effect of the trace's thinking steps (or is not positive at all).
WEAK_FRACTION = 0.25


class EvidenceWording(NamedTuple):
    """The words for one evidence label, from shortest to longest."""

    badge: str  # the report's label: "grounded", "weak evidence", "indirect", "inherited"
    caption: str  # "<label> evidence": a muted picture's caption, the demo's note
    aside: str  # what the web app's step list appends ("" for grounded)
    explanation: str  # why: the report's tooltip


_WORDING = {
    "grounded": EvidenceWording(
        "grounded", "grounded evidence", "",
        "predicted effects are large for this trace; the outlined regions are what the step relies on"),
    "weak": EvidenceWording(
        "weak evidence", "weak evidence", " (weak evidence)",
        "largest predicted effect is small compared with this trace's other steps; little visual evidence"),
    "indirect": EvidenceWording(
        "indirect", "indirect evidence", " (indirect: follows from the thinking text)",
        "answer span: it follows from the thinking text, and this estimator scores it by its own attention "
        "only, which does not predict its effects (see docs/faithfulness.md)"),
    "inherited": EvidenceWording(
        "inherited", "inherited evidence", " (inherited from the thinking steps)",
        "answer span: its scores inherit the thinking steps' (the image reaches the answer through the "
        "reasoning); they predict the answer's total effect (see docs/faithfulness.md)"),
}


def evidence_wording(evidence: str) -> EvidenceWording:
    """The words every view uses for an evidence label (one of :data:`EVIDENCE_LEVELS`)."""
    if evidence not in _WORDING:
        raise ValueError(f"evidence must be one of {EVIDENCE_LEVELS}, got {evidence!r}.")
    return _WORDING[evidence]


def span_evidence(span: SpanLike, trace: TraceLike) -> str:
    """How much a span's region scores can be trusted as visual evidence: grounded, weak, inherited or indirect.

    Rule (simple on purpose, so a reader can check it):

    * ``"inherited"``: answer spans whose scores include the thinking steps' (``span.inherited``:
      an estimator fit with inheritance). The image reaches the answer through the reasoning; the
      scores predict the answer's total effect, i.e. with the reasoning regenerated (docs/faithfulness.md).
    * ``"indirect"``: other answer spans. The answer follows from the thinking text, so an
      estimator without inheritance sees only the answer's own attention, which does not predict
      its effects (on the toy task Pearson 0.005 teacher-forced, below 0 against total effects).
      Its heatmap must not be read as grounding.
    * ``"weak"``: a thinking step whose largest predicted effect is not positive, or is below
      ``WEAK_FRACTION`` (0.25) of the median largest effect over the trace's thinking steps.
    * ``"grounded"``: every other thinking step.
    """
    if span.section == "answer":
        return "inherited" if getattr(span, "inherited", False) else "indirect"
    peak = float(torch.as_tensor(span.region_scores).max()) if torch.as_tensor(span.region_scores).numel() else 0.0
    if not peak > 0:
        return "weak"
    peaks = [float(s.region_scores.max()) for s in trace.spans
             if s.section != "answer" and s.sequence == span.sequence and s.region_scores.numel()]
    if peaks:
        ref = float(np.median(peaks))
        if ref > 0 and peak < WEAK_FRACTION * ref:
            return "weak"
    return "grounded"
