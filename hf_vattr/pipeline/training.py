"""Fitting a :class:`~hf_vattr.estimator.LinearEstimator` on collected ablation ground truth.

The training step of the method (arXiv 2604.16587; recipe as in AT2). For every span ``S``
of every collected example we have the pooled attention features ``f(S) : (L, H, K)`` and
measured ablation effects: leave-one-out effects ``loo(S) : (K,)`` and/or the effects of
``M`` random region subsets ``subset(S) : (M,)`` with their ``(M, K)`` ablation masks. The
estimator predicts

    score(S, k) = sum_{l,h} w[l, h] * f[l, h](S, k)

and is trained with a **scale-free** loss: minus the Pearson correlation, per span,
between predicted and actual effects, averaged over spans.

* ``target="loo"``: across the K regions, ``score(S, :)`` vs ``loo(S)``.
* ``target="subsets"``: across the M masks, ``masks @ score(S, :)`` (the additive
  prediction of a subset's effect, as in LDS) vs ``subset(S)``.
* ``target="both"``: the mean of the two losses.

Spans whose actual effects are constant (e.g. a span that ignores the image) have no
correlation and are left out of the loss (and counted in the report).

Optimisation is full batch (the model has only ``L * H`` parameters): Adam with the
weights projected back onto the unit sphere after every step (the loss does not depend on
the scale of ``w``; keeping the norm fixed keeps Adam's step size meaningful), or L-BFGS.
Non-negativity is a projection (``clamp_min(0)`` before renormalising; for L-BFGS the
parametrisation ``w = theta**2``). Initialisation: uniform weights, i.e. raw attention
(the mean over layers and heads). ``weight_decay`` shrinks the *direction* of ``w``
towards that uniform initialisation (``weight_decay * ||w/|w| - u/|u|||^2``): since the
loss is scale-free an ordinary L2 penalty would only change the norm.

**Calibration.** The Pearson loss fixes each span's scores only up to a positive scale
and a per-span shift. After fitting, ``calibrate=True`` fits one scale ``a`` by least
squares on the *training* examples, on within-span centred values
(``loo - mean ~ a * (score - mean)``; without LOO data, the same across subsets), then a
bias ``b`` if ``use_bias`` (the mean residual), and folds them into the estimator, so raw
scores are in log-prob units (a predicted log-prob drop). The per-span level is not
something the loss learns: pooled raw R^2 also depends on it (non-negative weights, which
score a never-attended region 0, tend to get it right). Raw R^2 needs calibrated units;
R^2 and every correlation metric do not. Without calibration the weights are rescaled to
``sum |w| = 1`` (for non-negative weights: sum to 1, the units of raw attention).

The held-out split is by **example**, never by span (spans of one trace share an image
and a trace, so a span split would leak). Seeds fix the split; the optimisation itself is
deterministic.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch
from scipy.optimize import nnls
from transformers.utils import logging

from .collection import check_ground_truth
from ..errors import AttributionError
from .evaluation import stored_metrics
from ..options import check_fields

if TYPE_CHECKING:
    from .collection import ExampleRecord

logger = logging.get_logger(__name__)


class TrainingError(AttributionError, ValueError):
    """The records or settings cannot be trained on."""

__all__ = [
    "TrainingConfig",
    "split_examples",
    "masked_pearson",
    "pearson_loss",
    "fit_estimator",
    "TARGETS",
    "synthetic_examples",
]

TARGETS = ("loo", "subsets", "both")
INHERIT_MODES = ("auto", "on", "off")
#: (pool, recency decay) tried when fitting inheritance (decay 1: plain mean of the steps; 0: the last step only)
INHERIT_CANDIDATES = (("mean", 1.0), ("mean", 0.7), ("mean", 0.5), ("mean", 0.3), ("mean", 0.0), ("max", 1.0))
OPTIMIZERS = ("adam", "lbfgs")


# ----------------------------------------------------------------------------- config


@dataclass
class TrainingConfig:
    """Hyper-parameters of :func:`fit_estimator`.

    Each field's ``help`` metadata documents it (``hf-vattr train --help`` prints the same text).
    """

    epochs: int = field(default=300, metadata={
        "help": "optimisation steps: full-batch steps, or passes of mini-batches when batch_size is set",
        "range": "[0, inf)"})
    lr: float = field(default=0.02, metadata={"help": "learning rate (Adam) or step size (L-BFGS)",
                                              "range": "(0, inf)"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "shrinks the weight direction towards uniform weights (raw attention)", "range": "[0, inf)"})
    nonnegative: bool = field(default=False, metadata={
        "help": "constrain weights to be >= 0 (the estimator records it)"})
    use_bias: bool = field(default=False, metadata={
        "help": "give the estimator a scalar bias (fit by calibration; never changes rankings or the Pearson loss)"})
    val_fraction: float = field(default=0.2, metadata={
        "help": "fraction of examples held out for validation and metrics (0 disables)", "range": "[0, 1)"})
    seed: int = field(default=0, metadata={"help": "seed of the example split and of the mini-batch order"})
    target: str = field(default="loo", metadata={
        "help": "what the Pearson loss correlates: single-region (loo) effects, random-subset effects, or both",
        "choices": TARGETS})
    optimizer: str = field(default="adam", metadata={"help": "optimiser of the correlation fit", "choices": OPTIMIZERS})
    calibrate: bool = field(default=True, metadata={
        "help": "after the correlation fit, fit the scale (and bias) by least squares on the training spans, "
                "so scores are in nats"})
    eval_every: int = field(default=10, metadata={
        "help": "validate every this many steps and keep the best weights by validation loss", "range": "[1, inf)"})
    batch_size: int | None = field(default=None, metadata={"help": "spans per step (None: full batch)",
                                                           "range": "[1, inf)"})
    min_effect_std: float = field(default=1e-8, metadata={
        "help": "spans whose actual effects vary less are left out of the loss (no correlation is defined)",
        "range": "[0, inf)"})
    device: str | None = field(default=None, metadata={"help": "where to optimise (None: CPU)"})
    inherit: str = field(default="auto", metadata={
        "help": "indirect effects: answer spans inherit the thinking steps' scores with a fitted weight and "
                "recency decay (their own features are then not fit to the answers); auto: on when the "
                "collection measured total answer effects (answer_effects=total)",
        "choices": INHERIT_MODES})

    def __post_init__(self) -> None:
        check_fields(self)  # ranges and choices declared on the fields (the CLI shows the same ones)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- split


def split_examples(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) example indices: a seeded permutation, ``round(val_fraction * n)`` held out.

    At least one example is held out when ``val_fraction > 0`` and there are >= 2 examples;
    at least one stays in train.
    """
    if n <= 0:
        return [], []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    val = sorted(perm[:n_val])
    train = sorted(perm[n_val:])
    return train, val


