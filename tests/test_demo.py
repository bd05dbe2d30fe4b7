"""The README's main command, on the shipped toy model and estimator (offline, CPU)."""

import torch

from hf_vattr import LinearEstimator
from hf_vattr.streaming.events import AttributionTrace
from hf_vattr.commands.cli import main
from hf_vattr.commands.demo import run_demo
from hf_vattr.toy import toy_estimator_path
from hf_vattr.toy import load_toy_model
from hf_vattr.viz import render_html


def test_shipped_estimator_fits_the_toy_model_and_records_its_metrics():
    model, _ = load_toy_model()
    estimator = LinearEstimator.from_pretrained(str(toy_estimator_path()))
    estimator.check_compatible(model)
    assert estimator.region_method == "vlm"
    metrics = estimator.training_metrics
    assert "test_lds" in metrics and "test_pointing" in metrics
    # the best measured setting (docs/faithfulness.md): value-norm features, answers inherit the steps
    assert estimator.feature_kind == "value_norm" and estimator.inherit_weight > 0
    card = (toy_estimator_path() / "README.md").read_text()
    assert "hf_vattr" in card


def test_demo_streams_and_writes_report(tmp_path, capsys):
    out = tmp_path / "vattr_report.html"
    summary = run_demo(out=out, quiet=True)
    printed = capsys.readouterr().out
    assert "Question:" in printed and "top regions" in printed
    html = out.read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # self-contained
    assert summary["spans"] >= 2 and len(summary["pngs"]) == summary["spans"]
    assert all(p.exists() and p.stat().st_size > 0 for p in summary["pngs"])
    # the report says how to read it; the shipped estimator scores the answer through the steps before it
    assert "predicted log-prob drop" in html and "inherited</span>" in html and "of the image" in html
    assert "(inherited evidence)" in printed
    assert [s.inherited for s in summary["trace"].spans] == [s.section == "answer" for s in summary["trace"].spans]
    # the saved trace comes back whole: the same report, rendered from the loaded trace alone
    loaded = AttributionTrace.load(summary["trace_dir"])
    trace = summary["trace"]
    assert loaded.text == trace.text and [t.token_id for t in loaded.tokens] == [t.token_id for t in trace.tokens]
    assert torch.equal(loaded.token_scores(), trace.token_scores())
    assert [s.inherited for s in loaded.spans] == [s.inherited for s in trace.spans]
    assert render_html(loaded, question=summary["example"].question) == \
        render_html(trace, question=summary["example"].question)


def test_cli_demo_entry_point(tmp_path, capsys):
    """`hf-vattr demo` dispatches to the demo with its own options (the console script itself is
    exercised in test_cli.py; a subprocess here would only add seconds of imports)."""
    assert main(["demo", "--out", str(tmp_path / "r.html"), "--quiet", "--top", "2"]) == 0
    assert (tmp_path / "r.html").exists()
    assert "Top region on the step's object" in capsys.readouterr().out


def _top_region_holds_step_object(regions, span, example, step: int) -> bool:
    """Does the span's top region hold the task's own evidence for `step` (its object, in its frame group)?"""
    top = int(torch.argmax(span.region_scores))
    item, local = regions.region_owner(top)
    mask = example.step_evidence_masks[step]  # (groups, H, W): the object's pixels in the step's group only
    labels = regions.maps[item]
    return any(bool((labels.pixel_labels(g)[mask[g]] == local).any()) for g in range(mask.shape[0]) if mask[g].any())


def test_video_demo_streams_a_clip_and_draws_filmstrips(tmp_path, capsys):
    out = tmp_path / "video.html"
    summary = run_demo(out=out, quiet=True, video=True)
    printed = capsys.readouterr().out
    example, trace = summary["example"], summary["trace"]
    assert f"Question: {example.question}" in printed
    thinking = [s for s in trace.spans if s.section == "thinking"]
    # the video toy reasons right on held-out clips: one step per ground-truth step, in order
    assert [s.text.strip() for s in thinking] == example.thinking_steps
    # every step is printed with its top regions named where and when (seconds of a frame group)
    step_lines = [line for line in printed.splitlines() if line.strip().startswith("-> step")]
    assert len(step_lines) == len(thinking)
    assert all("top regions #" in line and " s, " in line for line in step_lines)
    # the pointing verdicts printed and returned are those of the task's own evidence
    regions = trace.regions
    expected = [_top_region_holds_step_object(regions, span, example, i) for i, span in enumerate(thinking)]
    assert summary["hits"] == expected
    assert [("[top region on the object: yes]" in line) for line in step_lines] == expected
    # scored by the shipped video estimator (docs/faithfulness-video.md: it points right on every held-out step)
    assert trace.calibrated and "(uncalibrated)" not in printed and all(expected)
    # the report draws the clip as filmstrips, one overlay per span, self-contained
    html = out.read_text()
    assert html.startswith("<!doctype html>") and "filmstrip" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    assert len(summary["pngs"]) == summary["spans"] and all(p.stat().st_size > 0 for p in summary["pngs"])
    assert any(m.image.is_video for m in regions.maps)


def test_cli_demo_video(tmp_path, capsys):
    assert main(["demo", "--video", "--out", str(tmp_path / "v.html"), "--quiet", "--index", "1"]) == 0
    assert (tmp_path / "v.html").exists()
    assert "Top region on the step's object in the step's frame group" in capsys.readouterr().out
