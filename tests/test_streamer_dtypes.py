"""The streamer in float32 and bfloat16, on every family.

* Generation is bitwise identical with the streamer attached (greedy, full sequences), and sdpa models
  take the constant-cost ``"lse"`` route on decode steps.
* The streamed (L, H, K) features equal an eager ``output_attentions=True`` reference computed in float32
  with the same weights, teacher-forced on the sequence the streamed run generated: exactly (atol 1e-5)
  in float32, within a stated relative bound in bfloat16 (the model itself then computes attention
  from bfloat16 activations, so the features are only as exact as its bfloat16 attention).
"""

import copy
import threading

import pytest
import torch

from hf_vattr import LinearEstimator, AttributionStreamer, TokenAttribution
from hf_vattr.capture import capture_active
from hf_vattr.layouts import extend_inputs
from hf_vattr.streaming.streamer import GenerationError
from hf_vattr.testing import FAMILIES, example_image, example_inputs

NEW_TOKENS = 6
DEADLINE = 30.0
# bfloat16: max |got - ref| over all tokens, layers, heads and regions, relative to max |ref|. Measured on
# the tiny models (torch 2.14, transformers 5.24, CPU): qwen3_vl 0.0154 (the largest), qwen3_vl_moe 0.0070,
# glm4v 0.0006, glm4v_moe 0.0004, qwen2_5_vl 0.0003. The bound leaves about 2x headroom over the largest.
BF16_RELATIVE_BOUND = 0.03

_EAGER: dict = {}


def _eager_reference_model(get_tiny, family):
    """A float32 eager copy of the shared tiny model: the same weights, attention returned as weights."""
    if family not in _EAGER:
        base, _ = get_tiny(family)
        eager = copy.deepcopy(base)
        eager.set_attn_implementation("eager")
        _EAGER[family] = eager
    return _EAGER[family]


def _model_in(get_tiny, family, dtype):
    base, proc = get_tiny(family)
    if dtype == torch.float32:
        return base, proc  # read-only use of the shared model
    return copy.deepcopy(base).to(dtype), proc  # the shared cached model stays float32


def _inputs(proc, dtype):
    images = [example_image(), example_image(100, 140, seed=2)]
    inputs = example_inputs(proc, images)
    cast = dict(inputs)
    cast["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs, cast


def _eager_features(get_tiny, family, inputs, sequence, streamer):
    """(T, L, H, K) float32: eager attention of each row that predicts a generated token, pooled to regions."""
    eager = _eager_reference_model(get_tiny, family)
    with torch.no_grad():
        out = eager(**extend_inputs(inputs, sequence), output_attentions=True, use_cache=False)
    att = torch.stack(out.attentions)[:, 0].float()  # (L, H, T, T)
    prompt_len = inputs["input_ids"].shape[1]
    rows = att[:, :, prompt_len - 1: sequence.shape[1] - 1]
    pooled = rows[..., streamer.layout.positions] @ streamer.regions.membership()  # (L, H, T, K)
    return pooled.permute(2, 0, 1, 3)


def _stream(streamer, **generate_kwargs):
    box = {"events": [], "error": None}

    def consume():
        try:
            for event in streamer.generate(**generate_kwargs):
                box["events"].append(event)
        except GenerationError as err:
            box["error"] = err

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the consumer hung"
    assert box["error"] is None, f"{box['error']!r} (cause {box['error'].__cause__!r})"
    return [e for e in box["events"] if isinstance(e, TokenAttribution)], streamer.join(DEADLINE)


def _attention_estimator(model):
    """Uniform weights over plain attention features: the features are the eager reference's, and a score is
    their mean over layers and heads (as raw-attention scoring was)."""
    layers, heads = model.config.get_text_config().num_hidden_layers, model.config.get_text_config().num_attention_heads
    estimator = LinearEstimator(layers, heads, model_type=model.config.model_type, feature_kind="attention")
    with torch.no_grad():
        estimator.weight.fill_(1.0 / (layers * heads))
    return estimator


def run(get_tiny, family, dtype):
    """Generate without and with the streamer; returns what the checks need, and the eager reference."""
    model, proc = _model_in(get_tiny, family, dtype)
    inputs32, inputs = _inputs(proc, dtype)
    plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    streamer = AttributionStreamer(model, proc, inputs=inputs, estimator=_attention_estimator(model),
                                   keep_features=True)
    tokens, output = _stream(streamer, **inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert not capture_active() and not model._forward_hooks
    reference = _eager_features(get_tiny, family, inputs32, output, streamer)
    return model, streamer, inputs["input_ids"].shape[1], tokens, plain, output, reference


def relative_error(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_unchanged_and_features_match_eager(family, dtype, get_tiny):
    model, streamer, prompt_len, tokens, plain, output, ref = run(get_tiny, family, dtype)
    assert next(model.parameters()).dtype == dtype
    # generation is bitwise identical with the streamer attached, one event per generated token
    assert torch.equal(output, plain)
    assert [t.token_id for t in tokens] == output[0, prompt_len:].tolist()
    # sdpa decode steps took the constant-cost route (the prefill row always takes the full-row route)
    assert streamer.capture.path == "lse"
    got = torch.stack([t.features for t in tokens]).float()  # (T, L, H, K)
    assert got.shape == ref.shape
    # uniform weights: a region's score is its attention averaged over layers and heads
    torch.testing.assert_close(torch.stack([t.region_scores for t in tokens]).float(), got.mean(dim=(1, 2)),
                               atol=1e-6, rtol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    else:
        relative = relative_error(got, ref)
        assert relative <= BF16_RELATIVE_BOUND, f"bfloat16 features deviate by {relative:.4f} of the largest value"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("route", ["weights", "full-row"])
def test_other_routes_keep_generation_and_features(family, dtype, route, monkeypatch, get_tiny):
    """The eager route (weights returned by the attention function) and the full-row fallback (any kernel
    without a log-sum-exp) also leave generation bitwise unchanged and match the eager reference."""
    import hf_vattr.capture.dispatch as capture_module

    base, proc = get_tiny(family)
    model = copy.deepcopy(base).to(dtype)
    if route == "weights":
        model.set_attn_implementation("eager")
    else:
        monkeypatch.setattr(capture_module, "_sdpa_decode_with_lse", lambda *args: None)  # no LSE kernel
    inputs32, inputs = _inputs(proc, dtype)
    plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    streamer = AttributionStreamer(model, proc, inputs=inputs, estimator=_attention_estimator(model),
                                   keep_features=True)
    tokens, output = _stream(streamer, **inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(output, plain)
    assert streamer.capture.path == route
    got = torch.stack([t.features for t in tokens]).float()
    ref = _eager_features(get_tiny, family, inputs32, output, streamer)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    else:
        assert relative_error(got, ref) <= BF16_RELATIVE_BOUND
    assert not capture_active() and not model._forward_hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_generation_unchanged_and_route_reported(dtype, get_tiny):
    """On CUDA the LSE kernels are used only where they reproduce sdpa bitwise; generation never changes."""
    base, proc = get_tiny("qwen3_vl")
    model = copy.deepcopy(base).to("cuda", dtype)
    _, inputs = _inputs(proc, dtype)
    inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    streamer = AttributionStreamer(model, proc, inputs=inputs, estimator=_attention_estimator(model),
                                   keep_features=True)
    tokens, output = _stream(streamer, **inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(output, plain)
    assert streamer.capture.path in ("lse", "full-row")
    assert all(torch.isfinite(t.region_scores).all() for t in tokens)
