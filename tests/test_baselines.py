"""Attribution methods: gradient baselines against independent references, LOO against the ablation engine."""

import copy
from dataclasses import dataclass

import pytest
import torch

from hf_vattr.pipeline.baselines import (
    EstimatorMethod,
    GradientXInput,
    IntegratedGradients,
    LeaveOneOut,
    RandomScores,
    RawAttention,
    compute_span_features,
    make_method,
    span_logprobs_with_embeddings,
    visual_embedding_override,
)
from hf_vattr.pipeline.collection import ExampleRecord
from hf_vattr.estimator import LinearEstimator
from hf_vattr.layouts import text_dims, visual_layout
from hf_vattr.regions import prompt_regions
from hf_vattr.testing import example_inputs

SPANS = [(0, 3), (3, 8)]
_CTX: dict = {}


def make_record(sequence: torch.Tensor, spans, regions, features: torch.Tensor, example_id=0) -> ExampleRecord:
    """A record of a trace (effects zero: the methods here never read them)."""
    s, k = len(spans), regions.num_regions
    return ExampleRecord(
        example_id=example_id, span_features=features, loo_effects=torch.zeros(s, k),
        subset_masks=torch.zeros(0, k, dtype=torch.bool), subset_effects=torch.zeros(s, 0),
        base_logprobs=torch.zeros(s), sequence=sequence.reshape(-1), prompt_len=0,
        spans=[{"start": a, "end": b, "text": "", "section": "thinking"} for a, b in spans], text="",
        num_regions=k, regions=regions.to_dict())


@dataclass
class Ctx:
    """A record plus what the model-running methods need with it."""

    model: torch.nn.Module
    inputs: dict
    sequence: torch.Tensor
    regions: object
    record: ExampleRecord
    spans = SPANS

    @property
    def num_regions(self) -> int:
        return self.regions.num_regions

    @property
    def args(self) -> tuple:
        return self.record, self.model, self.inputs


def make_context(get_tiny, family: str, *, double: bool = False, k: int = 6, features: bool = False) -> Ctx:
    key = (family, double, k)
    if key not in _CTX:
        model, processor = get_tiny(family)
        inputs = example_inputs(processor)
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        if double:
            model = copy.deepcopy(model).double()
            inputs = {k_: (v.double() if v.is_floating_point() else v) for k_, v in inputs.items()}
        layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"])
        regions = prompt_regions(layout, k=k)
        _CTX[key] = (model, inputs, sequence, regions)
    model, inputs, sequence, regions = _CTX[key]
    if features:
        feats = compute_span_features(model, inputs, sequence, SPANS, regions)
    else:
        feats = torch.zeros(len(SPANS), *text_dims(model), regions.num_regions)
    return Ctx(model, inputs, sequence, regions, make_record(sequence, SPANS, regions, feats, f"{family}-0"))


def _layer0_scaled_logprobs(ctx: Ctx, region: int, eps, grad: bool = False) -> torch.Tensor:
    """Span log-probs with region ``region``'s visual hidden states scaled by (1 + eps) at the input of
    decoder layer 0: an independent route (not the pre-hook on the text decoder the methods use)."""
    positions = ctx.regions.layout.positions[ctx.regions.token_masks()[region]]
    layer0 = ctx.model.model.language_model.layers[0]

    def hook(module, args, kwargs):
        h = args[0]
        scale = torch.ones(h.shape[1], 1, dtype=h.dtype)
        scale[positions] = 1 + eps
        return (h * scale,) + tuple(args[1:]), kwargs

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.set_grad_enabled(grad):
            return span_logprobs_with_embeddings(ctx.model, ctx.inputs, ctx.sequence, ctx.spans)
    finally:
        handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "glm4v"])
def test_grad_x_input_matches_independent_references(family, get_tiny):
    ctx = make_context(get_tiny, family, double=True)
    scores = GradientXInput().span_scores(*ctx.args)
    assert scores.shape == (len(SPANS), ctx.num_regions)
    region = 2
    # autograd reference: d/d eps of log p(S) with region k's inputs scaled by (1 + eps) = sum_i g_i . x_i
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    lp = _layer0_scaled_logprobs(ctx, region, eps, grad=True)
    ref = torch.stack([torch.autograd.grad(lp[s], eps, retain_graph=True)[0] for s in range(len(SPANS))])
    torch.testing.assert_close(scores[:, region].double(), ref, rtol=1e-6, atol=1e-9)
    # finite-difference reference (central, step 1e-2; RMSNorm computes in float32, so steps must not be tiny)
    h = 1e-2
    fd = (_layer0_scaled_logprobs(ctx, region, h) - _layer0_scaled_logprobs(ctx, region, -h)) / (2 * h)
    torch.testing.assert_close(scores[:, region].double(), fd.double(), rtol=2e-2, atol=2e-4)


def _completeness_gap(ctx: Ctx) -> torch.Tensor:
    positions = ctx.regions.layout.positions
    with torch.no_grad():
        full = span_logprobs_with_embeddings(ctx.model, ctx.inputs, ctx.sequence, ctx.spans)
        with visual_embedding_override(ctx.model, positions, lambda rows: rows * 0):
            zero = span_logprobs_with_embeddings(ctx.model, ctx.inputs, ctx.sequence, ctx.spans)
    return full - zero


@pytest.mark.slow
def test_integrated_gradients_completeness_uniform_grid(get_tiny):
    ctx = make_context(get_tiny, "glm4v")
    ig = IntegratedGradients(steps=16).span_scores(*ctx.args)
    torch.testing.assert_close(ig.sum(1), _completeness_gap(ctx).float(), rtol=1e-2, atol=1e-3)


