"""hf_vattr: live, faithful visual attribution for multimodal thinking models.

    from hf_vattr import AttributionStreamer, LinearEstimator

Public names are imported lazily so that ``import hf_vattr`` is cheap and has
no side effects (nothing is registered or patched until a capture starts).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AttributionError": "errors",
    "AttributionStreamer": "streamer",
    "TokenAttribution": "streamer",
    "SpanAttribution": "streamer",
    "AttributionTrace": "streamer",
    "GenerationError": "streamer",
    "AttributionTimeout": "streamer",
    "StreamerStateError": "streamer",
    "AttributionSession": "session",
    "LinearEstimator": "estimator",
    "AttentionCapture": "capture",
    "visual_layout": "layouts",
    "register_architecture": "layouts",
    "ArchitectureSpec": "layouts",
    "RegionMap": "regions",
    "PromptRegions": "regions",
    "grid_regions": "regions",
    "prompt_regions": "regions",
    "ReasoningStepSplitter": "spans",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hf_vattr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
