"""Attention interventions: rewrite the mask of every text-decoder attention call of one model, made by this
thread (the ablations knock regions out of attention this way), through the same capturing function."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..layouts import attention_modules
from .dispatch import _LOCK, _switch_off, _switch_on, _thread_scope
from .pooling import CaptureError

__all__ = ["attention_intervention"]

_INTERVENED: dict[Any, int] = {}  # attention module -> thread holding an intervention on it


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
