"""Faithfulness metrics: how well attribution scores predict real ablation effects.

Every function here is pure and numeric: array-likes in (numpy arrays, lists, or torch
tensors, including ones on GPU, requiring grad, or in half precision), Python floats or
numpy arrays out. Nothing imports torch.

Conventions shared by the whole module

* ``scores`` / ``predicted``: one value per image region, shape ``(K,)``. Higher means
  "this region matters more for the span" (a predicted log-prob drop).
* ``masks``: boolean, shape ``(M, K)``. **True means the region is ABLATED** (knocked
  out) in that subset; False means it is kept. This is the opposite of "keep masks" used
  by some ContextCite code, so convert before calling if yours are keep-masks
  (``~keep``).
* ``actual`` / ``actual_effects``: measured log-prob drops,
  ``log p(S | x) - log p(S | x with the subset ablated)``; positive = the regions helped.

Undefined correlations (an input that is constant) come back as ``nan`` instead of
raising, because that happens legitimately per span (e.g. a span that ignores the image)
and aggregates should skip it and count it; see :func:`summarize`.
Malformed inputs (wrong shapes, empty, NaN/inf) raise ``ValueError``.

:data:`METRICS` is the one glossary of metric names: the keys that training and
evaluation write (``lds``, ``top3_drop``, ``test_r2`` ...) with a label and a meaning,
used by reports and by the estimator's model card (:func:`metric_label`,
:func:`metric_meaning`).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
from scipy import stats
from sklearn.metrics import r2_score as _sklearn_r2

__all__ = [
    "as_array",
    "subset_predictions",
    "lds",
    "topk_regions",
    "topk_mask",
    "topk_drop",
    "ablation_from_table",
    "pearson",
    "spearman",
    "r2_score",
    "calibrated_r2",
    "summarize",
    "curve_steps",
    "deletion_masks",
    "insertion_masks",
    "deletion_curve",
    "insertion_curve",
    "curve_auc",
    "deletion_auc",
    "insertion_auc",
    "DEFAULT_CURVE_POINTS",
    "MIN_TOTAL_EFFECT",
    "length_quantile_groups",
    "r2_by_group",
    "METRICS",
    "metric_label",
    "metric_meaning",
]


# --------------------------------------------------------------------------- helpers


def as_array(x: Any, *, dtype: Any = np.float64) -> np.ndarray:
    """Convert an array-like or torch tensor to a numpy array of ``dtype``.

    Torch tensors are detached and moved to CPU first so that GPU / grad / bfloat16
    tensors work without the caller thinking about it (``np.asarray`` alone fails on all
    three).
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, duck-typed
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _vector(x: Any, name: str) -> np.ndarray:
    """A finite, non-empty 1-D float64 vector, or a ValueError that says what to fix."""
    a = as_array(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per region/subset); got shape {a.shape}.")
    if a.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value.")
    if not np.all(np.isfinite(a)):
        raise ValueError(
            f"{name} contains NaN or inf at positions {np.flatnonzero(~np.isfinite(a)).tolist()}; "
            "drop or impute those entries before computing metrics."
        )
    return a


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same length; got {a.shape[0]} and {b.shape[0]}. "
            "Pass one value per region (or per subset) in both."
        )


def _ablation_masks(masks: Any, num_regions: int) -> np.ndarray:
    """Validate an (M, K) ablation-mask matrix (True = ablated) and return it as bool."""
    raw = as_array(masks, dtype=None)
    if raw.ndim != 2:
        raise ValueError(f"masks must be 2-D (subsets x regions); got shape {raw.shape}.")
    if raw.shape[0] == 0:
        raise ValueError("masks has no subsets (M=0); pass at least one ablation subset.")
    if raw.shape[1] != num_regions:
        raise ValueError(
            f"masks has {raw.shape[1]} columns but there are {num_regions} region scores; "
            "columns must be regions in the same order as the scores."
        )
    if raw.dtype != bool:
        if not np.all(np.isin(raw, (0, 1))):
            raise ValueError(
                "masks must be boolean (True = region ablated) or 0/1; got other values."
            )
        raw = raw.astype(bool)
    return raw


