"""Attention capture through transformers' ``AttentionInterface``, keeping the model's own attention.

Why this design: forcing ``attn_implementation="eager"`` or ``output_attentions=True`` costs
O(T^2 L H) memory and changes numerics. Every attention call in transformers 5 goes through
the implementation named by its config (``config._attn_implementation``) and receives post-RoPE
queries and the cached keys. For each implementation a model uses ("sdpa", "eager", a flash
kernel, ...) a capturing twin is registered once through the documented extension points,
``AttentionInterface.register`` (with the same mask function through
``AttentionMaskInterface.register``); while a capture is active only *that model's text decoder*
is switched to the twin, and switched back when it ends. The twin calls the original function and,
for the forwards of the thread that started the capture, records the *one* attention row we need
(the query that predicts the next token), restricted to the visual tokens and pooled to regions.

Constant cost per decode step: the softmax normaliser of that row (its log-sum-exp) is
computed by the attention kernel anyway, so the row on the visual keys is
``exp(scale * q . K_visual - lse)``: one product over the *visual* keys only, whatever the
trace length, and the KV cache is never copied. Which route serves a capture is its
``path`` attribute (logged once):

* ``"lse"``: transformers' sdpa on decode steps. The kernel that ``F.scaled_dot_product_attention``
  dispatches to (``_scaled_dot_product_flash_attention_for_cpu`` on CPU; on CUDA the flash or
  memory-efficient kernel) is called directly so it returns the log-sum-exp too; its output is
  checked bitwise against the model's own attention on first use, per call signature.
* ``"weights"``: the attention function already returns its weights (eager): they are read, for free.
* ``"full-row"``: any other kernel (flash-attn, flex, an sdpa kernel that is not reproduced): the row is recomputed over all
  keys, in blocks so that memory stays bounded; the cost then grows with the trace.

Prefill steps (many queries) always take the full-row route once.

Isolation: captures are keyed by attention *module object* and by thread, so other models, and
other threads running the same model, pass through the original attention untouched and are never
recorded. One capture per model at a time; a second is a clear :class:`CaptureError`. Restoration:
the model's text config gets its own implementation back when the capture stops, also when
generation raises; the vision tower and every other model are never switched.
"""

from __future__ import annotations

import sys
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from transformers.utils import logging

from ..errors import AttributionError
from ..layouts import _get_path, architecture_spec, attention_modules, output_projection, text_dims

logger = logging.get_logger(__name__)

__all__ = [
    "AttentionCapture",
    "attention_row_features",
    "visual_row_features_from_lse",
    "value_norm_weights",
    "value_norm_weights_from_module",
    "output_norms",
    "FEATURE_KINDS",
    "attention_intervention",
    "CaptureError",
    "capture_active",
    "own_implementation",
]

FEATURE_KINDS = ("attention", "value_norm")
_KEY_BLOCK = 4096  # keys per block on the full-row route: bounds the float32 temporary


class CaptureError(AttributionError, RuntimeError):
    """Attention capture was used in a way it cannot serve."""


# ----------------------------------------------------------------------------- pure computation


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


def _features_from_lse(query, logsumexp, keys_t, pooling, visual_mask=None, visual_weights=None) -> torch.Tensor:
    """(B, H, K): four small kernels per layer and step (cast, fused product, exp, pooling)."""
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
    return torch.matmul(probs, pooling)


def _last_row_features(query, key, scaling, positions, pooling, attention_mask, weights=None) -> torch.Tensor:
    """(B, H, K): the full-row route, one sequence at a time."""
    out = []
    for b in range(query.shape[0]):
        mask = None if attention_mask is None or attention_mask.dim() != 4 else attention_mask[b % attention_mask.shape[0]][None]
        out.append(attention_row_features(query[b:b + 1], key[b:b + 1], scaling, positions[b], pooling[b], mask,
                                          visual_weights=None if weights is None else weights[b])[0])
    return torch.stack(out)


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


# ----------------------------------------------------------------------------- kernels with log-sum-exp


def _is_transformers_sdpa(function: Callable) -> bool:
    from transformers.integrations import sdpa_attention

    return function is sdpa_attention.sdpa_attention_forward


