"""Regions across space and time: grids per frame group, Ward over the spatio-temporal token graph (the VLM's own
features, colour, DINO, precomputed features), masks per frame, and the prefill recorder on video prompts."""

from collections import deque

import numpy as np
import pytest
import torch

from hf_vattr import AttributionError, AttributionStreamer
from hf_vattr.layouts import ImageTokens, visual_layout
from hf_vattr.regions import ColorFeatures, build_regions, grid_regions, vlm_token_features
from hf_vattr.regions.features import VideoNotSupportedError, dino_features
from hf_vattr.testing import example_image, example_video, example_video_inputs


def _video_tokens(t=3, h=4, w=5, size=(120, 150), fps=2.0):
    frames = 2 * t
    return ImageTokens(0, torch.arange(t * h * w), (t, h, w), 30, size, kind="video",
                       frame_times=tuple(i / fps for i in range(frames)), frame_step=1 / fps)


def _connected_in_space_time(labels, grid_thw):
    """Each region one piece of the graph where a token touches its 4 spatial neighbours and the same cell in the
    neighbouring frame groups (breadth-first search, written out)."""
    t, h, w = grid_thw
    labels = np.asarray(labels).reshape(t, h, w)
    for region in np.unique(labels):
        cells = {tuple(c) for c in np.argwhere(labels == region)}
        start = next(iter(cells))
        seen, todo = {start}, deque([start])
        while todo:
            g, r, c = todo.popleft()
            for dg, dr, dc in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                nxt = (g + dg, r + dr, c + dc)
                if nxt in cells and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        if seen != cells:
            return False
    return True


def _video_prompt(get_tiny, family, frames=6):
    model, proc = get_tiny(family)
    video = example_video(frames, seed=4)
    images = [] if family.startswith("glm") else [example_image(100, 140, seed=5)]
    inputs = example_video_inputs(proc, [video], images, fps=2.0)
    layout = visual_layout(model, inputs["input_ids"], inputs.get("image_grid_thw"), images,
                           video_grid_thw=inputs["video_grid_thw"], videos=[video], video_metadata={"fps": 2.0})
    return model, proc, inputs, layout, [video], images


def test_grid_is_the_image_grid_in_every_frame_group():
    video = _video_tokens()
    frame = ImageTokens(0, torch.arange(20), (1, 4, 5), 30, (120, 150))
    rmap = grid_regions(video, 6)
    one = grid_regions(frame, 6).assignment
    assert rmap.num_regions == 3 * 6 and rmap.info["k_per_group"] == 6
    assert rmap.assignment.tolist() == torch.cat([one + 6 * g for g in range(3)]).tolist()
    assert [rmap.region_groups(r) for r in (0, 6, 17)] == [[0], [1], [2]]
    assert rmap.region_time_span(7) == pytest.approx((1.0, 2.0))
    assert torch.equal(rmap.token_grid(2), one.reshape(4, 5) + 12)
    # build_regions resolves K per frame group (the policy sees a group's tokens)
    built = build_regions(video, "grid", k=None)
    assert built.num_regions == 3 * 16


def test_ward_regions_span_time_where_the_features_do():
    """Features that only depend on the cell: every region runs through all frame groups; contiguity holds in
    space and time for every K."""
    video = _video_tokens()
    rng = np.random.default_rng(0)
    cell = rng.normal(size=(20, 8))
    feats = torch.tensor(np.tile(cell, (3, 1)) + 1e-3 * rng.normal(size=(60, 8)))
    maps = build_regions(video, "features", k=[1, 5, 20, 37, 60], features=feats)
    for k, rmap in maps.items():
        assert rmap.num_regions == k and rmap.is_hard
        assert _connected_in_space_time(rmap.assignment, video.grid_thw)
    five = maps[5]
    assert all(five.region_groups(r) == [0, 1, 2] for r in range(5))
    assert five.region_time_span(0) == pytest.approx((0.0, 3.0))
    # a cell-wise partition repeated in time: the spatial partition at K=5 is the same in every group
    assert torch.equal(five.token_grid(0), five.token_grid(2))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_vlm_features_of_a_video_are_its_embeddings_and_cluster_in_space_time(family, get_tiny):
    model, _, inputs, layout, _, _ = _video_prompt(get_tiny, family)
    video = layout.videos[0]
    feats = vlm_token_features(model, inputs["pixel_values_videos"], inputs["video_grid_thw"], kind="video")
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda mod, args, kw: seen.update(embeds=kw["inputs_embeds"]),
                                          with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["embeds"][0][video.positions].float(), feats[0], rtol=1e-4, atol=1e-5)
    regions = build_regions(layout, "vlm", k=8, model=model, inputs=inputs)
    rmap = regions.maps[video.image_index]
    assert rmap.num_regions == 8 and rmap.info["features"].startswith("get_video_features")
    assert _connected_in_space_time(rmap.assignment, video.grid_thw)
    assert regions.membership().shape == (layout.num_visual_tokens, 8 * len(layout.images))


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_prefill_regions_of_a_video_prompt_equal_vlm_regions(family, get_tiny):
    model, proc, inputs, _, videos, images = _video_prompt(get_tiny, family)
    visual = model.model.visual
    calls = []
    handle = visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        ref = AttributionStreamer(model, proc, inputs=inputs, images=images, videos=videos, regions="vlm")
        calls.clear()
        streamer = AttributionStreamer(model, proc, inputs=inputs, images=images, videos=videos, regions="prefill")
        list(streamer.generate(**inputs, max_new_tokens=3, do_sample=False))
        assert len(calls) == 1 + len(images)  # the prefill's own tower calls: the images', the video's
    finally:
        handle.remove()
    assert [m.num_regions for m in streamer.regions.maps] == [m.num_regions for m in ref.regions.maps]
    torch.testing.assert_close(streamer.regions.membership(), ref.regions.membership())
    assert not visual._forward_hooks


