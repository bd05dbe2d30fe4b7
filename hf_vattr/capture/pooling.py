"""The predicting query's attention on the visual keys, pooled to regions: pure tensor functions.

Three routes give the same (H, K) block per sequence and layer: from the attention kernel's log-sum-exp
(:func:`visual_row_features_from_lse`, constant cost per decode step), from probabilities an attention
function returned (:func:`_features_from_weights`, eager), and the full-row reference that recomputes the
softmax over every key (:func:`attention_row_features`). ``feature_kind="value_norm"`` multiplies each
visual token's weight by a per-head factor before pooling (:mod:`.value_norms`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import AttributionError

__all__ = ["FEATURE_KINDS", "CaptureError", "attention_row_features", "visual_row_features_from_lse"]

FEATURE_KINDS = ("attention", "value_norm")
_KEY_BLOCK = 4096  # keys per block on the full-row route: bounds the float32 temporary


class CaptureError(AttributionError, RuntimeError):
    """Attention capture was used in a way it cannot serve."""


def attention_row_features(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    visual_positions: torch.Tensor,
    pooling_matrix: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    query_rows: slice | None = None,
    visual_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Region-pooled attention of selected query rows on the visual tokens (the full-row reference).

    Args:
        query: (1, H, Tq, D) post-RoPE queries of one layer.
        key: (1, Hkv, Tk, D) keys including the cache (grouped-query attention allowed).
        scaling: the layer's softmax scale.
        visual_positions: (Nv,) key positions of the visual tokens.
        pooling_matrix: (Nv, K) token -> region weights (membership, or membership / region size for mean).
        attention_mask: optional additive float or boolean (True = attend) mask of shape (1, 1|H, Tq, Tk).
        query_rows: which query rows to use; default only the last one (the query predicting the next token).
        visual_weights: optional (H, Nv) per-head weight of each visual token (``feature_kind="value_norm"``).

    Returns:
        (Tq', H, K) float32 features, one (H, K) block per selected query row.
    """
    rows = slice(-1, None) if query_rows is None else query_rows
    q = query[0, :, rows].float()  # (H, Tq', D)
    num_heads, num_q, dim = q.shape
    num_kv = key.shape[1]
    if num_heads % num_kv:
        raise CaptureError(f"{num_heads} query heads are not a multiple of {num_kv} key/value heads.")
    groups = num_heads // num_kv
    q = q.reshape(num_kv, groups * num_q, dim)
    # Key blocks: the float32 copy of the cache never exceeds one block (bfloat16 caches stay as they are).
    blocks = [torch.matmul(q, key[0, :, start:start + _KEY_BLOCK].float().transpose(1, 2))
              for start in range(0, key.shape[2], _KEY_BLOCK)]
    scores = torch.cat(blocks, dim=-1).mul_(scaling).reshape(num_heads, num_q, -1)  # (H, Tq', Tk)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[0, :, rows, : scores.shape[-1]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    visual = probs.index_select(-1, visual_positions)  # (H, Tq', Nv)
    if visual_weights is not None:
        visual = visual * visual_weights[:, None, :]
    pooled = torch.matmul(visual, pooling_matrix)  # (H, Tq', K)
    return pooled.transpose(0, 1)


def _visual_keys(key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, Nv, D) keys of the visual tokens: a copy of Nv rows, never of the cache."""
    if positions.shape[0] == 1 and key.shape[0] == 1:
        return key.index_select(2, positions[0])
    index = positions[:, None, :, None].expand(key.shape[0], key.shape[1], positions.shape[1], key.shape[3])
    return key.gather(2, index)


def _visual_mask(attention_mask: torch.Tensor | None, positions: torch.Tensor, num_keys: int) -> torch.Tensor | None:
    """Additive float32 mask (B, 1|H, Nv) of the last query row at the visual positions, or None."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    last = attention_mask[:, :, -1, :num_keys]  # (B|1, 1|H, Tk)
    index = positions[:, None, :].expand(max(last.shape[0], positions.shape[0]), last.shape[1], positions.shape[1])
    picked = last.expand(index.shape[0], -1, -1).gather(-1, index)
    return _additive(picked, torch.float32).float()


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean (True = attend) mask as the additive mask sdpa builds from it; float masks as they are."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def visual_row_features_from_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    logsumexp: torch.Tensor,
    scaling: float,
    positions: torch.Tensor,
    pooling: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    visual_keys: torch.Tensor | None = None,
    visual_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Region-pooled attention of the last query row, from the kernel's log-sum-exp.

    ``a_i = exp(scale * q . k_i + mask_i - lse)`` for the visual keys only: constant cost in the trace length.

    Args:
        query: (B, H, Tq, D) post-RoPE queries; the last row is used.
        key: (B, Hkv, Tk, D) keys including the cache.
        logsumexp: (B, H) log-sum-exp of the last row's scaled, masked scores over all keys.
        positions: (B, Nv) visual key positions per sequence (padded entries point at any valid key).
        pooling: (B, Nv, K) token -> region weights (zero rows for padded entries).
        visual_keys: optional (B, Hkv, Nv, D) float32 keys at ``positions``, kept from an earlier step.
        visual_weights: optional (B, H, Nv) per-head weight of each visual token (``feature_kind="value_norm"``).

    Returns:
        (B, H, K) float32 features.
    """
    if visual_keys is None:
        visual_keys = _visual_keys(key, positions).float()
    keys_t = _scaled_keys_t(visual_keys, scaling)
    return _features_from_lse(query, logsumexp, keys_t, pooling,
                              _visual_mask(attention_mask, positions, key.shape[2]), visual_weights)


def _scaled_keys_t(visual_keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B * Hkv, D, Nv) float32: the visual keys times the softmax scale, laid out for one batched product."""
    batch, num_kv, num_visual, dim = visual_keys.shape
    return (visual_keys.float() * scaling).reshape(batch * num_kv, num_visual, dim).transpose(1, 2).contiguous()


