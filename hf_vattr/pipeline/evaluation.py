"""Faithfulness evaluation of attribution methods against ablation ground truth (LDS, top-k drop, AUCs, R^2).

:func:`evaluate` runs every method (the estimator and the baselines of
:mod:`hf_vattr.pipeline.baselines`) over the same collected examples through the same code path,
times each, and scores each against the measured effects:

* **LDS**: Spearman, per span, of predicted subset effects (sum of member scores) vs the
  stored effects of the M random subsets; mean over spans.
* **Top-k drop** (k = 1, 3, 5): log-prob drop of the span when the k top-scored regions are
  ablated together. With a model, measured for real with :mod:`hf_vattr.pipeline.ablation`
  (same ablation method as collection); without one, looked up in the stored tables
  (leave-one-out rows give k = 1; a larger k is found only if a stored subset happens to
  be exactly that top-k set, otherwise it is left out and counted).
* **R^2** of predicted vs actual leave-one-out effects pooled over all (span, region)
  points, raw (scores taken as log-prob drops: needs calibrated units) and calibrated
  (after one least-squares line ``actual ~ a * score + b``: Pearson^2 of the pooled points).
* **Pearson**: per-span Pearson of predicted vs actual leave-one-out effects, mean over spans.
* **Deletion / insertion AUC** (with a model only: real ablations, same engine): regions
  removed from the image (deletion) or restored to a fully ablated image (insertion) in the
  method's score order; area under the span's log-prob drop (resp. log-prob recovered),
  divided by its drop with every region ablated, over the fraction of regions; higher is
  more faithful for both (:func:`hf_vattr.metrics.deletion_auc`, :func:`~hf_vattr.metrics.insertion_auc`).
* **Breakdowns** (:func:`breakdown_metrics`): every metric per span section (``lds_thinking``,
  ``pearson_answer`` ...) and R^2 per generation-length quintile of the examples
  (``r2_q1`` .. ``r2_q5``), in the rows, the JSON and :meth:`EvalReport.to_markdown`.
* **Time per span**: wall-clock seconds a method spends producing a trace's scores,
  divided by its number of spans. For the estimator and raw attention that is the scoring
  of features the model computed anyway during generation (see ``docs/training.md``).

:func:`trajectory_report` turns per-step region-effect vectors into the paper's
trajectory statistics (path length, tortuosity, concentration) and the failure-prediction
AUC over reasoning progress.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from transformers.utils import logging

from .. import metrics as M
from .collection import check_ground_truth
from ..errors import AttributionError
from ..serialization import to_jsonable

if TYPE_CHECKING:
    from .collection import ExampleRecord

logger = logging.get_logger(__name__)


class EvaluationError(AttributionError, ValueError):
    """Evaluation cannot run on these methods, records or settings."""

__all__ = [
    "stored_metrics",
    "span_level_metrics",
    "span_groups",
    "breakdown_metrics",
    "EvalReport",
    "evaluate",
    "check_estimator",
    "trajectory_report",
    "DEFAULT_KS",
]

DEFAULT_KS = (1, 3, 5)



# ----------------------------------------------------------------------------- per-span metrics


def _np(x: Any) -> np.ndarray | None:
    return None if x is None else M.as_array(x)


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def span_level_metrics(scores: Sequence[Any], examples: Sequence[ExampleRecord], ks: Sequence[int] = DEFAULT_KS,
                       topk_effects: Sequence[Mapping[Any, Any]] | None = None) -> dict[str, np.ndarray]:
    """Per-span metric values of ``scores[e] (S_e, K_e)`` against the stored effects of ``examples[e]``.

    Returns arrays over all spans (``nan`` where undefined) for ``lds``, ``pearson``,
    ``top{k}_drop``, ``deletion_auc``, ``insertion_auc`` and ``all_drop`` (the span's drop with
    every region ablated), and the pooled point lists ``loo_pred`` / ``loo_actual`` used for
    R^2 with ``loo_span`` (index of each point's span among all spans).
    ``topk_effects[e]``, when given, holds measured values of example ``e`` (``(S_e,)`` each) that
    replace the table lookup: ``topk_effects[e][k]`` top-k drops, and ``"deletion_auc"``,
    ``"insertion_auc"``, ``"all_drop"`` (which need real ablations: ``nan`` without them).
    """
    if len(scores) != len(examples):
        raise EvaluationError(f"got scores for {len(scores)} examples but {len(examples)} examples.")
    curve_keys = ("deletion_auc", "insertion_auc", "all_drop")
    out: dict[str, list] = {"lds": [], "pearson": [], "loo_pred": [], "loo_actual": [], "loo_span": []}
    for k in ks:
        out[f"top{k}_drop"] = []
    for key in curve_keys:
        out[key] = []
    span_index = 0
    for e, (sc, r) in enumerate(zip(scores, examples)):
        sc = _np(sc)
        if sc.shape != (r.num_spans, r.num_regions):
            raise EvaluationError(f"example {r.example_id}: scores have shape {sc.shape}, expected "
                             f"({r.num_spans}, {r.num_regions}).")
        loo = _np(r.loo_effects)
        masks = r.subset_masks.numpy().astype(bool)
        subs = _np(r.subset_effects)
        measured = topk_effects[e] if topk_effects is not None else {}
        for s in range(r.num_spans):
            out["lds"].append(M.lds(sc[s], masks, subs[s]) if masks.shape[0] >= 2 else float("nan"))
            out["pearson"].append(M.pearson(sc[s], loo[s]))
            out["loo_pred"].extend(sc[s].tolist())
            out["loo_actual"].extend(loo[s].tolist())
            out["loo_span"].extend([span_index] * r.num_regions)
            span_index += 1
            # the stored subsets, then the leave-one-out rows (which win when a subset ablates one region)
            ablate = M.ablation_from_table(np.concatenate([masks, np.eye(r.num_regions, dtype=bool)]),
                                           np.concatenate([subs[s], loo[s]]), duplicates="last")
            for k in ks:
                kk = min(k, r.num_regions)
                if k in measured:
                    out[f"top{k}_drop"].append(float(_np(measured[k])[s]))
                    continue
                try:
                    out[f"top{k}_drop"].append(M.topk_drop(sc[s], ablate, kk))
                except KeyError:
                    out[f"top{k}_drop"].append(float("nan"))
            for key in curve_keys:
                out[key].append(float(_np(measured[key])[s]) if key in measured else float("nan"))
    return {k: np.asarray(v, dtype=np.int64 if k == "loo_span" else np.float64) for k, v in out.items()}


#: Per-span metrics averaged over spans (mean, ``_sem``, ``_n``), in report order.
_MEAN_METRICS = ("lds", "pearson", "deletion_auc", "insertion_auc")
_POINT_KEYS = ("loo_pred", "loo_actual", "loo_span")


def _aggregate(per_span: Mapping[str, np.ndarray], ks: Sequence[int]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in ["lds", "pearson", *[f"top{k}_drop" for k in ks], "deletion_auc", "insertion_auc"]:
        vals = per_span.get(name)
        if vals is None or vals.size == 0 or (name in ("deletion_auc", "insertion_auc") and np.isnan(vals).all()):
            continue
        s = M.summarize(vals)
        res[name] = s["mean"]
        res[f"{name}_sem"] = s["sem"]
        res[f"{name}_n"] = s["n"]
    pred, act = per_span.get("loo_pred"), per_span.get("loo_actual")
    if pred is not None and pred.size >= 2:
        res["r2"] = M.r2_score(pred, act)
        res["r2_calibrated"] = M.calibrated_r2(pred, act)
        res["pearson_pooled"] = M.pearson(pred, act)
    n = per_span.get("lds")
    res["num_spans"] = int(n.size) if n is not None else 0
    return res


def span_groups(examples: Sequence[ExampleRecord], num_groups: int = 5) -> dict[str, Any]:
    """Per span (all spans of ``examples`` in order): its ``section`` and its example's length quintile.

    Generation length is the number of generated tokens of the span's **example** (its whole
    trace, ``record.num_generated``): examples that have spans are sorted by it and cut into
    ``min(num_groups, n)`` equal-count groups (:func:`hf_vattr.metrics.length_quantile_groups`;
    ties keep collection order), and every span of an example belongs to the example's group.
    Returns ``section`` ``(N,)`` str, ``quintile`` ``(N,)`` int (0 = shortest), and
    ``quintiles``: one dict per group with its ``q`` (1-based), ``min_tokens`` / ``max_tokens``,
    ``examples`` and ``spans``.
    """
    with_spans = [r for r in examples if r.num_spans]
    sections = np.array([str(sp.get("section") or "thinking") for r in examples for sp in r.spans], dtype=object)
    if not with_spans:
        return {"section": sections, "quintile": np.zeros(0, dtype=np.int64), "quintiles": []}
    lengths = np.array([r.num_generated for r in with_spans], dtype=np.float64)
    group = M.length_quantile_groups(lengths, num_groups)
    quintile = np.concatenate([np.full(r.num_spans, g) for r, g in zip(with_spans, group)]).astype(np.int64)
    info = []
    for g in range(int(group.max()) + 1):
        sel = group == g
        info.append({"q": g + 1, "min_tokens": int(lengths[sel].min()), "max_tokens": int(lengths[sel].max()),
                     "examples": int(sel.sum()), "spans": int(sum(r.num_spans for r, x in zip(with_spans, sel) if x))})
    return {"section": sections, "quintile": quintile, "quintiles": info}


def _subset(per_span: Mapping[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The per-span arrays of the spans where ``keep`` (bool over spans) holds, points included."""
    out = {k: v[keep] for k, v in per_span.items() if k not in _POINT_KEYS}
    if "loo_span" in per_span:
        pts = keep[per_span["loo_span"]]
        for k in _POINT_KEYS:
            out[k] = per_span[k][pts]
    return out


