"""Evaluation: stored-table metrics by hand, the report layout, real ablation on a tiny model, trajectories."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from hf_vattr import metrics as M
from hf_vattr.pipeline.baselines import AttributionMethod, EstimatorMethod, LeaveOneOut, RandomScores, RawAttention
from hf_vattr.estimator import LinearEstimator
from hf_vattr.pipeline.collection import ExampleRecord
from hf_vattr.pipeline.evaluation import EvalReport, evaluate, span_level_metrics, stored_metrics, trajectory_report
from hf_vattr.pipeline.training import synthetic_examples


def record(example_id, span_features, loo_effects, subset_masks=None, subset_effects=None, **kw):
    """An ExampleRecord with placeholder tokens and span texts around the given tensors."""
    s, k = loo_effects.shape
    if subset_masks is None:
        subset_masks, subset_effects = torch.zeros(0, k, dtype=torch.bool), torch.zeros(s, 0)
    return ExampleRecord(example_id=example_id, span_features=span_features, loo_effects=loo_effects,
                         subset_masks=subset_masks, subset_effects=subset_effects, base_logprobs=torch.zeros(s),
                         sequence=torch.zeros(s, dtype=torch.long), prompt_len=0,
                         spans=[{"start": i, "end": i + 1, "text": "", "section": "thinking"} for i in range(s)],
                         text="", num_regions=k, **kw)


def true_estimator(w):
    est = LinearEstimator(*w.shape, model_type="qwen3_vl")
    with torch.no_grad():
        est.weight.copy_(w)
    return est


def test_stored_metrics_match_hand_computation():
    records, w = synthetic_examples(6, 2, 3, num_subsets=10, seed=0)
    scores = [torch.einsum("slhk,lh->sk", r.span_features, w) for r in records]
    got = stored_metrics(scores, records)
    lds, pears, top1, pred, act = [], [], [], [], []
    for sc, r in zip(scores, records):
        for s in range(sc.shape[0]):
            lds.append(M.lds(sc[s], r.subset_masks, r.subset_effects[s]))
            pears.append(M.pearson(sc[s], r.loo_effects[s]))
            top1.append(float(r.loo_effects[s, int(torch.argmax(sc[s]))]))
            pred += sc[s].tolist()
            act += r.loo_effects[s].tolist()
    assert got["lds"] == pytest.approx(np.mean(lds))
    assert got["pearson"] == pytest.approx(np.mean(pears))
    assert got["top1_drop"] == pytest.approx(np.mean(top1))
    assert got["r2"] == pytest.approx(M.r2_score(pred, act))
    assert got["r2_calibrated"] == pytest.approx(M.pearson(pred, act) ** 2)
    assert got["num_spans"] == len(lds)


def test_topk_from_table_only_when_the_set_was_measured():
    rec = record(0, torch.zeros(1, 1, 1, 4), torch.tensor([[0.1, 0.5, 0.2, 0.0]]),
                 torch.tensor([[False, True, True, False], [True, False, False, True]]), torch.tensor([[0.9, 0.05]]))
    scores = [torch.tensor([[0.0, 3.0, 2.0, 1.0]])]
    per = span_level_metrics(scores, [rec], ks=(1, 2, 3))
    assert per["top1_drop"][0] == pytest.approx(0.5)  # LOO row of region 1
    assert per["top2_drop"][0] == pytest.approx(0.9)  # the stored subset {1, 2}
    assert np.isnan(per["top3_drop"][0])  # {1, 2, 3} was never ablated: missing, not guessed


class Oracle(AttributionMethod):
    """Scores = the stored LOO effects themselves."""

    name = "oracle"

    def span_scores(self, record, model=None, inputs=None, **options):
        return record.loo_effects


def test_offline_evaluate_ranks_methods_sensibly():
    records, w = synthetic_examples(20, 3, 4, noise=0.02, seed=1)
    methods = [EstimatorMethod(true_estimator(w)), RawAttention(), RandomScores(seed=0), Oracle(),
               LeaveOneOut()]
    report = evaluate(methods, records, progress=False)
    rows = report.rows
    assert "leave_one_out" not in rows and report.info["skipped_methods"] == ["leave_one_out"]
    assert rows["oracle"]["pearson"] == pytest.approx(1.0) and rows["oracle"]["r2"] == pytest.approx(1.0)
    assert rows["estimator"]["lds"] > 0.9 and rows["estimator"]["r2"] > 0.9
    assert abs(rows["random"]["lds"]) < 0.2 and abs(rows["random"]["pearson"]) < 0.2
    assert rows["estimator"]["top1_drop"] >= rows["random"]["top1_drop"]
    for row in rows.values():
        assert row["time_per_span_ms"] >= 0
    md = report.to_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| Method | LDS | Top-1 drop")
    assert "Time / span (ms)" in lines[0] and "R^2 (cal.)" in lines[0]
    assert [ln.split("|")[1].strip() for ln in lines[2:6]] == ["estimator", "raw_attention", "random", "oracle"]
    data = json.loads(report.to_json())
    assert data["rows"]["estimator"]["lds"] == pytest.approx(rows["estimator"]["lds"])
    again = EvalReport.from_json(report.to_json())
    assert again.to_markdown() == md


@pytest.fixture(scope="module")
def tiny_glm_run(get_tiny):
    """Two examples collected on the tiny GLM-4.1V (6 regions each), with the prompt rebuilder."""
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    from hf_vattr.testing import example_image

    model, processor = get_tiny("glm4v")
    cfg = collection.CollectionConfig(num_subsets=8, max_new_tokens=12, k=6)
    images = {i: example_image(seed=i) for i in range(2)}
    records = [collection.collect_example(model, processor, [images[i]], "What colour is the circle?", cfg,
                                          example_id=i) for i in range(2)]
    assert all(r.num_spans for r in records)

    def inputs_fn(record):
        return collection._build_inputs(processor, [images[record.example_id]], "What colour is the circle?")

    return model, processor, records, inputs_fn


@pytest.mark.slow
def test_evaluate_with_model_measures_topk_and_runs_every_baseline(tiny_glm_run):
    from hf_vattr.pipeline.baselines import GradientXInput, IntegratedGradients

    model, processor, records, inputs_fn = tiny_glm_run
    L, H = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    methods = [EstimatorMethod(LinearEstimator(L, H, model_type="glm4v")), RawAttention(), LeaveOneOut(),
               GradientXInput(), IntegratedGradients(steps=4), RandomScores()]
    report = evaluate(methods, records, model, processor, inputs_fn=inputs_fn, ks=(1, 3), progress=False,
                      auc_points=2)  # curves at 0, 3, 6 regions: every method through the measured-curve path
    rows = report.rows
    assert set(rows) == {"estimator", "raw_attention", "leave_one_out", "grad_x_input", "integrated_gradients",
                         "random"}
    assert "measured" in report.info["topk_source"]
    # LOO recomputed through the same engine reproduces the stored ground truth
    assert rows["leave_one_out"]["r2"] == pytest.approx(1.0, abs=1e-4)
    # its measured top-1 drop is the largest single-region effect of each span
    best = np.mean([float(r.loo_effects[s].max()) for r in records for s in range(r.num_spans)])
    assert rows["leave_one_out"]["top1_drop"] == pytest.approx(best, abs=1e-4)
    for name, row in rows.items():
        assert row["top3_drop"] is not None, name
        assert np.isfinite(row["deletion_auc"]) and np.isfinite(row["insertion_auc"]), name
        assert row["time_per_span_ms"] > 0, name
    # measured top-1 drop agrees with the stored LOO table (same engine, same masks)
    table = evaluate([RawAttention()], records, progress=False, ks=(1,))
    assert table.rows["raw_attention"]["top1_drop"] == pytest.approx(rows["raw_attention"]["top1_drop"], abs=1e-4)


def test_trajectory_report():
    rng = np.random.default_rng(0)
    records, labels = [], []
    for i in range(12):
        correct = i % 2 == 0
        s, k = 8, 5
        if correct:  # a straight walk towards one region
            traj = np.outer(np.linspace(0, 1, s), np.eye(k)[i % k]) + 0.01 * rng.standard_normal((s, k))
        else:  # wandering between regions
            traj = np.eye(k)[rng.integers(0, k, s)] + 0.01 * rng.standard_normal((s, k))
        records.append(record(f"t{i}", torch.zeros(s, 1, 1, k), torch.tensor(traj, dtype=torch.float32)))
        labels.append(correct)
    rep = trajectory_report(records, labels)
    assert rep["num_traces"] == 12 and len(rep["per_trace"]) == 12
    g = rep["groups"]
    assert g["incorrect"]["tortuosity"] > g["correct"]["tortuosity"]
    assert g["incorrect"]["path_length"] > g["correct"]["path_length"]
    assert rep["failure_auc"]["auc"][-1] == pytest.approx(1.0)
    assert len(g["correct"]["concentration_curve"]) == 10
    # labels by example id, and scores given explicitly
    by_id = {r.example_id: lab for r, lab in zip(records, labels)}
    rep2 = trajectory_report(records, by_id, scores=[r.loo_effects * 2 for r in records])
    assert rep2["groups"]["incorrect"]["tortuosity"] == pytest.approx(g["incorrect"]["tortuosity"])
    json.dumps(rep2)
    with pytest.raises(ValueError, match="labels"):
        trajectory_report(records, labels[:3])


def test_bench_methods_smoke():
    """The benchmark script runs end to end (tiny settings) and reports the estimator faster than LOO."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"
    spec = importlib.util.spec_from_file_location("bench_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.argparse.Namespace(k=4, layers=2, heads=4, head_dim=16, image_size=[96, 128], max_tokens=64,
                                    generated=8, span=4, batch_size=4, ig_steps=1, repeats=1, threads=1)
    threads = torch.get_num_threads()
    try:
        text, times = bench.run(args)
    finally:
        torch.set_num_threads(threads)
    assert "| leave-one-out ablation (K=4) |" in text and "integrated gradients (1 steps)" in text
    assert times["estimator"] < times["loo"]


