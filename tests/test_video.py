"""Videos as visual items: token positions, frame groups, boxes and times, checked against the processor's and
the model's own bookkeeping (``mm_token_type_ids``, the M-RoPE position ids, the timestamps written into the
prompt) on tiny models of every family."""

import re

import numpy as np
import pytest
import torch

from hf_vattr.layouts import LayoutError, VideoInputError, visual_layout
from hf_vattr.testing import example_image, example_video, example_video_inputs

from conftest import get_tiny

FPS = 1.0  # one frame a second: group g of a 5-frame video starts at 2g seconds


def _layout(model, inputs, images=None, videos=None, fps=FPS):
    metadata = None if videos is None else [{"fps": fps}] * len(videos)
    return visual_layout(model, inputs["input_ids"], inputs.get("image_grid_thw"), images,
                         video_grid_thw=inputs.get("video_grid_thw"), videos=videos, video_metadata=metadata,
                         second_per_grid_ts=inputs.get("second_per_grid_ts"))


def _rope_positions(model, inputs):
    """(3, T) M-RoPE position ids the model itself gives the prompt: time, row and column of every token."""
    keys = ("image_grid_thw", "video_grid_thw", "attention_mask", "second_per_grid_ts")
    position_ids, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 **{k: inputs[k] for k in keys if k in inputs})
    return position_ids[:, 0]


def _video_runs_of_glm(ids, config):
    """GLM: image-token positions between <|begin_of_video|> and <|end_of_video|>, found by walking the ids."""
    inside, video, image = False, [], []
    for i, token in enumerate(ids.tolist()):
        if token == config.video_start_token_id:
            inside = True
        elif token == config.video_end_token_id:
            inside = False
        elif token == config.image_token_id:
            (video if inside else image).append(i)
    return image, video


