"""feature_kind="value_norm": attention times ||W_O^h v_j||, checked against an independent eager reference."""

import copy

import pytest
import torch

from hf_vattr import AttributionStreamer, LinearEstimator, TokenAttribution
from hf_vattr.capture.attention import AttentionCapture
from hf_vattr.layouts import extend_inputs, visual_layout
from hf_vattr.regions import prompt_regions
from hf_vattr.testing import FAMILIES, example_image, example_inputs


def _reference(get_tiny, family, inputs, positions, membership):
    """(L, H, T, K): eager attention weights times the norm of each visual token's output contribution,
    from v_proj outputs and o_proj weights taken directly (a per-head product, no Gram matrix)."""
    base, _ = get_tiny(family)
    eager = copy.deepcopy(base)
    eager.set_attn_implementation("eager")
    layers = eager.model.language_model.layers
    values, hooks = {}, []
    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            lambda mod, args, out, i=i: values.__setitem__(i, out.detach())))
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, use_cache=False)
    for h in hooks:
        h.remove()
    text = eager.config.get_text_config()
    num_heads, num_kv = text.num_attention_heads, text.num_key_value_heads
    feats = []
    for i, layer in enumerate(layers):
        dim = values[i].shape[-1] // num_kv
        v = values[i][0].reshape(-1, num_kv, dim)[positions]  # (Nv, Hkv, D)
        w_o = layer.self_attn.o_proj.weight  # (hidden, H * D)
        norms = torch.stack([
            (v[:, h // (num_heads // num_kv)] @ w_o[:, h * dim:(h + 1) * dim].T).norm(dim=-1) for h in range(num_heads)
        ])  # (H, Nv)
        att = out.attentions[i][0][:, :, positions]  # (H, T, Nv)
        feats.append((att * norms[:, None, :]) @ membership)  # (H, T, K)
    return torch.stack(feats)  # (L, H, T, K)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_all_rows_match_the_reference(family, get_tiny):
    model, proc = get_tiny(family)
    inputs = example_inputs(proc, [example_image()])
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"])
    membership = prompt_regions(layout, k=4).membership()
    with AttentionCapture(model, layout.positions, membership, rows="all", feature_kind="value_norm") as cap:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        got = cap.pop()  # (T, L, H, K)
    ref = _reference(get_tiny, family, inputs, layout.positions, membership).permute(2, 0, 1, 3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # and it is not plain attention
    with AttentionCapture(model, layout.positions, membership, rows="all") as cap:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        assert not torch.allclose(cap.pop(), got)


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_streamed_decode_steps_match_the_reference(family, get_tiny):
    model, proc = get_tiny(family)
    inputs = example_inputs(proc, [example_image()])
    plain = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    text = model.config.get_text_config()
    estimator = LinearEstimator(text.num_hidden_layers, text.num_attention_heads, model_type=model.config.model_type,
                                feature_kind="value_norm")
    streamer = AttributionStreamer(model, proc, inputs=inputs, estimator=estimator, grid_k=4, keep_features=True)
    tokens = [e for e in streamer.generate(**inputs, max_new_tokens=5, do_sample=False)
              if isinstance(e, TokenAttribution)]
    output = streamer.join()
    assert torch.equal(output, plain) and streamer.capture.path == "lse"
    ref = _reference(get_tiny, family, extend_inputs(inputs, output), streamer.layout.positions,
                     streamer.regions.membership())
    prompt_len = inputs["input_ids"].shape[1]
    rows = ref[:, :, prompt_len - 1: output.shape[1] - 1].permute(2, 0, 1, 3)  # (T, L, H, K)
    torch.testing.assert_close(torch.stack([t.features for t in tokens]), rows, atol=1e-5, rtol=1e-4)


def test_unknown_feature_kind_is_refused(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="feature_kind"):
        AttentionCapture(model, layout.positions, None, feature_kind="norms")


def test_estimator_records_its_feature_kind(tmp_path):
    est = LinearEstimator(2, 4, feature_kind="value_norm")
    est.save_pretrained(tmp_path / "vn")
    assert LinearEstimator.from_pretrained(tmp_path / "vn").feature_kind == "value_norm"
    plain = LinearEstimator(2, 4)
    plain.save_pretrained(tmp_path / "att")
    assert "feature_kind" not in (tmp_path / "att" / "config.json").read_text()  # older files keep their bytes
    assert LinearEstimator.from_pretrained(tmp_path / "att").feature_kind == "attention"
    with pytest.raises(ValueError, match="feature_kind"):
        LinearEstimator(2, 4, feature_kind="norms")


def test_collection_and_training_carry_the_feature_kind(tmp_path, get_tiny):
    """A value_norm collection stores value_norm features (equal to the reference) and trains a value_norm estimator."""
    from test_collection import EveryN, config, dataset

    from hf_vattr.pipeline.collection import collect, load_collection
    from hf_vattr.pipeline.training import TrainingConfig, fit_estimator

    model, proc = get_tiny("qwen3_vl")
    collect(model, proc, dataset(2), tmp_path, config(feature_kind="value_norm"), splitter_factory=EveryN,
            progress=False)
    records = load_collection(tmp_path)
    assert all(r.feature_kind == "value_norm" for r in records)
    plain_dir = tmp_path / "plain"
    collect(model, proc, dataset(2), plain_dir, config(), splitter_factory=EveryN, progress=False)
    plain = load_collection(plain_dir)
    assert not torch.allclose(records[0].span_features, plain[0].span_features)
    estimator, _ = fit_estimator(records, config=TrainingConfig(epochs=2))
    assert estimator.feature_kind == "value_norm"