@pytest.mark.parametrize("field, estimator_kwargs, message", [
    ("model_type", dict(model_type="glm4v"), "model_type: estimator has 'glm4v', collection has 'qwen3_vl'"),
    ("L", dict(num_layers=3), "num_layers (L): estimator has 3, collection has 2"),
    ("H", dict(num_heads=5), "num_heads (H): estimator has 5, collection has 3"),
    ("pooling", dict(pooling="mean"), "pooling: estimator has 'mean', collection has 'sum'"),
    ("region_method", dict(region_method="slic"), "region_method: estimator has 'slic', collection has 'grid'"),
    ("K", dict(k_policy={"k": 32}), "k (regions per image): estimator has 32, collection has 10"),
    ("feature_kind", dict(feature_kind="value_norm"), "feature_kind: estimator has 'value_norm', collection has 'attention'"),
])
def test_evaluate_refuses_an_estimator_made_for_another_collection(field, estimator_kwargs, message):
    """Without a model nothing else would notice: the scores would look like any other table."""
    records, w = synthetic_examples(3, 2, 3, seed=2)
    records = [dataclasses.replace(r, config={"pooling": "sum", "region_method": "grid", "k": 10}) for r in records]
    kwargs = dict(num_layers=2, num_heads=3, model_type="qwen3_vl", pooling="sum", region_method="grid",
                  k_policy={"k": 10})
    matching = LinearEstimator(**kwargs)
    assert evaluate([EstimatorMethod(matching)], records, progress=False).rows["estimator"]["num_spans"] > 0
    kwargs.update(estimator_kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate([EstimatorMethod(LinearEstimator(**kwargs))], records, progress=False)


# ----------------------------------------------------------------------------- deletion / insertion AUC, breakdowns


@pytest.mark.slow
def test_deletion_insertion_auc_match_an_independent_ablation_on_a_tiny_model(tiny_glm_run):
    """The AUC columns exist and are finite, and equal curves rebuilt by hand from the functional ablation API."""
    from hf_vattr.pipeline.ablation import span_effects

    model, processor, records, inputs_fn = tiny_glm_run
    report = evaluate([RawAttention(), RandomScores(seed=1)], records[:1], model, processor,
                      inputs_fn=inputs_fn, ks=(1,), progress=False, auc_points=3, keep_scores=True)
    for name, row in report.rows.items():
        for col in ("deletion_auc", "insertion_auc", "r2_q1", "r2_calibrated_q1", "lds_thinking",
                    "num_spans_thinking"):
            assert row[col] is not None and np.isfinite(row[col]), (name, col)
    assert report.info["auc"]["points"] == 3 and "deletion_auc" in report.columns()
    assert report.info["length_quintiles"] == [{"q": 1, "min_tokens": records[0].num_generated,
                                                "max_tokens": records[0].num_generated, "examples": 1,
                                                "spans": records[0].num_spans}]
    md = report.to_markdown()
    assert "| Deletion AUC | Insertion AUC |" in md.splitlines()[0]
    assert "R^2 by generation-length quintile" in md and "Q1 (" in md

    # Independent reference: K = 6, points = 3 -> j = 0, 2, 4, 6; trapezoid over j / K of the drop (nats).
    rec = records[0]
    scores = np.asarray(report.info["scores"]["raw_attention"][0])
    order = np.argsort(-scores[0], kind="stable")
    j = np.array([0, 2, 4, 6])
    delete = np.zeros((4, 6), dtype=bool)
    restore = np.ones((4, 6), dtype=bool)
    for i, n in enumerate(j):
        delete[i, order[:n]] = True
        restore[i, order[:n]] = False
    inputs = inputs_fn(rec)
    eff = span_effects(model, inputs, rec.sequence[None], rec.span_ranges[:1],
                       torch.as_tensor(np.concatenate([delete, restore])), rec.prompt_regions()).double().numpy()[:, 0]
    drops, after = eff[:4], eff[4:]
    total = drops[-1]
    assert total == pytest.approx(after[0], abs=1e-9)  # both are "every region ablated"
    deletion = np.trapezoid(drops, j / 6)
    insertion = np.trapezoid(total - after, j / 6)
    per = report.per_span["raw_attention"]
    assert per["all_drop"][0] == pytest.approx(total, abs=1e-4)
    assert per["deletion_auc"][0] == pytest.approx(deletion, abs=1e-4)
    assert per["insertion_auc"][0] == pytest.approx(insertion, abs=1e-4)
    # no model: no real ablations, so no AUC column (not a guess from tables)
    offline = evaluate([RawAttention()], records, progress=False, ks=(1,))
    assert "deletion_auc" not in offline.columns() and offline.rows["raw_attention"].get("deletion_auc") is None


def _mixed_records():
    """Synthetic examples of different generation lengths whose last span is an answer."""
    records, w = synthetic_examples(10, 2, 3, num_subsets=8, noise=0.3, seed=4)
    out = []
    for i, r in enumerate(records):
        n = r.num_spans
        spans = [dict(sp, section="answer" if s == n - 1 else "thinking") for s, sp in enumerate(r.spans)]
        length = 20 + 37 * ((i * 7) % 10)  # distinct generation lengths, not in example order
        out.append(dataclasses.replace(r, spans=spans, sequence=torch.zeros(5 + length, dtype=torch.long),
                                       prompt_len=5))
    return out, w


def test_section_and_length_quintile_breakdowns_against_an_independent_split():
    from sklearn.metrics import r2_score

    records, w = _mixed_records()
    scores = [torch.einsum("slhk,lh->sk", r.span_features, w) for r in records]
    report = evaluate([EstimatorMethod(true_estimator(w)), RandomScores(seed=0)], records, progress=False,
                      keep_scores=True)
    row = report.rows["estimator"]
    # sections: recompute each metric on that section's spans only
    for section in ("thinking", "answer"):
        pears, lds, pred, act = [], [], [], []
        for sc, r in zip(scores, records):
            for s, sp in enumerate(r.spans):
                if sp["section"] == section:
                    pears.append(M.pearson(sc[s], r.loo_effects[s]))
                    lds.append(M.lds(sc[s], r.subset_masks, r.subset_effects[s]))
                    pred += sc[s].tolist()
                    act += r.loo_effects[s].tolist()
        assert row[f"num_spans_{section}"] == len(pears)
        assert row[f"pearson_{section}"] == pytest.approx(np.nanmean(pears))
        assert row[f"lds_{section}"] == pytest.approx(np.nanmean(lds))
        assert row[f"r2_{section}"] == pytest.approx(r2_score(act, pred))
    assert row["num_spans_thinking"] + row["num_spans_answer"] == row["num_spans"]
    # quintiles: 10 examples by generated tokens -> 5 groups of 2; sklearn on each group's pooled points
    lengths = [r.num_generated for r in records]
    by_length = sorted(range(10), key=lambda e: lengths[e])
    for q in range(5):
        members = by_length[2 * q: 2 * q + 2]
        pred = np.concatenate([scores[e].flatten().numpy() for e in members])
        act = np.concatenate([records[e].loo_effects.flatten().numpy() for e in members])
        assert row[f"r2_q{q + 1}"] == pytest.approx(r2_score(act, pred), abs=1e-6)
        assert row[f"r2_calibrated_q{q + 1}"] == pytest.approx(np.corrcoef(pred, act)[0, 1] ** 2, abs=1e-6)
        info = report.info["length_quintiles"][q]
        assert (info["min_tokens"], info["max_tokens"]) == (lengths[members[0]], lengths[members[1]])
    # the report: main table, then both breakdown tables, and the labels come from the glossary
    md = report.to_markdown()
    assert "**By span section**" in md and "| estimator | answer | " in md and "| random | thinking | " in md
    quint = md.split("R^2 by generation-length quintile")[1]
    assert quint.count("| estimator |") == 1 and "Q5 (" in quint
    again = EvalReport.from_json(report.to_json())
    assert again.to_markdown() == md
    # stored_metrics (training reports) gives the same breakdown on request
    stored = stored_metrics(scores, records, breakdown=True)
    assert stored["pearson_answer"] == pytest.approx(row["pearson_answer"])
    assert stored["r2_q3"] == pytest.approx(row["r2_q3"])
    assert "pearson_answer" not in stored_metrics(scores, records)


def test_cli_eval_prints_the_breakdowns_and_writes_them(tmp_path, capsys):
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    from hf_vattr.commands.cli import build_parser, main

    records, _ = _mixed_records()
    gt = tmp_path / "gt"
    cfg = {"pooling": "sum", "method": "attention", "k": 10, "region_method": "grid"}
    for r in records:
        dataclasses.replace(r, config=cfg, model_type="qwen3_vl").save(collection.example_path(gt, r.example_id))
    (gt / "collection.json").write_text(json.dumps({
        "format": collection.FORMAT_NAME, "version": collection.FORMAT_VERSION, "config": dict(cfg, keep_prob=0.5),
        "model": {"model_type": "qwen3_vl", "name_or_path": "synthetic/model", "num_layers": 2, "num_heads": 3},
        "examples": list(range(len(records))), "complete": True}))
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(gt), "--methods", "raw_attention,random", "--json", str(out_json), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "**By span section**" in out and "| raw_attention | answer |" in out
    assert "R^2 by generation-length quintile" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert rows["raw_attention"]["r2_q5"] is not None and rows["random"]["pearson_answer"] is not None
    assert build_parser().parse_args(["eval", "x", "--auc-points", "0"]).auc_points == 0
