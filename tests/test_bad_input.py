"""A careless user's inputs: each gives the correct result or one clear error, never a plausible wrong result.

One test (or parametrised group) per case of the "every bad input a clear error" report; the case number is
in each test's docstring. CLI mistakes are one line on stderr and exit status 2, refused before any model
loads or anything is written. Every error derives from ``hf_vattr.AttributionError`` and keeps its builtin
type. The seeded fuzz over the same inputs is tests/test_bad_input_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import hf_vattr.commands.cli as cli
from hf_vattr.errors import AttributionError
from hf_vattr.commands.cli import build_parser, main
from hf_vattr.pipeline.collection import (
    MANIFEST,
    CollectionConfig,
    ExampleRecord,
    GroundTruthError,
    check_ground_truth,
    example_path,
    load_collection,
)
from hf_vattr.estimator import EstimatorConfigError, EstimatorLoadError, LinearEstimator
from hf_vattr.options import ConfigError
from hf_vattr.pipeline.training import TrainingConfig, fit_estimator, synthetic_examples

from test_cli import write_synthetic_collection


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_model", refuse)


def one_line_error(capsys, *words: str) -> str:
    """The stderr of a refused command: exactly one line, naming every word given."""
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("hf-vattr"), err
    for word in words:
        assert word in err, (word, err)
    return err


# ----------------------------------------------------------------------------- options (cases 1, 2, 11)


@pytest.mark.parametrize("option,value,words", [
    ("--batch-size", "-1", [">= 1"]),  # case 1
    ("--batch-size", "0", [">= 1"]),  # case 11
    ("--keep-prob", "1.5", ["(0, 1)"]),  # case 2
    ("--keep-prob", "-0.5", ["(0, 1)"]),
    ("--keep-prob", "1", ["(0, 1)"]),
    ("--keep-prob", "nan", ["(0, 1)"]),
    ("--max-new-tokens", "0", [">= 1"]),  # case 11
    ("--num-subsets", "-1", [">= 0"]),
    ("--k", "0", [">= 1"]),
    ("--toy", "0", [">= 1"]),
    ("--limit", "0", [">= 1"]),
    ("--region-method", "gird", ["gird"]),  # case 13
    ("--pooling", "max", ["max"]),
])
def test_collect_refuses_bad_options_before_anything_loads_or_is_written(tmp_path, capsys, no_model, option, value,
                                                                         words):
    """Cases 1, 2, 11: out-of-range collect options are refused at once; no folder, no manifest."""
    out = tmp_path / "gt"
    args = ["collect", "--out", str(out), option, value]
    if option != "--toy":
        args += ["--toy", "2"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    one_line_error(capsys, option, value, *words)
    assert not out.exists()


@pytest.mark.parametrize("command,option,value", [
    ("train", "--lr", "0"), ("train", "--lr", "-1"), ("train", "--val-fraction", "1"), ("train", "--epochs", "-1"),
    ("train", "--batch-size", "0"), ("train", "--weight-decay", "-0.1"),
    ("eval", "--ks", "0"), ("eval", "--batch-size", "0"), ("eval", "--ig-steps", "0"), ("eval", "--auc-points", "-1"),
    ("eval", "--max-examples", "0"),
    ("app", "--port", "0"), ("app", "--max-new-tokens", "0"), ("app", "--updates-per-second", "0"),
])
def test_train_eval_app_refuse_bad_numbers_at_parse_time(tmp_path, capsys, no_model, command, option, value):
    """Case 11: every numeric option of every command is checked before anything runs."""
    args = {"train": ["train", str(tmp_path), "--out", str(tmp_path / "est")],
            "eval": ["eval", str(tmp_path)], "app": ["app"]}[command]
    with pytest.raises(SystemExit) as info:
        main(args + [option, value])
    assert info.value.code == 2
    one_line_error(capsys, option, value)
    assert not (tmp_path / "est").exists()


def test_ranges_in_help_and_checks_come_from_the_same_field_metadata():
    """The CLI's help text, its parse-time check and the config's own check read one ``range`` per field."""
    from hf_vattr.commands.cli import COLLECT_OPTIONS, TRAIN_OPTIONS
    from hf_vattr.options import interval

    subs = {name: p for name, p in build_parser()._subparsers._group_actions[0].choices.items()}
    checked = 0
    for command, config_cls, names in (("collect", CollectionConfig, COLLECT_OPTIONS),
                                       ("train", TrainingConfig, TRAIN_OPTIONS)):
        actions = {a.dest: a for a in subs[command]._actions}
        for f in dataclasses.fields(config_cls):
            if f.name not in names or "range" not in f.metadata:
                continue
            rng, action = interval(f.metadata["range"]), actions[f.name]
            assert rng.describe() in action.help, (f.name, action.help)
            outside = rng.low - 1 if rng.low != float("-inf") else rng.high + 1
            if rng.low_open:
                outside = rng.low
            with pytest.raises(Exception):
                action.type(str(int(outside) if isinstance(f.default, int) else outside))
            with pytest.raises(ConfigError, match=f.name):
                config_cls(**{f.name: type(f.default)(outside) if f.default is not None else int(outside)})
            checked += 1
    assert checked >= 10


def test_config_errors_are_attribution_errors_and_value_errors():
    """Cases 1, 2: the Python API refuses the same values as the CLI."""
    for kwargs in ({"batch_size": -1}, {"keep_prob": 1.5}, {"keep_prob": -0.5}, {"max_new_tokens": 0},
                   {"num_subsets": -1}, {"region_method": "gird"}, {"batch_size": 2.5}):
        with pytest.raises(ConfigError) as info:
            CollectionConfig(**kwargs)
        assert isinstance(info.value, AttributionError) and isinstance(info.value, ValueError)
        assert repr(next(iter(kwargs.values()))) in str(info.value)
    from hf_vattr.pipeline.ablation import random_subset_masks

    for p in (0.0, 1.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="keep_prob"):
            random_subset_masks(8, 4, p)


# ----------------------------------------------------------------------------- ground truth (case 1, Must)


def _zero_effects(folder: Path, value: float = 0.0, only_first: bool = False) -> None:
    for i, path in enumerate(sorted((folder / "examples").glob("*.safetensors"))):
        if only_first and i:
            break
        r = ExampleRecord.load(path)
        r.loo_effects = torch.full_like(r.loo_effects, value)
        r.subset_effects = torch.full_like(r.subset_effects, value)
        r.save(path)


@pytest.mark.parametrize("value,words", [(0.0, ["every ablation effect", "is 0"]),
                                         (float("nan"), ["non-finite", "example 0", "000000.safetensors"]),
                                         (float("inf"), ["non-finite"])])
def test_train_and_eval_refuse_zero_or_non_finite_ground_truth(tmp_path, capsys, value, words):
    """Case 1 (and Must): effects that are all 0, or NaN / inf, are refused by train and eval with the reason."""
    gt = tmp_path / "gt"
    write_synthetic_collection(gt, n=4)
    _zero_effects(gt, value, only_first=value != 0.0)
    assert main(["train", str(gt), "--out", str(tmp_path / "est"), "--quiet"]) == 2
    one_line_error(capsys, str(gt), *words)
    assert not (tmp_path / "est").exists()  # no estimator saved
    assert main(["eval", str(gt), "--methods", "raw_attention,random", "--quiet"]) == 2
    one_line_error(capsys, *words)
    assert not (gt / "eval_report.json").exists()
    records = load_collection(gt)
    with pytest.raises(GroundTruthError):
        fit_estimator(records, config=TrainingConfig(epochs=1))
    from hf_vattr.pipeline.baselines import make_method
    from hf_vattr.pipeline.evaluation import evaluate

    with pytest.raises(GroundTruthError):
        evaluate([make_method("random")], records, progress=False)


def test_ground_truth_check_passes_real_effects():
    records, _ = synthetic_examples(3, 2, 2)
    check_ground_truth(records)  # no error
    empty = [dataclasses.replace(r, span_features=r.span_features[:0], loo_effects=r.loo_effects[:0],
                                 subset_effects=r.subset_effects[:0], base_logprobs=r.base_logprobs[:0], spans=[])
             for r in records]
    check_ground_truth(empty)  # no spans: nothing to judge here


# ----------------------------------------------------------------------------- collection folders (cases 8, 13)


COLLECT = ["--max-new-tokens", "6", "--k", "4", "--num-subsets", "2", "--quiet"]


@pytest.mark.slow
def test_limit_leaves_the_collection_incomplete_until_the_rest_is_collected(tmp_path, tiny_model_dir, capsys):
    """Case 8: ``--toy 3 --limit 2`` is not a complete collection of the 3-example dataset."""
    gt = tmp_path / "gt"
    assert main(["collect", "--model", str(tiny_model_dir), "--toy", "3", "--limit", "2", "--out", str(gt),
                 *COLLECT]) == 0
    assert "not complete" in capsys.readouterr().out
    manifest = json.loads((gt / MANIFEST).read_text())
    assert manifest["examples"] == [0, 1] and manifest["complete"] is False
    assert json.loads((gt / "dataset.json").read_text())["n"] == 3
    assert main(["collect", "--model", str(tiny_model_dir), "--toy", "3", "--out", str(gt), *COLLECT]) == 0
    manifest = json.loads((gt / MANIFEST).read_text())
    assert manifest["examples"] == [0, 1, 2] and manifest["complete"] is True


def test_a_folder_with_no_example_does_not_pin_settings(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Case 13: a folder left by a refused or failed run (manifest, no example) takes the corrected command."""
    gt = tmp_path / "gt"
    (gt / "examples").mkdir(parents=True)
    stale = {"format": "hf_vattr.collection", "version": 1, "config": {"region_method": "gird", "k": 99},
             "model": {"model_type": "other"}, "dataset_fingerprint": "0" * 64, "examples": [], "complete": False}
    (gt / MANIFEST).write_text(json.dumps(stale))
    assert main(["collect", "--model", str(tiny_model_dir), "--toy", "1", "--out", str(gt), *COLLECT]) == 0
    manifest = json.loads((gt / MANIFEST).read_text())
    assert manifest["config"]["k"] == 4 and manifest["examples"] == [0] and manifest["complete"] is True
    # once an example is on disk the settings are pinned: another k is refused, in one line, before loading
    capsys.readouterr()
    monkeypatch.setattr(cli, "_load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert main(["collect", "--model", str(tiny_model_dir), "--toy", "1", "--out", str(gt),
                 *COLLECT[:2], "--k", "5", *COLLECT[4:]]) == 2
    one_line_error(capsys, "different settings", "k")


