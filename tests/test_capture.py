"""Captured features are checked against an independent reference: the eager attention weights
returned by ``output_attentions=True`` on an eager copy of the same model."""

import threading

import pytest
import torch

from hf_vattr.capture import AttentionCapture, CaptureError, capture_active
from hf_vattr.layouts import extend_inputs, visual_layout
from hf_vattr.regions import prompt_regions
from hf_vattr.testing import build_model, example_image, example_inputs

# float32 models: captured rows agree with eager weights to ~1e-7; we assert 1e-5 absolute.
TOLERANCE = 1e-5


def _eager_reference(get_tiny, family, inputs, positions, membership):
    eager_model, _ = get_tiny(family, attn_implementation="eager")
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True, use_cache=False)
    att = torch.stack(out.attentions)[:, 0]  # (L, H, T, T)
    return att[..., positions] @ membership  # (L, H, T, K)


def _layout_and_membership(model, proc, images=None, k=8):
    images = images or [example_image(), example_image(120, 90, seed=3)]
    inputs = example_inputs(proc, images)
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], images)
    regions = prompt_regions(layout, k=k)
    return inputs, layout, regions.membership()


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_last_row_matches_eager_attention(family, pooling, get_tiny):
    model, proc = get_tiny(family)
    assert model.config._attn_implementation == "sdpa"
    inputs, layout, membership = _layout_and_membership(model, proc)
    with AttentionCapture(model, layout.positions, membership, pooling=pooling) as cap:
        with torch.no_grad():
            model(**inputs)
        feats = cap.pop()
    ref_membership = membership if pooling == "sum" else membership / membership.sum(0)
    ref = _eager_reference(get_tiny, family, inputs, layout.positions, ref_membership)[:, :, -1]
    assert feats.shape == ref.shape == (2, 4, membership.shape[1])
    torch.testing.assert_close(feats, ref, atol=TOLERANCE, rtol=0)
    # the model was never switched to eager
    assert model.config._attn_implementation == "sdpa"
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_all_rows_match_eager_attention(family, get_tiny):
    model, proc = get_tiny(family)
    inputs, layout, membership = _layout_and_membership(model, proc)
    first = int(layout.positions[-1]) + 1
    with AttentionCapture(model, layout.positions, membership, rows="all", first_row=first) as cap:
        with torch.no_grad():
            model(**inputs, use_cache=False)
        feats = cap.pop()  # (T', L, H, K)
    ref = _eager_reference(get_tiny, family, inputs, layout.positions, membership)[:, :, first:].permute(2, 0, 1, 3)
    torch.testing.assert_close(feats, ref, atol=TOLERANCE, rtol=0)


def test_decode_steps_match_eager_rows(get_tiny):
    """During cached decoding each step's row equals the eager row of the same position."""
    model, proc = get_tiny("qwen2_5_vl")
    inputs, layout, membership = _layout_and_membership(model, proc)
    rows = []
    with AttentionCapture(model, layout.positions, membership) as cap:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, logits_processor=None,
                             stopping_criteria=None, return_dict_in_generate=True)
        # the last forward's row is pending: it predicted the final token
        rows.append(cap.pop())
    seq = out.sequences
    full = extend_inputs(inputs, seq)
    ref = _eager_reference(get_tiny, "qwen2_5_vl", full, layout.positions, membership)
    torch.testing.assert_close(rows[-1], ref[:, :, seq.shape[1] - 2], atol=TOLERANCE, rtol=0)


