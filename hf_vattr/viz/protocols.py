"""What the pictures need of a span and of a trace.

:class:`hf_vattr.streaming.events.SpanAttribution` and :class:`~hf_vattr.streaming.events.AttributionTrace`
have it. viz does not import events (events' display methods import viz), so it reads them through these
protocols; the web app's partial trace view passes as a trace too.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..regions import PromptRegions

__all__ = ["SpanLike", "TraceLike"]


class SpanLike(Protocol):
    """One finished step: its number, text, section, sequence and region scores."""

    index: int
    text: str
    section: str
    sequence: int
    region_scores: torch.Tensor

    def top_regions(self, k: int = 3) -> list[int]: ...


class TraceLike(Protocol):
    """A trace: the regions its scores refer to, its finished steps and the prompt's images."""

    regions: PromptRegions | None
    spans: Sequence[SpanLike]
    images: list | None
