"""Seeded fuzz of a careless user's inputs: odd option values, swapped image sizes, corrupted traces and
collection files, broken estimator weights.

Whatever is drawn, the outcome is either the correct result or one clear error: an ``AttributionError`` (for
the CLI, one line on stderr and exit status 2, before any model loads or anything is written), never a raw
exception from a dependency and never a plausible wrong result.

A failing case prints its seed and draw; rerun one seed with
``python -m pytest tests/test_bad_input_fuzz.py -k "seed<N>"`` (``HF_VATTR_FUZZ_SEEDS`` above the default 4
for seeds past 3). The per-case tests of the same inputs are in tests/test_bad_input.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

import hf_vattr.commands.cli as cli
from hf_vattr.errors import AttributionError
from hf_vattr.options import interval

SEEDS = list(range(int(os.environ.get("HF_VATTR_FUZZ_SEEDS", "4"))))
VALUES = ["-1", "0", "1", "2", "3", "0.5", "1.5", "-0.5", "1e9", "nan", "inf", "-inf", "abc", "", "1_000", "0x10"]


class _Reached(Exception):
    """Raised instead of loading a model: the options were accepted."""


def _ranged_options(command: str) -> list[tuple[str, type, str]]:
    """(flag, kind, interval) of every option of ``command`` that has a range, read from the parser itself."""
    from hf_vattr.commands.cli import COLLECT_OPTIONS, TRAIN_OPTIONS
    from hf_vattr.pipeline.collection import CollectionConfig
    from hf_vattr.pipeline.training import TrainingConfig

    out = []
    config, names = {"collect": (CollectionConfig, COLLECT_OPTIONS), "train": (TrainingConfig, TRAIN_OPTIONS)}.get(
        command, (None, ()))
    if config is not None:
        hints = {f.name: f for f in dataclasses.fields(config)}
        for name in names:
            f = hints[name]
            if "range" in f.metadata:
                kind = int if isinstance(f.default, int) and not isinstance(f.default, bool) or f.default is None \
                    else float
                out.append(("--" + name.replace("_", "-"), kind, f.metadata["range"]))
    extra = {"collect": [("--toy", int, "[1, inf)"), ("--limit", int, "[1, inf)")],
             "eval": [("--ks", int, "[1, inf)"), ("--batch-size", int, "[1, inf)"), ("--ig-steps", int, "[1, inf)"),
                      ("--auc-points", int, "[0, inf)"), ("--max-examples", int, "[1, inf)")],
             "train": []}[command]
    return out + extra


def _accepted(kind: type, rng: str, text: str) -> bool:
    try:
        value = kind(text)
    except ValueError:
        return False
    return value in interval(rng)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_odd_option_values(seed, tmp_path, monkeypatch, capsys):
    """Every numeric option of collect / train / eval: in range runs on, out of range is one line, exit 2."""
    rng = random.Random(seed)

    def refuse(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(cli, "_load_model", refuse)
    for draw in range(25):
        command = rng.choice(["collect", "train", "eval"])
        flag, kind, interval_text = rng.choice(_ranged_options(command))
        value = rng.choice(VALUES)
        out = tmp_path / f"out{draw}"
        missing = tmp_path / "no-collection"
        args = {"collect": ["collect", "--out", str(out), "--quiet"] + ([] if flag == "--toy" else ["--toy", "2"]),
                "train": ["train", str(missing), "--out", str(out), "--quiet"],
                "eval": ["eval", str(missing), "--quiet", "--methods", "raw_attention", "--json",
                         str(out / "r.json")]}[command]
        case = dict(seed=seed, draw=draw, command=command, flag=flag, value=value)
        expected_ok = _accepted(kind, interval_text, value)
        try:
            code = cli.main(args + [flag, value])
        except _Reached:
            assert expected_ok and command == "collect", case
        except SystemExit as exit_info:
            assert exit_info.code == 2 and not expected_ok, case
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and flag in err and "Traceback" not in err, (case, err)
        else:  # train / eval went past the options and refused the missing collection
            assert code == 2 and expected_ok and command != "collect", case
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "no-collection" in err, (case, err)
        assert not out.exists(), case


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_swapped_or_foreign_image_sizes(seed, get_tiny):
    """The processor's own size always passes; a swapped or foreign size of a clearly oblong grid is refused."""
    from PIL import Image

    from hf_vattr.layouts import LayoutError, visual_layout
    from hf_vattr.testing import example_inputs

    rng = random.Random(seed)
    family = rng.choice(["qwen3_vl", "qwen2_5_vl", "glm4v"])
    model, processor = get_tiny(family)
    for draw in range(6):
        w, h = rng.randint(8, 400), rng.randint(8, 400)
        image = Image.new("RGB", (w, h))
        inputs = example_inputs(processor, [image])
        ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
        layout = visual_layout(model, ids, grid, [image])  # never refused
        assert visual_layout(model, ids, grid, [(h, w)]).images[0].original_size == (h, w)
        gh, gw = layout.images[0].grid_hw
        case = dict(seed=seed, draw=draw, family=family, size=(h, w), grid=(gh, gw))
        oblong = max(gh, gw) >= 2 * min(gh, gw) + 2
        for wrong in [(w, h), (h * 3, w), (h, w * 3)]:
            try:
                visual_layout(model, ids, grid, [wrong])
            except LayoutError as err:
                assert "aspect ratios disagree" in str(err), case
            else:
                assert not (oblong and wrong == (w, h)), (case, wrong)