# ----------------------------------------------------------------------------- padded span tensors


@dataclass
class _SpanTensors:
    """The spans of some records as padded tensors, so the loss is a few batched ops.

    Not a record shape: built from :class:`~hf_vattr.pipeline.collection.ExampleRecord` s by
    :meth:`from_records` and only used inside the fit. ``features (N, L, H, Kmax)``,
    ``region_valid (N, Kmax)``, ``loo (N, Kmax)``, ``masks (E, Mmax, Kmax)`` and
    ``subset_valid (E, Mmax)`` per example (None without subsets), ``subsets (N, Mmax)``,
    ``example_index (N,)`` (the example of each span).
    """

    features: torch.Tensor
    region_valid: torch.Tensor
    example_index: torch.Tensor
    loo: torch.Tensor
    masks: torch.Tensor | None
    subset_valid: torch.Tensor | None
    subsets: torch.Tensor | None
    records: list[ExampleRecord] = field(default_factory=list, repr=False)

    @property
    def num_spans(self) -> int:
        return int(self.features.shape[0])

    @property
    def dims(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])

    @property
    def example_ids(self) -> list[str]:
        return [str(r.example_id) for r in self.records]

    @classmethod
    def from_records(cls, records: Sequence[ExampleRecord], dtype: torch.dtype = torch.float32,
                     exclude_sections: Sequence[str] = ()) -> _SpanTensors:
        """``exclude_sections``: spans of these sections are left out (examples keep their index)."""
        kept = {id(r): [i for i, sp in enumerate(r.spans) if sp.get("section") not in exclude_sections]
                for r in records}
        records = [r for r in records if kept[id(r)]]
        if not records:
            raise TrainingError("no spans to train on: every example is empty (S = 0) or no examples were given.")
        dims = {r.dims for r in records}
        if len(dims) != 1:
            raise TrainingError(f"examples come from models of different sizes: (L, H) in {sorted(dims)}.")
        l_, h_ = dims.pop()
        kmax = max(r.num_regions for r in records)
        n = sum(len(kept[id(r)]) for r in records)
        has_sub = all(r.num_subsets > 0 for r in records)
        mmax = max(r.num_subsets for r in records) if has_sub else 0

        feats = torch.zeros(n, l_, h_, kmax, dtype=dtype)
        rvalid = torch.zeros(n, kmax, dtype=torch.bool)
        loo = torch.zeros(n, kmax, dtype=torch.float32)
        masks = torch.zeros(len(records), mmax, kmax, dtype=torch.bool) if has_sub else None
        svalid = torch.zeros(len(records), mmax, dtype=torch.bool) if has_sub else None
        subs = torch.zeros(n, mmax, dtype=torch.float32) if has_sub else None
        ex_index = torch.empty(n, dtype=torch.long)
        start = 0
        for e, r in enumerate(records):
            keep, k, m = kept[id(r)], r.num_regions, r.num_subsets
            s = len(keep)
            sl = slice(start, start + s)
            feats[sl, :, :, :k] = r.span_features[keep].to(dtype)
            rvalid[sl, :k] = True
            ex_index[sl] = e
            loo[sl, :k] = r.loo_effects[keep]
            if masks is not None:
                masks[e, :m, :k] = r.subset_masks
                svalid[e, :m] = True
                subs[sl, :m] = r.subset_effects[keep]
            start += s
        return cls(feats, rvalid, ex_index, loo, masks, svalid, subs, records)

    def subset(self, example_indices: Sequence[int]) -> _SpanTensors:
        """The spans of the given examples (indices into ``self.records``)."""
        keep = list(example_indices)
        if not keep:
            raise TrainingError("empty example subset")
        remap = torch.full((len(self.records),), -1, dtype=torch.long)
        remap[torch.tensor(keep)] = torch.arange(len(keep))
        idx = (remap[self.example_index] >= 0).nonzero().flatten()
        return _SpanTensors(
            features=self.features[idx],
            region_valid=self.region_valid[idx],
            example_index=remap[self.example_index[idx]],
            loo=self.loo[idx],
            masks=None if self.masks is None else self.masks[keep],
            subset_valid=None if self.subset_valid is None else self.subset_valid[keep],
            subsets=None if self.subsets is None else self.subsets[idx],
            records=[self.records[i] for i in keep],
        )

    def to(self, device: torch.device | str) -> _SpanTensors:
        def mv(t):
            return None if t is None else t.to(device)

        return _SpanTensors(mv(self.features), mv(self.region_valid), mv(self.example_index), mv(self.loo),
                            mv(self.masks), mv(self.subset_valid), mv(self.subsets), self.records)

    def summary(self) -> dict:
        ks = [r.num_regions for r in self.records]
        out = {
            "num_examples": len(self.records),
            "num_spans": self.num_spans,
            "num_regions_min": int(min(ks)),
            "num_regions_max": int(max(ks)),
            "has_loo": True,
            "has_subsets": self.masks is not None,
        }
        if self.masks is not None:
            ms = [r.num_subsets for r in self.records]
            out["masks_per_example_min"] = int(min(ms))
            out["masks_per_example_max"] = int(max(ms))
        return out