@pytest.mark.parametrize("video_first", [True, False])
def test_positions_are_the_prompts_image_and_video_tokens_in_order(tiny, family, video_first):
    model, proc = tiny
    video, image = example_video(5), example_image()
    inputs = example_video_inputs(proc, [video], [image], fps=FPS, video_first=video_first)
    layout = _layout(model, inputs, [image], [video])
    ids = inputs["input_ids"][0]
    config = model.config
    if family.startswith("glm"):
        image_pos, video_pos = _video_runs_of_glm(ids, config)
    else:
        image_pos = (ids == config.image_token_id).nonzero().flatten().tolist()
        video_pos = (ids == config.video_token_id).nonzero().flatten().tolist()
    # the processor's own modality per token says the same
    kinds = inputs["mm_token_type_ids"][0]
    assert image_pos == (kinds == 1).nonzero().flatten().tolist()
    assert video_pos == (kinds == 2).nonzero().flatten().tolist()
    assert layout.positions.tolist() == sorted(image_pos + video_pos)
    assert [im.kind for im in layout.images] == (["video", "image"] if video_first else ["image", "video"])
    assert [im.image_index for im in layout.images] == [0, 1]
    v = layout.videos[0]
    assert v.positions.tolist() == video_pos and v.kind_index == 0
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert v.grid_thw == (t, h // 2, w // 2) and t == 3  # 5 frames, padded to 6, two per group
    assert v.original_size == (120, 160)


def test_frame_groups_and_boxes_match_the_models_rope_positions(tiny, family):
    """Each video token's frame group and (row, col) are where the model's M-RoPE puts it."""
    model, proc = tiny
    video, image = example_video(5), example_image()
    inputs = example_video_inputs(proc, [video], [image], fps=FPS)
    layout = _layout(model, inputs, [image], [video])
    rope = _rope_positions(model, inputs)
    for item in layout.images:
        time, rows, cols = (rope[axis, item.positions] for axis in range(3))
        groups = torch.unique(time, sorted=True, return_inverse=True)[1]  # one temporal index per frame group
        assert int(groups.max()) + 1 == item.num_frame_groups
        for k in range(item.num_tokens):
            g = item.token_frame_group(k)
            assert g == int(groups[k])
            in_group = groups == g
            r, c = int(rows[k] - rows[in_group].min()), int(cols[k] - cols[in_group].min())
            assert item.token_rc(k) == (r, c)
            u = item.token_size
            assert item.token_box_resized(k) == (r * u, c * u, (r + 1) * u, (c + 1) * u)
            assert item.frame_group_tokens(g).start <= k < item.frame_group_tokens(g).stop
        y0, x0, y1, x1 = item.token_box_original(item.num_tokens - 1)
        assert (y1, x1) == pytest.approx(item.original_size)  # the last token ends at the frame's corner
        assert item.token_at_original(0, 0, group=item.num_frame_groups - 1) == item.num_tokens - item.tokens_per_group


def test_group_times_are_the_processors_timestamps(tiny, family):
    """Qwen3-VL and GLM write each group's time into the prompt; Qwen2.5-VL gives second_per_grid_ts."""
    model, proc = tiny
    video = example_video(5)  # odd: the processor repeats the last frame
    inputs = example_video_inputs(proc, [video], fps=FPS)
    v = _layout(model, inputs, videos=[video]).videos[0]
    spans = [v.frame_group_span(g) for g in range(v.num_frame_groups)]
    # frames 0..4 at 1 fps, two per group: [0, 2), [2, 4), and the padded last group [4, 5)
    assert spans == [pytest.approx(s) for s in [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]]
    assert v.token_time_span(v.tokens_per_group) == pytest.approx((2.0, 4.0))
    text = proc.tokenizer.decode(inputs["input_ids"][0])
    if family.startswith("qwen3"):  # the mean of the group's first and last frame times, 0.1 s
        written = [float(x) for x in re.findall(r"<([0-9.]+) seconds>", text)]
        assert written == [round((v.frame_times[2 * g] + v.frame_times[2 * g + 1]) / 2, 1) for g in range(3)]
    elif family.startswith("glm"):  # the whole seconds of the group's first frame, after each frame block
        written = [int(x) for x in re.findall(r"<\|end_of_image\|>(\d+)", text)]
        assert written == [int(start) for start, _ in spans]
    else:  # the model's temporal scale: group g starts at g * second_per_grid_ts (the padded one is shorter)
        spg = float(inputs["second_per_grid_ts"][0])
        assert [start for start, _ in spans] == pytest.approx([g * spg for g in range(3)])
        assert [end for _, end in spans[:2]] == pytest.approx([spg, 2 * spg])
        # without video_metadata the layout reads the same times from second_per_grid_ts (with the frames, the
        # padding too)
        alone = visual_layout(model, inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"], videos=[video],
                              second_per_grid_ts=inputs["second_per_grid_ts"]).videos[0]
        assert [alone.frame_group_span(g) for g in range(3)] == [pytest.approx(s) for s in spans]
        sizes_only = visual_layout(model, inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"],
                                   second_per_grid_ts=inputs["second_per_grid_ts"]).videos[0]
        assert sizes_only.frame_group_span(2) == pytest.approx((2 * spg, 3 * spg))


def test_without_fps_times_follow_the_processors_24_fps_default():
    model, proc = get_tiny("qwen3_vl")
    video = example_video(4)
    inputs = proc(text=[proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}],
                                                  add_generation_prompt=True, tokenize=False)],
                  videos=[video], do_sample_frames=False, return_tensors="pt")
    v = visual_layout(model, inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"], videos=[video]).videos[0]
    assert v.frame_group_span(1) == pytest.approx((2 / 24, 4 / 24))
    written = [float(x) for x in re.findall(r"<([0-9.]+) seconds>", proc.tokenizer.decode(inputs["input_ids"][0]))]
    assert written == [round((0 + 1 / 24) / 2, 1), round((2 / 24 + 3 / 24) / 2, 1)]


def test_two_videos_and_two_images_interleaved(family):
    model, proc = get_tiny(family)
    videos = [example_video(4, seed=1), example_video(6, 90, 150, seed=2)]
    images = [example_image(), example_image(100, 140, seed=3)]
    prompt = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "video"}, {"type": "text", "text": "?"}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[prompt], images=images, videos=videos, do_sample_frames=False, return_tensors="pt",
                  video_metadata=[{"fps": 2.0, "total_num_frames": len(v), "frames_indices": list(range(len(v)))}
                                  for v in videos])
    layout = _layout(model, inputs, images, videos, fps=2.0)
    assert [(im.kind, im.kind_index) for im in layout.images] == [("image", 0), ("video", 0), ("image", 1),
                                                                 ("video", 1)]
    kinds = inputs["mm_token_type_ids"][0]
    assert layout.positions.tolist() == (kinds > 0).nonzero().flatten().tolist()
    assert [im.original_size for im in layout.images] == [(150, 210), (120, 160), (100, 140), (90, 150)]
    assert [im.num_frame_groups for im in layout.images] == [1, 2, 1, 3]
    assert layout.images[0].frame_group_span(0) is None  # images have no time
