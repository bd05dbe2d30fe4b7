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
