"""`hf-vattr` end to end: collect -> train -> eval -> push, on a tiny model saved to disk and a local Hub."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from hf_vattr.commands.cli import build_parser, main
from hf_vattr.estimator import LinearEstimator
from hf_vattr.pipeline.training import synthetic_examples

REPO = Path(__file__).resolve().parents[1]


def write_synthetic_collection(folder: Path, n: int = 15, seed: int = 0):
    """A collection in the documented on-disk format (collection.json + examples/*.safetensors)."""
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    records, w = synthetic_examples(n, 2, 4, noise=0.02, seed=seed)
    for r in records:
        rec = dataclasses.replace(
            r, sequence=torch.arange(30), prompt_len=15, text="...", model_type="qwen3_vl",
            spans=[dict(sp, text=f"step {i}", section="thinking") for i, sp in enumerate(r.spans)],
            config={"pooling": "sum", "method": "attention", "k": 10, "region_method": "grid"},
        )
        rec.save(collection.example_path(folder, r.example_id))
    manifest = {"format": collection.FORMAT_NAME, "version": collection.FORMAT_VERSION,
                "config": {"pooling": "sum", "method": "attention", "k": 10, "region_method": "grid", "keep_prob": 0.5},
                "model": {"model_type": "qwen3_vl", "name_or_path": "synthetic/model", "num_layers": 2, "num_heads": 4},
                "examples": list(range(n)), "complete": True}
    (folder / "collection.json").write_text(json.dumps(manifest))
    return w


@pytest.mark.slow
def test_train_and_eval_on_a_synthetic_collection(tmp_path, capsys):
    gt, est_dir = tmp_path / "gt", tmp_path / "est"
    w_true = write_synthetic_collection(gt)
    assert main(["train", str(gt), "--out", str(est_dir), "--epochs", "150", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out (val)" in out
    est = LinearEstimator.from_pretrained(est_dir)
    assert torch.corrcoef(torch.stack([est.weight.detach().flatten(), w_true.flatten()]))[0, 1] > 0.95
    assert est.base_model_id == "synthetic/model" and est.model_type == "qwen3_vl"
    assert est.k_policy == {"k": 10} and est.training_data["collection"] == "gt"
    report = json.loads((est_dir / "training_report.json").read_text())
    assert report["config"]["target"] == "both"  # --target auto: the collection has random subsets
    val_ids = report["split"]["val"]
    assert len(val_ids) == 3 and report["data"]["split"] == "by example"

    assert main(["eval", str(gt), "--estimator", str(est_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    table = [ln for ln in out.split("\n\n")[0].splitlines() if ln.startswith("|")]  # the main table
    assert table[0].startswith("| Method | LDS |") and [r.split("|")[1].strip() for r in table[2:]] == \
        ["estimator", "raw_attention", "random"]
    data = json.loads((est_dir / "eval_report.json").read_text())
    assert data["info"]["split"] == "val" and sorted(data["info"]["example_ids"]) == sorted(val_ids)
    assert data["rows"]["estimator"]["lds"] > 0.8 > data["rows"]["random"]["lds"]

    target = tmp_path / "all.json"
    assert main(["eval", str(gt), "--estimator", str(est_dir), "--split", "all", "--methods", "estimator",
                 "--json", str(target), "--quiet"]) == 0
    assert json.loads(target.read_text())["info"]["num_examples"] == 15


def test_train_auto_target_falls_back_to_loo_without_subsets(tmp_path):
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    gt = tmp_path / "gt"
    write_synthetic_collection(gt, n=8)
    for path in sorted((gt / "examples").glob("*.safetensors")):  # drop the random-subset ground truth
        rec = collection.ExampleRecord.load(path)
        rec.subset_masks = torch.zeros(0, rec.num_regions, dtype=torch.bool)  # as collected with --num-subsets 0
        rec.subset_effects = torch.zeros(rec.num_spans, 0)
        rec.save(path)
    assert main(["train", str(gt), "--out", str(tmp_path / "est"), "--epochs", "20", "--quiet"]) == 0
    report = json.loads((tmp_path / "est" / "training_report.json").read_text())
    assert report["config"]["target"] == "loo"


@pytest.mark.slow
def test_collect_train_eval_push_end_to_end(tmp_path, tiny_model_dir, capsys, local_hub):
    gt, est_dir = tmp_path / "gt", tmp_path / "est"
    assert main(["collect", "--model", str(tiny_model_dir), "--toy", "4", "--out", str(gt), "--max-new-tokens", "10",
                 "--k", "4", "--num-subsets", "6", "--quiet"]) == 0
    assert len(list((gt / "examples").glob("*.safetensors"))) == 4
    spec = json.loads((gt / "dataset.json").read_text())
    assert spec["kind"] == "toy" and spec["n"] == 4 and spec["model"] == str(tiny_model_dir)
    # resuming is a no-op
    assert main(["collect", "--model", str(tiny_model_dir), "--toy", "4", "--out", str(gt), "--max-new-tokens", "10",
                 "--k", "4", "--num-subsets", "6", "--quiet"]) == 0
    assert "0 examples (4 already on disk)" in capsys.readouterr().out

    assert main(["train", str(gt), "--out", str(est_dir), "--epochs", "30", "--val-fraction", "0.25", "--quiet"]) == 0
    est = LinearEstimator.from_pretrained(est_dir)
    assert est.model_type == "qwen3_vl" and est.base_model_id == str(tiny_model_dir)
    capsys.readouterr()

    assert main(["eval", str(gt), "--estimator", str(est_dir), "--with-model", "--ig-steps", "2", "--ks", "1", "3",
                 "--trajectories", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| Outcome | Traces |" in out  # toy labels from check_answer
    main_table = out[out.index("| Method |"):].split("\n\n")[0]  # the methods table (section tables follow)
    names = [ln.split("|")[1].strip() for ln in main_table.splitlines() if ln.startswith("| ")][1:]
    assert names == ["estimator", "raw_attention", "leave_one_out", "grad_x_input", "integrated_gradients", "random"]
    data = json.loads((est_dir / "eval_report.json").read_text())
    assert "measured" in data["info"]["topk_source"]
    assert data["rows"]["leave_one_out"]["r2"] == pytest.approx(1.0, abs=1e-3)
    assert all(row["time_per_span_ms"] > 0 for row in data["rows"].values())
    assert data["info"]["trajectories"]["num_traces"] == 1  # the held-out example

    assert main(["push", str(est_dir), "local-user/tiny-estimator"]) == 0
    files = local_hub.files("local-user/tiny-estimator")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    pulled = LinearEstimator.from_pretrained("local-user/tiny-estimator")
    assert torch.equal(pulled.weight, est.weight) and pulled.training_data == est.training_data


@pytest.mark.slow
def test_collect_from_a_jsonl_dataset_and_eval_rebuilds_prompts(tmp_path, tiny_model_dir, capsys):
    from hf_vattr.testing import example_image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        example_image(seed=i).save(data / f"img{i}.png")
    rows = [{"id": 10, "image": "img0.png", "prompt": "What colour is the circle?", "answer": "red"},
            {"id": 11, "images": ["img1.png"], "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]}]}]
    (data / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    gt = tmp_path / "gt"
    assert main(["collect", "--model", str(tiny_model_dir), "--prompts", str(data / "prompts.jsonl"), "--out", str(gt),
                 "--max-new-tokens", "8", "--k", "4", "--num-subsets", "4", "--quiet"]) == 0
    assert sorted(p.stem for p in (gt / "examples").glob("*.safetensors")) == ["000010", "000011"]
    report = tmp_path / "r.json"
    assert main(["eval", str(gt), "--model", str(tiny_model_dir), "--methods", "raw_attention,leave_one_out",
                 "--json", str(report), "--quiet"]) == 0
    rows = json.loads(report.read_text())["rows"]
    if rows["leave_one_out"].get("r2") is not None:  # defined when the spans have non-constant effects
        assert rows["leave_one_out"]["r2"] == pytest.approx(1.0, abs=1e-3)


def test_cli_errors(tmp_path, tiny_model_dir, capsys):
    # a user mistake is one line on stderr and exit status 2, never a traceback
    assert main(["collect", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "exactly one dataset" in err and err.count("\n") == 1
    gt = tmp_path / "gt"
    write_synthetic_collection(gt, n=4)
    assert main(["eval", str(gt), "--methods", "estimator", "--quiet"]) == 2
    assert "--estimator" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["frobnicate"])


def test_demo_subcommand_dispatches_lazily(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("hf_vattr.commands.demo")
    fake.main = lambda args: calls.append(args.demo_args) or 0
    monkeypatch.setitem(sys.modules, "hf_vattr.commands.demo", fake)
    assert main(["demo", "--port", "7860"]) == 0
    assert calls == [["--port", "7860"]]
    monkeypatch.setitem(sys.modules, "hf_vattr.commands.demo", None)  # as if hf_vattr/commands/demo.py did not exist
    assert main(["demo"]) == 2
    assert "not available" in capsys.readouterr().err


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_a_help_line_and_config_options_are_written_once():
    from hf_vattr.commands.cli import COLLECT_OPTIONS, TRAIN_OPTIONS
    from hf_vattr.pipeline.collection import CollectionConfig
    from hf_vattr.pipeline.training import TrainingConfig

    subs = _subparsers(build_parser())
    for name, sub in subs.items():
        for action in sub._actions:
            if name != "demo" and not isinstance(action, argparse._HelpAction):
                assert action.help and action.help.strip(), (name, action.dest)  # demo's own parser has its own
    for command, config_cls, names in (("collect", CollectionConfig, COLLECT_OPTIONS),
                                       ("train", TrainingConfig, TRAIN_OPTIONS)):
        actions = {a.dest: a for a in subs[command]._actions}
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        for field_name in names:
            action, f = actions[field_name], fields[field_name]
            assert f.metadata["help"] in action.help, (command, field_name)  # the text lives on the field
            if field_name != "target":  # train's --target adds "auto" (decided from the collection)
                assert action.default == f.default, (command, field_name)
    assert actions["target"].default == "auto"


def test_flags_reach_the_configs():
    ns = build_parser().parse_args(["train", "c", "--out", "o", "--no-calibrate", "--nonnegative", "--lr", "0.5"])
    assert (ns.calibrate, ns.nonnegative, ns.use_bias, ns.lr, ns.epochs) == (False, True, False, 0.5, 300)
    ns = build_parser().parse_args(["collect", "--toy", "2", "--out", "o", "--k", "8", "--method", "pixel"])
    assert (ns.k, ns.method, ns.pixel_fill, ns.num_subsets, ns.max_new_tokens) == (8, "pixel", "mean", 32, 256)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["collect", "--toy", "2", "--out", "o", "--pooling", "max"])  # choices checked


def test_help_texts_document_the_jsonl_format_and_say_what_exists(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ('"image"', '"images"', '"prompt"', '"messages"', '"answer"', "--images-dir", "dataset.json"):
        assert word in text, word
    subs = _subparsers(build_parser())
    eval_model = next(a for a in subs["eval"]._actions if a.dest == "model")
    assert "--toy" not in eval_model.help  # eval has no --toy option
    top = build_parser().format_help()
    assert "interactive" not in top and "demo" in top
    with pytest.raises(SystemExit) as exit_info:  # `demo --help` is the demo's own help
        main(["demo", "--help"])
    assert exit_info.value.code == 0 and "--seed" in capsys.readouterr().out


@pytest.mark.slow
def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "hf_vattr.commands.cli", "train", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and "--nonnegative" in res.stdout and "--no-calibrate" in res.stdout


def test_train_fits_inheritance_on_a_total_answer_collection_and_can_be_told_not_to(tmp_path, capsys):
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    gt = tmp_path / "gt"
    write_synthetic_collection(gt)
    for path in sorted((gt / "examples").glob("*.safetensors")):  # the last span becomes a total-effect answer
        r = collection.ExampleRecord.load(path)
        r.spans[-1]["section"] = "answer"
        r.loo_effects[-1] = r.loo_effects[:-1].clamp_min(0).max(0).values
        r.subset_effects[-1] = r.subset_effects[:-1].mean(0)
        r.config["answer_effects"] = "total"
        r.save(path)
    assert main(["train", str(gt), "--out", str(tmp_path / "on"), "--epochs", "60", "--quiet"]) == 0
    assert "answers inherit the thinking steps' scores" in capsys.readouterr().out
    assert LinearEstimator.from_pretrained(tmp_path / "on").inherit_weight > 0
    assert main(["train", str(gt), "--out", str(tmp_path / "off"), "--epochs", "60", "--inherit", "off", "--quiet"]) == 0
    assert "answers inherit" not in capsys.readouterr().out
    assert LinearEstimator.from_pretrained(tmp_path / "off").inherit_weight == 0
