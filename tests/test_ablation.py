"""The ablation engine against an independent reference.

Reference (shares no code with the engine): the *eager* copy of the tiny model, run as a plain
``model(**extend_inputs(...), use_cache=False)`` forward -- the model's own image merge and M-RoPE
positions, no KV cache, one sequence -- with the modeling module's ``eager_attention_forward``
replaced by a hand-written attention that computes the full causal softmax and then zeroes the
ablated visual columns for every later query row and renormalises. The engine instead rewrites
the sdpa mask, batches masks, reuses the prefix cache, passes precomputed image embeddings and
explicit position ids.

Tolerance: float32 models; observed differences are ~4e-6 on span sums; we assert 1e-4 absolute.
"""

import sys

import pytest
import torch

from hf_vattr.pipeline.ablation import (
    AblationEngine,
    leave_one_out_masks,
    pixel_patch_rows,
    random_subset_masks,
    span_effects,
    span_logprobs,
)
from hf_vattr.layouts import attention_modules, extend_inputs, visual_layout
from hf_vattr.regions import prompt_regions
from hf_vattr.testing import example_image, example_inputs

TOLERANCE = 1e-4
REFERENCE_FAMILIES = ["qwen3_vl", "qwen2_5_vl", "glm4v"]
_EXAMPLES: dict = {}


def _example(get_tiny, family: str, k: int = 4):
    """(model, processor, inputs, sequence, regions, spans): two images, 2k regions, a short greedy trace."""
    key = (family, k)
    if key not in _EXAMPLES:
        model, proc = get_tiny(family)
        images = [example_image(), example_image(120, 90, seed=3)]
        inputs = example_inputs(proc, images, text="Where is the red square? Think step by step.")
        layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], images)
        regions = prompt_regions(layout, k=k)
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        g = sequence.shape[1] - inputs["input_ids"].shape[1]
        spans = [(0, 3), (3, g), (1, 6)]
        _EXAMPLES[key] = (model, proc, inputs, sequence, regions, spans)
    return _EXAMPLES[key]


