import pytest
import transformers

from hf_vattr.layouts import UnsupportedModelError, architecture_spec, text_dims, visual_layout
from hf_vattr.testing import example_image, example_inputs


def test_positions_and_grid_match_processor(tiny, family):
    model, proc = tiny
    images = [example_image(150, 210), example_image(300, 100, seed=1)]
    inputs = example_inputs(proc, images)
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], images)
    ids = inputs["input_ids"][0]
    assert len(layout.images) == 2
    assert (ids[layout.positions] == model.config.image_token_id).all()
    assert layout.num_visual_tokens == int((ids == model.config.image_token_id).sum())
    expected_px = 32 if family.startswith("qwen3") else 28
    for im, (t, h, w) in zip(layout.images, inputs["image_grid_thw"].tolist()):
        assert im.token_size == expected_px
        assert im.grid_thw == (t, h // 2, w // 2)  # image_grid_thw is in patches; merge size 2
        assert im.num_tokens == t * (h // 2) * (w // 2)
    # images are contiguous runs, image 0 before image 1
    assert layout.images[0].positions.max() < layout.images[1].positions.min()


def test_original_boxes_use_separate_scales(tiny):
    model, proc = tiny
    img = example_image(150, 210)
    inputs = example_inputs(proc, [img])
    im = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [img]).images[0]
    rh, rw = im.resized_size
    sy, sx = im.scale_yx
    assert sy == pytest.approx(150 / rh) and sx == pytest.approx(210 / rw)
    last = im.num_tokens - 1
    y0, x0, y1, x1 = im.token_box_original(last)
    assert y1 == pytest.approx(150) and x1 == pytest.approx(210)  # the last token ends at the image corner
    assert im.token_at_original(149.5, 209.5) == last
    assert im.token_at_original(0, 0) == 0


def test_text_dims(tiny):
    model, _ = tiny
    assert text_dims(model) == (2, 4)


def test_unsupported_model_names_what_is_missing():
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=50)
    with pytest.raises(UnsupportedModelError, match="register_architecture") as err:
        architecture_spec(config)
    assert "llama" in str(err.value)


def test_prompt_without_image_is_refused(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = proc(text=["no image here"], return_tensors="pt")
    with pytest.raises(ValueError, match="no image"):
        visual_layout(model, inputs["input_ids"], inputs.get("image_grid_thw"))


def test_batch_of_two_is_refused(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    with pytest.raises(ValueError, match="batch of 2"):
        visual_layout(model, inputs["input_ids"].repeat(2, 1), inputs["image_grid_thw"])


def test_mismatched_grid_is_refused(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    grid = inputs["image_grid_thw"].clone()
    grid[0, 1] += 2
    with pytest.raises(ValueError, match="same processor call"):
        visual_layout(model, inputs["input_ids"], grid)