def breakdown_metrics(per_span: Mapping[str, np.ndarray], groups: Mapping[str, Any],
                      ks: Sequence[int]) -> dict[str, Any]:
    """Section and length-quintile breakdowns of one method's :func:`span_level_metrics`.

    * For each span section present (``thinking``, ``answer``): every metric of the main table
      restricted to that section's spans, keyed with a ``_<section>`` suffix (``lds_answer``,
      ``r2_thinking``, ``num_spans_answer`` ...).
    * For each generation-length quintile ``q`` (:func:`span_groups`): raw and calibrated R^2 of
      the pooled single-region points of its spans (``r2_q1`` .. ``r2_q5``,
      ``r2_calibrated_q1`` ..).
    """
    res: dict[str, Any] = {}
    sections = groups["section"]
    for section in sorted(set(sections.tolist()), key=lambda x: (x != "thinking", x != "answer", x)):
        sub = _aggregate(_subset(per_span, sections == section), ks)
        res.update({f"{k}_{section}": v for k, v in sub.items()})
    quint = groups["quintile"]
    pred, act, span = per_span.get("loo_pred"), per_span.get("loo_actual"), per_span.get("loo_span")
    if pred is not None and span is not None and quint.size and pred.size:
        point_q = quint[span]
        raw = M.r2_by_group(pred, act, point_q)
        cal = M.r2_by_group(pred, act, point_q, calibrated=True)
        for g in range(len(groups["quintiles"])):
            res[f"r2_q{g + 1}"] = raw.get(g, float("nan"))
            res[f"r2_calibrated_q{g + 1}"] = cal.get(g, float("nan"))
    return res


