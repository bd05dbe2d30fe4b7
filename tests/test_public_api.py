"""The public surface: what ``hf_vattr`` exports, and one error base class for everything it raises."""

import importlib
import inspect
import pkgutil

import hf_vattr
from hf_vattr import AttributionError


def test_every_exported_name_resolves_and_no_internals_are_exported():
    for name in hf_vattr.__all__:
        assert getattr(hf_vattr, name) is not None
    assert {"AttributionStreamer", "LinearEstimator", "build_regions", "AttributionError", "GenerationError"} <= set(
        hf_vattr.__all__)
    assert not {"AttributionSession", "AttentionCapture"} & set(hf_vattr.__all__)


def test_every_error_class_of_the_package_derives_from_attribution_error():
    skip = {"hf_vattr.commands.app", "hf_vattr.streaming.notebook"}  # optional front ends (gradio, IPython) are checked where installed
    offenders = []
    for info in pkgutil.walk_packages(hf_vattr.__path__, "hf_vattr."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            if info.name in skip:
                continue
            raise
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException) and not issubclass(
                    cls, AttributionError):
                offenders.append(f"{module.__name__}.{cls.__name__}")
    assert not offenders, f"errors outside the AttributionError hierarchy: {offenders}"
