"""Shared fixtures: tiny offline models of every supported family (built once per session)."""

import os
import sys
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


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return get_tiny(family)