class RegionIndex(NamedTuple):
    """Pooling where every visual token lies in at most one region: (B, Nv) region of each token, and its weight
    (1 for sum pooling, 1 / region size for mean, 0 for a batch's padding entries)."""

    region: torch.Tensor
    weight: torch.Tensor
    num_regions: int


def region_index(pooling: torch.Tensor) -> RegionIndex | None:
    """The :class:`RegionIndex` form of a (B, Nv, K) pooling table, or None if a token lies in several regions.

    Why: regions partition the visual tokens, so pooling is a sum per region. Done as a scatter it reads Nv
    numbers per head, where the dense product reads the whole (Nv, K) table: on a 2048-token video with 128
    regions that table is as large as the product over the visual keys itself.
    """
    nonzero = pooling.ne(0)
    if bool((nonzero.sum(-1) > 1).any()):
        return None
    region = nonzero.to(torch.uint8).argmax(-1)  # a token outside every region (padding): region 0, weight 0
    return RegionIndex(region, pooling.gather(-1, region[..., None])[..., 0], int(pooling.shape[-1]))


def _pool(probs: torch.Tensor, pooling: torch.Tensor | RegionIndex) -> torch.Tensor:
    """(B, H, K) region sums of (B, H, Nv) per-token values, by a dense table or a :class:`RegionIndex`
    (which scales ``probs`` in place: the caller's temporary)."""
    if not isinstance(pooling, RegionIndex):
        return torch.matmul(probs, pooling)
    batch, heads, num_visual = probs.shape
    out = probs.new_zeros(batch, heads, pooling.num_regions)
    region = pooling.region[:, None, :].expand(batch, heads, num_visual)
    return out.scatter_add_(-1, region, probs.mul_(pooling.weight[:, None, :]))


def _features_from_lse(query, logsumexp, keys_t, pooling, visual_mask=None, visual_weights=None) -> torch.Tensor:
    """(B, H, K): four small kernels per layer and step (cast, fused product, exp, pooling).

    ``pooling``: a (B, Nv, K) table or its :class:`RegionIndex` form (the same sums, without the table product).
    """
    batch, num_heads, _, dim = query.shape
    groups = num_heads // (keys_t.shape[0] // batch)
    q = query[:, :, -1].float().reshape(keys_t.shape[0], groups, dim)
    # One fused op, beta=-1: scale * q . k - lse over the visual keys, per (sequence, KV head, query head of the group).
    scores = torch.baddbmm(logsumexp.reshape(keys_t.shape[0], groups, 1), q, keys_t, beta=-1)
    scores = scores.reshape(batch, num_heads, keys_t.shape[-1])
    if visual_mask is not None:
        scores = scores + visual_mask
    probs = scores.exp_()
    if visual_weights is not None:
        probs = probs.mul_(visual_weights)
    return _pool(probs, pooling)


def _last_row_features(query, key, scaling, positions, pooling, attention_mask, weights=None) -> torch.Tensor:
    """(B, H, K): the full-row route, one sequence at a time."""
    out = []
    for b in range(query.shape[0]):
        mask = None if attention_mask is None or attention_mask.dim() != 4 else attention_mask[b % attention_mask.shape[0]][None]
        out.append(attention_row_features(query[b:b + 1], key[b:b + 1], scaling, positions[b], pooling[b], mask,
                                          visual_weights=None if weights is None else weights[b])[0])
    return torch.stack(out)


def _features_from_weights(probabilities: torch.Tensor, positions: torch.Tensor, pooling: torch.Tensor,
                           visual_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, K) from the (B, H, Tq, Tk) probabilities an attention function returned (eager): read, for free."""
    last = probabilities[:, :, -1].float()  # (B, H, Tk)
    index = positions[:, None, :].expand(last.shape[0], last.shape[1], -1)
    visual = last.gather(-1, index)
    return torch.matmul(visual if visual_weights is None else visual * visual_weights, pooling)