def _is_constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


# --------------------------------------------------------------------------- correlations


def pearson(predicted: Any, actual: Any) -> float:
    """Pearson correlation of two equal-length vectors; ``nan`` if either is constant.

    Scale- and shift-free, which is why the estimator is trained on it (negative Pearson
    is the training loss, see :mod:`hf_vattr.pipeline.training`).
    """
    p, a = _vector(predicted, "predicted"), _vector(actual, "actual")
    _same_length(p, a, "predicted", "actual")
    if p.size < 2 or _is_constant(p) or _is_constant(a):
        return float("nan")
    return float(stats.pearsonr(p, a).statistic)


def spearman(predicted: Any, actual: Any) -> float:
    """Spearman rank correlation; ``nan`` if either input is constant (no ranking)."""
    p, a = _vector(predicted, "predicted"), _vector(actual, "actual")
    _same_length(p, a, "predicted", "actual")
    if p.size < 2 or _is_constant(p) or _is_constant(a):
        return float("nan")
    return float(stats.spearmanr(p, a).statistic)


def r2_score(predicted: Any, actual: Any) -> float:
    """Raw coefficient of determination ``1 - SS_res / SS_tot`` of ``predicted`` for ``actual``.

    This is the *uncalibrated* R^2: predictions are taken at face value, so it is
    scale-sensitive (scores that rank perfectly but are off by a factor of 2 score < 1,
    and it can be arbitrarily negative). Use it when scores claim to be log-prob drops in
    their own units. ``nan`` if ``actual`` is constant (SS_tot = 0).
    """
    p, a = _vector(predicted, "predicted"), _vector(actual, "actual")
    _same_length(p, a, "predicted", "actual")
    if _is_constant(a):
        return float("nan")
    return float(_sklearn_r2(a, p))


def calibrated_r2(predicted: Any, actual: Any) -> float:
    """R^2 after least-squares fitting ``actual ~ a * predicted + b``; equals Pearson^2.

    Scale-free counterpart of :func:`r2_score`: measures how much variance of the actual
    effects a linear recalibration of the scores can explain (what "R^2 of predicted vs
    actual" in a scatter plot with a fitted line reports). ``nan`` if either is constant.
    """
    r = pearson(predicted, actual)
    return r * r


def summarize(values: Any) -> dict[str, float]:
    """Mean, sample std (ddof=1), count, and standard error of per-span metric values.

    NaN entries mean "undefined for this span" and are skipped but counted in ``n_nan`` so
    a report can say how many spans were excluded. ``inf`` is kept (it is a real value,
    e.g. tortuosity of a closed loop). Keys: ``mean, std, sem, n, n_nan``.
    """
    v = as_array(values).ravel()
    if v.size == 0:
        raise ValueError("values is empty; pass at least one metric value.")
    ok = v[~np.isnan(v)]
    n = int(ok.size)
    mean = float(ok.mean()) if n else float("nan")
    std = float(ok.std(ddof=1)) if n >= 2 else float("nan")
    sem = std / np.sqrt(n) if n >= 2 else float("nan")
    return {"mean": mean, "std": std, "sem": float(sem), "n": n, "n_nan": int(v.size - n)}


# --------------------------------------------------------------------------- LDS


def subset_predictions(predicted_scores: Any, masks: Any) -> np.ndarray:
    """Predicted effect of ablating each subset: the sum of its ablated regions' scores.

    This additivity is the linear-datamodel assumption LDS tests (ContextCite / AT2).
    """
    s = _vector(predicted_scores, "predicted_scores")
    m = _ablation_masks(masks, s.size)
    return m.astype(np.float64) @ s


