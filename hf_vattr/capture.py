"""Attention capture through transformers' ``AttentionInterface``, keeping the model's own attention.

Why this design: forcing ``attn_implementation="eager"`` or
``output_attentions=True`` costs O(T^2 L H) memory and changes numerics. Every
attention call in transformers 5 goes through
``ALL_ATTENTION_FUNCTIONS.get_interface(impl, default)`` and receives post-RoPE
queries and the cached keys. While a capture is active we wrap whatever
function that lookup returns (sdpa, flash, eager, ...): the wrapped function
runs unchanged, and for the text decoder's attention modules of the captured
model we additionally compute the *one* attention row we need -- the query
that predicts the next token -- restricted to the visual tokens and pooled to
regions. That is one (heads x keys) product per layer, a small fraction of a
decode step.

Isolation: captures are keyed by attention *module object*, so two models
generating in two threads never see each other's rows; modules that are not
being captured (other models, the vision tower) pass straight through.
Restoration: the lookup is patched while at least one capture is active and
restored exactly when the last one exits, also when generation raises.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .layouts import attention_modules, text_dims

__all__ = [
    "AttentionCapture",
    "attention_row_features",
    "attention_intervention",
    "CaptureError",
    "patched_attention_lookup",
]


class CaptureError(RuntimeError):
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
) -> torch.Tensor:
    """Region-pooled attention of selected query rows on the visual tokens.

    Args:
        query: (1, H, Tq, D) post-RoPE queries of one layer.
        key: (1, Hkv, Tk, D) keys including the cache (grouped-query attention allowed).
        scaling: the layer's softmax scale.
        visual_positions: (Nv,) key positions of the visual tokens.
        pooling_matrix: (Nv, K) token -> region weights (membership, or membership / region size for mean).
        attention_mask: optional additive float or boolean (True = attend) mask of shape (1, 1|H, Tq, Tk).
        query_rows: which query rows to use; default only the last one (the query predicting the next token).

    Returns:
        (Tq', H, K) float32 features, one (H, K) block per selected query row.
    """
    rows = slice(-1, None) if query_rows is None else query_rows
    q = query[0, :, rows].float()  # (H, Tq', D)
    k = key[0].float()  # (Hkv, Tk, D)
    num_heads, num_q, dim = q.shape
    num_kv = k.shape[0]
    if num_heads % num_kv:
        raise CaptureError(f"{num_heads} query heads are not a multiple of {num_kv} key/value heads.")
    groups = num_heads // num_kv
    # (Hkv, G*Tq', D) @ (Hkv, D, Tk): grouped-query attention without materialising repeated keys.
    scores = torch.matmul(q.reshape(num_kv, groups * num_q, dim), k.transpose(1, 2)) * scaling
    scores = scores.reshape(num_heads, num_q, -1)  # (H, Tq', Tk)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[0, :, rows, : scores.shape[-1]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    visual = probs.index_select(-1, visual_positions)  # (H, Tq', Nv)
    pooled = torch.matmul(visual, pooling_matrix)  # (H, Tq', K)
    return pooled.transpose(0, 1)


# ----------------------------------------------------------------------------- global dispatcher

_LOCK = threading.RLock()
_ACTIVE: dict[Any, "AttentionCapture"] = {}  # attention module -> capture
_INTERVENTIONS: dict[Any, Callable] = {}  # attention module -> mask intervention (used by ablations)
_WRAPPERS: dict[Callable, Callable] = {}  # original attention fn -> wrapped fn
_PATCH: dict[str, Any] = {}  # saved original lookup while patched
_USERS = 0


def _wrap(original: Callable) -> Callable:
    wrapped = _WRAPPERS.get(original)
    if wrapped is not None:
        return wrapped

    def capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
        intervention = _INTERVENTIONS.get(module)
        if intervention is not None:
            attention_mask = intervention(module, query, key, attention_mask)
        output = original(module, query, key, value, attention_mask, *args, **kwargs)
        capture = _ACTIVE.get(module)
        if capture is not None:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            capture._record(module, query, key, attention_mask, scaling)
        return output

    capturing_attention.__wrapped__ = original  # type: ignore[attr-defined]
    _WRAPPERS[original] = capturing_attention
    return capturing_attention


def _install() -> None:
    global _USERS
    from transformers.modeling_utils import AttentionInterface

    with _LOCK:
        if _USERS == 0:
            original = AttentionInterface.get_interface
            _PATCH["get_interface"] = original

            def get_interface(self, attn_implementation, default):
                return _wrap(original(self, attn_implementation, default))

            get_interface.__wrapped__ = original  # type: ignore[attr-defined]
            AttentionInterface.get_interface = get_interface
        _USERS += 1


def _uninstall() -> None:
    global _USERS
    from transformers.modeling_utils import AttentionInterface

    with _LOCK:
        _USERS -= 1
        if _USERS == 0:
            AttentionInterface.get_interface = _PATCH.pop("get_interface")
            _WRAPPERS.clear()


def patched_attention_lookup() -> bool:
    """Whether the attention lookup is currently wrapped (for tests and debugging)."""
    return _USERS > 0


# ----------------------------------------------------------------------------- capture session


class AttentionCapture:
    """Records region-pooled visual attention of the predicting query, layer by layer.

    Use as a context manager around forward passes (``generate`` or a
    teacher-forced forward). After each forward, :meth:`pop` returns
    ``(L, H, K)`` features of the last query row (``rows="last"``) or
    ``(T, L, H, K)`` for every query row from ``first_row`` on (``rows="all"``,
    for teacher-forced collection; needs a forward without cache).

    Args:
        model: a ``*ForConditionalGeneration`` model whose architecture is declared in :mod:`hf_vattr.layouts`.
        visual_positions: (Nv,) sequence positions of the visual tokens.
        membership: (Nv, K) token -> region membership; ``None`` to set it later with
            :meth:`set_membership` (before the first attention call).
        pooling: ``"sum"`` (attention mass on the region) or ``"mean"`` (per-token average).
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
    ) -> None:
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}.")
        if rows not in ("last", "all"):
            raise ValueError(f"rows must be 'last' or 'all', got {rows!r}.")
        self.model = model
        self.modules = attention_modules(model)
        self.num_layers, self.num_heads = text_dims(model)
        if len(self.modules) != self.num_layers:
            raise CaptureError(f"Found {len(self.modules)} attention modules but config says {self.num_layers} layers.")
        self.pooling = pooling
        self.rows = rows
        self.first_row = int(first_row)
        self._layer_of = {module: i for i, module in enumerate(self.modules)}
        self._positions: dict[torch.device, torch.Tensor] = {}
        self._pooling: dict[torch.device, torch.Tensor] = {}
        self._positions_cpu = torch.as_tensor(visual_positions, dtype=torch.long)
        self._pooling_cpu: torch.Tensor | None = None
        self.num_regions = 0
        self._slots: list[torch.Tensor | None] = [None] * self.num_layers
        if membership is not None:
            self.set_membership(membership)
        self.active = False
        self.on_layer: Callable[[int, torch.Tensor], None] | None = None

    def set_membership(self, membership: torch.Tensor) -> None:
        """Set (or replace) the (Nv, K) token -> region membership; until then nothing can be recorded.

        Why settable: regions built from the vision tower's output *during* the prefill are only
        known after the tower ran, which is still before the first decoder attention call.
        """
        membership = torch.as_tensor(membership, dtype=torch.float32)
        if membership.dim() != 2 or membership.shape[0] != len(self._positions_cpu):
            raise ValueError(f"membership must be (visual tokens={len(self._positions_cpu)}, K), "
                             f"got {tuple(membership.shape)}.")
        if self.pooling == "mean":
            membership = membership / membership.sum(0, keepdim=True).clamp_min(1e-12)
        self._pooling_cpu = membership
        self._positions.clear()
        self._pooling.clear()
        self.num_regions = int(membership.shape[1])
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
        with _LOCK:
            busy = [m for m in self.modules if m in _ACTIVE]
            if busy:
                raise CaptureError(
                    "This model already has an active attribution capture (another streamer or capture is running "
                    "on it). Finish that generation first, or use a separate model instance per thread."
                )
            _install()
            for module in self.modules:
                _ACTIVE[module] = self
            self.active = True

    def stop(self) -> None:
        with _LOCK:
            if not self.active:
                return
            for module in self.modules:
                if _ACTIVE.get(module) is self:
                    del _ACTIVE[module]
            self.active = False
            _uninstall()

    # -- recording
    def _record(self, module, query, key, attention_mask, scaling) -> None:
        layer = self._layer_of[module]
        device = query.device
        if self._pooling_cpu is None:
            raise CaptureError("No region membership was set before the first attention call; call "
                               "set_membership(...) first (the regions of this prompt's visual tokens).")
        if device not in self._positions:
            self._prepare(device)
        if query.shape[0] != 1:
            raise CaptureError(
                f"Attribution supports batch size 1, got {query.shape[0]} sequences in one forward. "
                "Run one example at a time (beam search and batches are not supported yet)."
            )
        if self.rows == "last":
            feats = attention_row_features(
                query, key, scaling, self._positions[device], self._pooling[device], attention_mask
            )[0]
        else:
            feats = self._all_rows(query, key, scaling, device, attention_mask)
        self._slots[layer] = feats
        if self.on_layer is not None:
            self.on_layer(layer, feats)

    def _all_rows(self, query, key, scaling, device, attention_mask, block: int = 256) -> torch.Tensor:
        num_q, num_k = query.shape[2], key.shape[2]
        if num_q != num_k:
            raise CaptureError("rows='all' needs a forward without cache (use_cache=False, full sequence).")
        out = []
        for start in range(self.first_row, num_q, block):
            stop = min(start + block, num_q)
            causal = torch.arange(num_k, device=device)[None, :] <= torch.arange(start, stop, device=device)[:, None]
            mask = causal[None, None]
            if attention_mask is not None and attention_mask.dim() == 4:
                extra = attention_mask[:, :, start:stop, :num_k]
                mask = mask & (extra if extra.dtype == torch.bool else extra > torch.finfo(extra.dtype).min / 2)
            q = query[:, :, start:stop]
            full_rows = slice(None)
            out.append(
                attention_row_features(q, key, scaling, self._positions[device], self._pooling[device], mask,
                                       query_rows=full_rows)
            )
        return torch.cat(out, 0)  # (T', H, K)

    def pop(self) -> torch.Tensor:
        """Features of the latest forward: (L, H, K) for rows='last', (T, L, H, K) for rows='all'."""
        missing = [i for i, s in enumerate(self._slots) if s is None]
        if missing:
            raise CaptureError(
                f"No attention was captured for layers {missing}. Was a forward run inside the capture, and does the "
                "model route attention through transformers' AttentionInterface?"
            )
        slots = [s.to(self._slots[0].device) for s in self._slots]  # type: ignore[union-attr]
        self._slots = [None] * self.num_layers
        return torch.stack(slots, dim=-3)

    def has_pending(self) -> bool:
        return all(s is not None for s in self._slots)