def stored_metrics(scores: Sequence[Any], examples: Sequence[ExampleRecord], ks: Sequence[int] = DEFAULT_KS,
                   breakdown: bool = False) -> dict[str, Any]:
    """Metrics of ``scores`` against the ground truth *stored* with ``examples`` (no model needed).

    Keys: ``lds``, ``pearson`` (mean per-span), ``top{k}_drop`` (from the stored tables,
    ``top{k}_drop_n`` spans found), ``r2`` / ``r2_calibrated`` / ``pearson_pooled`` (pooled
    LOO points), each mean with ``_sem`` and ``_n``; ``nan`` is reported as missing.
    ``breakdown=True`` adds the per-section and per-length-quintile keys of
    :func:`breakdown_metrics`. Deletion / insertion AUCs need real ablations (:func:`evaluate`
    with a model) and are absent here.
    """
    per = span_level_metrics(scores, examples, ks)
    res = _aggregate(per, ks)
    if breakdown:
        res.update(breakdown_metrics(per, span_groups(examples), ks))
    return {k: _nan_to_none(v) for k, v in res.items()}


# ----------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Methods x metrics, laid out like the paper's main table.

    ``rows[method][metric]`` holds means (``None`` = undefined / not computed);
    ``per_span[method][metric]`` the per-span values; ``info`` what was evaluated.
    """

    rows: dict[str, dict[str, Any]]
    per_span: dict[str, dict[str, list]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    COLUMNS = ("lds", "top1_drop", "top3_drop", "top5_drop", "deletion_auc", "insertion_auc", "r2", "r2_calibrated",
               "pearson", "time_per_span_ms")
    #: Columns of the per-section table (each metric restricted to one span section).
    SECTION_COLUMNS = ("num_spans", "lds", "pearson", "r2", "r2_calibrated", "top1_drop", "top3_drop", "top5_drop",
                       "deletion_auc", "insertion_auc")

    def columns(self) -> list[str]:
        cols = [c for c in self.COLUMNS if any(r.get(c) is not None for r in self.rows.values())]
        extra = [c for r in self.rows.values() for c in r if c.startswith("top") and c.endswith("_drop")
                 and c not in cols]
        for c in extra:
            if c not in cols:
                cols.insert(cols.index("deletion_auc") if "deletion_auc" in cols else
                            cols.index("r2") if "r2" in cols else len(cols), c)
        return cols

    def sections(self) -> list[str]:
        """Span sections with per-section metrics in the rows (``thinking`` first, then ``answer``)."""
        found = {c.rsplit("_", 1)[1] for r in self.rows.values() for c in r
                 if c.startswith("num_spans_")}
        return sorted(found, key=lambda x: (x != "thinking", x != "answer", x))

    @staticmethod
    def _cell(row: Mapping[str, Any], c: str, digits: int, sem: bool = True) -> str:
        v = row.get(c)
        if v is None:
            return "n/a"
        if c == "time_per_span_ms":
            return f"{v:.3g}" if v < 100 else f"{v:.0f}"
        if c.startswith("num_spans"):
            return str(int(v))
        err = row.get(f"{c}_sem") if sem and not c.startswith("r2") else None
        return f"{v:.{digits}f}" + (f" ± {err:.{digits}f}" if err is not None else "")

    def section_markdown(self, digits: int = 3) -> str:
        """Methods x span sections: the main metrics on thinking steps and on answer spans separately.

        Empty when the spans are all of one section (the main table then says the same).
        """
        sections = self.sections()
        if len(sections) < 2:  # one section: the main table already is that section
            return ""
        cols = [c for c in self.SECTION_COLUMNS
                if any(r.get(f"{c}_{sec}") is not None for r in self.rows.values() for sec in sections)]
        cols += [c for c in self.columns() if c.startswith("top") and c.endswith("_drop") and c not in cols
                 and any(r.get(f"{c}_{sec}") is not None for r in self.rows.values() for sec in sections)]
        lines = ["| Method | Section | " + " | ".join(M.metric_label(c) for c in cols) + " |",
                 "|---|---|" + "|".join("---:" for _ in cols) + "|"]
        for name, row in self.rows.items():
            for sec in sections:
                if row.get(f"num_spans_{sec}") is None:
                    continue
                sub = {k[: -len(sec) - 1]: v for k, v in row.items() if k.endswith("_" + sec)}
                lines.append(f"| {name} | {sec} | " + " | ".join(self._cell(sub, c, digits) for c in cols) + " |")
        return "\n".join(lines)

    def quintile_markdown(self, digits: int = 3) -> str:
        """Methods x generation-length quintiles: raw R^2 (calibrated in brackets) per quintile."""
        groups = self.info.get("length_quintiles") or []
        if not groups or not any(r.get("r2_q1") is not None or r.get("r2_calibrated_q1") is not None
                                 for r in self.rows.values()):
            return ""
        head = " | ".join(f"Q{g['q']} ({g['min_tokens']}-{g['max_tokens']} tok, {g['spans']} spans)" for g in groups)
        lines = [f"| Method | {head} |", "|---|" + "|".join("---:" for _ in groups) + "|"]

        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.{digits}f}"

        for name, row in self.rows.items():
            cells = [f"{fmt(row.get('r2_q%d' % g['q']))} ({fmt(row.get('r2_calibrated_q%d' % g['q']))})"
                     for g in groups]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_markdown(self, digits: int = 3) -> str:
        cols = self.columns()
        head = "| Method | " + " | ".join(M.metric_label(c) for c in cols) + " |"
        sep = "|---|" + "|".join("---:" for _ in cols) + "|"
        lines = [head, sep]
        for name, row in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(self._cell(row, c, digits) for c in cols) + " |")
        notes = []
        if self.info:
            n = self.info.get("num_examples")
            s = self.info.get("num_spans")
            notes.append(f"{n} examples, {s} spans" + (f", K in [{self.info.get('k_min')}, {self.info.get('k_max')}]"
                                                       if self.info.get("k_min") is not None else ""))
            if self.info.get("topk_source"):
                notes.append(f"top-k drop: {self.info['topk_source']}")
            auc = self.info.get("auc")
            if auc and "deletion_auc" in cols:
                notes.append("deletion / insertion AUC: real ablations at "
                             + (f"{auc['points']} steps" if auc.get("points") else "every region")
                             + ", in nats (spans whose all-regions drop is below "
                             + f"{auc['min_effect']:g} nats left out)")
        if notes:
            lines.append("")
            lines.append("_" + "; ".join(notes) + "; ± is the standard error over spans._")
        section = self.section_markdown(digits)
        if section:
            lines += ["", "**By span section**", "", section]
        quint = self.quintile_markdown(digits)
        if quint:
            lines += ["", "**R^2 by generation-length quintile** (raw; calibrated in brackets; quintiles of the "
                          "examples by generated tokens, each span in its example's quintile)", "", quint]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "per_span": self.per_span, "info": self.info}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(to_jsonable(self.to_dict()), indent=indent)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> EvalReport:
        p = Path(text_or_path)
        text = p.read_text() if p.suffix == ".json" and p.exists() else str(text_or_path)
        data = json.loads(text)
        return cls(data["rows"], data.get("per_span", {}), data.get("info", {}))

    def __str__(self) -> str:
        return self.to_markdown()

    def _repr_markdown_(self) -> str:  # notebooks
        return self.to_markdown()


# ----------------------------------------------------------------------------- estimator vs collection


def check_estimator(estimator: Any, records: Sequence[ExampleRecord]) -> None:
    """Raise a ValueError unless ``estimator`` was trained on data like ``records``.

    Scoring a collection with an estimator trained for another model type, size ``(L, H)``,
    pooling, region method or number of regions gives numbers that look fine and mean
    nothing, so evaluation refuses. Each side is checked only where it records the value.
    """
    first = next((r for r in records), None)
    if first is None:
        return
    cfg = first.config or {}
    k_est = (estimator.k_policy or {}).get("k") if isinstance(estimator.k_policy, Mapping) else None
    pairs = [
        ("model_type", estimator.model_type, first.model_type or None),
        ("num_layers (L)", estimator.num_layers, first.dims[0]),
        ("num_heads (H)", estimator.num_heads, first.dims[1]),
        ("pooling", estimator.pooling, cfg.get("pooling")),
        ("feature_kind", getattr(estimator, "feature_kind", "attention"), first.feature_kind),
        ("region_method", estimator.region_method, cfg.get("region_method")),
        ("k (regions per image)", k_est, cfg.get("k")),
    ]
    lines = [f"  - {name}: estimator has {a!r}, collection has {b!r}" for name, a, b in pairs
             if a is not None and b is not None and a != b]
    if lines:
        raise EvaluationError(
            f"The estimator does not match the collection (example {first.example_id} and its collection config):\n"
            + "\n".join(lines)
            + "\nEvaluate it on a collection made with the same model and CollectionConfig, or train an estimator "
              "on this collection (`hf-vattr train`)."
        )


# ----------------------------------------------------------------------------- evaluate


def _measured_topk(record: ExampleRecord, model: Any, inputs: Mapping[str, Any],
                   all_scores: Mapping[str, torch.Tensor], ks: Sequence[int], batch_size: int,
                   method: str, auc_points: int | None = 0,
                   min_total: float = M.MIN_TOTAL_EFFECT) -> dict[str, dict[Any, np.ndarray]]:
    """Real ablations for every method: top-k drops and (``auc_points != 0``) deletion / insertion AUCs.

    One ablation engine per example; every distinct mask of every method and span (top-k sets,
    deletion and insertion steps, all regions) is measured once, batched, for all spans at once.
    Returns ``{method: {k: (S,) drops, "deletion_auc": (S,), "insertion_auc": (S,), "all_drop": (S,)}}``.
    """
    from .ablation import AblationEngine
    from .collection import total_answer_effects

    k_regions = record.num_regions
    keys: dict[bytes, int] = {}
    rows: list[np.ndarray] = []

    def add(mask: np.ndarray) -> None:
        key = np.packbits(mask).tobytes()
        if key not in keys and mask.any():  # the empty mask is the unablated run: drop 0 by definition
            keys[key] = len(rows)
            rows.append(mask)

    curves = auc_points is None or auc_points > 0
    arrays = {name: M.as_array(sc) for name, sc in all_scores.items()}
    for sc in arrays.values():
        for s in range(sc.shape[0]):
            for k in ks:
                add(M.topk_mask(sc[s], min(k, k_regions)))
            if curves:
                for mask in (*M.deletion_masks(sc[s], auc_points), *M.insertion_masks(sc[s], auc_points)):
                    add(mask)
    if not rows:
        return {}
    spans = record.span_ranges
    engine = AblationEngine(model, inputs, record.sequence[None], record.prompt_regions(),
                            max_generated=max(b for _, b in spans))
    masks = torch.as_tensor(np.stack(rows))
    eff = engine.span_effects(spans, masks, batch_size=batch_size, method=method)  # (U, S)
    # answers of a total-effects collection are measured as collected: reasoning regenerated per mask
    eff = total_answer_effects(engine, record, masks, eff, batch_size=batch_size).numpy().astype(np.float64)

    # per span: every measured mask, and the empty mask (the unablated run: drop 0 by definition)
    measured = np.concatenate([np.zeros((1, k_regions), dtype=bool), masks.numpy()])
    ablations = [M.ablation_from_table(measured, np.concatenate([[0.0], eff[:, s]])) for s in range(eff.shape[1])]
    out: dict[str, dict[Any, np.ndarray]] = {}
    for name, sc in arrays.items():
        res: dict[Any, np.ndarray] = {k: np.empty(sc.shape[0]) for k in ks}
        if curves:
            for key in ("deletion_auc", "insertion_auc", "all_drop"):
                res[key] = np.empty(sc.shape[0])
        for s in range(sc.shape[0]):
            ablate = ablations[s]
            # through the metrics module so each definition stays in one place
            for k in ks:
                res[k][s] = M.topk_drop(sc[s], ablate, min(k, k_regions))
            if curves:
                res["deletion_auc"][s] = M.deletion_auc(sc[s], ablate, auc_points, min_total)
                res["insertion_auc"][s] = M.insertion_auc(sc[s], ablate, auc_points, min_total)
                res["all_drop"][s] = ablate(np.ones(k_regions, dtype=bool))
        out[name] = res
    return out


def evaluate(
    methods: Sequence[Any],
    records: Sequence[ExampleRecord],
    model: Any = None,
    processor: Any = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    topk: str = "auto",
    batch_size: int = 16,
    ablation_method: str = "attention",
    inputs_fn: Callable[[Any], Mapping] | None = None,
    progress: bool = True,
    keep_scores: bool = False,
    auc_points: int | None = M.DEFAULT_CURVE_POINTS,
    auc_min_effect: float = M.MIN_TOTAL_EFFECT,
    length_groups: int = 5,
) -> EvalReport:
    """Run every method over ``records`` and score it; returns an :class:`EvalReport`.

    Args:
        methods: :class:`~hf_vattr.pipeline.baselines.AttributionMethod` instances (names must differ).
        records: collected examples (:func:`hf_vattr.pipeline.collection.load_collection`). Every
            :class:`~hf_vattr.pipeline.baselines.EstimatorMethod` is first checked against them
            (:func:`check_estimator`).
        model: the VLM; needed by ablation / gradient methods and for measured top-k drops.
            Without it those methods are skipped (with a warning).
        processor: unused by the built-in code path (kept for symmetry with collection and
            for ``inputs_fn`` closures).
        ks: top-k drop sizes (clipped to the number of regions of an example).
        topk: ``"measure"`` (real ablation, needs the model), ``"table"`` (stored tables
            only) or ``"auto"`` (measure when a model and ``inputs_fn`` are there).
        batch_size / ablation_method: for the ablation engine (default: the collection's method
            when the records say which).
        inputs_fn: ``inputs_fn(record) -> processor outputs`` of the record's prompt (records do not
            store pixels); needed by the methods that run the model.
        keep_scores: also return every method's ``(S, K)`` scores in ``report.info["scores"]``.
        auc_points: steps along the deletion / insertion curves, measured with real ablations
            whenever top-k drops are (:func:`hf_vattr.metrics.curve_steps`: ``round(i*K/auc_points)``
            regions for ``i = 0..auc_points``; ``None`` or ``>= K``: every region, the full curve;
            ``0``: no curves).
        auc_min_effect: spans whose drop with every region ablated is below this (nats) get no AUC.
        length_groups: number of generation-length groups for ``r2_q*`` (5: quintiles).

    Every row also carries the per-section metrics (``lds_thinking``, ``pearson_answer`` ...) and
    R^2 by generation-length quintile (``r2_q1`` ..) of :func:`breakdown_metrics`.
    """
    runnable = _runnable_methods(methods, records, model, topk)
    iterator = range(len(records))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="evaluating", unit="example")
    scored = _MethodScores(runnable)
    for e in iterator:
        scored.add(records[e], model, inputs_fn, ks=ks, topk=topk, batch_size=batch_size,
                   ablation_method=ablation_method, auc_points=auc_points, auc_min_effect=auc_min_effect)
    curves = scored.measured_any and (auc_points is None or auc_points > 0)
    groups = span_groups(records, length_groups)
    rows, per_span = scored.rows(records, ks, groups, curves)
    info = _report_info(records, methods, runnable, ks, scored.measured_any, curves, auc_points, auc_min_effect, groups)
    if keep_scores:
        info["scores"] = {k: [s.tolist() for s in v] for k, v in scored.scores.items()}
    return EvalReport(rows, per_span, info)


def _report_info(records: Sequence[ExampleRecord], methods: Sequence[Any], runnable: Sequence[Any], ks: Sequence[int],
                 measured: bool, curves: bool, auc_points: int | None, auc_min_effect: float,
                 groups: Mapping[str, Any]) -> dict[str, Any]:
    """What an evaluation covered: examples, spans, regions, how top-k drops and curves were measured, methods."""
    ks_all = [r.num_regions for r in records]
    info = {
        "num_examples": len(records),
        "num_spans": sum(r.num_spans for r in records),
        "k_min": min(ks_all),
        "k_max": max(ks_all),
        "masks_per_example": sorted({r.num_subsets for r in records}),
        "ks": list(ks),
        "topk_source": ("measured (real ablation of the top-k regions)" if measured else
                        "stored tables (LOO rows for k=1; a stored subset when one equals the top-k set)"),
        "auc": ({"points": auc_points, "min_effect": auc_min_effect,
                 "steps": "round(i*K/points) regions, i = 0..points" if auc_points is not None else "every region"}
                if curves else None),
        "length_quintiles": groups["quintiles"],
        "sections": {sec: int((groups["section"] == sec).sum()) for sec in sorted(set(groups["section"].tolist()),
                                                                                  reverse=True)},
        "methods": [m.name for m in runnable],
        "skipped_methods": [m.name for m in methods if m not in runnable],
        "example_ids": [str(r.example_id) for r in records],
        "model_type": records[0].model_type or None,
    }
    return info


def _runnable_methods(methods: Sequence[Any], records: Sequence[ExampleRecord], model: Any, topk: str) -> list:
    """The methods that can run (those that need the model are skipped without one), after checking the inputs."""
    from .baselines import AttributionMethod, EstimatorMethod

    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise EvaluationError(f"method names must be unique, got {names}.")
    if topk not in ("auto", "measure", "table"):
        raise EvaluationError(f"topk must be 'auto', 'measure' or 'table', got {topk!r}.")
    runnable = []
    for m in methods:
        if not isinstance(m, AttributionMethod):
            raise TypeError(f"{m!r} is not an AttributionMethod.")
        if m.requires_model and model is None:
            logger.warning(f"Skipping method {m.name!r}: it runs the model, and no model was given.")
            continue
        runnable.append(m)
    if not records:
        raise EvaluationError("no examples to evaluate.")
    check_ground_truth(records)  # all-zero or non-finite effects would score every method 0 (or NaN)
    for m in runnable:
        if isinstance(m, EstimatorMethod):
            check_estimator(m.estimator, records)
    return runnable


class _MethodScores:
    """Every method's scores of every example, the time each took, and the real ablations of their top regions."""

    def __init__(self, methods: Sequence[Any]) -> None:
        self.methods = list(methods)
        self.scores: dict[str, list[torch.Tensor]] = {m.name: [] for m in methods}
        self.seconds: dict[str, float] = {m.name: 0.0 for m in methods}
        self.measured: dict[str, list[dict[Any, np.ndarray]]] = {m.name: [] for m in methods}
        self.measured_any = False

    def add(self, rec: ExampleRecord, model: Any, inputs_fn: Callable[[Any], Mapping] | None, *, ks: Sequence[int],
            topk: str, batch_size: int, ablation_method: str, auc_points: int | None, auc_min_effect: float) -> None:
        """Score one example with every method; measure top-k drops and curves when ``topk`` says so."""
        if rec.num_spans == 0:
            for m in self.methods:
                self.scores[m.name].append(torch.zeros(0, rec.num_regions))
                self.measured[m.name].append({})
            return
        inputs = inputs_fn(rec) if inputs_fn is not None else None
        if model is not None and inputs is None and any(m.requires_model for m in self.methods):
            raise EvaluationError(
                f"example {rec.example_id}: records store no pixels; pass inputs_fn=... to rebuild the prompt "
                "inputs for the model-running methods."
            )
        method = rec.config.get("method") or ablation_method
        per_example: dict[str, torch.Tensor] = {}
        for m in self.methods:
            t0 = time.perf_counter()
            sc = m.span_scores(rec, model, inputs, batch_size=batch_size, ablation_method=method)
            self.seconds[m.name] += time.perf_counter() - t0
            sc = torch.as_tensor(sc).detach().float().cpu()
            if tuple(sc.shape) != (rec.num_spans, rec.num_regions):
                raise EvaluationError(f"method {m.name!r} returned shape {tuple(sc.shape)} for example {rec.example_id}; "
                                 f"expected ({rec.num_spans}, {rec.num_regions}).")
            self.scores[m.name].append(sc)
            per_example[m.name] = sc
        got: dict[str, dict[Any, np.ndarray]] = {}
        if topk == "measure" or (topk == "auto" and model is not None and inputs is not None
                                 and rec.regions is not None):
            if model is None or inputs is None or rec.regions is None:
                raise EvaluationError("topk='measure' needs the model, inputs_fn and records with their regions.")
            got = _measured_topk(rec, model, inputs, per_example, ks, batch_size, method, auc_points, auc_min_effect)
            self.measured_any = True
        for m in self.methods:
            self.measured[m.name].append(got.get(m.name, {}))

    def rows(self, records: Sequence[ExampleRecord], ks: Sequence[int], groups: Mapping[str, Any],
             curves: bool) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list]]]:
        """Per method: its row of means (with breakdowns and time per span) and its per-span values."""
        total_spans = sum(r.num_spans for r in records)
        rows: dict[str, dict[str, Any]] = {}
        per_span: dict[str, dict[str, list]] = {}
        for m in self.methods:
            per = span_level_metrics(self.scores[m.name], records, ks, topk_effects=self.measured[m.name])
            agg = _aggregate(per, ks)
            agg["time_per_span_ms"] = 1000.0 * self.seconds[m.name] / max(total_spans, 1)
            agg.update(breakdown_metrics(per, groups, ks))
            rows[m.name] = {k: _nan_to_none(v) for k, v in agg.items()}
            per_span[m.name] = {k: v.tolist() for k, v in per.items() if k not in _POINT_KEYS
                                and not (k in ("deletion_auc", "insertion_auc", "all_drop") and not curves)}
        return rows, per_span