def lds(predicted_scores: Any, masks: Any, actual_effects: Any) -> float:
    """Linear Datamodeling Score of one span.

    Args:
        predicted_scores: ``(K,)`` per-region attribution scores.
        masks: ``(M, K)`` bool, **True = region ablated** in subset m.
        actual_effects: ``(M,)`` measured log-prob drop of the span under each subset.

    Returns:
        Spearman correlation over the M subsets between the predicted subset effect
        (sum of ablated regions' scores) and the actual one; ``nan`` if either side is
        constant (e.g. all scores equal and every subset the same size).
    """
    pred = subset_predictions(predicted_scores, masks)
    act = _vector(actual_effects, "actual_effects")
    if act.shape != pred.shape:
        raise ValueError(
            f"actual_effects has {act.size} entries but masks has {pred.size} subsets; "
            "pass one measured effect per mask row."
        )
    return spearman(pred, act)


# --------------------------------------------------------------------------- top-k drop


def _check_k(k: int, num_regions: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer; got {k!r}.")
    if not 1 <= k <= num_regions:
        raise ValueError(
            f"k={k} is out of range for {num_regions} regions; use 1 <= k <= {num_regions} "
            "(clip k to the number of regions for small images)."
        )
    return int(k)


def topk_regions(scores: Any, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; ties go to the lower region index.

    Deterministic tie-breaking keeps Top-K drop reproducible when scores tie (e.g. the
    all-zero scores of a text-only span, or the random baseline with coarse values).
    """
    s = _vector(scores, "scores")
    k = _check_k(k, s.size)
    return np.argsort(-s, kind="stable")[:k]


def topk_mask(scores: Any, k: int) -> np.ndarray:
    """``(K,)`` bool ablation mask (True = ablated) selecting :func:`topk_regions`."""
    s = _vector(scores, "scores")
    mask = np.zeros(s.size, dtype=bool)
    mask[topk_regions(s, k)] = True
    return mask


def topk_drop(scores: Any, ablate: Callable[[np.ndarray], float], k: int) -> float:
    """Top-K drop: the log-prob drop when the k top-scored regions are ablated together.

    Higher is more faithful: a good attribution puts the regions the span truly needs at
    the top. ``ablate`` receives a fresh ``(K,)`` bool mask, **True = ablate**, and must
    return the measured drop ``log p(S|x) - log p(S|x ablated)``; it is called exactly
    once. Use :func:`ablation_from_table` to evaluate against precomputed ablations.
    """
    return _call_ablate(ablate, topk_mask(scores, k))


def ablation_from_table(masks: Any, effects: Any, *, duplicates: str = "raise") -> Callable[[np.ndarray], float]:
    """An ``ablate`` function that looks a mask up in precomputed ablation results.

    Lets :func:`topk_drop` run offline against ground truth collected once (e.g. LDS
    subsets plus leave-one-out and top-k masks). A mask not in the table raises
    ``KeyError`` naming the missing regions, rather than silently guessing. A mask listed twice
    with different effects raises a ``ValueError`` (``duplicates="raise"``), or the later row wins
    (``duplicates="last"``: e.g. leave-one-out rows listed after subsets that happen to ablate one region).
    """
    if duplicates not in ("raise", "last"):
        raise ValueError(f"duplicates must be 'raise' or 'last', got {duplicates!r}.")
    m = as_array(masks, dtype=None)
    if m.ndim != 2:
        raise ValueError(f"masks must be 2-D (subsets x regions); got shape {m.shape}.")
    m = _ablation_masks(m, m.shape[1])
    e = _vector(effects, "effects")
    if e.size != m.shape[0]:
        raise ValueError(f"got {m.shape[0]} masks but {e.size} effects; pass one effect per mask.")
    table: dict[bytes, float] = {}
    for row, eff in zip(m, e):
        key = np.packbits(row).tobytes()
        if duplicates == "raise" and key in table and table[key] != eff:
            raise ValueError(f"mask {np.flatnonzero(row).tolist()} appears twice with different effects.")
        table[key] = float(eff)
    num_regions = m.shape[1]

    def ablate(mask: np.ndarray) -> float:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (num_regions,):
            raise ValueError(f"mask must have shape ({num_regions},); got {mask.shape}.")
        key = np.packbits(mask).tobytes()
        if key not in table:
            raise KeyError(f"no precomputed ablation for regions {np.flatnonzero(mask).tolist()}.")
        return table[key]

    return ablate


# --------------------------------------------------------------------------- deletion / insertion AUC

#: Default number of steps along a deletion / insertion curve (``None`` = every region, i.e. K steps).
DEFAULT_CURVE_POINTS = 8
#: Spans whose all-regions drop ``E`` is below this (nats) have no normalised curve (``nan``).
MIN_TOTAL_EFFECT = 1e-2


def curve_steps(num_regions: int, points: int | None = DEFAULT_CURVE_POINTS) -> np.ndarray:
    """Region counts ``j`` at which a deletion / insertion curve is measured, ``0 .. K`` increasing.

    ``points=None`` (or ``points >= K``): every ``j = 0, 1, ..., K`` (the full curve). Otherwise the
    ``points + 1`` evenly spaced fractions ``0, 1/points, ..., 1`` of the K regions, each rounded to
    the nearest whole region (``round(i * K / points)``, duplicates dropped). ``0`` and ``K`` are
    always included.
    """
    if isinstance(num_regions, bool) or not isinstance(num_regions, (int, np.integer)) or num_regions < 1:
        raise ValueError(f"num_regions must be a positive integer; got {num_regions!r}.")
    k = int(num_regions)
    if points is None or points >= k:
        return np.arange(k + 1)
    if isinstance(points, bool) or not isinstance(points, (int, np.integer)) or points < 1:
        raise ValueError(f"points must be a positive integer or None (full curve); got {points!r}.")
    return np.unique(np.round(np.linspace(0, k, int(points) + 1)).astype(int))


def _order(scores: Any) -> np.ndarray:
    """Regions by decreasing score, ties to the lower index (the order of :func:`topk_regions`)."""
    return np.argsort(-_vector(scores, "scores"), kind="stable")


def deletion_masks(scores: Any, points: int | None = DEFAULT_CURVE_POINTS) -> np.ndarray:
    """``(P, K)`` bool ablation masks of a deletion curve: row ``i`` ablates the ``j_i`` top-scored regions.

    ``j_i`` are :func:`curve_steps`; the first row (``j = 0``) ablates nothing, the last all regions.
    """
    order = _order(scores)
    steps = curve_steps(order.size, points)
    masks = np.zeros((steps.size, order.size), dtype=bool)
    for i, j in enumerate(steps):
        masks[i, order[:j]] = True
    return masks


def insertion_masks(scores: Any, points: int | None = DEFAULT_CURVE_POINTS) -> np.ndarray:
    """``(P, K)`` bool ablation masks of an insertion curve: row ``i`` keeps (restores) only the ``j_i``
    top-scored regions and ablates the rest; the first row ablates every region, the last none."""
    order = _order(scores)
    steps = curve_steps(order.size, points)
    masks = np.ones((steps.size, order.size), dtype=bool)
    for i, j in enumerate(steps):
        masks[i, order[:j]] = False
    return masks


def _call_ablate(ablate: Callable[[np.ndarray], float], mask: np.ndarray) -> float:
    drop = ablate(mask.copy())
    try:
        value = float(np.asarray(as_array(drop)).item())
    except (TypeError, ValueError) as e:
        raise ValueError(f"ablate must return one number (the log-prob drop); got {drop!r}.") from e
    if not np.isfinite(value):
        raise ValueError(f"ablate returned {value} for mask {mask.astype(int).tolist()}; expected a finite drop.")
    return value


def deletion_curve(scores: Any, ablate: Callable[[np.ndarray], float],
                   points: int | None = DEFAULT_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Deletion curve of one span: ``(fractions, drops)``, both ``(P,)``.

    ``drops[i] = D(j_i)``: the span's log-prob drop when its ``j_i`` top-scored regions are ablated
    together (``j_i`` from :func:`curve_steps`, ``fractions = j / K``). ``D(0) = 0`` by definition
    (``ablate`` is not called for the empty mask); ``D(K) = E`` is the drop with every region ablated.
    ``ablate(mask) -> drop`` as in :func:`topk_drop` (True = ablated).
    """
    masks = deletion_masks(scores, points)
    k = masks.shape[1]
    drops = np.array([0.0 if not m.any() else _call_ablate(ablate, m) for m in masks])
    return masks.sum(1) / k, drops


def insertion_curve(scores: Any, ablate: Callable[[np.ndarray], float],
                    points: int | None = DEFAULT_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Insertion curve of one span: ``(fractions, recovered)``, both ``(P,)``.

    Start from every region ablated and restore regions in score order: ``recovered[i] = I(j_i) =
    E - drop(ablate all but the j_i top-scored regions)``, the log-prob the span gets back when only
    those ``j_i`` regions are visible, with ``E = drop(ablate all)``. ``I(0) = 0``, ``I(K) = E``
    (``ablate`` is not called for the empty mask).
    """
    masks = insertion_masks(scores, points)
    k = masks.shape[1]
    total = _call_ablate(ablate, np.ones(k, dtype=bool))
    rec = np.array([total - (0.0 if not m.any() else (total if m.all() else _call_ablate(ablate, m)))
                    for m in masks])
    return (~masks).sum(1) / k, rec


def curve_auc(fractions: Any, values: Any, total: float, min_total: float = MIN_TOTAL_EFFECT) -> float:
    """Area under ``values`` (nats) over ``fractions`` in [0, 1] (trapezoid rule): the curve's mean height.

    Why not divided by ``total`` (the all-regions drop ``E``): effects are far from monotone in the
    ablated set (ablating one object can cost a step 20 nats while ablating the whole image costs it
    2), so ``curve / E`` explodes on exactly the spans that matter. In nats, methods compare on the
    same scale, like top-k drop. ``nan`` when ``total < min_total`` (a span that barely depends on the
    image, or is helped by removing it, has no meaningful order).
    """
    x, y = _vector(fractions, "fractions"), _vector(values, "values")
    _same_length(x, y, "fractions", "values")
    if x[0] != 0.0 or x[-1] != 1.0 or np.any(np.diff(x) <= 0):
        raise ValueError("fractions must increase from 0 to 1.")
    if not np.isfinite(total) or total < min_total:
        return float("nan")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def deletion_auc(scores: Any, ablate: Callable[[np.ndarray], float], points: int | None = DEFAULT_CURVE_POINTS,
                 min_total: float = MIN_TOTAL_EFFECT) -> float:
    """Deletion AUC of one span, in nats; **higher is more faithful**.

    Remove regions in decreasing score order; the curve is the span's log-prob drop ``D(j)``
    after ``j`` regions are ablated, over the fraction ``j / K`` of regions removed; AUC by the
    trapezoid rule on :func:`curve_steps` (the mean drop along the removal order). A method that
    puts the regions the span needs first makes the drop rise early (``E (1 - 1/(2K))`` when one
    region carries everything, ``E = D(K)``); random order gives ``E / 2`` in expectation when
    effects add up. ``nan`` when ``E < min_total`` nats.

    (Unlike RISE-style "deletion" curves of the remaining probability, where lower is better,
    this curve is the drop, so higher is better.)
    """
    fractions, drops = deletion_curve(scores, ablate, points)
    return curve_auc(fractions, drops, drops[-1], min_total)


def insertion_auc(scores: Any, ablate: Callable[[np.ndarray], float], points: int | None = DEFAULT_CURVE_POINTS,
                  min_total: float = MIN_TOTAL_EFFECT) -> float:
    """Insertion AUC of one span, in nats; **higher is more faithful**.

    Start from every region ablated and restore regions in decreasing score order; the curve is
    the log-prob recovered ``I(j) = E - drop(all but the top j ablated)``, over the fraction
    ``j / K`` restored; trapezoid AUC on :func:`curve_steps` (the mean recovery). ``nan`` when
    ``E < min_total`` nats. Differs from :func:`deletion_auc` when regions interact: two regions
    that each show the same evidence score low on deletion (removing one changes nothing) and
    high on insertion (restoring one brings the evidence back).
    """
    fractions, rec = insertion_curve(scores, ablate, points)
    return curve_auc(fractions, rec, rec[-1], min_total)


# --------------------------------------------------------------------------- R^2 by length


def length_quantile_groups(lengths: Any, num_groups: int = 5) -> np.ndarray:
    """Group index ``0 .. G-1`` of each item by increasing length, equal counts (quintiles for G = 5).

    Items are sorted by length (ties keep their input order) and cut into ``G = min(num_groups,
    n)`` consecutive groups whose sizes differ by at most one (``np.array_split``), so every group
    is populated even when many lengths tie; group 0 holds the shortest items.
    """
    v = _vector(lengths, "lengths")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer; got {num_groups!r}.")
    g = min(int(num_groups), v.size)
    out = np.empty(v.size, dtype=np.int64)
    for i, idx in enumerate(np.array_split(np.argsort(v, kind="stable"), g)):
        out[idx] = i
    return out


def r2_by_group(predicted: Any, actual: Any, groups: Any, *, calibrated: bool = False) -> dict[int, float]:
    """R^2 of ``predicted`` for ``actual`` within each group: ``{group: r2}`` in increasing group order.

    Raw :func:`r2_score` (or :func:`calibrated_r2` with ``calibrated=True``) of the points whose
    ``groups`` entry equals the group; ``nan`` for a group with fewer than two points or constant
    ``actual``.
    """
    p, a = _vector(predicted, "predicted"), _vector(actual, "actual")
    _same_length(p, a, "predicted", "actual")
    g = np.asarray(groups)
    if g.shape != p.shape:
        raise ValueError(f"groups must have one entry per point ({p.size}); got shape {g.shape}.")
    fn = calibrated_r2 if calibrated else r2_score
    out: dict[int, float] = {}
    for key in sorted(np.unique(g).tolist()):
        sel = g == key
        out[int(key)] = fn(p[sel], a[sel]) if sel.sum() >= 2 else float("nan")
    return out


# --------------------------------------------------------------------------- glossary

#: Every metric name that training and evaluation write, with a short label and its meaning.
#: ``top{k}_drop`` stands for any k and ``r2_q{q}`` for any quintile; ``test_`` / ``val_`` / ``train_``
#: prefixes, ``_thinking`` / ``_answer`` suffixes (the metric on one span section) and ``_sem`` /
#: ``_n`` suffixes are resolved by :func:`metric_meaning`.
METRICS: dict[str, tuple[str, str]] = {
    "lds": (
        "LDS",
        "Linear datamodeling score: mean over spans of the Spearman correlation between predicted "
        "(sum of member scores) and measured log-prob drops of random region subsets",
    ),
    "pearson": ("Pearson", "Mean over spans of the Pearson correlation of predicted vs measured single-region effects"),
    "pearson_pooled": ("Pearson (pooled)", "Pearson correlation of predicted vs measured single-region effects, all spans pooled"),
    "r2": ("R^2", "R^2 of the scores, taken at face value, for the measured single-region effects (all spans pooled)"),
    "r2_calibrated": ("R^2 (cal.)", "R^2 after a least-squares line through the scores (= pooled Pearson^2)"),
    "top{k}_drop": (
        "Top-{k} drop",
        "Log-prob drop of a span when its top-{k} regions by score are ablated together (nats; higher is more faithful)",
    ),
    "deletion_auc": (
        "Deletion AUC",
        "Regions ablated one after another in decreasing score order (real ablations): area under the span's "
        "log-prob drop over the fraction of regions removed, i.e. the mean drop along that order; mean over "
        "spans (nats; higher is more faithful)",
    ),
    "insertion_auc": (
        "Insertion AUC",
        "From every region ablated, regions restored in decreasing score order (real ablations): area under "
        "the log-prob recovered over the fraction of regions restored, i.e. the mean recovery; mean over "
        "spans (nats; higher is more faithful)",
    ),
    "r2_q{q}": (
        "R^2 Q{q}",
        "R^2 (raw, pooled single-region points) on the spans of the examples in generation-length quintile {q} "
        "(1 = shortest fifth of the traces by generated tokens)",
    ),
    "r2_calibrated_q{q}": (
        "R^2 (cal.) Q{q}",
        "Calibrated R^2 (pooled Pearson^2) on the spans of the examples in generation-length quintile {q} "
        "(1 = shortest fifth of the traces by generated tokens)",
    ),
    "pointing": ("Pointing", "Fraction of steps whose top-1 region is on the object the step is about (toy task)"),
    "time_per_span_ms": ("Time / span (ms)", "Wall time to attribute one span, in milliseconds"),
    "num_spans": ("Spans", "Number of spans the metrics were computed on"),
    "split": ("Split", "Examples the metrics were computed on: val = held out from training, train = none held out"),
    "val_loss": ("Val. loss", "Best validation loss: negative mean per-span Pearson (lower is better)"),
}

_SPLITS = {"test": "test examples", "val": "held-out validation examples", "train": "training examples"}


#: Span sections a metric name can be restricted to with a ``_<section>`` suffix (``lds_answer``).
SECTIONS = {"thinking": "thinking (reasoning) spans only", "answer": "answer spans only"}


def _lookup(name: str) -> tuple[str, str] | None:
    """(label, meaning) of a plain metric name: ``top{k}_drop`` / ``r2_q{q}`` filled in, ``_<section>`` resolved."""
    for section, what in SECTIONS.items():
        if name.endswith("_" + section) and (found := _lookup(name[: -len(section) - 1])):
            return f"{found[0]} ({section})", f"{found[1]}; on {what}"
    for pattern, key, field in ((r"top(\d+)_drop", "top{k}_drop", "k"), (r"r2_q(\d+)", "r2_q{q}", "q"),
                                (r"r2_calibrated_q(\d+)", "r2_calibrated_q{q}", "q")):
        if match := re.fullmatch(pattern, name):
            label, meaning = METRICS[key]
            return label.format(**{field: match[1]}), meaning.format(**{field: match[1]})
    if name not in METRICS:
        return None
    return METRICS[name]


def metric_label(name: str) -> str:
    """Short column label of a metric name (``top3_drop`` -> ``Top-3 drop``); the name itself if unknown."""
    found = _lookup(name)
    return found[0] if found else name


def metric_meaning(name: str) -> str:
    """One-line meaning of a metric name as written by training / evaluation; ``""`` if unknown.

    Understands ``top{k}_drop`` for any k, ``r2_q{q}`` for any quintile, a ``_thinking`` /
    ``_answer`` suffix (the metric on one span section), a ``test_`` / ``val_`` / ``train_`` prefix
    (the same metric on that split) and a ``_sem`` / ``_n`` suffix (its standard error / span count).
    """
    for suffix, what in (("_sem", "Standard error (over spans) of: "), ("_n", "Spans with a defined value of: ")):
        if name.endswith(suffix) and _lookup(name[: -len(suffix)]):
            return what + metric_meaning(name[: -len(suffix)])
    if found := _lookup(name):
        return found[1]
    prefix, _, rest = name.partition("_")
    if prefix in _SPLITS and (found := _lookup(rest)):
        return f"{found[1]}; on the {_SPLITS[prefix]}"
    return ""
