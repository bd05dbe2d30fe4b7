"""How many regions (K) an image gets.

Why a policy and not a constant: attribution over K regions is only readable
when a region is a few tokens wide, and the number of visual tokens per image
varies by two orders of magnitude across models and image sizes (a 224 px
thumbnail has 64 tokens, a 1000 px photo about 1000). The paper uses K in
[16, 128]; we scale K with the token count inside that range, and never ask
for more regions than there are visual tokens (a region must own a token).
A video's K counts all its tokens (its regions may span frame groups); a grid
resolves K per frame group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = ["KPolicy", "DEFAULT_K_POLICY", "resolve_k", "resolve_ks"]


@dataclass(frozen=True)
class KPolicy:
    """K = clip(round(num_tokens / tokens_per_region), min_k, max_k), capped at num_tokens.

    The default (12 tokens per region, K in [16, 128]) gives 16 regions for a
    224 px image, about 60-80 for a 1000 x 750 photo and 128 from about 1,500
    tokens on.
    """

    min_k: int = 16
    max_k: int = 128
    tokens_per_region: float = 12.0

    def __post_init__(self) -> None:
        if self.min_k < 1 or self.max_k < self.min_k:
            raise ValueError(f"KPolicy needs 1 <= min_k <= max_k, got min_k={self.min_k}, max_k={self.max_k}.")
        if self.tokens_per_region <= 0:
            raise ValueError(f"tokens_per_region must be > 0, got {self.tokens_per_region}.")

    def __call__(self, num_tokens: int) -> int:
        k = int(round(num_tokens / self.tokens_per_region))
        return max(1, min(max(self.min_k, min(self.max_k, k)), int(num_tokens)))

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_K_POLICY = KPolicy()


def resolve_k(k: int | None, num_tokens: int, policy: KPolicy | None = None) -> tuple[int, dict]:
    """The K to build for an image with ``num_tokens`` tokens, and what to report about it.

    An explicit ``k`` is honoured up to the token count; the returned info says
    when it was capped (``requested_k`` > ``k``) so the caller can tell the user.
    """
    if num_tokens < 1:
        raise ValueError("An image needs at least one visual token to have regions.")
    if k is None:
        used = (policy or DEFAULT_K_POLICY)(num_tokens)
        return used, {"k": used, "k_source": "policy"}
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    used = min(k, int(num_tokens))
    info: dict = {"k": used, "k_source": "explicit"}
    if used < k:
        info["requested_k"] = k
        info["k_capped_by_tokens"] = True
    return used, info


def resolve_ks(ks: Sequence[int | None], num_tokens: int, policy: KPolicy | None = None) -> list[tuple[int, dict]]:
    """:func:`resolve_k` for several requested K at once (one tree serves them all)."""
    return [resolve_k(k, num_tokens, policy) for k in ks]
