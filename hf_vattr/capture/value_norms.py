"""Value norms ``||W_O^h v_j^h||``: how far a unit of head h's attention on visual token j can move the
residual stream, through the layer's output projection (``feature_kind="value_norm"``).

Computed once per prompt and layer from the prefill's values; a plain ``nn.Linear`` is read through its
Gram matrix, any other layer (quantized, offloaded) through its own forward.
"""

from __future__ import annotations

from typing import Any

import torch

from .pooling import _visual_keys

__all__ = ["value_norm_weights", "value_norm_weights_from_module", "output_norms", "plain_projection_weight"]


def value_norm_weights(value: torch.Tensor, positions: torch.Tensor, output_weight: torch.Tensor,
                       num_heads: int) -> torch.Tensor:
    """``||W_O^h v_j^h||`` for every head h and visual token j: (B, H, Nv) float32.

    How much a unit of head h's attention on token j can move the residual stream (the norm of
    that token's contribution through the output projection). Values of prompt tokens never change
    once the prefill ran, so this is computed once per layer; attention times this norm then costs
    one elementwise product per decode step.

    Args:
        value: (B, Hkv, T, D) value states of one layer (the model's own, as its attention received them).
        positions: (B, Nv) visual positions.
        output_weight: (hidden, H * D) weight of the layer's output projection.
    """
    batch, num_kv, _, dim = value.shape
    visual_values = _visual_keys(value, positions).float()  # (B, Hkv, Nv, D)
    per_head = output_weight.float().reshape(-1, num_heads, dim).permute(1, 2, 0)  # (H, D, hidden)
    gram = torch.matmul(per_head, per_head.transpose(1, 2))  # (H, D, D): ||W v||^2 = v^T (W^T W) v
    values = visual_values.repeat_interleave(num_heads // num_kv, dim=1)  # (B, H, Nv, D)
    squared = (torch.matmul(values, gram) * values).sum(-1)
    return squared.clamp_min(0).sqrt()


_PROBE_ELEMENTS = 1 << 24  # rows x (input + output width) per call of the projection on its probe route


def plain_projection_weight(projection: Any) -> torch.Tensor | None:
    """The weight of a plain, materialised ``nn.Linear`` output projection, or None for anything else.

    Anything else (a bitsandbytes 8-bit or 4-bit layer, another quantized layer, a subclass, a layer
    whose weight accelerate keeps offloaded on ``meta`` outside its forward) is served through the
    layer's own forward by :func:`value_norm_weights_from_module`, which needs no knowledge of its format.
    """
    if type(projection) is not torch.nn.Linear or hasattr(projection, "_hf_hook"):
        return None
    weight = projection.weight
    if (not isinstance(weight, torch.Tensor) or type(weight.data) is not torch.Tensor
            or not weight.is_floating_point() or weight.device.type == "meta"):
        return None
    return weight


def value_norm_weights_from_module(value: torch.Tensor, positions: torch.Tensor, projection: Any,
                                   num_heads: int) -> torch.Tensor:
    """``||W_O^h v_j^h||`` through the output projection's own forward: (B, H, Nv) float32.

    Each visual token's value is fed in its head's slice with zeros elsewhere, so the layer returns that
    head's contribution ``W_O^h v_j`` (plus its bias, the output at zero input, which is subtracted),
    whatever the layer stores: int8 weights with separate scales, packed 4-bit blocks, weights that
    accelerate loads from CPU or disk only inside the forward. Rows are batched in blocks that bound
    memory. Costs ``H`` rows per visual token and layer, once per prompt; nothing per decode step.

    Args:
        value: (B, Hkv, T, D) value states of one layer (fed to the layer in their own dtype and device).
        positions: (B, Nv) visual positions.
        projection: the layer's output projection module (heads -> hidden), called as ``projection(x)``.
    """
    batch, num_kv, _, dim = value.shape
    visual = _visual_keys(value, positions)  # (B, Hkv, Nv, D), the model's dtype
    values = visual.repeat_interleave(num_heads // num_kv, dim=1)  # (B, H, Nv, D)
    num_visual = values.shape[2]
    width = num_heads * dim
    # Row (b, h, j) holds v_j^h in columns [h * D, (h + 1) * D): ordered (B, Nv, H) so each block is contiguous.
    flat = values.permute(0, 2, 1, 3).reshape(-1, num_heads, dim)  # (B * Nv, H, D)
    heads = torch.arange(num_heads, device=value.device)
    with torch.no_grad():
        zero = projection(torch.zeros(1, width, dtype=value.dtype, device=value.device)).float()  # the bias, or 0
        hidden = zero.shape[-1]
        tokens_per_block = max(1, _PROBE_ELEMENTS // (num_heads * (width + hidden)))
        norms = []
        for start in range(0, flat.shape[0], tokens_per_block):
            block = flat[start:start + tokens_per_block]  # (n, H, D)
            rows = torch.zeros(block.shape[0], num_heads, num_heads, dim, dtype=value.dtype, device=value.device)
            rows[:, heads, heads] = block  # (n, H, H, D): head h's value in slice h, zeros elsewhere
            out = projection(rows.reshape(-1, width)).float() - zero  # (n * H, hidden)
            norms.append(out.norm(dim=-1).reshape(-1, num_heads))
    result = torch.cat(norms).reshape(batch, num_visual, num_heads).transpose(1, 2)
    return result.to(value.device).contiguous()


def output_norms(value: torch.Tensor, positions: torch.Tensor, projection: Any, num_heads: int) -> torch.Tensor:
    """(B, H, Nv) value norms for any output projection: the Gram route for a plain ``nn.Linear`` (its features
    are the ones the shipped estimators were fit on), the layer's own forward for anything else."""
    weight = plain_projection_weight(projection)
    if weight is not None:
        return value_norm_weights(value, positions, weight, num_heads)
    return value_norm_weights_from_module(value, positions, projection, num_heads)

