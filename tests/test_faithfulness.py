"""The toy faithfulness runner (scripts/toy/faithfulness.py): end to end at a small scale, and its
toy-specific metrics checked against scores whose right answer is known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_vattr.pipeline.collection import load_collection
from hf_vattr.estimator import LinearEstimator
from hf_vattr.pipeline.evaluation import span_level_metrics
from hf_vattr.regions import PromptRegions
from hf_vattr.toy import evidence_for_step, example_seed, make_example

from faithfulness import TEST_SEED, main, metrics_by_section, pointing_accuracy  # scripts/toy (conftest.py)

pytestmark = pytest.mark.slow  # every test reads one small run of the whole report


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One run at the smallest scale that still exercises every step (~20 s; the report uses 400 + 100)."""
    work = tmp_path_factory.mktemp("faith")
    argv = ["--train", "4", "--test", "2", "--num-subsets", "4", "--k", "8", "--ig-steps", "2",
            "--work", str(work / "runs"), "--estimator-out", str(work / "estimator"),
            "--report", str(work / "faithfulness.md")]
    assert main(argv) == 0
    return work


def test_runner_writes_report_estimator_and_json(small_run):
    report = (small_run / "faithfulness.md").read_text()
    for heading in ("## Methods x metrics", "## Pointing accuracy", "## By span section", "## Targets"):
        assert heading in report
    for method in ("estimator", "raw_attention", "leave_one_out", "grad_x_input", "integrated_gradients", "random"):
        assert f"| {method} |" in report
    est = LinearEstimator.from_pretrained(str(small_run / "estimator"))
    assert (est.num_layers, est.num_heads) == (4, 4)
    assert "test_lds" in est.training_metrics and "test_pointing" in est.training_metrics
    data = json.loads((small_run / "runs" / "faithfulness.json").read_text())
    assert set(data["by_section"]["leave_one_out"]) == {"thinking", "answer"}


def _test_records(small_run):
    return load_collection(small_run / "runs" / "test")


def test_pointing_is_one_for_scores_that_follow_the_evidence(small_run):
    records = _test_records(small_run)
    oracle, inverted = [], []
    for record in records:
        example = make_example(example_seed(TEST_SEED, int(record.example_id)))
        labels = PromptRegions.from_dict(record.regions).maps[0].pixel_labels()
        k = record.num_regions
        rows = []
        for span in record.spans:
            evidence = evidence_for_step(example, span["text"]) if span["section"] == "thinking" else None
            overlap = np.zeros(k) if evidence is None else np.array([(evidence & (labels == r)).sum() for r in range(k)])
            rows.append(torch.tensor(overlap, dtype=torch.float32))
        oracle.append(torch.stack(rows))
        inverted.append(-torch.stack(rows))
    result = pointing_accuracy(records, {"oracle": oracle, "inverted": inverted}, TEST_SEED)
    assert result["oracle"]["steps"] > 0
    assert result["oracle"]["pointing"] == 1.0
    assert result["inverted"]["pointing"] < 1.0


def test_sections_of_the_ground_truth_itself(small_run):
    records = _test_records(small_run)
    loo = [r.loo_effects for r in records]
    per_span = {name: span_level_metrics(scores, records) for name, scores in
                (("leave_one_out", loo), ("negated", [-x for x in loo]))}
    by = metrics_by_section(records, per_span)
    n_spans = sum(r.num_spans for r in records)
    assert sum(row["spans"] for row in by["leave_one_out"].values()) == n_spans
    assert by["leave_one_out"]["thinking"]["pearson"] == pytest.approx(1.0)
    assert by["negated"]["thinking"]["pearson"] == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def small_video_run(tmp_path_factory):
    """The video task's run at the smallest scale (no gradient baselines: the report's own choice)."""
    work = tmp_path_factory.mktemp("faith-video")
    argv = ["--task", "video", "--train", "3", "--test", "2", "--num-subsets", "4",
            "--methods", "estimator", "raw_attention", "leave_one_out", "random",
            "--work", str(work / "runs"), "--estimator-out", str(work / "estimator"),
            "--report", str(work / "faithfulness-video.md")]
    assert main(argv) == 0
    return work


def _video_overlap(regions, evidence: np.ndarray) -> torch.Tensor:
    """Per region: how many of the evidence's pixels it holds, counted in each frame group."""
    video = regions.maps[0]
    counts = np.zeros(regions.num_regions)
    for g in range(evidence.shape[0]):
        labels = video.pixel_labels(g)
        for r in range(video.num_regions):
            counts[r] += (evidence[g] & (labels == r)).sum()
    return torch.tensor(counts, dtype=torch.float32)


def test_video_run_regions_estimator_and_pointing_in_time(small_video_run):
    from hf_vattr.toy import make_video_example

    report = (small_video_run / "faithfulness-video.md").read_text()
    assert report.startswith("# Faithfulness on the toy thinking VLM (video task)")
    assert "--task video --train 3 --test 2 --methods estimator raw_attention leave_one_out random" in report
    est = LinearEstimator.from_pretrained(str(small_video_run / "estimator"))
    assert est.region_method == "grid" and est.k_policy == {"k": 9}
    records = load_collection(small_video_run / "runs" / "test")
    oracle, wrong_time = [], []
    for record in records:
        example = make_video_example(example_seed(TEST_SEED, int(record.example_id)))
        regions = PromptRegions.from_dict(record.regions)
        assert regions.num_regions == 9 * example.num_groups  # one region per cell and frame group
        rows, shifted = [], []
        steps = iter(range(len(example.thinking_steps)))
        for span in record.spans:
            if span["section"] != "thinking":
                rows.append(torch.zeros(regions.num_regions))
                shifted.append(torch.zeros(regions.num_regions))
                continue
            evidence = example.step_evidence_masks[next(steps)]  # the task's own: the object in its group
            rows.append(_video_overlap(regions, evidence))
            shifted.append(_video_overlap(regions, np.roll(evidence, 1, axis=0)))  # same pixels, another group
        oracle.append(torch.stack(rows))
        wrong_time.append(torch.stack(shifted))
    result = pointing_accuracy(records, {"oracle": oracle, "wrong_time": wrong_time}, TEST_SEED, task="video")
    assert result["oracle"]["steps"] == 2 * len(records)
    assert result["oracle"]["pointing"] == 1.0
    assert result["wrong_time"]["pointing"] == 0.0  # the right place at the wrong time is a miss
