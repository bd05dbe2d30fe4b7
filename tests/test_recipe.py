"""The documented recipe (examples/train_estimator.py) end to end, and `hf-vattr collect --like ESTIMATOR`."""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import pytest

from hf_vattr.commands import cli
from hf_vattr.commands.cli import main
from hf_vattr.estimator import LinearEstimator
from hf_vattr.toy import toy_estimator_path
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_model", refuse)


@pytest.mark.slow
def test_recipe_from_a_dataset_to_a_pushed_estimator(tmp_path, monkeypatch, capsys, local_hub,
                                                     tiny_model_dir):
    datasets = pytest.importorskip("datasets")
    from hf_vattr.testing import example_image

    model_dir = tiny_model_dir
    data = tmp_path / "data"
    ds = datasets.Dataset.from_dict(
        {"picture": [example_image(64, 96, seed=i) for i in range(6)],
         "query": [f"Where is shape {i}? Think step by step." for i in range(6)]},
        features=datasets.Features({"picture": datasets.Image(), "query": datasets.Value("string")}))
    (data / "data").mkdir(parents=True)
    ds.to_parquet(str(data / "data" / "train.parquet"))  # a local folder of parquet files: streamed

    argv = ["--model", str(model_dir), "--dataset", str(data), "--split", "train", "--image-column", "picture",
            "--question-column", "query", "--out", str(tmp_path / "run"), "--k", "4", "--regions", "grid",
            "--num-subsets", "4", "--max-new-tokens", "12", "--repo-id", "local-user/tiny-vattr", "--quiet"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / "train_estimator.py"), *argv])
    start = time.perf_counter()
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(EXAMPLES / "train_estimator.py"), run_name="__main__")
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    for step in ("$ hf-vattr collect", "$ hf-vattr train", "$ hf-vattr eval", "$ hf-vattr push"):
        assert step in out
    assert "| estimator |" in out and "| leave_one_out |" in out and "pushed" in out
    run = tmp_path / "run"
    assert json.loads((run / "ground-truth" / "dataset.json").read_text())["kind"] == "datasets"
    card = (run / "estimator" / "README.md").read_text()
    assert str(model_dir) in card
    files = local_hub.files("local-user/tiny-vattr")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    pushed = LinearEstimator.from_pretrained("local-user/tiny-vattr")
    assert pushed.model_type == "qwen3_vl" and pushed.region_method == "grid" and pushed.k_policy == {"k": 4}
    assert json.loads((run / "eval.json").read_text())
    print(f"recipe end to end: {elapsed:.1f} s")


# ----------------------------------------------------------------------------- collect --like


def test_like_refuses_contradicting_options_before_the_model(tmp_path, capsys, no_model):
    like = str(toy_estimator_path())
    assert main(["collect", "--toy", "2", "--like", like, "--k", "8", "--feature-kind", "attention",
                 "--out", str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--like" in err and "--k 8 (the estimator has 16)" in err
    assert "--feature-kind attention (the estimator has value_norm)" in err
    assert main(["collect", "--toy", "2", "--like", str(tmp_path / "nowhere"), "--out", str(tmp_path / "gt")]) == 2
    assert "--like" in capsys.readouterr().err
    assert not (tmp_path / "gt").exists()


@pytest.mark.slow
def test_like_takes_the_settings_and_the_toy_estimator_evaluates_the_fresh_collection(tmp_path, capsys):
    gt = tmp_path / "gt"
    # --k 16 agrees with the estimator: accepted; everything else comes from it
    assert main(["collect", "--toy", "1", "--toy-seed", "123", "--like", str(toy_estimator_path()), "--k", "16",
                 "--num-subsets", "4", "--max-new-tokens", "96", "--out", str(gt), "--quiet"]) == 0
    config = json.loads((gt / "collection.json").read_text())["config"]
    assert (config["region_method"], config["k"], config["feature_kind"], config["answer_effects"],
            config["pooling"]) == ("vlm", 16, "value_norm", "total", "sum")
    capsys.readouterr()
    assert main(["eval", str(gt), "--estimator", str(toy_estimator_path()), "--methods", "estimator,random",
                 "--json", str(tmp_path / "eval.json"), "--quiet"]) == 0
    assert "| estimator |" in capsys.readouterr().out
