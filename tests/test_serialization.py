"""Plain JSON from numpy and torch values: what the evaluation report and saved traces write."""

import json
import math

import numpy as np
import torch

from hf_vattr.serialization import to_jsonable


def test_numbers_arrays_and_tensors_become_plain_json():
    value = {1: np.float32(0.5), "n": np.int64(3), "flag": np.bool_(True), "t": torch.tensor([[1.0, 2.5]]),
             "a": np.arange(3), "nested": ({"x": (1, "s", None)},)}
    out = to_jsonable(value)
    assert out == {"1": 0.5, "n": 3, "flag": True, "t": [[1.0, 2.5]], "a": [0, 1, 2], "nested": [{"x": [1, "s", None]}]}
    assert type(out["n"]) is int and type(out["flag"]) is bool and type(out["1"]) is float
    json.dumps(out, allow_nan=False)  # strict JSON: no numpy scalars left


def test_non_finite_values_become_none_wherever_they_are():
    out = to_jsonable({"f": math.nan, "g": np.float64(np.inf), "t": torch.tensor([1.0, float("nan")]),
                       "a": np.array([-np.inf, 2.0])})
    assert out == {"f": None, "g": None, "t": [1.0, None], "a": [None, 2.0]}
    json.dumps(out, allow_nan=False)


def test_other_objects_are_written_as_their_repr():
    class Thing:
        def __repr__(self) -> str:
            return "Thing()"

    assert to_jsonable([Thing()]) == ["Thing()"]