@contextmanager
def capture_attention(model: Any, visual_positions: torch.Tensor, membership: torch.Tensor,
                      **kwargs: Any) -> Iterator[AttentionCapture]:
    """``with capture_attention(model, positions, membership) as cap: model(**inputs); feats = cap.pop()``."""
    cap = AttentionCapture(model, visual_positions, membership, **kwargs)
    with cap:
        yield cap


@contextmanager
def attention_intervention(model: Any, intervene: Callable[[Any, torch.Tensor, torch.Tensor, Any], Any]) -> Iterator[None]:
    """Let ``intervene(module, query, key, attention_mask) -> attention_mask`` rewrite the mask of every
    text-decoder attention call of ``model`` (e.g. to knock regions out of attention for ablations).

    The returned mask is passed to the model's own attention function, so it must be in a form that
    function accepts: a boolean (True = attend) or additive float 4D mask works for ``sdpa`` and ``eager``.
    Restored on exit, also on error.
    """
    modules = attention_modules(model)
    with _LOCK:
        if any(m in _INTERVENTIONS for m in modules):
            raise CaptureError("This model already has an active attention intervention.")
        _install()
        for m in modules:
            _INTERVENTIONS[m] = intervene
    try:
        yield
    finally:
        with _LOCK:
            for m in modules:
                _INTERVENTIONS.pop(m, None)
            _uninstall()
