"""sdpa kernels that return the attention output *and* its log-sum-exp, each checked bitwise once.

On a decode step with transformers' sdpa, the kernel that ``F.scaled_dot_product_attention`` dispatches to
(``_scaled_dot_product_flash_attention_for_cpu`` on CPU; on CUDA the flash or memory-efficient kernel) is
called directly so it returns the log-sum-exp too; its output is checked bitwise against the model's own
attention on first use, per call signature (:func:`_verify_kernel`). A kernel that differs, or refuses the
call, is never tried again for that signature; the full-row route serves that step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.utils import logging

from .pooling import _additive

logger = logging.get_logger(__name__)

_VERIFIED: set[tuple] = set()  # (call signature, kernel) whose LSE-route output equals the model's own, bitwise
_REJECTED: set[tuple] = set()  # (call signature, kernel) that differ or refuse the call: never tried again


def _call_signature(module, query, key, attention_mask) -> tuple:
    """What decides which kernel ``F.scaled_dot_product_attention`` picks for a decode step."""
    return (query.device.type, query.dtype, tuple(query.shape), tuple(key.shape[:2]), key.shape[-1],
            getattr(module, "num_key_value_groups", 1),
            None if attention_mask is None else (attention_mask.dtype, tuple(attention_mask.shape[:3])))



def _lse_kernels(q, key, value, mask, scaling, gqa: bool, groups: int) -> list[tuple[str, Callable]]:
    """Kernels that return the attention output *and* its log-sum-exp, in the order sdpa prefers them.

    Each returns ``(output, lse)`` for the layout transformers passed (``q`` possibly packed). Which one
    reproduces the model's own sdpa bitwise is checked on first use (:func:`_verify_kernel`), so a kernel that
    sdpa would not have picked is never used.
    """
    aten = torch.ops.aten
    if q.device.type == "cpu":
        return [("cpu-flash", lambda: aten._scaled_dot_product_flash_attention_for_cpu(
            q, key, value, attn_mask=_additive(mask, q.dtype), scale=scaling))]
    if q.device.type != "cuda":
        return []
    kernels = []
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        kernels.append(("cuda-flash", lambda: aten._scaled_dot_product_flash_attention(
            q, key, value, scale=scaling)[:2]))
    rep = groups if gqa else 1  # sdpa repeats keys for the memory-efficient kernel under enable_gqa

    def efficient():
        k, v = (key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)) if rep > 1 else (key, value)
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, _additive(mask, q.dtype), True,
                                                                scale=scaling)[:2]
        return out, lse[..., : q.shape[2]]

    kernels.append(("cuda-efficient", efficient))
    return kernels


def _sdpa_decode_with_lse(module, query, key, value, attention_mask, scaling, kwargs
                          ) -> tuple[Any, torch.Tensor, str, tuple] | None:
    """transformers' sdpa for a single-query step, through a kernel that also returns the LSE.

    Mirrors ``sdpa_attention_forward``'s decode layout (GQA handled natively without a mask, packed
    queries with one) using transformers' own helpers; the caller checks the output bitwise against
    the original once per call signature. Returns None where no such kernel applies.
    """
    from transformers.integrations import sdpa_attention as tsdpa

    if (query.shape[2] != 1 or kwargs.get("dropout", 0.0) or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or query.shape[-1] != value.shape[-1]):
        return None
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, query.dtype):
        return None
    q, mask = query, attention_mask
    groups = getattr(module, "num_key_value_groups", 1)
    gqa = groups > 1 and tsdpa.use_gqa_in_sdpa(mask, key, value)
    if groups > 1 and not gqa:
        q, mask = tsdpa.pack_gqa(q, groups), tsdpa.pack_gqa(mask, groups)
    signature = _call_signature(module, query, key, attention_mask)
    for name, kernel in _lse_kernels(q, key, value, mask, scaling, gqa, groups):
        if (signature, name) in _REJECTED:
            continue
        try:
            out, lse = kernel()
        except RuntimeError:  # this kernel does not take these shapes or dtypes here
            _REJECTED.add((signature, name))
            continue
        out = out.reshape(out.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous()
        return (out, None), lse.reshape(query.shape[0], query.shape[1]), name, signature
    return None



def _verify_kernel(output, kernel: str, signature: tuple, reference: Callable[[], Any]) -> bool:
    """Check an LSE kernel bitwise against the model's own attention, once per process and call signature.

    A kernel that differs is never used again for that signature (the next one is tried at the next
    step); this step's features then come from the full-row route.
    """
    if (signature, kernel) in _VERIFIED:
        return True
    if torch.equal(reference()[0], output[0]):
        _VERIFIED.add((signature, kernel))
        return True
    _REJECTED.add((signature, kernel))
    logger.warning(f"hf_vattr: the '{kernel}' log-sum-exp kernel does not reproduce this model's sdpa output "
                   "bitwise; not using it (the full-row route serves this step).")
    return False
