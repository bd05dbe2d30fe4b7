"""What a streamer yields: token and span attributions, and the trace that keeps them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .regions import PromptRegions

__all__ = ["TokenAttribution", "SpanAttribution", "AttributionTrace"]


@dataclass
class TokenAttribution:
    """One generated token and its region scores."""

    index: int  # position among this sequence's generated tokens
    token_id: int
    text: str  # decoded piece ("" for special tokens such as end-of-turn)
    region_scores: torch.Tensor  # (K,) float32 on CPU
    section: str  # "thinking" or "answer"
    features: torch.Tensor | None = None  # (L, H, K) when keep_features=True
    sequence: int = 0  # which sequence of the batch (row of generate's output)

    @property
    def token(self) -> str:
        return self.text

    def __iter__(self):  # allows `token, scores = event`
        yield self.text
        yield self.region_scores


@dataclass
class SpanAttribution:
    """One finished reasoning step (or answer span) and its region scores."""

    index: int  # span number within its sequence
    text: str
    token_range: tuple[int, int]  # [start, end) among the sequence's generated tokens
    region_scores: torch.Tensor  # (K,) float32 on CPU: mean of the tokens' scores
    section: str
    sequence: int = 0

    def top_regions(self, k: int = 3) -> list[int]:
        return torch.argsort(self.region_scores, descending=True, stable=True)[:k].tolist()

    def __iter__(self):
        yield self.text
        yield self.region_scores


@dataclass
class AttributionTrace:
    """Everything a streamer produced for one sequence: tokens, spans and the regions they refer to."""

    regions: PromptRegions | None  # None until generation starts with regions="prefill"
    tokens: list[TokenAttribution] = field(default_factory=list)
    spans: list[SpanAttribution] = field(default_factory=list)
    prompt_text: str = ""
    sequence: int = 0
    images: list | None = None  # the images the user passed for this sequence (PIL, arrays or (h, w)), if any

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def token_scores(self) -> torch.Tensor:
        """(T, K) token-by-region score matrix."""
        if not self.tokens:
            return torch.zeros(0, self.regions.num_regions if self.regions is not None else 0)
        return torch.stack([t.region_scores for t in self.tokens])

    def span_scores(self) -> torch.Tensor:
        """(S, K) span-by-region score matrix (a reasoning trajectory)."""
        if not self.spans:
            return torch.zeros(0, self.regions.num_regions if self.regions is not None else 0)
        return torch.stack([s.region_scores for s in self.spans])
