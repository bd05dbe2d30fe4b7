"""The capturing attention function, registered through transformers' ``AttentionInterface``, and the switch
that points one model's text decoder at it.

Every attention call in transformers 5 goes through the implementation named by its config
(``config._attn_implementation``) and receives post-RoPE queries and the cached keys. For each
implementation a model uses ("sdpa", "eager", a flash kernel, ...) a capturing twin is registered once
through the documented extension points, ``AttentionInterface.register`` (with the same mask function
through ``AttentionMaskInterface.register``); while a capture or an intervention is active only *that
model's text decoder* is switched to the twin, and switched back when the last one ends, also when
generation raises. The vision tower and every other model are never switched.

The twin calls the original function. Captures and interventions are keyed by attention *module object*
and by thread, so other models, and other threads running the same model, pass through untouched.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable

from ..layouts import _get_path, architecture_spec
from .kernels import _sdpa_decode_with_lse, _verify_kernel
from .pooling import CaptureError

__all__ = ["capture_active", "own_implementation"]

_IMPLEMENTATION_PREFIX = "hf_vattr_"
_LOCK = threading.RLock()
_REGISTERED: set[str] = set()
_SWITCHED: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()  # model -> [config, original, users]
_THREAD = threading.local()  # .captures / .interventions: attention module -> capture / mask rewrite, this thread only


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
                if _verify_kernel(output, kernel, signature, reference):
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