def _call_signature(module, query, key, attention_mask) -> tuple:
    """What decides which kernel ``F.scaled_dot_product_attention`` picks for a decode step."""
    return (query.device.type, query.dtype, tuple(query.shape), tuple(key.shape[:2]), key.shape[-1],
            getattr(module, "num_key_value_groups", 1),
            None if attention_mask is None else (attention_mask.dtype, tuple(attention_mask.shape[:3])))


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean (True = attend) mask as the additive mask sdpa builds from it; float masks as they are."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _lse_kernels(q, key, value, mask, scaling, gqa: bool, groups: int) -> list[tuple[str, Callable]]:
    """Kernels that return the attention output *and* its log-sum-exp, in the order sdpa prefers them.

    Each returns ``(output, lse)`` for the layout transformers passed (``q`` possibly packed). Which one
    reproduces the model's own sdpa bitwise is checked on first use (``_verify``), so a kernel that
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


# ----------------------------------------------------------------------------- dispatch, scoped to one model

# Registered once per wrapped implementation through transformers' documented extension points
# (``AttentionInterface.register`` and ``AttentionMaskInterface.register``); a model's text decoder is
# switched to it only while a capture or intervention is active on that model, and switched back after.
_IMPLEMENTATION_PREFIX = "hf_vattr_"
_LOCK = threading.RLock()
_REGISTERED: set[str] = set()
_SWITCHED: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()  # model -> [config, original, users]
_ACTIVE: dict[Any, "AttentionCapture"] = {}  # attention module -> capture (any thread): one capture per model
_INTERVENED: dict[Any, int] = {}  # attention module -> thread holding an intervention on it
_THREAD = threading.local()  # .captures / .interventions: attention module -> capture / mask rewrite, this thread only
_VERIFIED: set[tuple] = set()  # (call signature, kernel) whose LSE-route output equals the model's own, bitwise
_REJECTED: set[tuple] = set()  # (call signature, kernel) that differ or refuse the call: never tried again


def _thread_scope(name: str) -> dict:
    scope = getattr(_THREAD, name, None)
    if scope is None:
        scope = {}
        setattr(_THREAD, name, scope)
    return scope


def _eager_attention(module: Any) -> Callable:
    """The eager function of a module's own modeling file (what transformers calls for "eager")."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise CaptureError(f"{type(module).__name__} has no eager_attention_forward in its modeling file; load the "
                           'model with attn_implementation="sdpa" to attribute it.')
    return eager


def _capturing_implementation(implementation: str) -> Callable:
    """The attention function registered for one original implementation: records for this thread's captures,
    rewrites masks for this thread's interventions, and otherwise is exactly the original call."""
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # Resolved once: what the model itself would call for this implementation (eager: per modeling file).
    registered = (ALL_ATTENTION_FUNCTIONS[implementation]
                  if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS else None)

    def capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
        original = registered if registered is not None else _eager_attention(module)
        interventions = getattr(_THREAD, "interventions", None)
        if interventions:
            intervention = interventions.get(module)
            if intervention is not None:
                attention_mask = intervention(module, query, key, attention_mask)
        captures = getattr(_THREAD, "captures", None)
        capture = captures.get(module) if captures else None
        if capture is None:  # another thread's forward, or a module we do not record: untouched
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        if (original is sdpa_attention.sdpa_attention_forward and capture.rows == "last"
                and capture.path != "full-row" and query.shape[2] == 1 and not args):
            routed = _sdpa_decode_with_lse(module, query, key, value, attention_mask, kwargs.get("scaling"), kwargs)
            if routed is not None:
                output, lse, kernel, signature = routed
                reference = lambda: original(module, query, key, value, attention_mask, **kwargs)  # noqa: E731
                if capture._verify(output, kernel, signature, reference):
                    capture._record_lse(module, query, key, value, lse, attention_mask, scaling)
                    return output
        output = original(module, query, key, value, attention_mask, *args, **kwargs)
        capture._record(module, query, key, value, attention_mask, scaling, output)
        return output

    capturing_attention.__qualname__ = f"capturing_attention[{implementation}]"
    return capturing_attention


def _registered_name(implementation: str) -> str:
    """Register (once) the capturing twin of ``implementation`` and its mask function; return its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = _IMPLEMENTATION_PREFIX + implementation
    with _LOCK:
        if name not in _REGISTERED:
            AttentionInterface.register(name, _capturing_implementation(implementation))
            if implementation in ALL_MASK_ATTENTION_FUNCTIONS:  # the same masks as the model would build
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
            _REGISTERED.add(name)
    return name


def _text_config(model: Any) -> Any:
    """The declared text-decoder config: the only one whose attention implementation a capture switches."""
    return _get_path(model.config, architecture_spec(model).text_config)


def _switch_on(model: Any) -> None:
    """Point this model's text decoder at the capturing twin of its attention (counted; the vision tower keeps its own)."""
    with _LOCK:
        entry = _SWITCHED.get(model)
        if entry is None:
            config = _text_config(model)
            original = config._attn_implementation or "eager"
            if original.startswith(_IMPLEMENTATION_PREFIX):
                raise CaptureError("The model's attention is already switched to an hf_vattr capture by a call that "
                                   "did not finish; reload the model.")
            config._attn_implementation = _registered_name(original)
            entry = _SWITCHED[model] = [config, original, 0]
        entry[2] += 1


