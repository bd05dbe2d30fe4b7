"""Plain JSON values from the numbers the package computes (numpy, torch), for reports and saved traces."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """``value`` with every part JSON holds as it is: ``str`` keys, lists, Python numbers.

    Dicts, lists and tuples are converted part by part; arrays and tensors become (nested) lists and numpy
    scalars Python ones. Non-finite floats become None: strict JSON has no NaN or infinity, and the
    reports mean "undefined" by None. Anything else JSON cannot hold becomes its ``repr``.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)
