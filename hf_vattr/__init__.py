"""hf_vattr: live, faithful visual attribution for multimodal thinking models.

    from hf_vattr import AttributionStreamer, LinearEstimator

Public names are imported lazily so that ``import hf_vattr`` is cheap and has
no side effects (nothing is registered or patched until a capture starts).
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # streaming: what users call
    "AttributionStreamer": "streaming.streamer",
    "TokenAttribution": "streaming.events",
    "SpanAttribution": "streaming.events",
    "AttributionTrace": "streaming.events",
    "LinearEstimator": "estimator",
    "ReasoningStepSplitter": "reasoning.spans",
    # regions: build or pass your own
    "build_regions": "regions",
    "RegionMap": "regions",
    "PromptRegions": "regions",
    # other architectures: declared, never sniffed
    "register_architecture": "layouts",
    "ArchitectureSpec": "layouts",
    # errors: one base class, and the ones a consumer catches
    "AttributionError": "errors",
    "GenerationError": "streaming.streamer",
    "AttributionTimeout": "streaming.streamer",
    "StreamerStateError": "streaming.streamer",
    "StreamerInputError": "streaming.streamer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hf_vattr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