@pytest.mark.slow
def test_integrated_gradients_completeness_geometric_grid(get_tiny):
    """On the tiny Qwen models most of the path integral sits near alpha = 0 (RMSNorm): a geometric grid."""
    ctx = make_context(get_tiny, "qwen2_5_vl")
    grid = IntegratedGradients.geometric_breakpoints(32, smallest=1e-5)
    ig = IntegratedGradients(breakpoints=grid).span_scores(*ctx.args)
    torch.testing.assert_close(ig.sum(1), _completeness_gap(ctx).float(), rtol=3e-2, atol=1e-3)
    with pytest.raises(ValueError, match="breakpoints"):
        IntegratedGradients(breakpoints=[0.0, 0.5, 0.4, 1.0])


def test_gradient_methods_leave_model_untouched(get_tiny):
    ctx = make_context(get_tiny, "qwen3_vl")
    flags = [p.requires_grad for p in ctx.model.parameters()]
    hooks = len(ctx.model.model.language_model._forward_pre_hooks)
    GradientXInput().span_scores(*ctx.args)
    assert [p.requires_grad for p in ctx.model.parameters()] == flags
    assert len(ctx.model.model.language_model._forward_pre_hooks) == hooks
    assert all(p.grad is None for p in ctx.model.parameters())


@pytest.mark.slow
def test_leave_one_out_equals_single_mask_span_effects(get_tiny):
    from hf_vattr.pipeline.ablation import leave_one_out_masks, span_effects, span_logprobs

    ctx = make_context(get_tiny, "qwen3_vl")
    loo = LeaveOneOut().span_scores(*ctx.args)
    k = ctx.num_regions
    assert loo.shape == (len(SPANS), k)
    for region in (0, k - 1):
        mask = torch.zeros(1, k, dtype=torch.bool)
        mask[0, region] = True
        single = span_effects(ctx.model, ctx.inputs, ctx.sequence, SPANS, mask, ctx.regions)
        torch.testing.assert_close(loo[:, region], single[0], rtol=1e-5, atol=1e-5)
    # and the definition: unablated log-prob minus ablated log-prob
    lp = span_logprobs(ctx.model, ctx.inputs, ctx.sequence, SPANS,
                       torch.cat([torch.zeros(1, k, dtype=torch.bool), leave_one_out_masks(k)]), ctx.regions)
    torch.testing.assert_close(loo, (lp[0:1] - lp[1:]).T, rtol=1e-5, atol=1e-5)


def test_features_raw_attention_and_estimator_agree(get_tiny):
    ctx = make_context(get_tiny, "qwen2_5_vl", features=True)
    feats = ctx.record.span_features
    model = ctx.model
    num_layers, num_heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert feats.shape == (len(SPANS), num_layers, num_heads, ctx.num_regions)
    # attention mass: each head's row sums to at most 1 over the visual tokens (sum pooling)
    assert bool((feats >= 0).all()) and bool((feats.sum(-1) <= 1 + 1e-5).all())
    raw = RawAttention().span_scores(*ctx.args)
    torch.testing.assert_close(raw, feats.mean(dim=(1, 2)))
    est = LinearEstimator(num_layers, num_heads, model_type=model.config.model_type)  # uniform init = raw attention
    torch.testing.assert_close(EstimatorMethod(est).span_scores(*ctx.args), raw, rtol=1e-5, atol=1e-7)
    again = compute_span_features(model, ctx.inputs, ctx.sequence, SPANS, ctx.regions)
    torch.testing.assert_close(again, feats)


def test_features_match_collection(get_tiny):
    collection = pytest.importorskip("hf_vattr.pipeline.collection")
    model, processor = get_tiny("qwen3_vl")
    from hf_vattr.testing import example_image

    cfg = collection.CollectionConfig(num_subsets=2, max_new_tokens=10, k=4)
    rec = collection.collect_example(model, processor, [example_image()], "What colour is the circle?", cfg)
    if rec.num_spans == 0:
        pytest.skip("the random tiny model produced no span")
    inputs = example_inputs(processor)
    spans = [(s["start"], s["end"]) for s in rec.spans]
    feats = compute_span_features(model, inputs, rec.sequence, spans, rec.prompt_regions())
    torch.testing.assert_close(feats, rec.span_features, rtol=1e-4, atol=1e-6)


def test_random_scores_and_registry(get_tiny):
    ctx = make_context(get_tiny, "glm4v")
    a = RandomScores(seed=3).span_scores(*ctx.args)
    assert a.shape == (len(SPANS), ctx.num_regions)
    torch.testing.assert_close(a, RandomScores(seed=3).span_scores(ctx.record))  # offline: no model needed
    assert not torch.equal(a, RandomScores(seed=4).span_scores(ctx.record))
    other = make_record(ctx.sequence, SPANS, ctx.regions, ctx.record.span_features, example_id="another")
    assert not torch.equal(a, RandomScores(seed=3).span_scores(other))
    assert isinstance(make_method("ig", steps=4), IntegratedGradients)
    assert make_method("leave_one_out").requires_model and not make_method("raw_attention").requires_model
    with pytest.raises(ValueError, match="estimator"):
        make_method("estimator")
    with pytest.raises(ValueError, match="unknown method"):
        make_method("saliency")


def test_bad_spans_and_missing_model(get_tiny):
    ctx = make_context(get_tiny, "glm4v")
    feats = torch.zeros(1, *ctx.record.dims, ctx.num_regions)
    bad = make_record(ctx.sequence, [(5, 99)], ctx.regions, feats)
    with pytest.raises(ValueError, match="generated tokens"):
        GradientXInput().span_scores(bad, ctx.model, ctx.inputs)
    with pytest.raises(ValueError, match="needs model, inputs"):
        GradientXInput().span_scores(ctx.record)
