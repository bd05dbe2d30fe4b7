"""The pipeline on video prompts: ablation ground truth, collection, training and evaluation.

References are independent of the code under test: the knocked-out positions are read off ``input_ids``
(the video's placeholder tokens, group by group), the pixel rows of a region are found by painting its
boxes into the raw frames and diffing the processor's ``pixel_values_videos``, and the attention
knock-out is checked against the eager model with a hand-written ablating attention.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vattr.layouts import extend_inputs, visual_layout
from hf_vattr.pipeline.ablation import AblationEngine, leave_one_out_masks, pixel_patch_rows, random_subset_masks
from hf_vattr.regions import build_regions
from hf_vattr.testing import example_video, example_video_inputs, video_metadata

from conftest import get_tiny
from test_ablation import TOLERANCE, _reference, _span_sums

VIDEO_FAMILIES = ["qwen3_vl", "qwen2_5_vl", "glm4v"]
_EXAMPLES: dict = {}


def _layout(model, inputs, videos):
    return visual_layout(model, inputs["input_ids"], inputs.get("image_grid_thw"), None,
                         video_grid_thw=inputs["video_grid_thw"], videos=videos,
                         video_metadata=[video_metadata(v) for v in videos],
                         second_per_grid_ts=inputs.get("second_per_grid_ts"))


def _no_visual_tokens(model) -> list[int]:
    """Token ids a tiny random model must not generate: a generated placeholder would be read as a visual token."""
    return [int(getattr(model.config, name)) for name in ("image_token_id", "video_token_id")
            if getattr(model.config, name, None) is not None]


def _video_example(family: str):
    """(model, inputs, videos, sequence, regions, spans): one 6-frame clip (3 groups), Ward regions across groups."""
    if family not in _EXAMPLES:
        model, proc = get_tiny(family)
        videos = [example_video(6, 64, 96, seed=2)]
        inputs = example_video_inputs(proc, videos)
        layout = _layout(model, inputs, videos)
        features = torch.randn(layout.images[0].num_tokens, 4, generator=torch.Generator().manual_seed(0))
        regions = build_regions(layout, "features", k=4, features=[features])
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=9, do_sample=False,
                                      suppress_tokens=_no_visual_tokens(model))
        g = sequence.shape[1] - inputs["input_ids"].shape[1]
        _EXAMPLES[family] = (model, inputs, videos, sequence, regions, [(0, 3), (3, g), (1, 6)])
    return _EXAMPLES[family]


def _video_token_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The video's placeholder positions read off ``input_ids`` (a video-only prompt: GLM writes its video
    with the image token), in prompt order, which is the tower's order."""
    token = model.config.image_token_id if model.config.model_type.startswith("glm") else model.config.video_token_id
    return (input_ids[0] == token).nonzero().flatten()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_regions_span_frame_groups(family):
    """The fixture is what the other tests need: some region covers tokens of more than one frame group."""
    _, _, _, _, regions, _ = _video_example(family)
    item = regions.layout.images[0]
    groups = [{item.token_frame_group(int(k)) for k in mask.nonzero().flatten()} for mask in regions.token_masks()]
    assert item.num_frame_groups == 3 and max(len(g) for g in groups) > 1


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_knocked_out_positions_are_the_regions_video_tokens(family):
    model, inputs, _, sequence, regions, _ = _video_example(family)
    engine = AblationEngine(model, inputs, sequence, regions)
    placeholders = _video_token_positions(model, inputs["input_ids"])
    masks = torch.cat([leave_one_out_masks(regions.num_regions), random_subset_masks(regions.num_regions, 3)])
    ablated = engine.key_ablation(masks).cpu()
    token_masks = regions.token_masks()
    for m, mask in enumerate(masks):
        expected = placeholders[token_masks[mask].any(0)]
        assert ablated[m].nonzero().flatten().tolist() == expected.tolist()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_attention_ablation_matches_reference(family, monkeypatch):
    model, inputs, _, sequence, regions, spans = _video_example(family)
    masks = torch.cat([torch.zeros(1, regions.num_regions, dtype=torch.bool), leave_one_out_masks(regions.num_regions),
                       random_subset_masks(regions.num_regions, 2, generator=torch.Generator().manual_seed(3))])
    engine = AblationEngine(model, inputs, sequence, regions)
    got = engine.span_logprobs(spans, masks, batch_size=3)
    expected = _reference(family, inputs, sequence, regions, spans, masks, monkeypatch)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert (got[masks.any(1)] - got[0]).abs().amax(1).min() > 1e-5  # every ablation moves something
    for reuse in ("prompt", "none"):
        torch.testing.assert_close(engine.span_logprobs(spans, masks, reuse_prefix=reuse), got, atol=1e-5, rtol=0)