def _corrupt_trace(rng: random.Random, folder: Path, other: Path) -> str:
    json_path, st_path = folder / "trace.json", folder / "trace.safetensors"
    kind = rng.choice(["truncate json", "truncate tensors", "empty file", "drop field", "drop tokens", "drop spans",
                       "foreign tensors", "num_regions", "delete file", "flip byte", "not an object"])
    if kind.startswith("truncate"):
        path = json_path if kind.endswith("json") else st_path
        data = path.read_bytes()
        path.write_bytes(data[: rng.randint(0, len(data) - 1)])
    elif kind == "empty file":
        rng.choice([json_path, st_path]).write_bytes(b"")
    elif kind in ("drop field", "drop tokens", "drop spans", "num_regions", "not an object"):
        meta = json.loads(json_path.read_text())
        if kind == "drop field":
            field = rng.choice(sorted(meta))
            del meta[field]
            kind = f"drop field {field}"
        elif kind == "drop tokens":
            meta["tokens"] = meta["tokens"][: rng.randint(0, len(meta["tokens"]) - 1)]
        elif kind == "drop spans":
            meta["spans"] = meta["spans"][:-1]
        elif kind == "num_regions":
            meta["num_regions"] += rng.choice([-1, 1])
        else:
            meta = [meta]
        json_path.write_text(json.dumps(meta))
    elif kind == "foreign tensors":
        shutil.copy(other / "trace.safetensors", st_path)
    elif kind == "delete file":
        rng.choice([json_path, st_path]).unlink()
    else:
        path = rng.choice([json_path, st_path])
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
    return kind


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_corrupted_traces(seed, tmp_path):
    """A damaged, edited or mismatched trace loads correctly or raises an AttributionError naming a file."""
    from test_trace_io import build_trace

    from hf_vattr.streaming.events import AttributionTrace

    rng = random.Random(seed)
    original = build_trace()
    other = build_trace()
    other.spans[0].region_scores = other.spans[0].region_scores + 1
    other.save(tmp_path / "other")
    for draw in range(12):
        folder = original.save(tmp_path / f"t{draw}")
        kind = _corrupt_trace(rng, folder, tmp_path / "other")
        case = dict(seed=seed, draw=draw, kind=kind)
        try:
            loaded = AttributionTrace.load(folder)
        except AttributionError as err:
            assert "trace." in str(err) or str(folder) in str(err), (case, err)
            continue
        except Exception as err:  # noqa: BLE001 - the fuzz's point
            pytest.fail(f"{case}: raw {type(err).__name__}: {err}")
        # loaded: a harmless change (a flipped byte inside a text value, an optional field dropped: the format
        # version defaults to 1's predecessor, num_regions is only a cross-check); the numbers are the original ones
        assert kind in ("flip byte", "drop field version", "drop field num_regions"), case
        assert len(loaded.tokens) == len(original.tokens) and len(loaded.spans) == len(original.spans), case
        assert torch.equal(loaded.span_scores(), original.span_scores()), case
        assert torch.equal(loaded.token_scores(), original.token_scores()), case


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_corrupted_collections_and_broken_weights(seed, tmp_path):
    """Collection files cut short or with NaN effects, and estimators with NaN / inf weights: clear errors."""
    from test_cli import write_synthetic_collection

    from hf_vattr.pipeline.collection import ExampleRecord, check_ground_truth, load_collection
    from hf_vattr.estimator import EstimatorConfigError, LinearEstimator

    rng = random.Random(seed)
    gt = tmp_path / "gt"
    write_synthetic_collection(gt, n=3, seed=seed)
    files = sorted((gt / "examples").glob("*.safetensors"))
    victim = rng.choice(files)
    kind = rng.choice(["truncate", "nan", "inf", "zero all"])
    if kind == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: rng.randint(0, len(data) - 1)])
    else:
        for path in files if kind == "zero all" else [victim]:
            r = ExampleRecord.load(path)
            value = {"nan": math.nan, "inf": math.inf, "zero all": 0.0}[kind]
            if kind == "zero all":
                r.loo_effects.zero_()
                r.subset_effects.zero_()
            else:
                r.loo_effects.view(-1)[rng.randrange(r.loo_effects.numel())] = value
            r.save(path)
    with pytest.raises(AttributionError) as info:
        check_ground_truth(load_collection(gt), gt)
    assert isinstance(info.value, ValueError)
    assert victim.name in str(info.value) or kind == "zero all", (seed, kind, str(info.value))

    est = LinearEstimator(2, 3)
    with torch.no_grad():
        est.weight[rng.randrange(2), rng.randrange(3)] = rng.choice([math.nan, math.inf, -math.inf])
    features = torch.rand(4, 2, 3, 5)
    for call in (lambda: est(features), lambda: est.span_scores(features, ["thinking"] * 4),
                 lambda: est.save_pretrained(tmp_path / "est")):
        with pytest.raises(EstimatorConfigError, match="non-finite"):
            call()
