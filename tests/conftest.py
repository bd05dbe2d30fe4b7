"""Shared fixtures: tiny offline models of every supported family (built once per session, read only) and a
consumer that drains a streamer under a deadline. The Hub fixtures are a plugin of their own (hub_fixture.py)."""

import gc
import os
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; hub tests point HF_ENDPOINT at a local server
# One intra-op thread, here and in the subprocesses the tests start (they inherit OMP_NUM_THREADS): the tiny
# models' ops are too small to gain from a second thread, and on a busy 2-core machine threads that wait for
# each other at every op made test_ablation + test_streamer take 74 s instead of 13 s. Set the variable to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The toy's development scripts (trainer, faithfulness report) live outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "toy"))

from hf_vattr.testing import FAMILIES, tiny_vlm  # noqa: E402

pytest_plugins = ["hub_fixture", "pytester"]  # pytester: test_markers runs pytest on small examples


_GENERATE_BOOKKEEPING = {"_cache", "_previous_max_cache_length"}  # what transformers' generate keeps on a model


def _state(model, processor) -> dict:
    """What a test could change on a shared pair and leave changed for the next test."""
    return {
        "dtype": model.dtype, "device": model.device, "training": model.training,
        "attention implementation": (model.config._attn_implementation,
                                     model.config.get_text_config()._attn_implementation),
        "instance attributes": sorted(set(vars(model)) - _GENERATE_BOOKKEEPING),  # e.g. a generate wrapper left armed
        "parameters": [(name, p.data_ptr(), p._version, p.requires_grad) for name, p in model.named_parameters()],
        "buffers": [(name, b.data_ptr(), b._version) for name, b in model.named_buffers()],
        "hooks": sorted((name, getattr(hook, "__qualname__", repr(hook))) for name, module in model.named_modules()
                        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values(),
                                     *module._backward_hooks.values())
                        if not getattr(hook, "__module__", "").startswith("transformers.")),  # its own: lazy, kept
        "tokenizer": (processor.tokenizer.padding_side, processor.tokenizer.truncation_side, len(processor.tokenizer)),
    }


class TinyModels:
    """``(model, processor)`` per family and attention implementation, built on first use and shared.

    Shared pairs are read only: a test that changes one (weights, dtype, attention implementation, hooks, an
    instance attribute, the tokenizer's padding side) must work on a ``copy.deepcopy`` or undo the change
    with ``monkeypatch``. :meth:`changed` finds the pairs a test left changed and drops them, so the next
    test gets a fresh build.
    """

    def __init__(self):
        self._pairs: dict[tuple[str, str], tuple] = {}  # key -> (model, processor, state when built)

    def __call__(self, family: str, attn_implementation: str = "sdpa"):
        key = (family, attn_implementation)
        if key not in self._pairs:
            model, processor = tiny_vlm(family, attn_implementation=attn_implementation)
            self._pairs[key] = (model, processor, _state(model, processor))
        model, processor, _ = self._pairs[key]
        return model, processor

    def _changes(self) -> dict[tuple[str, str], list[str]]:
        changes = {}
        for key, (model, processor, built) in self._pairs.items():
            now = _state(model, processor)
            fields = [name for name in built if now[name] != built[name]]
            if fields:
                changes[key] = fields
        return changes

    def changed(self) -> list[str]:
        """The pairs changed since they were built (``"family (attention): fields"``), dropped from the cache."""
        changes = self._changes()
        if changes:  # a dropped streamer's generate wrapper goes when the streamer is collected
            gc.collect()
            changes = self._changes()
        for key in changes:
            del self._pairs[key]
        return [f"{family} ({attn}): {', '.join(fields)}" for (family, attn), fields in changes.items()]


@pytest.fixture(scope="session")
def get_tiny() -> TinyModels:
    """``get_tiny(family, attn_implementation="sdpa") -> (model, processor)``: the session's shared tiny pair."""
    return TinyModels()


@pytest.fixture(autouse=True)
def _shared_tiny_models_stay_unchanged(get_tiny):
    """Fails the test that leaves a shared tiny model or processor changed (the next test would inherit it)."""
    yield
    changed = get_tiny.changed()
    if changed:
        pytest.fail(f"the test changed the shared tiny model(s) {'; '.join(changed)}: work on a copy.deepcopy "
                    "or undo the change (monkeypatch)", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, get_tiny):
    """A tiny Qwen3-VL saved as a model folder, for commands that load ``--model`` from disk (read only)."""
    path = tmp_path_factory.mktemp("tiny-qwen3-vl")
    model, processor = get_tiny("qwen3_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny(family, get_tiny):
    return get_tiny(family)


def _consume(streamer, deadline: float = 20.0):
    box = {"events": [], "error": None}

    def run():
        try:
            for event in streamer:
                box["events"].append(event)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), "the consumer hung"
    return box["events"], box["error"]


@pytest.fixture(scope="session")
def consume():
    """``consume(streamer, deadline=20.0) -> (events, error)``: iterate a streamer in a helper thread. A consumer
    still waiting after ``deadline`` seconds fails the test instead of stalling CI."""
    return _consume
