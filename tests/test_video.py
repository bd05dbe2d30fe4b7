"""Videos as visual items: token positions, frame groups, boxes and times, checked against the processor's and
the model's own bookkeeping (``mm_token_type_ids``, the M-RoPE position ids, the timestamps written into the
prompt) on tiny models of every family."""

import re

import numpy as np
import pytest
import torch

from hf_vattr import AttributionError, AttributionStreamer, AttributionTrace, TokenAttribution
from hf_vattr.capture import AttentionCapture, capture_active
from hf_vattr.layouts import LayoutError, VideoInputError, visual_layout
from hf_vattr.regions import build_regions
from hf_vattr.streaming.streamer import armed_on
from hf_vattr.testing import example_image, example_inputs, example_video, example_video_inputs
from test_streamer import _eager_token_features, _random_estimator  # the image tests' reference, reused

FPS = 1.0  # one frame a second: group g of a 5-frame video starts at 2g seconds
NEW_TOKENS = 6


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


def test_without_fps_times_follow_the_processors_24_fps_default(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    video = example_video(4)
    inputs = proc(text=[proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}],
                                                  add_generation_prompt=True, tokenize=False)],
                  videos=[video], do_sample_frames=False, return_tensors="pt")
    v = visual_layout(model, inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"], videos=[video]).videos[0]
    assert v.frame_group_span(1) == pytest.approx((2 / 24, 4 / 24))
    written = [float(x) for x in re.findall(r"<([0-9.]+) seconds>", proc.tokenizer.decode(inputs["input_ids"][0]))]
    assert written == [round((0 + 1 / 24) / 2, 1), round((2 / 24 + 3 / 24) / 2, 1)]


def test_two_videos_and_two_images_interleaved(family, get_tiny):
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


# ----------------------------------------------------------------------------- streaming


def _video_prompt(family, proc, fps=2.0):
    """A 6-frame video (and, where the model can mix them, an image after it) and the processor's outputs."""
    video = example_video(6, seed=4)
    # GLM writes video frames with the image token, and transformers' GLM cannot then tell an image's features
    # from a video's in one prompt (its placeholder check counts both): GLM prompts hold the video alone.
    images = [] if family.startswith("glm") else [example_image(100, 140, seed=5)]
    return example_video_inputs(proc, [video], images, fps=fps), [video], images


def test_video_prompts_stream_features_equal_to_eager_attention(tiny, family, get_tiny):
    model, proc = tiny
    inputs, videos, images = _video_prompt(family, proc)
    # random weights: keep the model from writing visual tokens, which a forward over the sequence would refuse
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=[
        model.config.image_token_id, model.config.video_token_id])
    reference = model.generate(**inputs, **settings)
    estimator = _random_estimator(model)
    streamer = AttributionStreamer(model, proc, inputs=inputs, estimator=estimator, images=images, videos=videos,
                                   video_metadata=[{"fps": 2.0}], grid_k=4, keep_features=True, timeout=60)
    events = list(streamer.generate(**inputs, **settings))
    tokens = [e for e in events if isinstance(e, TokenAttribution)]
    assert [t.token_id for t in tokens] == reference[0, inputs["input_ids"].shape[1]:].tolist()
    # every visual token, image and video, in exactly one region; a 4-cell grid per frame group of the video
    membership = streamer.regions.membership()
    assert membership.shape[0] == streamer.layout.num_visual_tokens
    assert torch.equal(membership.sum(1), torch.ones(membership.shape[0])) and set(membership.unique().tolist()) <= {0, 1}
    video_map = streamer.regions.maps[0]
    assert video_map.image.is_video and video_map.num_regions == 4 * video_map.image.num_frame_groups
    assert streamer.regions.region_time_span(0) == pytest.approx((0.0, 1.0))
    assert streamer.regions.region_time_span(video_map.num_regions - 1) == pytest.approx((2.0, 3.0))
    ref = _eager_token_features(get_tiny, family, inputs, reference, streamer)
    torch.testing.assert_close(torch.stack([t.features for t in tokens]), ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([t.region_scores for t in tokens]), estimator(ref), atol=1e-4,
                                   rtol=1e-4)
    # the trace keeps the video's frames as the tower's input order had them
    assert isinstance(streamer.trace.images[0], np.ndarray) and streamer.trace.images[0].shape == (6, 120, 160, 3)
    assert not capture_active() and not armed_on(model)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_captured_rows_of_a_video_prompt_match_eager_attention_over_regions_across_time(tiny, family, pooling,
                                                                                       get_tiny):
    """The capture's last row, pooled over the VLM-feature regions of the video (regions that may span frame
    groups) and the image, is eager attention pooled the same way."""
    model, proc = tiny
    inputs, videos, images = _video_prompt(family, proc)
    layout = _layout(model, inputs, images, videos, fps=2.0)
    regions = build_regions(layout, "vlm", k=5, model=model, inputs=inputs)
    video_map = regions.maps[layout.videos[0].image_index]
    assert any(len(video_map.region_groups(r)) > 1 for r in range(video_map.num_regions))
    membership = regions.membership()
    with AttentionCapture(model, layout.positions, membership, pooling=pooling) as cap:
        with torch.no_grad():
            model(**inputs)
        feats = cap.pop()
    eager, _ = get_tiny(family, attn_implementation="eager")
    with torch.no_grad():
        att = torch.stack(eager(**inputs, output_attentions=True, use_cache=False).attentions)[:, 0, :, -1]
    weights = membership if pooling == "sum" else membership / membership.sum(0)
    torch.testing.assert_close(feats, att[..., layout.positions] @ weights, atol=1e-5, rtol=0)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_a_video_trace_saves_and_loads_with_its_frames_and_times(tmp_path, get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs, videos, images = _video_prompt("qwen3_vl", proc)
    frames = np.stack([np.asarray(f) for f in videos[0]])  # a (T, H, W, C) array, one video passed alone
    streamer = AttributionStreamer(model, proc, videos=frames, images=images, video_metadata={"fps": 2.0},
                                   grid_k=4)
    events = list(streamer.generate(**inputs, max_new_tokens=4, do_sample=False))  # inputs taken from generate
    assert events and streamer.layout.videos[0].frame_group_span(2) == pytest.approx((2.0, 3.0))
    loaded = AttributionTrace.load(streamer.trace.save(tmp_path / "trace"))
    item = loaded.regions.layout.images[0]
    assert item.is_video and item.frame_times == streamer.layout.images[0].frame_times
    assert np.array_equal(loaded.images[0], frames)
    assert loaded.regions.region_time_span(5) == streamer.regions.region_time_span(5) == pytest.approx((1.0, 2.0))
    torch.testing.assert_close(loaded.token_scores(), streamer.trace.token_scores())


# ----------------------------------------------------------------------------- bad input


def _refused_before_any_work(model, build, error=VideoInputError, match=None):
    """``build()`` raises ``error`` and leaves the model as it was: no wrapper, no capture, no hook."""
    with pytest.raises(error, match=match) as info:
        build()
    assert isinstance(info.value, AttributionError)
    assert not armed_on(model) and "generate" not in vars(model) and not capture_active()
    assert not model.model.visual._forward_hooks
    return info.value


def test_a_one_frame_video_is_one_frame_group(get_tiny):
    """Qwen2.5-VL's processor takes a one-frame video (it repeats the frame); Qwen3-VL's and GLM's refuse it."""
    model, proc = get_tiny("qwen2_5_vl")
    video = example_video(1)
    inputs = example_video_inputs(proc, [video], fps=2.0)
    streamer = AttributionStreamer(model, proc, inputs=inputs, videos=[video], video_metadata=[{"fps": 2.0}],
                                   grid_k=4)
    events = list(streamer.generate(**inputs, max_new_tokens=3, do_sample=False))
    item = streamer.layout.videos[0]
    assert events and item.num_frame_groups == 1 and item.frame_group_span(0) == pytest.approx((0.0, 0.5))
    assert streamer.regions.num_regions == 4
    # a one-frame video for a prompt whose video has three groups is not that video
    three = example_video_inputs(proc, [example_video(6)], fps=2.0)
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=three, videos=[video]),
                             match="1 frames, but the prompt's video 0 has 3 frame group")


