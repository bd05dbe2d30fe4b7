"""Reasoning trajectories in region-effect space (paper sec. 4.4).

A reasoning trace with S steps (spans) over an image with K regions gives S region-effect
vectors, one per step: an ``(S, K)`` array, row s = attribution scores of step s. Read as a
path through R^K, it shows how visual grounding moves while the model thinks. The paper
finds failed traces wander (longer, more tortuous paths) and that tortuosity predicts
failure early in the trace; these functions compute those quantities.

Inputs are array-likes or torch tensors (see :func:`hf_vattr.metrics.as_array`);
malformed inputs (wrong rank, empty, NaN/inf) raise ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from .metrics import as_array

__all__ = [
    "path_length",
    "displacement",
    "tortuosity",
    "concentration",
    "concentration_curve",
    "truncate",
    "failure_auc_over_progress",
    "TrajectoryStats",
    "trajectory_stats",
]

DEFAULT_FRACTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))


def _trajectory(vectors: Any, name: str = "vectors") -> np.ndarray:
    """A finite ``(S, K)`` float64 array with S >= 1, K >= 1, or a ValueError."""
    v = as_array(vectors)
    if v.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (steps x regions); got shape {v.shape}. "
            "Stack one region-effect vector per reasoning step."
        )
    if v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {v.shape}); need at least one step and one region.")
    if not np.all(np.isfinite(v)):
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(v))[:, 0]})
        raise ValueError(f"{name} contains NaN or inf in steps {bad}; fix or drop those steps.")
    return v


def _steps(v: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(v, axis=0), axis=1)


# --------------------------------------------------------------------------- path geometry


def path_length(vectors: Any) -> float:
    """Sum of Euclidean distances between consecutive steps (0.0 for a single step)."""
    return float(_steps(_trajectory(vectors)).sum())


def displacement(vectors: Any) -> float:
    """Euclidean distance from the first step's vector to the last (0.0 for one step)."""
    v = _trajectory(vectors)
    return float(np.linalg.norm(v[-1] - v[0]))


def tortuosity(vectors: Any) -> float:
    """Path length / displacement: 1 for a straight path, larger the more it wanders.

    Edge cases: fewer than 2 steps -> ``nan`` (no path); displacement 0 with path length
    > 0 (a closed loop) -> ``inf``; both 0 (never moved) -> ``nan``. Note that a loop that
    returns only *almost* to its start gives a large finite value.
    """
    v = _trajectory(vectors)
    if v.shape[0] < 2:
        return float("nan")
    length = float(_steps(v).sum())
    disp = float(np.linalg.norm(v[-1] - v[0]))
    if disp == 0.0:
        return float("inf") if length > 0.0 else float("nan")
    return max(length / disp, 1.0)  # >= 1 by the triangle inequality; clip rounding


# --------------------------------------------------------------------------- concentration


def concentration(vector: Any, method: Literal["entropy", "gini"] = "entropy") -> float:
    """How concentrated one step's attribution is: 1 = one region, 0 = spread evenly.

    Only positive evidence counts: p = max(v, 0) / sum(max(v, 0)), no softmax (softmax
    would depend on the scores' scale). Then

    * ``"entropy"`` (default): ``1 - H(p) / log K``, H the Shannon entropy.
    * ``"gini"``: Gini coefficient of p rescaled by K/(K-1) so a one-hot vector gives 1.

    Returns ``nan`` if no score is positive (no region supports the step), and 1.0 when
    K == 1 with a positive score (all mass is on the only region).
    """
    v = as_array(vector)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"vector must be a non-empty 1-D array of region scores; got shape {v.shape}.")
    if not np.all(np.isfinite(v)):
        raise ValueError("vector contains NaN or inf; fix or drop that step.")
    pos = np.maximum(v, 0.0)
    total = pos.sum()
    if total <= 0.0:
        return float("nan")
    k = v.size
    if k == 1:
        return 1.0
    p = pos / total
    if method == "entropy":
        nz = p[p > 0]
        h = float(-(nz * np.log(nz)).sum())
        c = 1.0 - h / math.log(k)
    elif method == "gini":
        x = np.sort(p)
        gini = float(((2 * np.arange(1, k + 1) - k - 1) @ x) / k)  # sum(x) == 1
        c = gini * k / (k - 1)
    else:
        raise ValueError(f"unknown method {method!r}; use 'entropy' or 'gini'.")
    return float(np.clip(c, 0.0, 1.0))


