"""LinearEstimator: scoring, save/load, loading by repo id from a real Hub cache layout, push, compatibility."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from transformers.testing_utils import CaptureLogger

import hf_vattr.estimator as estimator_mod
from hf_vattr.estimator import EstimatorConfigError, EstimatorLoadError, EstimatorMismatchError, LinearEstimator
from hf_vattr.metrics import metric_meaning

TOY_ESTIMATOR = Path(estimator_mod.__file__).parent / "toy" / "assets" / "toy-estimator"
METRICS = {"lds": 0.4137, "r2": 0.65, "top3_drop": 2.5, "custom": [1.25, 2]}
TRAINING_DATA = {"task": "toy-grounded", "num_examples": 128, "masks_per_example": 32}


def make_estimator(L=3, H=4, **kwargs) -> LinearEstimator:
    kwargs.setdefault("model_type", "qwen3_vl")
    est = LinearEstimator(L, H, **kwargs)
    with torch.no_grad():
        est.weight.copy_(torch.randn(L, H, generator=torch.Generator().manual_seed(0)))
        if est.bias is not None:
            est.bias.fill_(0.75)
    return est


def qwen3_vl_config(layers=2, heads=4):
    return transformers.Qwen3VLConfig(
        text_config=dict(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         hidden_size=16 * heads, intermediate_size=128, head_dim=16),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=16 * heads),
    )


def folder_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


# --------------------------------------------------------------------------- scoring


def test_forward_matches_hand_computed_sum_and_nonnegative_clamps():
    est = make_estimator(3, 4, use_bias=True)
    feats = torch.rand(2, 5, 3, 4, 7)  # (..., L, H, K)
    out = est(feats)
    expected = torch.zeros(2, 5, 7)
    for layer in range(3):
        for head in range(4):
            expected += est.weight.detach()[layer, head] * feats[:, :, layer, head, :]
    torch.testing.assert_close(out, expected + 0.75)

    nn_est = make_estimator(3, 4, nonnegative=True)
    assert (nn_est.weight < 0).any()
    assert torch.equal(nn_est.effective_weight, nn_est.weight.clamp_min(0))
    torch.testing.assert_close(nn_est(feats[0, 0]), torch.einsum("lhk,lh->k", feats[0, 0], nn_est.weight.clamp_min(0)))


def test_forward_follows_feature_dtype_and_rejects_wrong_shapes():
    est = make_estimator(2, 3)
    f32 = torch.rand(2, 3, 5)
    out64 = est(f32.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, est(f32).double(), rtol=1e-5, atol=1e-6)  # float32 vs float64 arithmetic
    assert est(f32.bfloat16()).dtype == torch.bfloat16
    assert est(torch.ones(2, 3, 5, dtype=torch.int64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"L=2, H=3"):
        est(torch.rand(3, 2, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        est(np.ones((2, 3, 5)))
    est(f32.double()).sum().backward()  # gradients reach the parameter through the cast
    assert est.weight.grad is not None and est.weight.grad.shape == (2, 3)


def test_invalid_arguments_are_rejected():
    with pytest.raises(EstimatorConfigError, match="pooling"):
        LinearEstimator(2, 2, pooling="max")
    with pytest.raises(EstimatorConfigError, match="num_layers"):
        LinearEstimator(0, 2)
    with pytest.raises(EstimatorConfigError, match="num_heads"):
        LinearEstimator(2, True)
    with pytest.raises(EstimatorConfigError, match="use_bias"):
        LinearEstimator(2, 2, use_bias="yes")
    with pytest.raises(EstimatorConfigError, match=r"training_metrics.*float\(\)"):
        LinearEstimator(2, 2, training_metrics={"lds": torch.tensor(0.5)})
    with pytest.raises(EstimatorConfigError, match="training_data"):
        LinearEstimator(2, 2, training_data={"n": np.int64(3)})


# ------------------------------------------------------------------ save / load


def test_save_load_round_trip_and_card(tmp_path):
    est = make_estimator(3, 4, use_bias=True, base_model_id="org/tiny-qwen3-vl", base_model_revision="abc123",
                         pooling="mean", region_method="ward", k_policy={"k": 32},
                         training_metrics=METRICS, training_data=TRAINING_DATA)
    out = tmp_path / "est"
    est.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config == est._hub_mixin_config
    assert (config["num_layers"], config["num_heads"], config["pooling"]) == (3, 4, "mean")
    assert config["training_metrics"] == METRICS
    assert set(load_file(out / "model.safetensors")) == {"weight", "bias"}

    loaded = LinearEstimator.from_pretrained(out)
    assert torch.equal(loaded.weight, est.weight) and torch.equal(loaded.bias, est.bias)
    assert loaded._hub_mixin_config == est._hub_mixin_config and not loaded.training
    feats = torch.rand(3, 4, 9)
    torch.testing.assert_close(loaded(feats), est(feats))

    card = (out / "README.md").read_text()
    assert "library_name: hf_vattr" in card and "base_model: org/tiny-qwen3-vl" in card and "- qwen3_vl" in card
    assert f"| lds | 0.4137 | {metric_meaning('lds')} |" in card
    assert f"| top3_drop | 2.5 | {metric_meaning('top3_drop')} |" in card
    assert "| custom | [1.25, 2] |  |" in card  # a name outside the glossary keeps a blank meaning
    assert "| Layers (L) | 3 |" in card and "| Parameters | 13 (L x H + bias) |" in card
    assert "| Pooling over a region's tokens | mean |" in card and "| Region method | ward |" in card
    assert "| K policy (number of regions) | k=32 |" in card and "- **num_examples**: 128" in card
    assert "w[l, h] * f[l, h](S, k) + b" in card and "`weight` of shape (3, 4) and scalar `bias`" in card

    bare = tmp_path / "bare"
    LinearEstimator(2, 2).save_pretrained(bare, model_card_kwargs={"repo_id": "org/bare"})
    card = (bare / "README.md").read_text()
    assert "No training metrics were recorded." in card and "No training data summary was recorded." in card
    assert 'LinearEstimator.from_pretrained("org/bare")' in card


def test_resave_is_byte_identical_refreshes_a_generated_card_and_keeps_a_handwritten_one(tmp_path):
    est = make_estimator(training_metrics={"lds": 0.1})
    est.save_pretrained(tmp_path / "a")
    first = folder_files(tmp_path / "a")
    est.save_pretrained(tmp_path / "a")
    assert folder_files(tmp_path / "a") == first  # identical weights give identical bytes (no spurious Hub commits)

    est.set_training_info(training_metrics={"lds": 0.9})
    est.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| lds | 0.9 |" in card and "| lds | 0.1 |" not in card
    assert json.loads((tmp_path / "a" / "config.json").read_text())["training_metrics"] == {"lds": 0.9}

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("# my own card\n")
    est.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "# my own card\n"


def test_shipped_toy_estimator_loads_and_resaves_unchanged(tmp_path):
    est = LinearEstimator.from_pretrained(TOY_ESTIMATOR)
    weight = load_file(TOY_ESTIMATOR / "model.safetensors")["weight"]
    feats = torch.rand(5, est.num_layers, est.num_heads, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(est(feats), torch.einsum("slhk,lh->sk", feats, weight))
    est.save_pretrained(tmp_path / "again")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (TOY_ESTIMATOR / name).read_bytes()
    card = (tmp_path / "again" / "README.md").read_text()
    rows = [line.split("|") for line in card.split("## Training metrics")[1].split("##")[0].splitlines()[4:] if line]
    assert len(rows) == len(est.training_metrics)
    assert all(row[3].strip() for row in rows), "every training metric of the shipped estimator has a meaning"


def test_every_metric_training_writes_is_in_the_glossary():
    from hf_vattr.pipeline.training import TrainingConfig, fit_estimator, synthetic_examples

    records, _ = synthetic_examples(8, 2, 3, seed=0)
    est, _ = fit_estimator(records, config=TrainingConfig(epochs=3, val_fraction=0.25, seed=0))
    assert {"split", "lds", "pearson", "r2", "val_loss"} <= set(est.training_metrics)
    assert [k for k in est.training_metrics if not metric_meaning(k)] == []


def test_load_rejects_bad_config_and_weights(tmp_path):
    make_estimator(2, 3).save_pretrained(tmp_path / "e")
    cfg_path, weights = tmp_path / "e" / "config.json", tmp_path / "e" / "model.safetensors"
    good = json.loads(cfg_path.read_text())
    for change, pattern in [
        ({"num_layers": 0}, r"config\.json.*num_layers"),
        ({"pooling": "max"}, "pooling"),
        ({"num_heads": 5}, r"(?s)H=5.*torch.Size\(\[2, 3\]\).*torch.Size\(\[2, 5\]\)"),  # the weights are (2, 3)
        ({"use_bias": True}, r"(?s)use_bias=True.*Missing key.*bias"),
    ]:
        cfg_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(EstimatorConfigError, match=pattern):
            LinearEstimator.from_pretrained(tmp_path / "e")
    cfg_path.write_text(json.dumps(good))

    save_file({"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, str(weights))
    with pytest.raises(EstimatorConfigError, match=r"(?s)Unexpected key.*extra"):
        LinearEstimator.from_pretrained(tmp_path / "e")
    assert torch.equal(LinearEstimator.from_pretrained(tmp_path / "e", strict=False).weight, torch.zeros(2, 3))
    save_file({"weight": torch.full((2, 3), math.nan)}, str(weights))
    with pytest.raises(EstimatorConfigError, match="must be finite floats"):
        LinearEstimator.from_pretrained(tmp_path / "e")
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 100\n")  # an LFS pointer
    with pytest.raises(EstimatorLoadError, match=r"Could not read estimator weights .*model\.safetensors"):
        LinearEstimator.from_pretrained(tmp_path / "e")
    weights.unlink()
    with pytest.raises(EstimatorLoadError, match="has a config.json but no model.safetensors"):
        LinearEstimator.from_pretrained(tmp_path / "e")


def test_load_names_the_common_mistakes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EstimatorLoadError, match="no config.json with num_layers"):
        LinearEstimator.from_pretrained(tmp_path / "empty")
    qwen3_vl_config().save_pretrained(tmp_path / "base_model")  # the base model's folder instead of the estimator's
    with pytest.raises(EstimatorLoadError, match="not a LinearEstimator"):
        LinearEstimator.from_pretrained(tmp_path / "base_model")
    with pytest.raises(EstimatorLoadError, match="No estimator folder at"):
        LinearEstimator.from_pretrained(tmp_path / "does" / "not" / "exist")
    with pytest.raises(EstimatorLoadError, match="No estimator folder at"):
        LinearEstimator.from_pretrained("./typo-est")


# --------------------------------------------------------- Hub: real cache layout


def test_load_by_repo_id_from_the_hub_cache(tmp_path, monkeypatch, cache_repo):
    est = make_estimator(3, 4, use_bias=True, training_metrics=METRICS)
    est.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "hub"
    first = cache_repo(cache, "org/vattr-est", folder_files(tmp_path / "saved"))
    with torch.no_grad():
        est.weight.mul_(2)
    est.save_pretrained(tmp_path / "saved")
    second = cache_repo(cache, "org/vattr-est", folder_files(tmp_path / "saved"))

    loaded = LinearEstimator.from_pretrained("org/vattr-est", cache_dir=cache)  # refs/main -> the second commit
    assert torch.equal(loaded.weight, est.weight) and loaded.training_metrics == METRICS
    pinned = LinearEstimator.from_pretrained("org/vattr-est", cache_dir=cache, revision=first)
    assert torch.equal(pinned.weight * 2, est.weight)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))  # the default cache, as users have it
    assert torch.equal(LinearEstimator.from_pretrained("org/vattr-est", revision=second).weight, est.weight)

    with pytest.raises(EstimatorLoadError, match="offline mode is on") as info:  # not cached, and offline
        LinearEstimator.from_pretrained("org/never-downloaded")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value.__cause__, LocalEntryNotFoundError)
    cache_repo(cache, "org/base-model", {"config.json": qwen3_vl_config().to_json_string().encode()})
    with pytest.raises(EstimatorLoadError, match="'org/base-model' has no config.json with num_layers"):
        LinearEstimator.from_pretrained("org/base-model")
    cache_repo(cache, "org/no-weights", {"config.json": (tmp_path / "saved" / "config.json").read_bytes()})
    with pytest.raises(EstimatorLoadError, match="offline mode is on"):
        LinearEstimator.from_pretrained("org/no-weights")


def test_push_to_hub_then_load_by_repo_id(local_hub):
    est = make_estimator(3, 4, use_bias=True, base_model_id="org/tiny-qwen3-vl", training_metrics=METRICS)
    commit_url = est.push_to_hub("vattr-estimator", model_card_kwargs={"repo_id": "local-user/vattr-estimator"})
    repo_id = f"{local_hub.user}/vattr-estimator"  # no namespace given -> the token's user, as on the Hub
    assert commit_url.endswith(f"/{repo_id}/commit/{local_hub.head(repo_id)}")
    remote = local_hub.files(repo_id)
    assert set(remote) == {"config.json", "model.safetensors", "README.md"}
    assert json.loads(remote["config.json"]) == est._hub_mixin_config
    assert f'LinearEstimator.from_pretrained("{repo_id}")' in remote["README.md"].decode()

    loaded = LinearEstimator.from_pretrained(repo_id)
    assert torch.equal(loaded.weight, est.weight) and torch.equal(loaded.bias, est.bias)
    assert loaded._hub_mixin_config == est._hub_mixin_config


# ------------------------------------------------------------------ compatibility


class _ModelWithConfig(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def test_check_compatible_accepts_matching_config_and_model():
    cfg = qwen3_vl_config(layers=2, heads=4)
    est = LinearEstimator(2, 4, model_type="qwen3_vl")
    assert est.check_compatible(cfg) is est
    assert est.check_compatible(_ModelWithConfig(cfg)) is est


@pytest.mark.parametrize(
    "est_kwargs, field, values",
    [
        (dict(num_layers=3, num_heads=4, model_type="qwen3_vl"), "num_hidden_layers", ("3", "2")),
        (dict(num_layers=2, num_heads=8, model_type="qwen3_vl"), "num_attention_heads", ("8", "4")),
        (dict(num_layers=2, num_heads=4, model_type="glm4v"), "model_type", ("'glm4v'", "'qwen3_vl'")),
    ],
)
def test_check_compatible_rejects_mismatch_naming_the_field(est_kwargs, field, values):
    est = LinearEstimator(est_kwargs.pop("num_layers"), est_kwargs.pop("num_heads"), **est_kwargs)
    with pytest.raises(EstimatorMismatchError) as info:
        est.check_compatible(qwen3_vl_config(layers=2, heads=4))
    message = str(info.value)
    line = next(line for line in message.splitlines() if field in line)
    assert values[0] in line and values[1] in line
    assert "hf-vattr collect" in message and "from_pretrained" in message
    assert set(info.value.mismatches) == {field}
    assert isinstance(info.value, ValueError)


def test_check_compatible_reports_every_mismatch_and_untyped_estimator_warns():
    est = LinearEstimator(5, 7, model_type="glm4v", base_model_id="org/glm")
    with pytest.raises(EstimatorMismatchError) as info:
        est.check_compatible(_ModelWithConfig(qwen3_vl_config(layers=2, heads=4)))
    assert set(info.value.mismatches) == {"num_hidden_layers", "num_attention_heads", "model_type"}
    assert info.value.mismatches["num_hidden_layers"] == (5, 2)
    assert "org/glm" in str(info.value)

    untyped = LinearEstimator(2, 4)
    with CaptureLogger(estimator_mod.logger) as captured:
        untyped.check_compatible(qwen3_vl_config(layers=2, heads=4))
    assert "model_type" in captured.out


def test_binary_or_huge_config_values_get_clear_errors(tmp_path):
    est = make_estimator(2, 3)
    est.save_pretrained(tmp_path / "binary")
    (tmp_path / "binary" / "config.json").write_bytes(b"\xff\xfe\x00binary\x00")
    with pytest.raises(EstimatorConfigError, match="config.json.*not valid JSON"):
        LinearEstimator.from_pretrained(tmp_path / "binary")
    est.save_pretrained(tmp_path / "huge")
    config = json.loads((tmp_path / "huge" / "config.json").read_text())
    config["num_layers"] = 10**30
    (tmp_path / "huge" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EstimatorConfigError, match="num_layers must be a positive integer of at most"):
        LinearEstimator.from_pretrained(tmp_path / "huge")