# ----------------------------------------------------------------------------- loss


def masked_pearson(pred: torch.Tensor, actual: torch.Tensor, valid: torch.Tensor,
                   min_std: float = 1e-8, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row Pearson correlation over the ``valid`` entries of the last dimension.

    Returns ``(r, usable)``: ``r (N,)`` and a bool ``usable (N,)`` that is False for rows with
    fewer than 2 valid entries or (near-)constant ``actual`` (their ``r`` is 0 and must be
    left out of averages). A constant *prediction* gives ``r = 0`` with a finite gradient.
    """
    v = valid.to(pred.dtype)
    n = v.sum(-1)
    safe_n = n.clamp_min(1.0)
    pm = (pred * v).sum(-1, keepdim=True) / safe_n[..., None]
    am = (actual * v).sum(-1, keepdim=True) / safe_n[..., None]
    pc = (pred - pm) * v
    ac = (actual - am) * v
    a_var = (ac * ac).sum(-1)
    usable = (n >= 2) & (a_var / safe_n > min_std**2)
    num = (pc * ac).sum(-1)
    den = torch.sqrt((pc * pc).sum(-1) * a_var + eps)
    r = torch.where(usable, num / den, torch.zeros_like(num))
    return r, usable


def _span_predictions(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nlhk,lh->nk", features, weight.to(features.dtype)).float()


def pearson_loss(weight: torch.Tensor, records: Sequence[ExampleRecord], target: str = "loo", *,
                 min_std: float = 1e-8) -> tuple[torch.Tensor, dict]:
    """Minus the mean per-span Pearson correlation of predicted vs actual effects over ``records``.

    ``target="loo"`` correlates across regions, ``"subsets"`` across ablation masks
    (prediction = mask @ scores), ``"both"`` averages the two. Returns ``(loss, info)``
    with ``info["pearson_loo"]`` / ``info["pearson_subsets"]`` (floats) and the number of
    spans used / skipped for each.
    """
    return _pearson_loss(weight, _SpanTensors.from_records(records), target, min_std=min_std)


def _pearson_loss(weight: torch.Tensor, data: _SpanTensors, target: str = "loo", *, min_std: float = 1e-8,
                  span_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    feats = data.features if span_index is None else data.features[span_index]
    rvalid = data.region_valid if span_index is None else data.region_valid[span_index]
    pred = _span_predictions(weight, feats)
    losses, info = [], {}
    if target in ("loo", "both"):
        loo = data.loo if span_index is None else data.loo[span_index]
        r, ok = masked_pearson(pred, loo, rvalid, min_std)
        used = int(ok.sum())
        info.update(pearson_loo=float((r.sum() / max(used, 1)).detach()), spans_loo=used,
                    skipped_loo=int((~ok).sum()))
        if used:
            losses.append(-r.sum() / used)
    if target in ("subsets", "both"):
        if data.masks is None:
            raise TrainingError("target 'subsets' needs random-subset effects in every example (collect with "
                             "num_subsets > 0); use target='loo'.")
        ex = data.example_index if span_index is None else data.example_index[span_index]
        masks = data.masks[ex].to(pred.dtype)  # (N, M, K)
        svalid = data.subset_valid[ex]
        subs = data.subsets if span_index is None else data.subsets[span_index]
        sub_pred = torch.bmm(masks, pred.unsqueeze(-1)).squeeze(-1)  # (N, M)
        r, ok = masked_pearson(sub_pred, subs, svalid, min_std)
        used = int(ok.sum())
        info.update(pearson_subsets=float((r.sum() / max(used, 1)).detach()), spans_subsets=used,
                    skipped_subsets=int((~ok).sum()))
        if used:
            losses.append(-r.sum() / used)
    if not losses:
        # Nothing to correlate (every span constant): a zero loss that still depends on weight.
        return weight.sum() * 0.0, info
    return torch.stack(losses).mean(), info


# ----------------------------------------------------------------------------- calibration


def _centred(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Subtract each row's mean over its valid entries (invalid entries -> 0)."""
    v = valid.to(values.dtype)
    mean = (values * v).sum(-1, keepdim=True) / v.sum(-1, keepdim=True).clamp_min(1.0)
    return (values - mean) * v


def _calibration(weight: torch.Tensor, data: _SpanTensors, use_bias: bool) -> tuple[float, float]:
    """Least-squares ``(scale, bias)`` mapping scores to measured effects on ``data``.

    The scale is fit on *within-span centred* values, ``(loo - mean_S) ~ a * (score - mean_S)``:
    the Pearson loss fixes each span's scores only up to a positive scale and a per-span shift,
    so the within-span slope is what training determined (and it is positive whenever training
    found a positive correlation). The bias, if any, is then the mean residual
    ``loo - a * score`` over all points.
    """
    with torch.no_grad():
        pred = _span_predictions(weight, data.features).double()
        v = data.region_valid
        y = data.loo.double()
        xc, yc = _centred(pred, v), _centred(y, v)
        x_all, y_all = pred[v], y[v]
        denom = float((xc * xc).sum())
        scale = float((xc * yc).sum()) / denom if denom > 0 else 1.0
        bias = 0.0
        if use_bias:
            resid = y_all - scale * x_all
            bias = float(resid.sum() / max(resid.numel(), 1))
        return scale, bias


# ----------------------------------------------------------------------------- fitting


def _unit(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm().clamp_min(1e-12)


def fit_estimator(
    data: Sequence[ExampleRecord],
    num_layers: int | None = None,
    num_heads: int | None = None,
    config: TrainingConfig | None = None,
    *,
    model_type: str | None = None,
    base_model_id: str | None = None,
    base_model_revision: str | None = None,
    pooling: str | None = None,
    region_method: str = "grid",
    k_policy: dict | None = None,
    extra_training_data: dict | None = None,
    progress: bool = False,
):
    """Fit a :class:`LinearEstimator` on collected records; returns ``(estimator, report)``.

    Args:
        data: collected :class:`~hf_vattr.pipeline.collection.ExampleRecord` s (:func:`~hf_vattr.pipeline.collection.load_collection`).
        num_layers, num_heads: ``L`` and ``H``; default: read from the features.
        config: :class:`TrainingConfig` (defaults if None).
        model_type, base_model_id, base_model_revision, pooling, region_method, k_policy:
            recorded in the estimator's config (``model_type``/``pooling`` default to the
            records' values).
        extra_training_data: merged into the recorded training-data summary (task name...).

    The report holds ``config``, ``data`` (summary), ``split`` (train/val example ids),
    ``history`` (loss curve), ``calibration`` and ``metrics`` ({"train": ..., "val": ...},
    see :func:`hf_vattr.pipeline.evaluation.stored_metrics`). The estimator's ``training_metrics``
    are the held-out ones (train ones when nothing is held out) and its ``training_data``
    the data summary.
    """
    from ..estimator import LinearEstimator

    config = config or TrainingConfig()
    if not isinstance(config, TrainingConfig):
        raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}.")
    check_ground_truth(data)  # all-zero or non-finite effects would fit noise (and calibrate to a sign error)
    t0 = time.perf_counter()
    inherit = _inherits(data, config)
    full = _training_spans(data, config, num_layers, num_heads, inherit)
    l_, h_ = full.dims
    first = full.records[0]
    split = _Split.of(full, config)
    device = torch.device(config.device or "cpu")
    objective = _Objective(config, (l_, h_), device)
    best, history = _optimise(objective, split.train.to(device),
                              split.val.to(device) if split.val is not None else None, config, progress)
    w, bias, calibration = _scaled_weights(objective.weight(best.theta), split.train, config)

    estimator = LinearEstimator(
        l_, h_, use_bias=config.use_bias, model_type=model_type or first.model_type or None,
        base_model_id=base_model_id, base_model_revision=base_model_revision, pooling=pooling or first.pooling,
        feature_kind=first.feature_kind, region_method=region_method, k_policy=k_policy,
        nonnegative=config.nonnegative,
    )
    with torch.no_grad():
        estimator.weight.copy_(w)
        if estimator.bias is not None:
            estimator.bias.fill_(bias)
    estimator.eval()
    inheritance = {"applied": False}
    if inherit:
        inheritance = _fit_inheritance(estimator, split.records(split.train_idx), split.records(split.val_idx), config)
    summary, metrics = _record_training_info(estimator, split, config, best, extra_training_data)
    report = {
        "config": config.to_dict(),
        "data": summary,
        "split": {"train": [full.example_ids[i] for i in split.train_idx],
                  "val": [full.example_ids[i] for i in split.val_idx]},
        "best_step": best.step,
        "history": history,
        "calibration": calibration,
        "inheritance": inheritance,
        "metrics": metrics,
        "seconds": time.perf_counter() - t0,
    }
    return estimator, report


def _inherits(data: Sequence[ExampleRecord], config: TrainingConfig) -> bool:
    """Whether answers inherit the steps' scores (``config.inherit``; auto: the collection measured total effects)."""
    return config.inherit == "on" or (config.inherit == "auto" and bool(data) and all(
        r.config.get("answer_effects") == "total" for r in data))


def _training_spans(data: Sequence[ExampleRecord], config: TrainingConfig, num_layers: int | None,
                    num_heads: int | None, inherit: bool) -> _SpanTensors:
    """The spans the loss correlates, checked against the given sizes and the target."""
    from ..estimator import INHERITING_SECTIONS

    # With inheritance, answers are scored through the steps before them: their own features are not fit.
    full = _SpanTensors.from_records(data, exclude_sections=INHERITING_SECTIONS if inherit else ())
    l_, h_ = full.dims
    if num_layers is not None and num_layers != l_ or num_heads is not None and num_heads != h_:
        raise TrainingError(f"features are (L={l_}, H={h_}) but num_layers={num_layers}, num_heads={num_heads} given.")
    if config.target in ("subsets", "both") and full.masks is None:
        raise TrainingError(f"target={config.target!r} needs random-subset effects but some examples have none "
                         "(collected with num_subsets=0); use target='loo'.")
    return full


class _Objective:
    """The fitted loss as a function of the optimised parameters ``theta``.

    ``weight = theta**2`` for non-negative L-BFGS (so the constraint needs no projection), else ``theta``.
    The loss is minus the Pearson correlation plus ``weight_decay`` times the squared distance of the
    weight direction from the uniform one (raw attention), where ``theta`` starts.
    """

    def __init__(self, config: TrainingConfig, dims: tuple[int, int], device: torch.device) -> None:
        uniform = torch.full(dims, 1.0, device=device)
        self.config = config
        self.uniform_direction = _unit(uniform)
        self.squared = config.nonnegative and config.optimizer == "lbfgs"
        self.start = uniform.sqrt() if self.squared else self.uniform_direction

    def weight(self, theta: torch.Tensor) -> torch.Tensor:
        return theta * theta if self.squared else theta

    def __call__(self, theta: torch.Tensor, data: _SpanTensors,
                 span_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        config = self.config
        w = self.weight(theta)
        loss, info = _pearson_loss(w, data, config.target, min_std=config.min_effect_std, span_index=span_index)
        if config.weight_decay:
            loss = loss + config.weight_decay * (_unit(w) - self.uniform_direction).pow(2).sum()
        return loss, info


class _Best(NamedTuple):
    """The best parameters seen: their validation (else training) loss, ``theta`` and step."""

    loss: float
    theta: torch.Tensor
    step: int


def _optimise(objective: _Objective, train: _SpanTensors, val: _SpanTensors | None, config: TrainingConfig,
              progress: bool) -> tuple[_Best, list[dict]]:
    """Full-batch (or mini-batch) Adam or L-BFGS on the correlation loss; validates every ``eval_every`` steps.

    Returns the best parameters by validation loss (training loss without a held-out split) and the loss curve.
    """
    theta = objective.start.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(int(config.seed))
    history: list[dict] = []
    best = _Best(math.inf, theta.detach().clone(), -1)
    steps = int(config.epochs)
    if config.optimizer == "adam":
        opt = torch.optim.Adam([theta], lr=config.lr)
    else:
        opt = torch.optim.LBFGS([theta], lr=config.lr, max_iter=20, line_search_fn="strong_wolfe")

    def checkpoint(step: int) -> None:
        nonlocal best
        with torch.no_grad():
            train_loss, info = objective(theta, train)
        entry, score = _validation_entry(objective, theta, val, step, float(train_loss), info)
        history.append(entry)
        if score < best.loss - 1e-12:
            best = _Best(score, theta.detach().clone(), step)

    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="training estimator", unit="step")
    checkpoint(0)
    for step in iterator:
        for idx in _batch_orders(train, config.batch_size, gen):
            if config.optimizer == "adam":
                _adam_step(opt, objective, theta, train, idx)
            else:
                _lbfgs_step(opt, objective, theta, train, idx)
        if (step + 1) % config.eval_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
            if progress and hasattr(iterator, "set_postfix"):
                iterator.set_postfix(train=f"{history[-1]['train_loss']:.4f}",
                                     val=f"{history[-1].get('val_loss', float('nan')):.4f}")
    return best, history


def _validation_entry(objective: _Objective, theta: torch.Tensor, val: _SpanTensors | None, step: int,
                      train_loss: float, info: dict) -> tuple[dict, float]:
    """One point of the loss curve, and the loss that picks the best weights (validation, else training)."""
    entry = {"step": step, "train_loss": train_loss, **{f"train_{k}": v for k, v in info.items()}}
    if val is None:
        return entry, train_loss
    with torch.no_grad():
        val_loss, val_info = objective(theta, val)
    entry["val_loss"] = float(val_loss)
    entry.update({f"val_{k}": v for k, v in val_info.items()})
    return entry, float(val_loss)


def _batch_orders(train: _SpanTensors, batch: int | None, gen: torch.Generator) -> list[torch.Tensor | None]:
    """The span batches of one pass: ``[None]`` (every span) for full batch, else a seeded shuffle in batches."""
    if batch is None or batch >= train.num_spans:
        return [None]
    perm = torch.randperm(train.num_spans, generator=gen).to(train.features.device)
    return [perm[i:i + batch] for i in range(0, len(perm), batch)]


def _adam_step(opt: torch.optim.Optimizer, objective: _Objective, theta: torch.Tensor, train: _SpanTensors,
               idx: torch.Tensor | None) -> None:
    """One Adam step, then back onto the unit sphere (and the non-negative orthant): the loss is scale-free."""
    opt.zero_grad()
    loss, _ = objective(theta, train, idx)
    loss.backward()
    opt.step()
    with torch.no_grad():
        if objective.config.nonnegative:
            theta.clamp_(min=0.0)
            if float(theta.sum()) == 0.0:  # projected onto the origin: restart from uniform
                theta.copy_(objective.uniform_direction)
        theta.copy_(_unit(theta))


def _lbfgs_step(opt: torch.optim.Optimizer, objective: _Objective, theta: torch.Tensor, train: _SpanTensors,
                idx: torch.Tensor | None) -> None:
    def closure():
        opt.zero_grad()
        loss, _ = objective(theta, train, idx)
        loss.backward()
        return loss

    opt.step(closure)


def _scaled_weights(weight: torch.Tensor, train: _SpanTensors, config: TrainingConfig
                    ) -> tuple[torch.Tensor, float, dict]:
    """The fitted weights in their final units: calibrated to nats, or ``sum |w| = 1``; with the bias and what ran."""
    with torch.no_grad():
        w = weight.detach().float().cpu()
        if config.nonnegative:
            w = w.clamp_min(0.0)
        calibration: dict[str, Any] = {"applied": False}
        scale, bias = 1.0, 0.0
        if config.calibrate:
            a, b = _calibration(w, train, config.use_bias)
            if a > 0:
                scale, bias = a, b
                calibration = {"applied": True, "scale": a, "bias": b, "fit_on": "loo"}
            else:
                logger.warning(
                    f"Calibration found a non-positive scale ({a:.4g}): the fitted scores anti-correlate with the "
                    "training effects. Leaving the weights uncalibrated (sum |w| = 1); check the data."
                )
                calibration = {"applied": False, "reason": f"non-positive scale {a:.4g}"}
        if not calibration["applied"]:
            scale = 1.0 / float(w.abs().sum().clamp_min(1e-12))
        return w * scale, bias, calibration


@dataclass
class _Split:
    """The held-out split, by example: indices into ``full.records`` and their spans."""

    full: _SpanTensors
    train_idx: list[int]
    val_idx: list[int]
    train: _SpanTensors
    val: _SpanTensors | None

    @classmethod
    def of(cls, full: _SpanTensors, config: TrainingConfig) -> _Split:
        train_idx, val_idx = split_examples(len(full.example_ids), config.val_fraction, config.seed)
        return cls(full, train_idx, val_idx, full.subset(train_idx), full.subset(val_idx) if val_idx else None)

    def records(self, indices: list[int]) -> list[ExampleRecord]:
        return [self.full.records[i] for i in indices]


def _record_training_info(estimator: Any, split: _Split, config: TrainingConfig, best: _Best,
                          extra_training_data: dict | None) -> tuple[dict, dict]:
    """Score the fitted estimator on both splits and record the held-out metrics and the data summary in it.

    Returns the summary and ``{"train": metrics, "val": metrics or None}``.
    """
    def metrics_on(records: list[ExampleRecord]) -> dict | None:
        if not records:
            return None
        with torch.no_grad():
            scores = [estimator.span_scores(r.span_features, [sp.get("section") for sp in r.spans]) for r in records]
        return stored_metrics(scores, records)

    train_metrics = metrics_on(split.records(split.train_idx))
    val_metrics = metrics_on(split.records(split.val_idx))
    held = val_metrics if val_metrics is not None else train_metrics
    summary = split.full.summary()
    summary.update(
        num_train_examples=len(split.train_idx), num_val_examples=len(split.val_idx),
        num_train_spans=split.train.num_spans, num_val_spans=0 if split.val is None else split.val.num_spans,
        target=config.target, seed=config.seed, split="by example",
    )
    if extra_training_data:
        summary.update(extra_training_data)
    headline = ("lds", "pearson", "r2", "r2_calibrated", "top1_drop", "top3_drop", "top5_drop", "num_spans")
    training_metrics = {
        "split": "val" if val_metrics is not None else "train",
        **{k: held[k] for k in headline if isinstance(held.get(k), (int, float)) and not _isnan(held[k])},
        "val_loss": float(best.loss) if split.val is not None else None,
    }
    training_metrics = {k: v for k, v in training_metrics.items() if v is not None}
    estimator.set_training_info(training_metrics=training_metrics, training_data=summary)
    return summary, {"train": train_metrics, "val": val_metrics}


def _fit_inheritance(estimator: Any, train: Sequence[ExampleRecord], val: Sequence[ExampleRecord],
                     config: TrainingConfig) -> dict:
    """Fit how answers inherit the steps' scores: ``answer = own_weight * own + gamma * pool(steps)``; set it.

    For each (pool, decay) of :data:`INHERIT_CANDIDATES`, ``own_weight`` and ``gamma`` are the least-squares
    slopes of the answers' within-span centred LOO effects on their centred own and inherited
    scores, over the training examples (non-negative: a span's own attention can only add
    evidence); the candidate is then chosen by the held-out mean Pearson of the
    answers' scores (LOO, subsets or both, as ``config.target``). Returns what was fit, for the report.
    """
    from ..estimator import INHERITING_SECTIONS, pool_steps

    bias = 0.0 if estimator.bias is None else float(estimator.bias)

    def answers_of(records: Sequence[ExampleRecord]) -> list[tuple]:
        """Per answer span after at least one step: (own scores, the steps' scores - bias, targets), scored once."""
        out = []
        with torch.no_grad():
            for r in records:
                sections = [sp.get("section") for sp in r.spans]
                own = estimator(r.span_features).double()
                for s, section in enumerate(sections):
                    steps = [j for j in range(s) if sections[j] not in INHERITING_SECTIONS]
                    if section in INHERITING_SECTIONS and steps:
                        out.append((own[s], own[steps] - bias, r.loo_effects[s].double(), r.subset_masks.double(),
                                    r.subset_effects[s].double()))
        return out

    def answer_terms(answers: list[tuple], pool: str, decay: float) -> list[tuple]:
        return [(own, pool_steps(steps, pool, decay), loo, masks, subsets) for own, steps, loo, masks, subsets in answers]

    def centred(x: torch.Tensor) -> torch.Tensor:
        return x - x.mean()

    def pearson(terms: list[tuple], gamma: float, own_weight: float) -> float:
        values = []
        for own, inherited, loo, masks, subsets in terms:
            pred = own_weight * own + gamma * inherited
            pairs = [] if config.target == "subsets" else [(pred, loo)]
            if config.target != "loo" and masks.shape[0] > 1:
                pairs.append((masks @ pred, subsets))
            for p, y in pairs:
                r, ok = masked_pearson(p[None].float(), y[None].float(), torch.ones(1, y.numel(), dtype=torch.bool),
                                       config.min_effect_std)
                if bool(ok[0]):
                    values.append(float(r[0]))
        return sum(values) / len(values) if values else float("nan")

    train_answers = answers_of(train)
    check_answers = answers_of(val) if val else train_answers
    own_only = pearson(answer_terms(check_answers, "max", 1.0), 0.0, 1.0)  # the pool does not enter at weight 0
    tried = []
    for pool, decay in INHERIT_CANDIDATES:
        terms = answer_terms(train_answers, pool, decay)
        own_weight, gamma = _two_slopes([(centred(own), centred(g), centred(loo)) for own, g, loo, _, _ in terms])
        check = answer_terms(check_answers, pool, decay) if val else terms
        tried.append({"pool": pool, "decay": decay, "weight": gamma, "own": own_weight, "answers": len(terms),
                      "answer_pearson": pearson(check, gamma, own_weight), "answer_pearson_own": own_only})
    usable = [t for t in tried if t["weight"] > 0 and not math.isnan(t["answer_pearson"])]
    if not usable:
        logger.warning("Inheritance was requested but no answer span with a measured effect follows a thinking step "
                       "(or the fit found no positive weight): answers keep their own scores.")
        return {"applied": False, "tried": tried}
    best = max(usable, key=lambda t: t["answer_pearson"])
    estimator.set_inheritance(best["weight"], best["decay"], best["own"], best["pool"])
    return {"applied": True, "weight": best["weight"], "pool": best["pool"], "decay": best["decay"], "own": best["own"],
            "chosen_by": "val" if val else "train", "tried": tried}


def _two_slopes(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Non-negative least squares ``y ~ a * x1 + b * x2`` over all rows' entries; returns ``(a, b)``."""
    if not rows:
        return 1.0, 0.0
    x = torch.stack([torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])], 1).double()
    y = torch.cat([r[2] for r in rows]).double()
    (a, b), _ = nnls(x.numpy(), y.numpy())
    return float(a), float(b)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ----------------------------------------------------------------------------- synthetic data