@pytest.mark.slow
def test_colour_and_dino_features_average_each_groups_frames():
    """Per-frame image features, averaged over the frames the tower fuses; the 5th frame pads the last group."""
    video = _video_tokens(t=3, h=4, w=5, size=(120, 150))
    frames = [np.asarray(f) for f in example_video(5, 120, 150, seed=1)]
    frame = ImageTokens(0, torch.arange(20), (1, 4, 5), 30, (120, 150))
    for extractor in (ColorFeatures(), dino_features("dinov3", weights="random")):
        per_frame = [extractor(f, frame) for f in frames + [frames[-1]]]
        expected = torch.cat([(per_frame[2 * g] + per_frame[2 * g + 1]) / 2 for g in range(3)])
        torch.testing.assert_close(extractor(frames, video).float(), expected.float(), rtol=1e-5, atol=1e-5)
    rmap = build_regions(video, "color", k=6, images=np.stack(frames))
    assert rmap.num_regions == 6 and _connected_in_space_time(rmap.assignment, video.grid_thw)


def test_masks_per_frame_follow_an_object_through_the_video():
    """A square's mask in each frame: its region's membership of each token is the share of the token's pixels,
    over its group's frames, that the square covers (counted here pixel by pixel)."""
    video = _video_tokens(t=2, h=4, w=5, size=(120, 150))
    masks = []
    for f in range(4):
        m = np.zeros((120, 150), bool)
        m[30:70, 10 + 25 * f:50 + 25 * f] = True
        masks.append(m)
    rmap = build_regions(video, "masks", masks=[[m] for m in masks])
    assert rmap.num_regions == 2 and rmap.info["rest_region"] == 1 and rmap.info["frames"] == 4
    expected = np.zeros(40)
    total = np.zeros(40)
    sy, sx = 120 / 120, 150 / 150
    for f, m in enumerate(masks):
        g = f // 2
        for y in range(120):
            for x in range(150):
                r, c = min(int((y + 0.5) / sy // 30), 3), min(int((x + 0.5) / sx // 30), 4)
                token = g * 20 + r * 5 + c
                total[token] += 1
                expected[token] += m[y, x]
    np.testing.assert_allclose(rmap.membership[:, 0].numpy(), expected / total, atol=1e-6)
    assert rmap.region_groups(0) == [0, 1]
    # a label video gives the same regions as the boolean masks
    labels = np.stack([m.astype(int) for m in masks])
    by_labels = build_regions(video, "masks", masks=labels)
    torch.testing.assert_close(by_labels.membership[:, 1], rmap.membership[:, 0])
    with pytest.raises(ValueError, match="masks for 5 frames"):  # the video has 2 groups of 2 frames
        build_regions(video, "masks", masks=masks + masks[:1])


def test_slic_on_a_video_is_a_clear_error():
    video = _video_tokens()
    with pytest.raises(VideoNotSupportedError, match="per image") as info:
        build_regions(video, "slic", k=4, images=[np.zeros((120, 150, 3), np.uint8)] * 6)
    assert isinstance(info.value, AttributionError) and isinstance(info.value, NotImplementedError)
