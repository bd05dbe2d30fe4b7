"""Attention capture: the predicting query's row on the visual keys, pooled to regions, recorded layer by
layer inside ``generate`` or a teacher-forced forward, keeping the model's own attention.

Why this design: forcing ``attn_implementation="eager"`` or ``output_attentions=True`` costs
O(T^2 L H) memory and changes numerics. Instead the model's text decoder is switched to a capturing twin
of its own attention function (:mod:`.dispatch`), which records the *one* attention row we need (the
query that predicts the next token), restricted to the visual tokens and pooled to regions (:mod:`.pooling`).

Constant cost per decode step: the softmax normaliser of that row (its log-sum-exp) is
computed by the attention kernel anyway, so the row on the visual keys is
``exp(scale * q . K_visual - lse)``: one product over the *visual* keys only, whatever the
trace length, and the KV cache is never copied. Which route serves a capture is its
``path`` attribute (logged once):

* ``"lse"``: transformers' sdpa on decode steps, through a kernel that also returns the log-sum-exp,
  checked bitwise against the model's own attention on first use, per call signature (:mod:`.kernels`).
* ``"weights"``: the attention function already returns its weights (eager): they are read, for free.
* ``"full-row"``: any other kernel (flash-attn, flex, an sdpa kernel that is not reproduced): the row is
  recomputed over all keys, in blocks so that memory stays bounded; the cost then grows with the trace.

Prefill steps (many queries) always take the full-row route once.

Isolation: captures are keyed by attention *module object* and by thread, so other models, and
other threads running the same model, are never recorded. One capture per model at a time; a second is a
clear :class:`CaptureError`. The model's text config gets its own implementation back when the capture
stops, also when generation raises.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import logging

from ..layouts import attention_modules, input_device, output_projection, text_dims
from .dispatch import _LOCK, _switch_off, _switch_on, _thread_scope
from .pooling import (
    FEATURE_KINDS,
    CaptureError,
    RegionIndex,
    _features_from_lse,
    _features_from_weights,
    _last_row_features,
    _scaled_keys_t,
    _visual_keys,
    _visual_mask,
    attention_row_features,
    region_index,
)
from .value_norms import output_norms

logger = logging.get_logger(__name__)

__all__ = ["AttentionCapture"]

_ACTIVE: dict[Any, "AttentionCapture"] = {}  # attention module -> capture (any thread): one capture per model


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
        self._lse_pooling: dict[torch.device, torch.Tensor | RegionIndex] = {}  # what the LSE route pools with
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
        self._lse_pooling.clear()
        self.num_regions = int(membership.shape[-1])
        self._prepare(input_device(self.model))  # moved once, not per step

    def _prepare(self, device: torch.device) -> None:
        # Cached per device so models split with device_map pay no transfer per step.
        if device not in self._positions:
            self._positions[device] = self._positions_cpu.to(device)
            self._pooling[device] = self._pooling_cpu.to(device)
            # On CPU the same sums as a scatter, when regions partition the tokens: the cheaper read. CUDA keeps the
            # table: its scatter adds atomically (run-to-run order), and its dense product is cheap anyway.
            index = region_index(self._pooling[device]) if device.type == "cpu" else None
            self._lse_pooling[device] = self._pooling[device] if index is None else index

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
        positions, _ = self._device_tables(query.device)
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
        self._slots[layer] = _features_from_lse(query, lse.float(), kept[1], self._lse_pooling[query.device], mask,
                                                weights)
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
            self._slots[layer] = _features_from_weights(attention, positions, pooling, weights)  # eager
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