def test_collect_refuses_a_file_as_out_and_a_missing_images_dir(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("x")
    assert main(["collect", "--toy", "1", "--out", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "--out")
    assert main(["collect", "--prompts", str(tmp_path / "p.jsonl"), "--images-dir", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "--images-dir")
    assert main(["collect", "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "missing.jsonl")
    assert main(["collect", "--toy", "1", "--out", str(tmp_path / "o"), "--device", "gpu:x"]) == 2
    one_line_error(capsys, "--device")
    assert not (tmp_path / "o").exists()


def test_a_bad_jsonl_row_is_one_line_naming_file_and_line(tmp_path, capsys, no_model):
    (tmp_path / "p.jsonl").write_text('{"image": "nope.png", "prompt": "hi"}\n')
    assert main(["collect", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "p.jsonl:1", "nope.png")
    assert not (tmp_path / "o").exists()


def test_eval_refuses_unknown_methods_before_loading(tmp_path, capsys, no_model):
    gt = tmp_path / "gt"
    write_synthetic_collection(gt, n=3)
    assert main(["eval", str(gt), "--methods", "raw_atention", "--model", "x/y"]) == 2
    one_line_error(capsys, "raw_atention", "raw_attention")


# ----------------------------------------------------------------------------- estimators (cases 4, 9, 12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_estimator_weights_are_refused_not_scored(tmp_path, bad):
    """Case 4: NaN / inf weights in memory: scoring, checking and saving refuse them; no fake top regions."""
    from hf_vattr.streaming.events import NonFiniteScoresError, SpanAttribution
    from hf_vattr.testing import tiny_vlm

    est = LinearEstimator(2, 4)
    with torch.no_grad():
        est.weight[1, 2] = bad
    with pytest.raises(EstimatorConfigError, match="layer 1, head 2"):
        est(torch.rand(3, 2, 4, 5))
    model, _ = tiny_vlm("qwen3_vl")
    with pytest.raises(EstimatorConfigError, match="non-finite"):
        est.check_compatible(model)
    with pytest.raises(EstimatorConfigError):
        est.save_pretrained(tmp_path / "est")
    assert not (tmp_path / "est" / "model.safetensors").exists()
    est.weight.data[1, 2] = 0.5  # fixed in place (no version bump): scoring works again
    assert torch.isfinite(est(torch.rand(3, 2, 4, 5))).all()
    span = SpanAttribution(index=0, text="x", token_range=(0, 1), region_scores=torch.tensor([0.1, bad, 0.3]),
                           section="thinking")
    with pytest.raises(NonFiniteScoresError, match="region 1"):
        span.top_regions(3)
    assert SpanAttribution(0, "x", (0, 1), torch.tensor([0.1, 0.5, 0.3]), "thinking").top_regions(2) == [1, 2]


def test_a_streamer_refuses_an_estimator_with_nan_weights_at_once():
    """Case 4 through the streamer: the session's compatibility check refuses it before generation starts."""
    from hf_vattr import AttributionStreamer
    from hf_vattr.testing import example_image, example_inputs, tiny_vlm

    model, processor = tiny_vlm("qwen3_vl")
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    est = LinearEstimator(layers, heads, model_type="qwen3_vl")
    with torch.no_grad():
        est.weight.fill_(float("nan"))
    image = example_image()
    inputs = example_inputs(processor, [image])
    with pytest.raises(AttributionError, match="non-finite"):
        AttributionStreamer(model, processor, inputs=inputs, estimator=est, images=[image])


def test_a_missing_estimator_folder_says_so(tmp_path, capsys, monkeypatch):
    """Case 9: a local name that does not exist is not reported as a connection problem."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EstimatorLoadError) as info:
        LinearEstimator.from_pretrained("my_estimator")
    message = str(info.value)
    assert "No estimator folder 'my_estimator'" in message and "offline" in message
    assert "connection" not in message and isinstance(info.value, FileNotFoundError)
    with pytest.raises(EstimatorLoadError, match="not a valid Hub repo id"):
        LinearEstimator.from_pretrained("bad name!!")
    gt = tmp_path / "gt"
    write_synthetic_collection(gt, n=3)
    assert main(["eval", str(gt), "--estimator", "est_nope", "--quiet"]) == 2
    one_line_error(capsys, "No estimator folder 'est_nope'", "offline")
    assert main(["push", "est_nope", "me/est"]) == 2
    one_line_error(capsys, "No estimator folder 'est_nope'")


def test_push_offline_or_to_an_invalid_repo_id_is_one_line(tmp_path, capsys):
    """Case 12: HF_HUB_OFFLINE=1 (the tests run offline) and an invalid repo id: one line saying what to do."""
    from huggingface_hub import constants

    LinearEstimator(2, 2).save_pretrained(tmp_path / "est")
    assert constants.HF_HUB_OFFLINE
    assert main(["push", str(tmp_path / "est"), "me/est"]) == 2
    one_line_error(capsys, "offline", "unset HF_HUB_OFFLINE")
    assert main(["push", str(tmp_path / "est"), "bad id!!"]) == 2
    one_line_error(capsys, "'bad id!!' is not a valid Hub repo id")


# ----------------------------------------------------------------------------- saved traces (cases 7, 10, 15)


def _saved_trace(folder: Path, seed_text: str = "") -> Path:
    from test_trace_io import build_trace

    trace = build_trace()
    if seed_text:
        trace.prompt_text += seed_text
        for span in trace.spans:
            span.region_scores = span.region_scores + 1.0
    return trace.save(folder)


def test_trace_files_that_disagree_are_refused(tmp_path):
    """Case 7: a trace.json with tokens removed, or a trace.safetensors from another trace, does not load."""
    from hf_vattr.streaming.events import AttributionTrace, TraceFileError

    a, b = _saved_trace(tmp_path / "a"), _saved_trace(tmp_path / "b", "other")
    assert len(AttributionTrace.load(a).tokens) == 7  # intact: loads
    meta = json.loads((a / "trace.json").read_text())
    meta["tokens"] = meta["tokens"][:-3]
    meta["features_of"] = [i for i in meta["features_of"] if i < len(meta["tokens"])]
    (a / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(TraceFileError, match="4 tokens but .* holds 7 rows"):
        AttributionTrace.load(a)
    c = _saved_trace(tmp_path / "c")
    (c / "trace.safetensors").write_bytes((b / "trace.safetensors").read_bytes())  # same shapes, other numbers
    with pytest.raises(TraceFileError, match="trace_id") as info:
        AttributionTrace.load(c)
    assert isinstance(info.value, AttributionError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["empty safetensors", "truncated safetensors", "truncated json", "empty json"])
def test_damaged_trace_files_name_the_file(tmp_path, damage):
    """Case 10: truncated or empty files give an error naming the file, not a raw SafetensorError / JSONDecodeError."""
    from hf_vattr.streaming.events import AttributionTrace, TraceFileError

    folder = _saved_trace(tmp_path / "t")
    name = "trace.safetensors" if "safetensors" in damage else "trace.json"
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(b"" if damage.startswith("empty") else data[: len(data) // 2])
    with pytest.raises(TraceFileError, match=rf"{name}.*(truncated|damaged)"):
        AttributionTrace.load(folder)


@pytest.mark.parametrize("field", ["spans", "tokens", "regions", "images", "span_scores", "token_scores"])
def test_trace_files_missing_a_field_name_it(tmp_path, field):
    """Case 15: a missing field of trace.json or tensor of trace.safetensors is named, with its file."""
    from safetensors.torch import load_file, save_file

    from hf_vattr.streaming.events import AttributionTrace, TraceFileError

    folder = _saved_trace(tmp_path / "t")
    if field.endswith("_scores"):
        from safetensors import safe_open

        path = folder / "trace.safetensors"
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        del tensors[field]
        save_file(tensors, str(path), metadata=metadata)
        match = rf"trace\.safetensors lacks '{field}'"
    else:
        meta = json.loads((folder / "trace.json").read_text())
        del meta[field]
        (folder / "trace.json").write_text(json.dumps(meta))
        match = rf"trace\.json lacks the field {field}"
    with pytest.raises(TraceFileError, match=match):
        AttributionTrace.load(folder)


def test_a_missing_trace_folder_or_file_is_named(tmp_path):
    from hf_vattr.streaming.events import AttributionTrace, TraceNotFoundError

    with pytest.raises(TraceNotFoundError, match="No trace folder"):
        AttributionTrace.load(tmp_path / "nope")
    folder = _saved_trace(tmp_path / "t")
    (folder / "trace.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="trace.safetensors is missing"):
        AttributionTrace.load(folder)


def test_collection_files_missing_a_tensor_name_it(tmp_path):
    """Case 15's counterpart for collection example files: the missing tensor and the file are named."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hf_vattr.pipeline.collection import CollectionError

    gt = tmp_path / "gt"
    write_synthetic_collection(gt, n=2)
    path = example_path(gt, 0)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors["loo_effects"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CollectionError, match="000000.safetensors lacks loo_effects"):
        load_collection(gt)


# ----------------------------------------------------------------------------- images and regions (cases 5, 6, 17)


@pytest.fixture(scope="module")
def tiny_qwen(get_tiny):
    return get_tiny("qwen3_vl")


def test_a_size_that_contradicts_the_token_grid_is_refused(tiny_qwen):
    """Case 5: ``(w, h)`` instead of ``(h, w)`` (grid 4x6, size 192x128) is refused, naming the swap."""
    from PIL import Image

    from hf_vattr import AttributionStreamer
    from hf_vattr.layouts import LayoutError, visual_layout
    from hf_vattr.testing import example_inputs

    model, processor = tiny_qwen
    image = Image.new("RGB", (192, 128))  # PIL size is (width, height)
    inputs = example_inputs(processor, [image])
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [image])
    assert layout.images[0].grid_hw == (4, 6) and layout.images[0].original_size == (128, 192)
    assert visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [(128, 192)]).images[0].grid_hw == (4, 6)
    with pytest.raises(LayoutError, match=r"192x128 pixels .* 4x6 token grid.*looks swapped") as info:
        visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [(192, 128)])
    assert isinstance(info.value, AttributionError) and isinstance(info.value, ValueError)
    with pytest.raises(LayoutError, match="looks swapped"):  # the streamer builds its layouts the same way
        AttributionStreamer(model, processor, inputs=inputs, images=[(192, 128)])
    with pytest.raises(LayoutError, match="aspect ratios"):  # another image altogether
        visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [Image.new("RGB", (40, 300))])


def test_a_batch_with_its_images_in_swapped_row_order_is_refused(tiny_qwen, monkeypatch):
    """Case 5: rows' images swapped: each row's image must fit its own token grid."""
    from hf_vattr import AttributionStreamer
    from hf_vattr.layouts import LayoutError
    from hf_vattr.testing import example_image

    model, processor = tiny_qwen
    monkeypatch.setattr(processor.tokenizer, "padding_side", "left")  # the shared processor
    images = [example_image(96, 224, seed=1), example_image(224, 96, seed=2)]  # wide, then tall
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}],
        add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt, prompt], images=images, return_tensors="pt", padding=True)
    AttributionStreamer(model, processor, inputs=batch, images=[[images[0]], [images[1]]])  # right order: fine
    with pytest.raises(LayoutError, match="Image 0"):
        AttributionStreamer(model, processor, inputs=batch, images=[[images[1]], [images[0]]])