def test_frames_of_different_sizes_are_refused(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_video_inputs(proc, [example_video(4)], fps=2.0)
    frames = example_video(4)
    frames[2] = frames[2].resize((100, 90))
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=inputs, videos=[frames]),
                             match="different sizes")


def test_videos_that_do_not_match_the_prompts_placeholders_are_refused(family, get_tiny):
    model, proc = get_tiny(family)
    video = example_video(4)
    inputs = example_video_inputs(proc, [video], fps=2.0)
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=inputs, videos=[video, video]),
                             match="Got 2 videos but the prompt has 1")
    images_only = example_inputs(proc)
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=images_only, videos=[video]),
                             match="Got 1 videos but the prompt has 0")
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=inputs, videos=[video],
                                                                video_metadata=[{"fps": 2.0}] * 2),
                             match="video_metadata for 2 videos")
    no_grid = {k: v for k, v in inputs.items() if k != "video_grid_thw"}
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=no_grid), error=LayoutError,
                             match="video_grid_thw")


def test_a_mismatch_found_at_generate_time_fails_the_call_and_undoes_everything(get_tiny, consume):
    """Without inputs= the streamer reads the prompt from generate: the same error there, nothing left patched."""
    model, proc = get_tiny("qwen3_vl")
    video = example_video(4)
    inputs = example_video_inputs(proc, [video], fps=2.0)
    streamer = AttributionStreamer(model, proc, videos=[video, video])
    with pytest.raises(VideoInputError, match="Got 2 videos"):
        model.generate(**inputs, streamer=streamer, max_new_tokens=3)
    events, error = consume(streamer)
    assert not events and isinstance(error.__cause__, VideoInputError)
    assert not armed_on(model) and not capture_active()