def _unpadded_frames(family: str, groups: int, rows: int, cols: int) -> tuple[int, list[np.ndarray]]:
    """Black frames the processor takes as they are (sides multiples of one token, no resize)."""
    model, _ = get_tiny(family)
    vision = model.config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return unit, [np.zeros((rows * unit, cols * unit, 3), dtype=np.uint8) for _ in range(2 * groups)]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_pixel_patch_rows_of_a_video_against_painted_frames(family):
    """Paint a region's boxes in the frames of its frame groups: exactly its tokens' rows of
    ``pixel_values_videos`` change, in every family's video processor."""
    model, proc = get_tiny(family)
    groups, rows, cols = 3, 2, 3
    unit, frames = _unpadded_frames(family, groups, rows, cols)
    plain = example_video_inputs(proc, [frames])
    merge = model.config.vision_config.spatial_merge_size
    assert plain["video_grid_thw"].tolist() == [[groups, rows * merge, cols * merge]]
    layout = _layout(model, plain, [frames])
    token_rows = pixel_patch_rows(layout.videos, plain["video_grid_thw"], merge)[0]  # (tokens, merge**2)
    generator = torch.Generator().manual_seed(1)
    for tokens in ([0], [rows * cols + 4], [1, rows * cols + 1, 2 * rows * cols + 5], list(range(rows * cols * groups))):
        painted = [f.copy() for f in frames]
        for k in tokens:
            group, (r, c) = k // (rows * cols), divmod(k % (rows * cols), cols)
            colour = torch.randint(1, 256, (3,), generator=generator).numpy().astype(np.uint8)
            for f in (2 * group, 2 * group + 1):
                painted[f][r * unit:(r + 1) * unit, c * unit:(c + 1) * unit] = colour
        changed = (example_video_inputs(proc, [painted])["pixel_values_videos"] != plain["pixel_values_videos"]).any(-1)
        assert changed.nonzero().flatten().tolist() == sorted(token_rows[tokens].flatten().tolist())


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_pixel_ablation(family):
    """Pixel ablation of a video's region equals a plain forward whose region rows (found by painting its
    boxes into the frames) hold the video's per-channel mean."""
    model, proc = get_tiny(family)
    groups, rows, cols = 2, 2, 3
    _, frames = _unpadded_frames(family, groups, rows, cols)
    frames = [np.asarray(f) for f in example_video(2 * groups, frames[0].shape[0], frames[0].shape[1], seed=4)]
    inputs = example_video_inputs(proc, [frames])
    layout = _layout(model, inputs, [frames])
    features = torch.randn(layout.videos[0].num_tokens, 4, generator=torch.Generator().manual_seed(5))
    regions = build_regions(layout, "features", k=3, features=[features])
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=_no_visual_tokens(model))
    spans = [(0, 2), (2, 6)]
    masks = torch.cat([torch.zeros(1, 3, dtype=torch.bool), leave_one_out_masks(3), torch.ones(1, 3, dtype=torch.bool)])
    engine = AblationEngine(model, inputs, sequence, regions)
    got = engine.span_logprobs(spans, masks, method="pixel", batch_size=2)
    blur = engine.span_logprobs(spans, masks, method="pixel", pixel_fill="blur", batch_size=5)
    assert torch.equal(got[0], engine.base_logprobs(spans)) and torch.equal(blur[0], got[0])
    assert ((got[1:] - got[0]).abs().amax(1) > 1e-5).all() and (blur[1:] - got[1:]).abs().max() > 1e-5
    pv = inputs["pixel_values_videos"]
    mean = pv.reshape(pv.shape[0], 3, -1).mean(dim=(0, 2))
    unit = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    token_masks = regions.token_masks()
    for m, mask in enumerate(masks[1:], start=1):
        painted = [f.copy() for f in frames]
        for k in token_masks[mask].any(0).nonzero().flatten().tolist():
            group, (r, c) = k // (rows * cols), divmod(k % (rows * cols), cols)
            for f in (2 * group, 2 * group + 1):
                painted[f][r * unit:(r + 1) * unit, c * unit:(c + 1) * unit] = 255 - painted[f][r * unit:(r + 1) * unit, c * unit:(c + 1) * unit]
        region_rows = (example_video_inputs(proc, [painted])["pixel_values_videos"] != pv).any(-1)
        filled = pv.clone().reshape(pv.shape[0], 3, -1)
        filled[region_rows] = mean[None, :, None].expand(int(region_rows.sum()), -1, filled.shape[-1])
        full = dict(extend_inputs(inputs, sequence), pixel_values_videos=filled.reshape(pv.shape))
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits[0]
        expected = _span_sums(logits, sequence, inputs["input_ids"].shape[1], spans)
        torch.testing.assert_close(got[m], expected, atol=TOLERANCE, rtol=0)