def test_sizes_the_processor_makes_always_pass(tiny_qwen):
    """The check never refuses what a processor really did (rounding, and the pixel budget's floor / ceil)."""
    import random

    from PIL import Image

    from hf_vattr.layouts import visual_layout
    from hf_vattr.testing import example_inputs

    model, processor = tiny_qwen
    rng = random.Random(0)
    for w, h in [(1, 1), (3, 1), (1, 50), (40, 300), (33, 31), *[(rng.randint(1, 400), rng.randint(1, 400))
                                                                 for _ in range(12)]]:
        image = Image.new("RGB", (w, h))
        inputs = example_inputs(processor, [image])
        visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [image])


def test_a_capped_default_grid_records_the_requested_k(tiny_qwen):
    """Case 6: ``grid_k=1000`` with the default regions records ``requested_k`` as ``regions="grid"`` does."""
    from hf_vattr import AttributionStreamer
    from hf_vattr.layouts import visual_layout
    from hf_vattr.regions import build_regions, prompt_regions
    from hf_vattr.testing import example_image, example_inputs

    model, processor = tiny_qwen
    image = example_image(128, 192, seed=0)
    inputs = example_inputs(processor, [image])
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [image])
    n = layout.images[0].num_tokens
    default, grid = prompt_regions(layout, k=1000).maps[0], build_regions(layout, method="grid", k=1000).maps[0]
    for rmap in (default, grid):
        assert rmap.num_regions == n and rmap.info["requested_k"] == 1000 and rmap.info["k_capped_by_tokens"]
    assert "requested_k" not in prompt_regions(layout, k=4).maps[0].info
    streamer = AttributionStreamer(model, processor, inputs=inputs, images=[image], grid_k=1000)
    for event in streamer.generate(**inputs, max_new_tokens=1, do_sample=False):
        pass
    assert streamer.trace.regions.maps[0].info["requested_k"] == 1000