def test_fps_that_contradicts_second_per_grid_ts_is_refused(get_tiny):
    model, proc = get_tiny("qwen2_5_vl")
    video = example_video(4)
    inputs = example_video_inputs(proc, [video], fps=2.0)
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=inputs, videos=[video],
                                                                video_metadata=[{"fps": 4.0}]),
                             match="second_per_grid_ts=1")


def test_unreadable_and_corrupt_video_paths_are_refused(tmp_path, monkeypatch, get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_video_inputs(proc, [example_video(4)], fps=2.0)
    missing = tmp_path / "missing.mp4"
    _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=inputs, videos=[str(missing)]),
                             match="missing.mp4' is not a readable file")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01 not a video" * 100)
    error = _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=inputs,
                                                                        videos=[corrupt]), match="corrupt.mp4")
    assert "decoder" in str(error) or "could not be decoded" in str(error)
    # with a decoder at hand, what it raises on the file is named, with the decoder's error as the cause
    import transformers.utils
    import transformers.video_utils

    def refuse(*args, **kwargs):
        raise RuntimeError("moov atom not found")

    monkeypatch.setattr(transformers.utils, "is_torchcodec_usable", lambda decode: True, raising=False)
    monkeypatch.setattr(transformers.video_utils, "load_video", refuse)
    error = _refused_before_any_work(model, lambda: AttributionStreamer(model, proc, inputs=inputs,
                                                                        videos=[str(corrupt)]),
                                     match="could not be decoded .*moov atom not found")
    assert isinstance(error.__cause__, RuntimeError)


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_a_left_padded_batch_of_video_prompts_equals_batch_one_runs(family, get_tiny, monkeypatch):
    """Row 0: a video and an image (GLM: the video alone); row 1: a shorter video. Videos per row, or flat."""
    model, proc = get_tiny(family)
    monkeypatch.setattr(proc.tokenizer, "padding_side", "left")  # the shared processor
    videos = [example_video(6, seed=1), example_video(4, 90, 150, seed=2)]
    images = [[] if family.startswith("glm") else [example_image(100, 140, seed=3)], []]
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}] + [{"type": "image"}] * len(
        imgs) + [{"type": "text", "text": q}]}], add_generation_prompt=True, tokenize=False)
        for imgs, q in zip(images, ["What moves?", "Where?"])]
    metadata = [{"fps": 2.0, "total_num_frames": len(v), "frames_indices": list(range(len(v)))} for v in videos]
    batch = proc(text=prompts, images=[im for imgs in images for im in imgs] or None, videos=videos,
                 video_metadata=metadata, do_sample_frames=False, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the test needs real left padding"
    settings = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id,
                                                                         model.config.video_token_id])
    estimator = _random_estimator(model)
    streamer = AttributionStreamer(model, proc, inputs=batch, estimator=estimator, images=images,
                                   videos=[[v] for v in videos], video_metadata=metadata, grid_k=4, keep_features=True)
    events = [e for e in streamer.generate(**batch, **settings) if isinstance(e, TokenAttribution)]
    flat = AttributionStreamer(model, proc, inputs=batch, videos=videos, video_metadata=metadata)
    for s in range(2):
        single = example_video_inputs(proc, [videos[s]], images[s], fps=2.0, text=["What moves?", "Where?"][s])
        alone = AttributionStreamer(model, proc, inputs=single, estimator=estimator, images=images[s],
                                    videos=[videos[s]], video_metadata=metadata[s], grid_k=4, keep_features=True)
        alone_tokens = [e for e in alone.generate(**single, **settings) if isinstance(e, TokenAttribution)]
        mine = [e for e in events if e.sequence == s]
        assert [t.token_id for t in mine] == [t.token_id for t in alone_tokens]
        torch.testing.assert_close(torch.stack([t.features for t in mine]),
                                   torch.stack([t.features for t in alone_tokens]), atol=1e-5, rtol=1e-4)
        pad = batch["input_ids"].shape[1] - single["input_ids"].shape[1]
        for layout in (streamer.layouts[s], flat.layouts[s]):
            assert [(im.kind, im.num_tokens) for im in layout.images] == [
                (im.kind, im.num_tokens) for im in alone.layout.images]
            assert torch.equal(layout.positions, alone.layout.positions + pad)
        assert np.array_equal(streamer.traces[s].images[0], alone.trace.images[0])
    assert not capture_active()


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_frames_the_processor_sampled_are_picked_and_timed_from_its_metadata(family, get_tiny):
    """The processor samples a longer video itself; with the metadata it returns, the streamer keeps the frames
    the tower saw and times them as the processor wrote them."""
    model, proc = get_tiny(family)
    video = example_video(12, seed=6)
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], add_generation_prompt=True,
                                      tokenize=False)
    inputs = proc(text=[prompt], videos=[video], video_metadata=[{"fps": 4.0, "total_num_frames": 12}],
                  return_metadata=True, return_tensors="pt")
    metadata = inputs.pop("video_metadata")
    picked = [int(i) for i in metadata[0].frames_indices]
    assert len(picked) < 12  # the processor did sample
    streamer = AttributionStreamer(model, proc, inputs=inputs, videos=[video], video_metadata=metadata)
    item = streamer.layout.videos[0]
    assert np.array_equal(streamer.trace.images[0], np.stack([np.asarray(video[i]) for i in picked]))
    assert [item.frame_group_span(g)[0] for g in range(item.num_frame_groups)] == pytest.approx(
        [picked[2 * g] / 4.0 for g in range(item.num_frame_groups)])
    text = proc.tokenizer.decode(inputs["input_ids"][0])
    if family == "qwen3_vl":
        written = [float(x) for x in re.findall(r"<([0-9.]+) seconds>", text)]
        assert written == [round((item.frame_times[2 * g] + item.frame_times[2 * g + 1]) / 2, 1)
                           for g in range(item.num_frame_groups)]
    else:
        written = [int(x) for x in re.findall(r"<\|end_of_image\|>(\d+)", text)]
        assert written == [int(item.frame_group_span(g)[0]) for g in range(item.num_frame_groups)]
    streamer.close()
    assert not armed_on(model)