def test_only_this_models_text_attention_is_switched_and_restored_also_on_error(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    other, _ = get_tiny("glm4v")
    inputs, layout, membership = _layout_and_membership(model, proc)
    from transformers import AttentionInterface

    class_attributes = dict(vars(AttentionInterface))
    text, vision = model.config.text_config, model.config.vision_config
    before = (text._attn_implementation, vision._attn_implementation, other.config.text_config._attn_implementation)
    with pytest.raises(RuntimeError, match="inside"):
        with AttentionCapture(model, layout.positions, membership):
            assert capture_active(model) and not capture_active(other)
            assert text._attn_implementation == "hf_vattr_" + before[0]  # a name registered through the interface
            assert vision._attn_implementation == before[1]  # the vision tower keeps its own
            assert other.config.text_config._attn_implementation == before[2]
            raise RuntimeError("inside")
    assert not capture_active()
    assert (text._attn_implementation, vision._attn_implementation,
            other.config.text_config._attn_implementation) == before
    assert dict(vars(AttentionInterface)) == class_attributes  # no class-level patch, ever


def test_same_model_cannot_be_captured_twice(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    _, layout, membership = _layout_and_membership(model, proc)
    with AttentionCapture(model, layout.positions, membership):
        with pytest.raises(CaptureError, match="already has an active"):
            AttentionCapture(model, layout.positions, membership).start()
    assert not capture_active()


def test_two_models_in_two_threads_do_not_mix(get_tiny):
    """Two different models capture concurrently; each gets exactly what it gets alone."""
    _, proc = get_tiny("qwen3_vl")
    models = [build_model("qwen3_vl", proc.tokenizer, seed=s) for s in (1, 2)]
    inputs, layout, membership = _layout_and_membership(models[0], proc)

    def run(model, out, repeats=5):
        with AttentionCapture(model, layout.positions, membership) as cap:
            for _ in range(repeats):
                with torch.no_grad():
                    model(**inputs)
                out.append(cap.pop())

    alone = [[], []]
    for m, o in zip(models, alone):
        run(m, o, repeats=1)
    together = [[], []]
    threads = [threading.Thread(target=run, args=(m, o)) for m, o in zip(models, together)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.allclose(alone[0][0], alone[1][0])  # the two models really differ
    for i in range(2):
        assert len(together[i]) == 5
        for feats in together[i]:
            torch.testing.assert_close(feats, alone[i][0], atol=1e-6, rtol=0)
    assert not capture_active()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs a CUDA GPU")
def test_flash_attention_2_matches_eager_when_installed(get_tiny):
    pytest.importorskip("flash_attn", reason="flash-attn not installed")
    _, proc = get_tiny("qwen3_vl")
    flash = build_model("qwen3_vl", proc.tokenizer, attn_implementation="flash_attention_2").to("cuda", torch.bfloat16)
    inputs, layout, membership = _layout_and_membership(flash, proc)
    cuda_inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    cuda_inputs["pixel_values"] = cuda_inputs["pixel_values"].to(torch.bfloat16)
    with AttentionCapture(flash, layout.positions, membership) as cap:
        with torch.no_grad():
            flash(**cuda_inputs)
        feats = cap.pop().cpu()
    ref = _eager_reference(get_tiny, "qwen3_vl", inputs, layout.positions, membership)[:, :, -1]
    torch.testing.assert_close(feats, ref, atol=2e-2, rtol=0)  # bf16 weights vs float32 reference


def test_region_index_pools_like_the_dense_table():
    """Regions partition the tokens, so the decode step pools by a scatter: the same sums as the dense table,
    for sum and mean pooling and a batch's padding entries; a token in two regions keeps the dense table."""
    from hf_vattr.capture.pooling import _pool, region_index

    g = torch.Generator().manual_seed(0)
    batch, visual, k, heads = 2, 50, 7, 4
    region = torch.randint(0, k, (batch, visual), generator=g)
    table = torch.zeros(batch, visual, k).scatter_(-1, region[..., None], 1.0)
    table[1, -5:] = 0  # padding entries of the shorter sequence
    mean = table / table.sum(1, keepdim=True).clamp_min(1e-12)
    probs = torch.rand(batch, heads, visual, generator=g)
    for pooling in (table, mean):
        index = region_index(pooling)
        assert index is not None and index.num_regions == k
        torch.testing.assert_close(_pool(probs.clone(), index), probs @ pooling, atol=1e-6, rtol=0)
    soft = table.clone()
    soft[0, 0] = 0.5
    assert region_index(soft) is None
    torch.testing.assert_close(_pool(probs.clone(), soft), probs @ soft)