def _masks(num_regions: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.cat([
        torch.zeros(1, num_regions, dtype=torch.bool),
        leave_one_out_masks(num_regions)[[0, num_regions - 1]],
        random_subset_masks(num_regions, 3, generator=gen),
        torch.ones(1, num_regions, dtype=torch.bool),
    ])


def _span_sums(logits: torch.Tensor, sequence: torch.Tensor, prompt_len: int, spans) -> torch.Tensor:
    lp = torch.log_softmax(logits[prompt_len - 1: -1].double(), -1).gather(-1, sequence[0, prompt_len:, None])[:, 0]
    return torch.stack([lp[s:e].sum() for s, e in spans]).float()


def _reference(get_tiny, family, inputs, sequence, regions, spans, masks, monkeypatch) -> torch.Tensor:
    """Span log-probs per mask from the eager model with a hand-written ablating attention."""
    eager, _ = get_tiny(family, attn_implementation="eager")
    module = sys.modules[type(eager).__module__]
    original = module.eager_attention_forward
    text_modules = set(attention_modules(eager))
    state = {"ablated": torch.zeros(0, dtype=torch.long)}

    def reference_attention(mod, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        if mod not in text_modules:
            return original(mod, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        batch, heads, length, _ = query.shape
        assert batch == 1 and key.shape[2] == length, "reference runs one full sequence without cache"
        groups = heads // key.shape[1]
        k = key.repeat_interleave(groups, dim=1).double()
        v = value.repeat_interleave(groups, dim=1).double()
        scores = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
        rows = torch.arange(length)[:, None]
        cols = torch.arange(length)[None, :]
        probs = torch.softmax(scores.masked_fill(cols > rows, float("-inf")), dim=-1)
        zero = torch.zeros(length, length, dtype=torch.bool)
        zero[:, state["ablated"]] = True
        zero &= cols < rows  # an ablated token is invisible to every later position
        probs = probs.masked_fill(zero, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
        out = torch.matmul(probs, v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), probs.to(query.dtype)

    monkeypatch.setattr(module, "eager_attention_forward", reference_attention)
    prompt_len = inputs["input_ids"].shape[1]
    full = extend_inputs(inputs, sequence)
    positions = regions.layout.positions
    token_masks = regions.token_masks()
    out = []
    with torch.no_grad():
        for mask in masks:
            state["ablated"] = positions[token_masks[mask].any(0)]
            logits = eager(**full, use_cache=False).logits[0]
            out.append(_span_sums(logits, sequence, prompt_len, spans))
    monkeypatch.setattr(module, "eager_attention_forward", original)
    return torch.stack(out)


def test_unablated_equals_plain_forward(family, get_tiny):
    model, _, inputs, sequence, regions, spans = _example(get_tiny, family)
    with torch.no_grad():
        logits = model(**extend_inputs(inputs, sequence), use_cache=False).logits[0]
    expected = _span_sums(logits, sequence, inputs["input_ids"].shape[1], spans)
    masks = torch.zeros(2, regions.num_regions, dtype=torch.bool)
    got = span_logprobs(model, inputs, sequence, spans, masks, regions)
    assert got.shape == (2, len(spans))
    torch.testing.assert_close(got[0], expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got[1], expected, atol=TOLERANCE, rtol=0)
    # span_effects of the all-False mask is exactly zero
    assert span_effects(model, inputs, sequence, spans, masks, regions).abs().max() == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_attention_ablation_matches_reference(family, monkeypatch, get_tiny):
    model, _, inputs, sequence, regions, spans = _example(get_tiny, family)
    masks = _masks(regions.num_regions)
    expected = _reference(get_tiny, family, inputs, sequence, regions, spans, masks, monkeypatch)
    # the masks really matter on this model (the test could fail)
    assert (expected - expected[0]).abs().max() > 1e-3
    engine = AblationEngine(model, inputs, sequence, regions)
    for batch_size in (1, 3):
        for reuse in ("ablated", "prompt", "none"):
            got = engine.span_logprobs(spans, masks, batch_size=batch_size, reuse_prefix=reuse)
            torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0,
                                       msg=lambda m: f"batch_size={batch_size} reuse={reuse}: {m}")


@pytest.mark.slow
def test_engine_on_eager_model_matches_reference(monkeypatch, get_tiny):
    """The intervention also speaks the eager implementation's additive float masks."""
    family = "qwen2_5_vl"
    _, proc, inputs, sequence, regions, spans = _example(get_tiny, family)
    eager, _ = get_tiny(family, attn_implementation="eager")
    masks = _masks(regions.num_regions)
    got = span_logprobs(eager, inputs, sequence, spans, masks, regions, batch_size=4)
    expected = _reference(get_tiny, family, inputs, sequence, regions, spans, masks, monkeypatch)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm4v_moe"])
def test_prefix_reuse_and_batching_change_nothing(family, get_tiny):
    model, _, inputs, sequence, regions, spans = _example(get_tiny, family)
    masks = _masks(regions.num_regions)
    engine = AblationEngine(model, inputs, sequence, regions)
    full = engine.span_logprobs(spans, masks, batch_size=1, reuse_prefix="none")
    for batch_size, reuse in [(4, "ablated"), (8, "prompt"), (2, "none"), (1, "ablated")]:
        got = engine.span_logprobs(spans, masks, batch_size=batch_size, reuse_prefix=reuse)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
    assert (full - full[0]).abs().max() > 1e-3


def test_pixel_patch_rows_match_the_processor(get_tiny):
    """Token -> pixel_values rows mapping, checked by painting one token's box in an image."""
    from PIL import Image
    import numpy as np

    model, proc = get_tiny("qwen3_vl")
    unit = 32  # qwen3_vl tiny: patch 16 x merge 2
    h_tok, w_tok = 4, 6
    for r, c in [(0, 0), (1, 4), (3, 5)]:
        arr = np.zeros((h_tok * unit, w_tok * unit, 3), dtype=np.uint8)
        arr[r * unit:(r + 1) * unit, c * unit:(c + 1) * unit] = 255
        img = Image.fromarray(arr)
        inputs = example_inputs(proc, [img])
        assert inputs["image_grid_thw"].tolist() == [[1, 2 * h_tok, 2 * w_tok]]
        layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [img])
        rows = pixel_patch_rows(layout.images, inputs["image_grid_thw"], 2)[0]
        bright = (inputs["pixel_values"].mean(-1) > 0).nonzero().flatten()
        assert bright.tolist() == rows[r * w_tok + c].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_pixel_ablation(family, get_tiny):
    model, _, inputs, sequence, regions, spans = _example(get_tiny, family)
    k = regions.num_regions
    masks = _masks(k)
    engine = AblationEngine(model, inputs, sequence, regions)
    base = engine.base_logprobs(spans)
    mean4 = engine.span_logprobs(spans, masks, batch_size=4, method="pixel")
    mean1 = engine.span_logprobs(spans, masks, batch_size=1, method="pixel")
    blur = engine.span_logprobs(spans, masks, batch_size=3, method="pixel", pixel_fill="blur")
    # unablated rows are exactly the unablated log-probs; ablated rows change
    assert torch.equal(mean4[0], base) and torch.equal(blur[0], base)
    assert ((mean4[1:] - base).abs().amax(1) > 1e-4).all()
    assert ((blur[1:] - base).abs().amax(1) > 1e-4).all()
    assert (blur[1:] - mean4[1:]).abs().max() > 1e-4
    torch.testing.assert_close(mean4, mean1, atol=TOLERANCE, rtol=0)
    # independent check with every region ablated: a plain forward on pixel_values whose rows
    # all hold the per-image, per-channel mean of the normalised pixels
    pv = inputs["pixel_values"].clone()
    dim = pv.shape[-1]
    offset = 0
    for t, h, w in inputs["image_grid_thw"].tolist():
        block = pv[offset: offset + t * h * w].reshape(t * h * w, 3, dim // 3)
        block[:] = block.mean(dim=(0, 2))[None, :, None]
        offset += t * h * w
    full = dict(extend_inputs(inputs, sequence), pixel_values=pv)
    with torch.no_grad():
        logits = model(**full, use_cache=False).logits[0]
    expected = _span_sums(logits, sequence, inputs["input_ids"].shape[1], spans)
    torch.testing.assert_close(mean4[-1], expected, atol=TOLERANCE, rtol=0)


def test_masks_helpers():
    loo = leave_one_out_masks(5)
    assert loo.dtype == torch.bool and torch.equal(loo, torch.eye(5, dtype=torch.bool))
    gen = torch.Generator().manual_seed(0)
    sub = random_subset_masks(16, 4000, keep_prob=0.25, generator=gen)
    assert sub.shape == (4000, 16) and sub.dtype == torch.bool
    assert abs(sub.float().mean().item() - 0.75) < 0.01  # True = ablated = not kept
    again = random_subset_masks(16, 4000, keep_prob=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sub, again)


def test_bad_arguments(get_tiny):
    model, _, inputs, sequence, regions, spans = _example(get_tiny, "qwen2_5_vl")
    with pytest.raises(ValueError, match="ablation_masks"):
        span_logprobs(model, inputs, sequence, spans, torch.zeros(2, regions.num_regions + 1, dtype=torch.bool),
                      regions)
    with pytest.raises(ValueError, match="outside"):
        AblationEngine(model, inputs, sequence, regions).span_logprobs([(0, 999)], torch.zeros(1, regions.num_regions))
    with pytest.raises(ValueError, match="method"):
        span_logprobs(model, inputs, sequence, spans, torch.zeros(1, regions.num_regions), regions, method="x")