def test_a_tuple_of_two_frames_is_a_video_and_a_tuple_of_two_ints_its_size(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    video = example_video(2)
    inputs = example_video_inputs(proc, [video], fps=2.0)
    frames = AttributionStreamer(model, proc, inputs=inputs, videos=[tuple(np.asarray(f) for f in video)])
    assert frames.trace.images[0].shape == (2, 120, 160, 3)
    size = AttributionStreamer(model, proc, inputs=inputs, videos=[(120, 160)])
    assert size.trace.images[0] == (120, 160) and size.layout.videos[0].original_size == (120, 160)
    with pytest.raises(LayoutError, match="Video 0 is 160x120"):  # (width, height): the grid says otherwise
        AttributionStreamer(model, proc, inputs=inputs, videos=[(160, 120)])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_a_video_over_the_processors_pixel_budget_is_resized_and_mapped_back(family, get_tiny):
    """Frames larger than the processor lets through are shrunk by the processor; the streamer follows its
    grid and maps every token back onto the frames the user passed (boxes inside the frame, covering it)."""
    model, proc = get_tiny(family)
    video = example_video(4, height=720, width=1280)
    inputs = example_video_inputs(proc, [video], fps=2.0)
    streamer = AttributionStreamer(model, proc, inputs=inputs, videos=[video], video_metadata=[{"fps": 2.0}],
                                   grid_k=4)
    events = list(streamer.generate(**inputs, max_new_tokens=3, do_sample=False))
    item = streamer.layout.videos[0]
    t, h, w = (int(v) for v in inputs["video_grid_thw"][0])
    merge = model.config.vision_config.spatial_merge_size
    assert item.grid_hw == (h // merge, w // merge) and item.original_size == (720, 1280)
    assert item.resized_size[0] * item.resized_size[1] < 720 * 1280  # the processor did shrink it
    last = item.token_box_original(item.num_tokens - 1)
    assert last[2] == pytest.approx(720) and last[3] == pytest.approx(1280)
    assert item.token_box_original(0)[:2] == (0.0, 0.0)
    members = streamer.regions.membership()
    assert events and tuple(members.shape) == (streamer.layout.num_visual_tokens, streamer.regions.num_regions)
    assert torch.all(members.sum(1) == 1)  # every token of the shrunk video in exactly one region