def synthetic_examples(
    num_examples: int = 30,
    num_layers: int = 3,
    num_heads: int = 4,
    *,
    regions: tuple[int, int] = (8, 12),
    spans: tuple[int, int] = (2, 5),
    num_subsets: int = 16,
    noise: float = 0.05,
    weight: torch.Tensor | None = None,
    seed: int = 0,
    model_type: str = "qwen3_vl",
) -> tuple[list[ExampleRecord], torch.Tensor]:
    """Examples whose effects follow a known linear rule (for tests, tutorials and sanity checks).

    Features look like pooled attention (non-negative, peaked over regions); leave-one-out
    effects are ``sum_lh weight[l,h] * f[l,h](S,k)`` plus Gaussian noise, and subset effects
    are the sum of the ablated regions' true effects plus noise. Returns ``(records, weight)``:
    :class:`~hf_vattr.pipeline.collection.ExampleRecord` s with placeholder token ids and span texts.
    """
    from .collection import ExampleRecord

    g = torch.Generator().manual_seed(int(seed))
    if weight is None:
        weight = torch.randn(num_layers, num_heads, generator=g)
    out = []
    for e in range(num_examples):
        k = int(torch.randint(regions[0], regions[1] + 1, (1,), generator=g))
        s = int(torch.randint(spans[0], spans[1] + 1, (1,), generator=g))
        f = torch.rand(s, num_layers, num_heads, k, generator=g) ** 3
        f = f / f.sum(-1, keepdim=True) * torch.rand(s, num_layers, num_heads, 1, generator=g)
        clean = torch.einsum("slhk,lh->sk", f, weight)
        loo = clean + noise * torch.randn(s, k, generator=g)
        masks = torch.rand(num_subsets, k, generator=g) < 0.5
        subs = clean @ masks.float().T + noise * torch.randn(s, num_subsets, generator=g)
        out.append(ExampleRecord(
            example_id=e,
            span_features=f,
            loo_effects=loo,
            subset_masks=masks,
            subset_effects=subs,
            base_logprobs=-torch.rand(s, generator=g) * 10,
            sequence=torch.zeros(2 * s, dtype=torch.long),
            prompt_len=0,
            spans=[{"start": 2 * i, "end": 2 * i + 2, "text": f"step {i}", "section": "thinking"} for i in range(s)],
            text="",
            num_regions=k,
            model_type=model_type,
        ))
    return out, weight