def test_an_ambiguous_array_image_is_read_one_way_everywhere(tiny_qwen):
    """Case 17: a (1, 1, 3) array is channels-first (transformers' rule) for the layout, features and pictures."""
    import numpy as np

    from hf_vattr import AttributionStreamer, TokenAttribution
    from hf_vattr.layouts import array_image_size, channels_first, visual_layout
    from hf_vattr.regions.features import image_to_tensor
    from hf_vattr.testing import example_inputs
    from hf_vattr.viz import as_pil, step_overlay

    model, processor = tiny_qwen
    arr = np.full((1, 1, 3), 200, dtype=np.uint8)
    assert channels_first(arr) and array_image_size(arr) == (1, 3)
    assert tuple(image_to_tensor(arr).shape[-2:]) == (1, 3) and as_pil(arr).size == (3, 1)
    inputs = example_inputs(processor, [arr])
    streamer = AttributionStreamer(model, processor, inputs=inputs, images=[arr], grid_k=2)
    events = list(streamer.generate(**inputs, max_new_tokens=2, do_sample=False))
    token = next(e for e in events if isinstance(e, TokenAttribution))
    picture = step_overlay(streamer.trace.regions, streamer.trace.images, token.region_scores)
    assert picture.width > 0
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [arr])
    assert layout.images[0].original_size == (1, 3)
    hwc = np.zeros((20, 30, 3), dtype=np.uint8)  # unambiguous arrays are unchanged
    assert not channels_first(hwc) and as_pil(hwc).size == (30, 20) and array_image_size(hwc) == (20, 30)
