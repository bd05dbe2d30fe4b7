"""LinearEstimator: scoring, save/load, Hub round trip over a local Hub server, compatibility."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx2
import pytest
import torch
import transformers
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from transformers.testing_utils import CaptureLogger

import hf_vattr.estimator as estimator_mod
from hf_vattr.estimator import (
    EstimatorConfigError,
    EstimatorLoadError,
    EstimatorMismatchError,
    LinearEstimator,
)
from hf_vattr.testing_hub import LocalHub, local_hub  # noqa: F401  (pytest fixture)

METRICS = {"lds": 0.4137, "r2": 0.65, "topk_drop": {"k1": 1.25, "k4": 2.5}}
TRAINING_DATA = {"task": "toy-grounded", "num_examples": 128, "masks_per_example": 32}


def make_estimator(L=3, H=4, **kwargs) -> LinearEstimator:
    kwargs.setdefault("model_type", "qwen3_vl")
    est = LinearEstimator(L, H, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        est.weight.copy_(torch.randn(L, H, generator=g))
        if est.bias is not None:
            est.bias.fill_(0.75)
    return est


def qwen3_vl_config(layers=2, heads=4):
    return transformers.Qwen3VLConfig(
        text_config=dict(
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            hidden_size=16 * heads,
            intermediate_size=128,
            head_dim=16,
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=16 * heads),
    )


# --------------------------------------------------------------------------- scoring


def test_forward_matches_hand_computed_sum():
    est = make_estimator(3, 4, use_bias=True)
    feats = torch.rand(2, 5, 3, 4, 7)  # (..., L, H, K)
    out = est(feats)
    assert out.shape == (2, 5, 7)
    w = est.weight.detach()
    expected = torch.zeros(2, 5, 7)
    for layer in range(3):
        for head in range(4):
            expected += w[layer, head] * feats[:, :, layer, head, :]
    expected += 0.75
    torch.testing.assert_close(out, expected)


def test_score_layer_sums_to_forward_and_nonnegative_clamps():
    est = make_estimator(3, 4, use_bias=True)
    feats = torch.rand(3, 4, 6)
    partial = sum(est.score_layer(layer, feats[layer]) for layer in range(3))
    assert partial.shape == (6,)
    torch.testing.assert_close(est.add_bias(partial), est(feats))
    torch.testing.assert_close(est.score_layer(-1, feats[2]), est.score_layer(2, feats[2]))
    with pytest.raises(IndexError):
        est.score_layer(3, feats[0])

    nn_est = make_estimator(3, 4, nonnegative=True)
    assert (nn_est.weight < 0).any()
    assert torch.equal(nn_est.effective_weight, nn_est.weight.clamp_min(0))
    torch.testing.assert_close(nn_est(feats), torch.einsum("lhk,lh->k", feats, nn_est.weight.clamp_min(0)))
    nn_est.project_()
    assert (nn_est.weight >= 0).all()


def test_forward_follows_feature_dtype_without_copying_weight():
    est = make_estimator(2, 3)
    f32 = torch.rand(2, 3, 5)
    assert est._cast(est.weight, f32) is est.weight  # same dtype/device: no copy
    f64 = f32.double()
    out64 = est(f64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, est(f32).double())
    assert est(f32.bfloat16()).dtype == torch.bfloat16
    assert est(torch.ones(2, 3, 5, dtype=torch.int64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"L=2, H=3"):
        est(torch.rand(3, 2, 5))
    # gradients reach the parameter through the cast
    est(f64).sum().backward()
    assert est.weight.grad is not None and est.weight.grad.shape == (2, 3)


def test_invalid_arguments_are_rejected():
    with pytest.raises(EstimatorConfigError, match="pooling"):
        LinearEstimator(2, 2, pooling="max")
    with pytest.raises(EstimatorConfigError, match="num_layers"):
        LinearEstimator(0, 2)
    with pytest.raises(EstimatorConfigError, match="num_heads"):
        LinearEstimator(2, True)
    with pytest.raises(EstimatorConfigError, match="training_metrics"):
        LinearEstimator(2, 2, training_metrics={"lds": object()})


# ------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    est = make_estimator(
        3,
        4,
        use_bias=True,
        base_model_id="org/tiny-qwen3-vl",
        base_model_revision="abc123",
        pooling="mean",
        region_method="ward",
        k_policy={"k": 32},
        training_metrics={**METRICS, "r2_tensor": torch.tensor(0.5)},  # 0-d tensor -> JSON float
        training_data=TRAINING_DATA,
    )
    out = tmp_path / "est"
    est.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((out / "config.json").read_text())
    assert config == est.config
    assert config["num_layers"] == 3 and config["num_heads"] == 4 and config["pooling"] == "mean"
    assert config["training_metrics"]["r2_tensor"] == 0.5
    assert set(load_file(out / "model.safetensors")) == {"weight", "bias"}

    loaded = LinearEstimator.from_pretrained(out)
    assert torch.equal(loaded.weight, est.weight) and torch.equal(loaded.bias, est.bias)
    assert loaded.config == est.config
    assert not loaded.training
    feats = torch.rand(3, 4, 9)
    torch.testing.assert_close(loaded(feats), est(feats))

    card = (out / "README.md").read_text()
    assert "library_name: hf_vattr" in card and "base_model: org/tiny-qwen3-vl" in card
    assert "| Metric | Value | Meaning |" in card
    assert "| lds | 0.4137 |" in card and "| r2 | 0.65 |" in card and "| topk_drop.k4 | 2.5 |" in card
    assert "| Layers (L) | 3 |" in card and "| Heads per layer (H) | 4 |" in card
    assert "| Pooling over a region's tokens | mean |" in card and "| Region method | ward |" in card
    assert "k=32" in card and "**num_examples**: 128" in card
    assert 'LinearEstimator.from_pretrained("' in card and "```python" in card


def test_resave_refreshes_generated_card_but_keeps_a_handwritten_one(tmp_path):
    est = make_estimator(training_metrics={"lds": 0.1})
    est.save_pretrained(tmp_path / "a")
    est.set_training_info(training_metrics={"lds": 0.9})
    est.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| lds | 0.9 |" in card and "| lds | 0.1 |" not in card
    assert json.loads((tmp_path / "a" / "config.json").read_text())["training_metrics"] == {"lds": 0.9}

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("# my own card\n")
    est.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "# my own card\n"


def test_load_rejects_bad_config_and_weights(tmp_path):
    est = make_estimator(2, 3)
    est.save_pretrained(tmp_path / "e")
    cfg_path = tmp_path / "e" / "config.json"
    good = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**good, "num_layers": 0}))
    with pytest.raises(EstimatorConfigError, match=r"config\.json.*num_layers"):
        LinearEstimator.from_pretrained(tmp_path / "e")
    cfg_path.write_text(json.dumps({**good, "pooling": "max"}))
    with pytest.raises(EstimatorConfigError, match="pooling"):
        LinearEstimator.from_pretrained(tmp_path / "e")
    cfg_path.write_text(json.dumps({**good, "num_heads": 5}))  # weights are (2, 3)
    with pytest.raises(EstimatorConfigError, match=r"shape \(2, 3\).*\(2, 5\)"):
        LinearEstimator.from_pretrained(tmp_path / "e")
    cfg_path.write_text(json.dumps({**good, "use_bias": True}))  # no bias tensor in the file
    with pytest.raises(EstimatorConfigError, match="missing tensors"):
        LinearEstimator.from_pretrained(tmp_path / "e")

    cfg_path.write_text(json.dumps(good))
    save_file({"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, str(tmp_path / "e" / "model.safetensors"))
    with pytest.raises(EstimatorConfigError, match="unexpected tensors"):
        LinearEstimator.from_pretrained(tmp_path / "e")

    (tmp_path / "empty").mkdir()
    with pytest.raises(EstimatorLoadError, match="config.json"):
        LinearEstimator.from_pretrained(tmp_path / "empty")
    with pytest.raises(EstimatorLoadError, match="No estimator folder"):
        LinearEstimator.from_pretrained(tmp_path / "does" / "not" / "exist")


# --------------------------------------------------------------- Hub (local server)


def test_push_to_hub_then_load_by_repo_id_over_http(local_hub, tmp_path):  # noqa: F811
    hub = local_hub
    est = make_estimator(3, 4, use_bias=True, base_model_id="org/tiny-qwen3-vl", training_metrics=METRICS)
    commit_url = est.push_to_hub("vattr-estimator")
    repo_id = f"{hub.user}/vattr-estimator"  # no namespace given -> the token's user, as on the Hub
    head = hub.head(repo_id)
    assert commit_url.endswith(f"/{repo_id}/commit/{head}")

    remote = hub.files(repo_id)
    assert {"config.json", "model.safetensors", "README.md"} <= set(remote)
    assert json.loads(remote["config.json"]) == est.config
    assert f'LinearEstimator.from_pretrained("{repo_id}")' in remote["README.md"].decode()
    assert hub.requests_matching("POST", "/api/repos/create")
    assert hub.requests_matching("POST", f"/api/models/{repo_id}/preupload/main")
    assert hub.requests_matching("POST", f"/api/models/{repo_id}/commit/main")

    hub.clear_requests()
    loaded = LinearEstimator.from_pretrained(repo_id)
    assert torch.equal(loaded.weight, est.weight) and torch.equal(loaded.bias, est.bias)
    assert loaded.config == est.config
    # fetched over HTTP by huggingface_hub's real download path ...
    assert sorted(hub.downloads(repo_id)) == [f"{repo_id}/main/config.json", f"{repo_id}/main/model.safetensors"]
    assert hub.requests_matching("HEAD", f"/{repo_id}/resolve/main/config.json")
    # ... into the temporary HF cache, as a snapshot of the pushed commit
    snapshot = tmp_path / "hf_home" / "hub" / "models--local-user--vattr-estimator" / "snapshots" / head
    assert (snapshot / "config.json").read_bytes() == remote["config.json"]
    assert (snapshot / "model.safetensors").read_bytes() == remote["model.safetensors"]
    assert hub.unhandled == []

    # a second push of the same estimator changes nothing: no new commit
    est.push_to_hub(repo_id)
    assert hub.head(repo_id) == head


def test_missing_repo_id_fails_with_clear_error(local_hub):  # noqa: F811
    with pytest.raises(EstimatorLoadError) as info:
        LinearEstimator.from_pretrained("nobody/no-such-estimator")
    message = str(info.value)
    assert "nobody/no-such-estimator" in message and "not found" in message
    assert local_hub.endpoint in message
    assert isinstance(info.value, OSError)
    assert [r.status for r in local_hub.requests_matching(path_contains="no-such-estimator")] == [404]

    local_hub.add_file("org/not-an-estimator", "README.md", "hello")
    with pytest.raises(EstimatorLoadError, match="has no config.json"):
        LinearEstimator.from_pretrained("org/not-an-estimator")


def test_local_hub_protocol_edges(tmp_path):
    with LocalHub() as hub:
        hub.add_file("org/r", "dir/a.bin", b"0123456789")
        base = hub.endpoint
        with httpx2.Client() as client:
            r = client.head(f"{base}/org/r/resolve/main/dir/a.bin")
            assert r.status_code == 200 and r.headers["Content-Length"] == "10"
            assert r.headers["X-Repo-Commit"] == hub.head("org/r") and r.headers["ETag"].startswith('"')
            assert not any(k.lower().startswith("x-xet") for k in r.headers)
            r = client.get(f"{base}/org/r/resolve/main/dir/a.bin", headers={"Range": "bytes=4-"})
            assert r.status_code == 206 and r.content == b"456789"
            r = client.head(f"{base}/org/r/resolve/main/missing.bin")
            assert r.status_code == 404 and r.headers["X-Error-Code"] == "EntryNotFound"
            r = client.get(f"{base}/api/models/nobody/none")
            assert r.status_code == 404 and r.headers["X-Error-Code"] == "RepoNotFound"
            r = client.post(f"{base}/api/repos/create", json={"name": "x"})  # no token
            assert r.status_code == 401
            r = client.get(f"{base}/api/not/a/route")
            assert r.status_code == 501 and "/api/not/a/route" in r.json()["error"]
        assert [u.path for u in hub.unhandled] == ["/api/not/a/route"]


def test_activate_restores_huggingface_hub_state(tmp_path):
    before = (hub_constants.ENDPOINT, hub_constants.HF_HUB_OFFLINE, hub_constants.HF_HUB_CACHE)
    env_before = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN")}
    with LocalHub() as hub:
        with hub.activate(tmp_path / "home"):
            assert hub_constants.ENDPOINT == hub.endpoint == os.environ["HF_ENDPOINT"]
            assert hub_constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
            assert hub_constants.HF_HUB_CACHE == str(tmp_path / "home" / "hub")
    assert (hub_constants.ENDPOINT, hub_constants.HF_HUB_OFFLINE, hub_constants.HF_HUB_CACHE) == before
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_offline_load_of_missing_repo_fails_fast(tmp_path):
    """With HF_HUB_OFFLINE=1 (read by huggingface_hub at import), a missing repo errors at once."""
    script = textwrap.dedent(
        """
        import time
        from hf_vattr.estimator import LinearEstimator, EstimatorLoadError
        t0 = time.perf_counter()
        try:
            LinearEstimator.from_pretrained("nobody/never-downloaded")
        except EstimatorLoadError as e:
            print("ELAPSED", time.perf_counter() - t0)
            print("MESSAGE", str(e).replace("\\n", " "))
        else:
            print("LOADED")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    # An endpoint nobody listens on: if offline mode were ignored this would still not hang.
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_ENDPOINT="http://127.0.0.1:9")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(estimator_mod.__file__).parents[1]), env.get("PYTHONPATH", "")])
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert "LOADED" not in proc.stdout
    assert float(lines["ELAPSED"]) < 10.0, proc.stdout
    assert "offline mode is on" in lines["MESSAGE"] and "nobody/never-downloaded" in lines["MESSAGE"]
    assert wall < 60, f"subprocess took {wall:.1f}s"


def test_local_files_only_in_process_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(EstimatorLoadError, match="offline mode is on"):
        LinearEstimator.from_pretrained("nobody/never-downloaded", cache_dir=tmp_path / "cache")
    assert time.perf_counter() - t0 < 10


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
    assert est.check_compatible(cfg.to_dict()) is est


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