def _switch_off(model: Any) -> None:
    with _LOCK:
        entry = _SWITCHED.get(model)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            entry[0]._attn_implementation = entry[1]
            del _SWITCHED[model]


def own_implementation(config: Any) -> str | None:
    """The attention implementation a config names, seen through a capture's switch (``"sdpa"``, ``"eager"``, ...)."""
    name = getattr(config, "_attn_implementation", None)
    return name[len(_IMPLEMENTATION_PREFIX):] if name and name.startswith(_IMPLEMENTATION_PREFIX) else name


def capture_active(model: Any | None = None) -> bool:
    """Whether ``model`` (default: any model) has its attention switched to hf_vattr's capture right now."""
    with _LOCK:
        return len(_SWITCHED) > 0 if model is None else model in _SWITCHED


# ----------------------------------------------------------------------------- capture session


class AttentionCapture:
    """Records region-pooled visual attention of the predicting query, layer by layer.

    Use as a context manager around forward passes (``generate`` or a teacher-forced forward).
    After each forward, :meth:`pop` returns the features of the last query row
    (``rows="last"``): ``(L, H, K)`` for one sequence, ``(B, L, H, K)`` when positions are given per
    sequence; or ``(T, L, H, K)`` for every query row from ``first_row`` on (``rows="all"``, for
    teacher-forced collection; needs a forward without cache, batch 1).

    Args:
        model: a ``*ForConditionalGeneration`` model whose architecture is declared in :mod:`hf_vattr.layouts`.
        visual_positions: (Nv,) sequence positions of the visual tokens, or (B, Nv) per sequence of a
            batch (pad shorter rows with any valid position and give them zero membership rows).
        membership: (Nv, K) or (B, Nv, K) token -> region membership; ``None`` to set it later with
            :meth:`set_membership` (before the first attention call).
        pooling: ``"sum"`` (attention mass on the region) or ``"mean"`` (per-token average).
        feature_kind: ``"attention"`` (attention weights) or ``"value_norm"`` (each weight times the norm of
            that token's contribution through the head's output projection, ``||W_O^h v_j||``: computed
            once per prompt, so it adds one elementwise product per decode step).

    Attributes:
        path: the route that served the latest decode step: ``"lse"``, ``"weights"`` or ``"full-row"``
            (see the module docstring); ``None`` before the first decode step.
    """

    def __init__(
        self,
        model: Any,
        visual_positions: torch.Tensor,
        membership: torch.Tensor | None,
        *,
        pooling: str = "sum",
        rows: str = "last",
        first_row: int = 0,
        feature_kind: str = "attention",
    ) -> None:
        if feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}.")
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}.")
        if rows not in ("last", "all"):
            raise ValueError(f"rows must be 'last' or 'all', got {rows!r}.")
        self.model = model
        self.modules = attention_modules(model)
        self.num_layers, self.num_heads = text_dims(model)
        if len(self.modules) != self.num_layers:
            raise CaptureError(f"Found {len(self.modules)} attention modules but config says {self.num_layers} layers.")
        positions = torch.as_tensor(visual_positions, dtype=torch.long)
        self.batched = positions.dim() == 2
        if rows == "all" and self.batched:
            raise CaptureError("rows='all' captures one sequence; pass (Nv,) positions.")
        self._positions_cpu = positions if self.batched else positions[None]
        self.pooling = pooling
        self.feature_kind = feature_kind
        self._value_weights: dict[int, torch.Tensor] = {}  # layer -> (B, H, Nv), for feature_kind="value_norm"
        self.rows = rows
        self.first_row = int(first_row)
        self.path: str | None = None
        self._scope: dict = {}
        self._layer_of = {module: i for i, module in enumerate(self.modules)}
        self._positions: dict[torch.device, torch.Tensor] = {}
        self._pooling: dict[torch.device, torch.Tensor] = {}
        self._pooling_cpu: torch.Tensor | None = None
        self._visual_key_cache: dict[int, tuple] = {}  # layer -> (cache length, scaled float keys, scale)
        self.num_regions = 0
        self._slots: list[torch.Tensor | None] = [None] * self.num_layers
        if membership is not None:
            self.set_membership(membership)
        self.active = False

    def set_membership(self, membership: torch.Tensor) -> None:
        """Set (or replace) the token -> region membership; until then nothing can be recorded.

        Why settable: regions built from the vision tower's output *during* the prefill are only
        known after the tower ran, which is still before the first decoder attention call.
        """
        membership = torch.as_tensor(membership, dtype=torch.float32)
        if membership.dim() == 2:
            membership = membership[None].expand(self._positions_cpu.shape[0], -1, -1)
        if membership.dim() != 3 or membership.shape[:2] != self._positions_cpu.shape:
            raise ValueError(f"membership must be (visual tokens={self._positions_cpu.shape[-1]}, K) "
                             f"or (sequences, visual tokens, K), got {tuple(membership.shape)}.")
        if self.pooling == "mean":
            membership = membership / membership.sum(1, keepdim=True).clamp_min(1e-12)
        self._pooling_cpu = membership.contiguous()
        self._positions.clear()
        self._pooling.clear()
        self.num_regions = int(membership.shape[-1])
        self._prepare(next(self.model.parameters()).device)  # moved once, not per step

    def _prepare(self, device: torch.device) -> None:
        # Cached per device so models split with device_map pay no transfer per step.
        if device not in self._positions:
            self._positions[device] = self._positions_cpu.to(device)
            self._pooling[device] = self._pooling_cpu.to(device)

    # -- lifecycle
    def __enter__(self) -> "AttentionCapture":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Switch the model's text attention to the capturing twin and record the forwards of *this thread*."""
        with _LOCK:
            if any(m in _ACTIVE for m in self.modules):
                raise CaptureError(
                    "This model already has an active attribution capture (another streamer or capture is running "
                    "on it). Finish or close that generation first, or use a separate model instance per thread."
                )
            _switch_on(self.model)
            for module in self.modules:
                _ACTIVE[module] = self
            self._scope = _thread_scope("captures")  # the starting thread's table: stop() may run in another
            self._scope.update(dict.fromkeys(self.modules, self))
            self.active = True

    def stop(self) -> None:
        """Undo :meth:`start` (idempotent, from any thread)."""
        with _LOCK:
            if not self.active:
                return
            for module in self.modules:
                if _ACTIVE.get(module) is self:
                    del _ACTIVE[module]
                if self._scope.get(module) is self:
                    del self._scope[module]
            self.active = False
            self._visual_key_cache.clear()
            self._value_weights.clear()
            _switch_off(self.model)

    # -- recording
    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pooling_cpu is None:
            raise CaptureError("No region membership was set before the first attention call; call "
                               "set_membership(...) first (the regions of this prompt's visual tokens).")
        if device not in self._positions:
            self._prepare(device)
        return self._positions[device], self._pooling[device]

    def _check_batch(self, batch: int) -> None:
        if batch != self._positions_cpu.shape[0]:
            raise CaptureError(
                f"The forward holds {batch} sequences but the capture was set up for {self._positions_cpu.shape[0]}. "
                "Beam search is not supported; for batches, build the streamer with the batched inputs."
            )

    def _set_path(self, path: str) -> None:
        if path != self.path:
            if self.path is None or path == "full-row":
                logger.info(f"hf_vattr attention capture: '{path}' route for decode steps.")
            self.path = path

    def _verify(self, output, kernel: str, signature: tuple, reference: Callable[[], Any]) -> bool:
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

    def _weights(self, layer: int, module: Any, value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """(B, H, Nv) value-norm weights of a layer, computed at its first call (the prefill) and kept."""
        if self.feature_kind != "value_norm":
            return None
        kept = self._value_weights.get(layer)
        if kept is None or kept.device != value.device or kept.shape[0] != value.shape[0]:
            kept = output_norms(value, positions, output_projection(self.model, module), self.num_heads)
            self._value_weights[layer] = kept
        return kept

    def _record_lse(self, module, query, key, value, lse, attention_mask, scaling) -> None:
        self._check_batch(query.shape[0])
        positions, pooling = self._device_tables(query.device)
        layer = self._layer_of[module]
        weights = self._weights(layer, module, value, positions)
        # The visual keys sit in the prompt, so they never change while the cache grows by one token a step:
        # keep them (float32, scaled, laid out for the product) instead of gathering them every step;
        # recomputed if the cache was cropped or reused.
        kept = self._visual_key_cache.get(layer)
        if kept is None or key.shape[2] != kept[0] + 1 or kept[1].device != key.device or kept[2] != scaling:
            kept = (key.shape[2], _scaled_keys_t(_visual_keys(key, positions), scaling), scaling)
        else:
            kept = (key.shape[2], kept[1], scaling)
        self._visual_key_cache[layer] = kept
        mask = _visual_mask(attention_mask, positions, key.shape[2])
        self._slots[layer] = _features_from_lse(query, lse.float(), kept[1], pooling, mask, weights)
        self._set_path("lse")

    def _record(self, module, query, key, value, attention_mask, scaling, output) -> None:
        layer = self._layer_of[module]
        positions, pooling = self._device_tables(query.device)
        if self.rows == "all":
            self._check_batch(query.shape[0])
            weights = self._weights(layer, module, value, positions)
            self._slots[layer] = self._all_rows(query, key, scaling, positions[0], pooling[0], attention_mask,
                                                None if weights is None else weights[0])
            return
        weights = self._weights(layer, module, value, positions)
        self._check_batch(query.shape[0])
        attention = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if isinstance(attention, torch.Tensor) and attention.dim() == 4 and attention.shape[-1] == key.shape[2]:
            last = attention[:, :, -1].float()  # (B, H, Tk): the function returned its probabilities (eager)
            index = positions[:, None, :].expand(last.shape[0], last.shape[1], -1)
            visual = last.gather(-1, index)
            self._slots[layer] = torch.matmul(visual if weights is None else visual * weights, pooling)
            route = "weights"
        else:
            if attention_mask is None and query.shape[2] > 1:
                # No mask with several queries: the kernel runs causal, top-left aligned, so the last row sees
                # keys [0, Tq). A static cache's keys run past them (empty slots), and must not enter the softmax.
                key = key[:, :, : query.shape[2]]
            self._slots[layer] = _last_row_features(query, key, scaling, positions, pooling, attention_mask, weights)
            route = "full-row"
        if query.shape[2] == 1:
            self._set_path(route)

    def _all_rows(self, query, key, scaling, positions, pooling, attention_mask, weights=None,
                  block: int = 256) -> torch.Tensor:
        num_q, num_k = query.shape[2], key.shape[2]
        if num_q != num_k:
            raise CaptureError("rows='all' needs a forward without cache (use_cache=False, full sequence).")
        device = query.device
        out = []
        for start in range(self.first_row, num_q, block):
            stop = min(start + block, num_q)
            causal = torch.arange(num_k, device=device)[None, :] <= torch.arange(start, stop, device=device)[:, None]
            mask = causal[None, None]
            if attention_mask is not None and attention_mask.dim() == 4:
                extra = attention_mask[:, :, start:stop, :num_k]
                mask = mask & (extra if extra.dtype == torch.bool else extra > torch.finfo(extra.dtype).min / 2)
            out.append(attention_row_features(query[:, :, start:stop], key, scaling, positions, pooling, mask,
                                              query_rows=slice(None), visual_weights=weights))
        return torch.cat(out, 0)  # (T', H, K)

    def pop(self) -> torch.Tensor:
        """Features of the latest forward: (L, H, K) or (B, L, H, K) for rows='last', (T, L, H, K) for rows='all'."""
        missing = [i for i, s in enumerate(self._slots) if s is None]
        if missing:
            raise CaptureError(
                f"No attention was captured for layers {missing}. Was a forward run inside the capture, and does the "
                "model route attention through transformers' AttentionInterface?"
            )
        device = self._slots[0].device  # type: ignore[union-attr]
        slots = [s.to(device) for s in self._slots]  # type: ignore[union-attr]
        self._slots = [None] * self.num_layers
        if self.rows == "all":
            return torch.stack(slots, dim=-3)
        stacked = torch.stack(slots, dim=1)  # (B, L, H, K)
        return stacked if self.batched else stacked[0]


@contextmanager
def attention_intervention(model: Any, intervene: Callable[[Any, torch.Tensor, torch.Tensor, Any], Any]) -> Iterator[None]:
    """Let ``intervene(module, query, key, attention_mask) -> attention_mask`` rewrite the mask of every
    text-decoder attention call of ``model`` made by this thread (e.g. to knock regions out of attention for
    ablations).

    The returned mask is passed to the model's own attention function, so it must be in a form that
    function accepts: a boolean (True = attend) or additive float 4D mask works for ``sdpa`` and ``eager``.
    Restored on exit, also on error.
    """
    modules = attention_modules(model)
    with _LOCK:
        if any(m in _INTERVENED for m in modules):
            raise CaptureError("This model already has an active attention intervention.")
        _switch_on(model)
        scope = _thread_scope("interventions")
        for m in modules:
            _INTERVENED[m] = threading.get_ident()
            scope[m] = intervene
    try:
        yield
    finally:
        with _LOCK:
            for m in modules:
                _INTERVENED.pop(m, None)
                scope.pop(m, None)
            _switch_off(model)