def concentration_curve(
    vectors: Any, num_bins: int = 10, method: Literal["entropy", "gini"] = "entropy"
) -> np.ndarray:
    """Mean step concentration in ``num_bins`` equal bins of normalized reasoning progress.

    Step s of S sits at progress (s + 0.5) / S (its midpoint), so traces of any length
    map onto [0, 1] and can be averaged bin by bin across traces (paper Fig. 10 left).
    Bins with no step (S < num_bins) or only ``nan`` concentrations are ``nan``.
    """
    v = _trajectory(vectors)
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer; got {num_bins!r}.")
    s = v.shape[0]
    conc = np.array([concentration(row, method) for row in v])
    bins = np.minimum(((np.arange(s) + 0.5) / s * num_bins).astype(int), num_bins - 1)
    curve = np.full(num_bins, np.nan)
    for b in range(num_bins):
        vals = conc[(bins == b) & ~np.isnan(conc)]
        if vals.size:
            curve[b] = vals.mean()
    return curve


# --------------------------------------------------------------------------- early failure prediction


def truncate(vectors: Any, fraction: float) -> np.ndarray:
    """The first ``ceil(fraction * S)`` steps (at least 1): the trace seen so far.

    The product is nudged down by 1e-9 before ``ceil`` so float noise does not add a step
    (0.3 * 10 is 3.0000000000000004 in floating point, which must stay 3).
    """
    v = _trajectory(vectors)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}.")
    n = max(1, min(v.shape[0], math.ceil(fraction * v.shape[0] - 1e-9)))
    return v[:n]


def failure_auc_over_progress(
    trajectories: Sequence[Any],
    failed: Sequence[bool],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, np.ndarray]:
    """ROC AUC of tortuosity as a failure predictor, using only the first part of each trace.

    For each fraction f, every trajectory is truncated to its first ``ceil(f * S_i)``
    steps and its tortuosity computed; AUC = probability that a failed trace is more
    tortuous than a successful one (failed is the positive class, higher tortuosity
    predicts failure). Traces whose truncated tortuosity is ``nan`` (fewer than 2 steps,
    or no movement) are left out; ``inf`` ranks above every finite value. The AUC is
    ``nan`` where the remaining traces contain only one class.

    Returns:
        ``{"fraction": (F,), "auc": (F,), "n": (F,) traces used at each fraction}``.
    """
    trajs = [_trajectory(t, f"trajectories[{i}]") for i, t in enumerate(trajectories)]
    if not trajs:
        raise ValueError("no trajectories given; pass at least one (S, K) array.")
    labels = np.asarray(failed)
    if labels.ndim != 1 or labels.size != len(trajs):
        raise ValueError(
            f"failed must have one bool per trajectory; got {labels.size} labels for {len(trajs)} trajectories."
        )
    if labels.dtype != bool:
        if not np.all(np.isin(labels, (0, 1))):
            raise ValueError("failed must be booleans (True = the trace failed) or 0/1.")
        labels = labels.astype(bool)
    fr = as_array(fractions)
    if fr.ndim != 1 or fr.size == 0 or not np.all((fr > 0) & (fr <= 1)):
        raise ValueError(f"fractions must be a non-empty list of values in (0, 1]; got {list(fr)}.")

    aucs, used = np.full(fr.size, np.nan), np.zeros(fr.size, dtype=int)
    for j, f in enumerate(fr):
        tort = np.array([tortuosity(truncate(t, float(f))) for t in trajs])
        keep = ~np.isnan(tort)
        used[j] = int(keep.sum())
        y = labels[keep]
        if y.size and 0 < y.sum() < y.size:
            # AUC depends on order only; ranks turn inf into a usable value for sklearn.
            aucs[j] = roc_auc_score(y, stats.rankdata(tort[keep]))
    return {"fraction": fr, "auc": aucs, "n": used}


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class TrajectoryStats:
    """Per-trace summary; see the functions of the same names for definitions."""

    num_steps: int
    path_length: float
    displacement: float
    tortuosity: float
    mean_concentration: float


def trajectory_stats(vectors: Any, method: Literal["entropy", "gini"] = "entropy") -> TrajectoryStats:
    """All trajectory metrics of one trace; ``mean_concentration`` skips ``nan`` steps."""
    v = _trajectory(vectors)
    conc = np.array([concentration(row, method) for row in v])
    ok = conc[~np.isnan(conc)]
    return TrajectoryStats(
        num_steps=int(v.shape[0]),
        path_length=path_length(v),
        displacement=displacement(v),
        tortuosity=tortuosity(v),
        mean_concentration=float(ok.mean()) if ok.size else float("nan"),
    )
