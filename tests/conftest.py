"""Shared fixtures: tiny offline models of every supported family (built once per session)."""

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; hub tests point HF_ENDPOINT at a local server
torch.set_num_threads(2)

# The toy's development scripts (trainer, faithfulness report) live outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "toy"))

from hf_vattr.testing import FAMILIES, tiny_vlm  # noqa: E402

_CACHE: dict = {}


def get_tiny(family: str, attn_implementation: str = "sdpa"):
    key = (family, attn_implementation)
    if key not in _CACHE:
        _CACHE[key] = tiny_vlm(family, attn_implementation=attn_implementation)
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen3-VL saved as a model folder, for commands that load ``--model`` from disk (read only)."""
    path = tmp_path_factory.mktemp("tiny-qwen3-vl")
    model, processor = tiny_vlm("qwen3_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return get_tiny(family)


def consume(streamer, deadline: float = 20.0):
    """Iterate a streamer in a helper thread; return ``(events, error)``. A consumer still waiting after
    ``deadline`` seconds fails the test instead of stalling CI."""
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
