"""Training: the Pearson loss, the example-level split, and recovery of a known linear rule."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from hf_vattr.estimator import LinearEstimator
from hf_vattr.metrics import pearson
from hf_vattr.pipeline.training import (
    TrainingConfig,
    fit_estimator,
    masked_pearson,
    pearson_loss,
    split_examples,
    synthetic_examples,
)


def _flat_pearson(a, b):
    return pearson(torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten())


# --------------------------------------------------------------------------- loss


def test_pearson_loss_matches_hand_computation():
    records, _ = synthetic_examples(4, 2, 3, seed=1)
    # make one span constant (no correlation defined): it must be left out, not counted as 0
    records[0].loo_effects[0] = 0.25
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    loss, info = pearson_loss(w, records, "loo")

    rs = []
    for rec in records:
        pred = np.einsum("slhk,lh->sk", rec.span_features.numpy(), w.numpy())
        for s in range(pred.shape[0]):
            r = pearson(pred[s], rec.loo_effects[s].numpy())
            if not np.isnan(r):
                rs.append(r)
    assert info["skipped_loo"] == 1
    assert info["spans_loo"] == len(rs)
    assert float(loss) == pytest.approx(-np.mean(rs), abs=1e-5)

    # subsets target: correlation across masks of the additive subset prediction
    loss_s, _ = pearson_loss(w, records, "subsets")
    rs = []
    for rec in records:
        pred = np.einsum("slhk,lh->sk", rec.span_features.numpy(), w.numpy())
        sub_pred = pred @ rec.subset_masks.numpy().astype(float).T
        for s in range(pred.shape[0]):
            rs.append(pearson(sub_pred[s], rec.subset_effects[s].numpy()))
    assert float(loss_s) == pytest.approx(-np.nanmean(rs), abs=1e-5)
    loss_b, _ = pearson_loss(w, records, "both")
    assert float(loss_b) == pytest.approx((float(loss) + float(loss_s)) / 2, abs=1e-6)


def test_loss_is_scale_free_and_padding_is_ignored():
    records, _ = synthetic_examples(5, 2, 2, regions=(3, 9), seed=2)
    assert len({r.num_regions for r in records}) > 1  # regions are padded to the largest K
    w = torch.rand(2, 2)
    l1, _ = pearson_loss(w, records, "both")
    l2, _ = pearson_loss(w * 7.5, records, "both")
    assert float(l1) == pytest.approx(float(l2), abs=1e-6)
    # padded regions (features 0, effects 0) would change the correlation if they were counted
    r, ok = masked_pearson(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), torch.tensor([[1.0, 2.0, 4.0, 9.0]]),
                           torch.tensor([[True, True, True, False]]))
    assert ok.all() and float(r) == pytest.approx(pearson([1, 2, 3], [1, 2, 4]), abs=1e-6)


def test_loss_gradient_flows_from_uniform_init():
    records, _ = synthetic_examples(3, 2, 2, seed=3)
    w = torch.full((2, 2), 0.25, requires_grad=True)
    loss, _ = pearson_loss(w, records, "loo")
    loss.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


# --------------------------------------------------------------------------- split


def test_split_is_by_example_and_seeded():
    records, _ = synthetic_examples(20, 2, 2, seed=4)
    train, val = split_examples(20, 0.25, seed=7)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert split_examples(20, 0.25, seed=7) == (train, val)
    assert split_examples(20, 0.25, seed=8) != (train, val)
    assert split_examples(1, 0.5, 0) == ([0], [])  # nothing to hold out
    assert split_examples(3, 0.01, 0)[1] != []  # at least one held out

    est, report = fit_estimator(records, config=TrainingConfig(epochs=5, val_fraction=0.25, seed=7))
    ids_train, ids_val = report["split"]["train"], report["split"]["val"]
    assert not set(ids_train) & set(ids_val)
    assert sorted(ids_val) == sorted(str(i) for i in val)
    spans_val = sum(records[i].num_spans for i in val)
    assert report["data"]["num_val_spans"] == spans_val  # every span of a held-out example is held out


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("target", ["loo", "subsets", "both"])
def test_training_recovers_known_weights(target):
    records, w_true = synthetic_examples(40, 3, 4, noise=0.02, seed=5)
    est, report = fit_estimator(records, config=TrainingConfig(target=target, epochs=200, seed=0))
    assert isinstance(est, LinearEstimator)
    assert _flat_pearson(est.weight.detach(), w_true) > 0.95
    val = report["metrics"]["val"]
    assert val["pearson"] > 0.9
    assert val["lds"] > 0.85
    assert val["r2"] > 0.85  # calibrated units: raw R^2 close to the calibrated one
    assert val["r2"] == pytest.approx(val["r2_calibrated"], abs=0.05)
    # calibration folds the scale back in: weights in log-prob units (the known rule's)
    assert torch.allclose(est.weight.detach(), w_true, atol=0.25 * float(w_true.abs().max()))
    # raw attention (the uniform init) is much worse on this data than the fit
    assert report["history"][0]["val_loss"] > report["history"][-1]["val_loss"]


def test_lbfgs_and_minibatch_agree_with_adam():
    records, w_true = synthetic_examples(30, 2, 3, noise=0.02, seed=6)
    for cfg in (TrainingConfig(optimizer="lbfgs", epochs=20), TrainingConfig(batch_size=16, epochs=60)):
        est, _ = fit_estimator(records, config=cfg)
        assert _flat_pearson(est.weight.detach(), w_true) > 0.95, cfg


def test_nonnegative_training():
    w_true = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.0, 0.0]])
    records, _ = synthetic_examples(30, 2, 3, noise=0.02, weight=w_true, seed=7)
    est, report = fit_estimator(records, config=TrainingConfig(nonnegative=True, epochs=200))
    assert est.nonnegative and bool((est.weight >= 0).all())
    assert _flat_pearson(est.weight.detach(), w_true) > 0.95
    est2, _ = fit_estimator(records, config=TrainingConfig(nonnegative=True, optimizer="lbfgs", epochs=15))
    assert bool((est2.effective_weight >= 0).all()) and _flat_pearson(est2.effective_weight.detach(), w_true) > 0.95


def test_bias_and_uncalibrated_units():
    records, w_true = synthetic_examples(30, 2, 2, noise=0.02, seed=8)
    for rec in records:  # constant offset on every single-region effect
        rec.loo_effects = rec.loo_effects + 0.3
    est, rep = fit_estimator(records, config=TrainingConfig(use_bias=True, epochs=150))
    assert est.bias is not None and float(est.bias.detach()) == pytest.approx(0.3, abs=0.05)
    assert rep["calibration"]["applied"]
    raw, rep2 = fit_estimator(records, config=TrainingConfig(calibrate=False, epochs=150))
    assert not rep2["calibration"]["applied"]
    assert float(raw.weight.detach().abs().sum()) == pytest.approx(1.0, abs=1e-5)  # raw-attention units
    assert _flat_pearson(raw.weight.detach(), w_true) > 0.95


def test_estimator_records_training_summary(tmp_path):
    records, _ = synthetic_examples(12, 2, 2, regions=(6, 10), num_subsets=8, seed=9)
    est, report = fit_estimator(records, config=TrainingConfig(epochs=20),
                                base_model_id="local/tiny", extra_training_data={"task": "synthetic"})
    td = est.training_data
    assert td["num_examples"] == 12 and td["num_spans"] == sum(r.span_features.shape[0] for r in records)
    assert td["num_regions_min"] >= 6 and td["num_regions_max"] <= 10
    assert td["masks_per_example_max"] == 8 and td["task"] == "synthetic" and td["split"] == "by example"
    m = est.training_metrics
    assert m["split"] == "val" and {"lds", "pearson", "r2", "r2_calibrated", "val_loss"} <= set(m)
    assert est.model_type == "qwen3_vl" and est.base_model_id == "local/tiny"
    est.save_pretrained(tmp_path / "est")
    cfg = json.loads((tmp_path / "est" / "config.json").read_text())
    assert cfg["training_data"]["num_examples"] == 12 and cfg["training_metrics"]["lds"] == pytest.approx(m["lds"])
    card = (tmp_path / "est" / "README.md").read_text()
    assert "lds" in card.lower() or "LDS" in card
    again = LinearEstimator.from_pretrained(tmp_path / "est")
    assert torch.equal(again.weight, est.weight)
    json.dumps(report, default=float)  # the report is JSON-serialisable


def _nnls_by_enumeration(x, y):
    """Reference: least squares on every set of free columns, the best feasible one (two columns only)."""
    best = None
    for free in ([0, 1], [0], [1], []):
        coef = np.zeros(2)
        if free:
            coef[free] = np.linalg.lstsq(x[:, free], y, rcond=None)[0]
        if (coef >= -1e-12).all():
            loss = float(((y - x @ coef) ** 2).sum())
            if best is None or loss < best[0] - 1e-12:
                best = (loss, coef.clip(min=0.0))
    return best[1]


def test_inheritance_slopes_are_non_negative_least_squares():
    from hf_vattr.pipeline.training import _two_slopes

    assert _two_slopes([]) == (1.0, 0.0)  # nothing to fit: answers keep their own scores
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(40, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    a, b = _two_slopes([(x1[:20], x2[:20], 2 * x1[:20] + 3 * x2[:20]), (x1[20:], x2[20:], 2 * x1[20:] + 3 * x2[20:])])
    assert (a, b) == pytest.approx((2.0, 3.0))
    for trial in range(20):  # negative true slopes included: the constraint binds
        coef = torch.randn(2, generator=g, dtype=torch.float64) * 2
        y = coef[0] * x1 + coef[1] * x2 + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)
        got = _two_slopes([(x1, x2, y)])
        assert min(got) >= 0
        assert got == pytest.approx(tuple(_nnls_by_enumeration(torch.stack([x1, x2], 1).numpy(), y.numpy())),
                                    abs=1e-9)


def test_input_validation():
    records, _ = synthetic_examples(3, 2, 2, seed=10)
    no_subsets = [dataclasses.replace(r, subset_masks=r.subset_masks[:0], subset_effects=r.subset_effects[:, :0])
                  for r in records]
    with pytest.raises(ValueError, match="num_subsets=0"):
        fit_estimator(no_subsets, config=TrainingConfig(target="subsets", epochs=1))
    est, _ = fit_estimator(no_subsets, config=TrainingConfig(target="loo", epochs=5))  # LOO alone works
    assert est.training_data["has_subsets"] is False
    with pytest.raises(ValueError, match="loo_effects must have shape"):
        dataclasses.replace(records[0], loo_effects=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="target"):
        TrainingConfig(target="everything")
    with pytest.raises(ValueError, match="num_layers"):
        fit_estimator(records, 5, 2, TrainingConfig(epochs=1))


def test_collection_records_train(tmp_path):
    """Records in the collection's on-disk format (ExampleRecord safetensors) train directly."""
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    records, w_true = synthetic_examples(16, 2, 3, noise=0.02, seed=11)
    for r in records:
        dataclasses.replace(r, config={"pooling": "mean"}).save(collection.example_path(tmp_path, r.example_id))
    loaded = collection.load_collection(tmp_path)
    est, report = fit_estimator(loaded, config=TrainingConfig(epochs=100))
    assert est.pooling == "mean" and est.model_type == "qwen3_vl"
    assert _flat_pearson(est.weight.detach(), w_true) > 0.95


def test_empty_example_file_is_named(tmp_path):
    """A 0-byte example file (a killed copy, a full disk) fails loading with its path and what to do."""
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    records, _ = synthetic_examples(2, 2, 2, seed=12)
    for r in records:
        r.save(collection.example_path(tmp_path, r.example_id))
    bad = collection.example_path(tmp_path, 1)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{bad.name} is not a readable hf_vattr collection example.*Delete it"):
        collection.load_collection(tmp_path)