# ----------------------------------------------------------------------------- trajectories


def trajectory_report(
    records: Sequence[ExampleRecord],
    labels: Sequence[bool] | Mapping[Any, bool],
    *,
    scores: Sequence[Any] | Callable[[Any], Any] | None = None,
    fractions: Sequence[float] | None = None,
    num_bins: int = 10,
    method: str = "entropy",
) -> dict[str, Any]:
    """Reasoning-trajectory statistics (paper sec. 4.4) and failure-prediction AUC.

    Args:
        records: collected examples; each gives one trajectory, its ``(S, K)`` region-effect
            vectors (one per reasoning step).
        labels: ``True`` = the trace was **correct**, one per record (or a mapping from
            example id to correctness).
        scores: the step vectors. ``None``: the stored leave-one-out effects (ground truth);
            a list of ``(S, K)`` arrays (e.g. estimator scores, one per record); or a
            callable ``record -> (S, K)`` (e.g. ``lambda r: estimator(r.span_features)``).
        fractions: progress fractions for the early-failure AUC (default 0.1 .. 1.0).

    Returns a dict with ``per_trace`` (id, correct, num_steps, path_length, displacement,
    tortuosity, mean_concentration), ``groups`` (means per correct / incorrect),
    ``concentration_curve`` (mean per progress bin and group) and ``failure_auc``
    (``fraction``, ``auc``, ``n``: AUC of tortuosity on the first part of each trace
    predicting failure).
    """
    from .. import trajectory as T

    ids = [str(r.example_id) for r in records]
    if isinstance(labels, Mapping):
        correct = [bool(labels[r.example_id] if r.example_id in labels else labels[i])
                   for r, i in zip(records, ids)]
    else:
        correct = [bool(x) for x in labels]
    if len(correct) != len(records):
        raise EvaluationError(f"got {len(correct)} labels for {len(records)} records.")
    trajs = []
    for i, r in enumerate(records):
        if scores is None:
            t = r.loo_effects
        elif callable(scores):
            t = scores(r)
        else:
            t = scores[i]
        trajs.append(M.as_array(t))
    keep = [i for i, t in enumerate(trajs) if t.ndim == 2 and t.shape[0] >= 1]
    per_trace = []
    for i in keep:
        st = T.trajectory_stats(trajs[i], method=method)  # type: ignore[arg-type]
        per_trace.append({"example_id": ids[i], "correct": correct[i], "num_steps": st.num_steps,
                          "path_length": st.path_length, "displacement": st.displacement,
                          "tortuosity": st.tortuosity, "mean_concentration": st.mean_concentration})
    groups = {}
    for label, name in ((True, "correct"), (False, "incorrect")):
        rows = [p for p in per_trace if p["correct"] is label]
        g: dict[str, Any] = {"n": len(rows)}
        for key in ("num_steps", "path_length", "tortuosity", "mean_concentration"):
            vals = np.array([p[key] for p in rows], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            g[key] = float(vals.mean()) if vals.size else None
            g[f"{key}_median"] = float(np.median(vals)) if vals.size else None
        curves = [T.concentration_curve(trajs[i], num_bins, method) for i in keep if correct[i] is label]
        if curves:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # bins no trace reaches: nan, reported as None
                c = np.nanmean(np.stack(curves), axis=0) if np.isfinite(np.stack(curves)).any() else None
            g["concentration_curve"] = None if c is None else [_nan_to_none(float(x)) for x in c]
        groups[name] = g
    auc = None
    if keep:
        fr = fractions if fractions is not None else T.DEFAULT_FRACTIONS
        res = T.failure_auc_over_progress([trajs[i] for i in keep], [not correct[i] for i in keep], fr)
        auc = {"fraction": [float(x) for x in res["fraction"]], "auc": [_nan_to_none(float(x)) for x in res["auc"]],
               "n": [int(x) for x in res["n"]]}
    return to_jsonable({"per_trace": per_trace, "groups": groups, "failure_auc": auc, "num_traces": len(keep),
                      "source": "loo_effects" if scores is None else "scores"})
