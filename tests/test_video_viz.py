"""Pictures and words of video attribution: regions located in time and space, the filmstrip overlay, the
timeline's scores per frame group, and traces with video frames saved and loaded. Built on a hand-made video
layout (3 frame groups of 2 frames, 3 x 3 tokens of 32 px over 96 x 96 frames), so every expected value is
worked out by hand from the geometry; a streamed trace of a tiny Qwen3-VL checks the same path end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vattr.layouts import ImageTokens, VisualLayout
from hf_vattr.regions import PromptRegions, RegionMap
from hf_vattr.streaming.events import AttributionTrace, SpanAttribution, TokenAttribution
from hf_vattr.viz import (
    colour_bar,
    describe_location,
    frame_group_scores,
    group_frame,
    render_html,
    save_overlays,
    step_overlay,
)

from test_viz import three_by_three, toy_image

#: six frames, each one flat colour: a frame group's panel shows the colour of its first frame
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200)]
SIDE, SCALE = 96, 2  # frames under 112 rows are enlarged by a whole factor: 96 -> 192
PANEL = SIDE * SCALE
LABEL, GAP = 16, 6  # the time label's strip above each panel, the gap between tiles


def video_tokens(image_index: int = 0, start: int = 3, kind_index: int = 0) -> ImageTokens:
    """3 frame groups of 3 x 3 tokens; frames at 0, 0.5, ..., 2.5 s, one every 0.5 s: group g covers [g, g + 1) s."""
    return ImageTokens(image_index, torch.arange(start, start + 27), (3, 3, 3), 32, (SIDE, SIDE), kind="video",
                       kind_index=kind_index, frame_times=tuple(0.5 * i for i in range(6)), frame_step=0.5)


def video_map(tokens: ImageTokens | None = None) -> RegionMap:
    """Region 0: the top-left cell of groups 0 and 1; region 1: the bottom-right cell of group 2; region 2: the rest."""
    labels = np.full((3, 9), 2)
    labels[0, 0] = labels[1, 0] = 0
    labels[2, 8] = 1
    return RegionMap.from_assignment(tokens or video_tokens(), labels.reshape(-1).tolist(), method="custom")


def video_frames(n: int = 6) -> np.ndarray:
    return np.stack([np.full((SIDE, SIDE, 3), COLOURS[i % len(COLOURS)], dtype=np.uint8) for i in range(n)])


def image_after_video() -> RegionMap:
    """The prompt's first image, second item after the video: a 3 x 3 grid, one region per cell."""
    tokens = ImageTokens(1, torch.arange(40, 49), (1, 3, 3), 32, (96, 96), kind_index=0)
    return RegionMap.from_assignment(tokens, list(range(9)), method="custom")


def prompt_of(*maps: RegionMap) -> PromptRegions:
    return PromptRegions(VisualLayout([m.image for m in maps], sequence_length=80, model_type="qwen3_vl"), list(maps))


# --------------------------------------------------------------------------- where and when


def test_a_video_region_is_located_in_time_and_space():
    regions = prompt_of(video_map())
    assert describe_location(regions, 0) == "0.0-2.0 s, top-left, 11% of the frame"  # two groups, one cell in each
    assert describe_location(regions, 1) == "2.0-3.0 s, bottom-right, 11% of the frame"
    # 8 of 9 cells in each of the 3 groups: 89% of one frame, centred (the missing corners balance out)
    assert describe_location(regions, 2) == "0.0-3.0 s, centre, 89% of the frame"


def test_images_beside_a_video_are_counted_apart_and_keep_their_words():
    regions = prompt_of(video_map(), image_after_video())
    assert describe_location(regions, 1) == "video 1, 2.0-3.0 s, bottom-right, 11%"
    assert describe_location(regions, 3 + 4) == "image 1, centre, 11%"  # the first image, though the second item
    assert describe_location(prompt_of(three_by_three()), 4) == "centre, 11% of the image"


# --------------------------------------------------------------------------- the filmstrip


def tiles(picture: Image.Image, group: int, header: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time label strip, original frame tile, heatmap tile) of one frame group's column."""
    arr = np.asarray(picture)
    x = group * (PANEL + GAP)
    top = header + LABEL
    return (arr[header:top, x:x + PANEL], arr[top:top + PANEL, x:x + PANEL],
            arr[top + PANEL + GAP:top + 2 * PANEL + GAP, x:x + PANEL])


def ring(tile: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """The outermost pixels of one token cell of a tile, all the way round."""
    r, c = cell
    y0, y1, x0, x1 = r * 32 * SCALE, (r + 1) * 32 * SCALE - 1, c * 32 * SCALE, (c + 1) * 32 * SCALE - 1
    return np.concatenate([tile[y0, x0:x1 + 1], tile[y1, x0:x1 + 1], tile[y0:y1 + 1, x0], tile[y0:y1 + 1, x1]])


def test_a_video_is_a_filmstrip_of_its_frame_groups():
    regions = prompt_of(video_map())
    frames = video_frames()
    scores = torch.tensor([1.0, 3.0, 0.0])  # region 1 first (white outline), region 0 second (cyan)
    picture = step_overlay(regions, [frames], scores, top=2)
    bar = colour_bar(0.0, 3.0, picture.width)
    assert picture.size == (3 * PANEL + 2 * GAP, LABEL + 2 * PANEL + GAP + bar.height)  # one row, one colour bar
    assert np.array_equal(np.asarray(picture)[-bar.height:], np.asarray(bar))
    brightness = []
    for group in range(3):
        label, original, heat = tiles(picture, group)
        assert (label < 128).any()  # the group's seconds are written above it
        # the original is the group's first frame (frame 2g), colours untouched, away from the outlines
        centre = original[PANEL // 2 - 20:PANEL // 2 + 20, PANEL // 2 - 20:PANEL // 2 + 20]
        assert (centre == COLOURS[2 * group]).all()
        brightness.append(heat.astype(float).mean(-1))
    cell = PANEL // 3
    top_left = lambda b: b[10:cell - 10, 10:cell - 10].mean()  # noqa: E731 - inside the cell, off its outline
    bottom_right = lambda b: b[2 * cell + 24:-10, 2 * cell + 24:-10].mean()  # noqa: E731 - below the rank tag
    assert bottom_right(brightness[2]) > top_left(brightness[0]) > bottom_right(brightness[0])  # 3 > 1 > 0
    assert top_left(brightness[0]) == pytest.approx(top_left(brightness[1]))  # one region, one colour, two groups
    # each top region is outlined in every group where it has pixels, and only there
    white, cyan = (255, 255, 255), (0, 200, 255)
    for group in range(3):
        _, original, heat = tiles(picture, group)
        for tile in (original, heat):
            assert (ring(tile, (2, 2)) == white).all() == (group == 2)
            assert (ring(tile, (0, 0)) == cyan).all() == (group < 2)


def test_filmstrip_panels_follow_the_first_frame_of_each_group_and_wrap_long_videos():
    frames = video_frames(5)  # 5 frames for 3 groups of 2: the processor pads the last group with frame 4
    assert group_frame(frames, 2, 2) is frames[4] or np.array_equal(group_frame(frames, 2, 2), frames[4])
    assert np.array_equal(group_frame(list(frames), 1, 2), frames[2])
    assert group_frame((SIDE, SIDE), 1, 2) == (SIDE, SIDE)  # a size only: a grey canvas
    # 10 groups wrap into two balanced rows of 5
    tokens = ImageTokens(0, torch.arange(3, 3 + 90), (10, 3, 3), 32, (SIDE, SIDE), kind="video",
                         frame_times=tuple(0.5 * i for i in range(20)), frame_step=0.5)
    regions = prompt_of(RegionMap.from_assignment(tokens, list(range(90)), method="custom"))
    picture = step_overlay(regions, [video_frames(20)], torch.arange(90, dtype=torch.float32), top=0)
    row = LABEL + 2 * PANEL + GAP
    assert picture.size == (5 * PANEL + 4 * GAP, 2 * row + GAP + colour_bar(0, 1, picture.width).height)
    second_row_first = np.asarray(picture)[row + GAP + LABEL + 40, 40]
    assert (second_row_first == COLOURS[10 % len(COLOURS)]).all()  # group 5 starts at frame 10


def test_a_mixed_prompt_draws_the_video_strip_beside_the_image():
    regions = prompt_of(video_map(), image_after_video())
    scores = torch.zeros(12)
    scores[3 + 8] = 2.0
    picture = step_overlay(regions, [video_frames(), toy_image()], scores)
    header = 18  # "video 1", "image 1" over their blocks
    video_width = 3 * PANEL + 2 * GAP
    assert picture.width == video_width + GAP + 2 * 288 + GAP
    assert (tiles(picture, 0, header)[1][PANEL // 2, PANEL // 2] == COLOURS[0]).all()
    original = np.asarray(toy_image().resize((288, 288), Image.NEAREST))
    shown = np.asarray(picture)[header:header + 288, video_width + GAP:video_width + GAP + 288]
    assert (shown == original).all(-1).mean() > 0.95  # the image's original panel, untouched but for its outline


# --------------------------------------------------------------------------- the timeline


def test_frame_group_scores_share_each_region_by_its_tokens_per_group():
    regions = prompt_of(video_map())
    groups = frame_group_scores(regions, torch.tensor([1.0, 3.0, -2.0]))
    # region 0 (1.0) lies half in group 0, half in group 1; region 1 (3.0) in group 2; region 2 is negative
    assert [(g.group, g.start, g.end) for g in groups] == [(0, 0.0, 1.0), (1, 1.0, 2.0), (2, 2.0, 3.0)]
    assert [g.score for g in groups] == pytest.approx([0.5, 0.5, 3.0])
    even = frame_group_scores(regions, torch.tensor([0.0, 0.0, 6.0]))  # 8 cells in each of the 3 groups
    assert [g.score for g in even] == pytest.approx([2.0, 2.0, 2.0])
    mixed = frame_group_scores(prompt_of(three_by_three(0), video_map(video_tokens(1, 40))), torch.ones(12))
    assert {(g.item, g.video) for g in mixed} == {(1, 0)} and len(mixed) == 3
    assert frame_group_scores(prompt_of(three_by_three()), torch.ones(9)) == []


# --------------------------------------------------------------------------- traces with videos


def video_trace(images: list) -> AttributionTrace:
    regions = prompt_of(video_map(), image_after_video())
    g = torch.Generator().manual_seed(0)
    tokens = [TokenAttribution(i, 50 + i, f"t{i}", torch.randn(12, generator=g), "thinking") for i in range(4)]
    spans = [SpanAttribution(0, "The square moves right.", (0, 2), torch.rand(12, generator=g) * 3, "thinking"),
             SpanAttribution(1, "right", (2, 4), torch.rand(12, generator=g), "answer", inherited=True)]
    return AttributionTrace(regions, tokens, spans, prompt_text="<video> where?", images=images)


@pytest.mark.parametrize("as_list", [False, True])
def test_a_trace_keeps_its_video_frames_through_save_and_load(tmp_path, as_list):
    frames = video_frames()
    video = [Image.fromarray(f) for f in frames] if as_list else frames
    trace = video_trace([video, toy_image()])
    trace.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "trace.json").read_text())
    assert meta["images"][0]["kind"] == ("frames" if as_list else "array")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t" / "trace.safetensors"), framework="pt") as f:
        assert np.array_equal(f.get_tensor("image.0").numpy(), frames)  # every frame, in the one tensor file
    back = AttributionTrace.load(tmp_path / "t")
    if as_list:
        assert [im.mode for im in back.images[0]] == ["RGB"] * 6
        assert np.array_equal(np.stack([np.asarray(im) for im in back.images[0]]), frames)
    else:
        assert back.images[0].dtype == np.uint8 and np.array_equal(back.images[0], frames)
    item = back.regions.maps[0].image
    assert (item.kind, item.frame_times, item.frame_step) == ("video", video_tokens().frame_times, 0.5)
    for region in range(12):
        assert describe_location(back.regions, region) == describe_location(trace.regions, region)
    for a, b in zip(trace.spans, back.spans):
        assert np.array_equal(np.asarray(step_overlay(trace.regions, trace.images, a.region_scores)),
                              np.asarray(step_overlay(back.regions, back.images, b.region_scores)))
    assert render_html(back) == render_html(trace)


def test_report_table_and_pngs_of_a_video_trace(tmp_path):
    trace = video_trace([video_frames(), toy_image()])
    page = render_html(trace, question="Where does the square go?")
    assert "alt='input video 1'" in page and "alt='input image 1'" in page
    assert "filmstrip" in page and "s, " in page
    for span in trace.spans:
        for region in [r for r in span.top_regions(3) if span.region_scores[r] > 0]:
            assert describe_location(trace.regions, region) in page
    assert "filmstrip" not in render_html(AttributionTrace(prompt_of(three_by_three()), images=[toy_image()]))
    assert trace._repr_html_().count("<tr class=") == 2
    paths = save_overlays(trace, out_dir=tmp_path)
    assert [p.name for p in paths] == ["step_000.png", "step_001.png"]
    assert Image.open(paths[0]).size == step_overlay(trace.regions, trace.images, trace.spans[0].region_scores).size
    assert "0.0-2.0 s" in trace.summary() or "2.0-3.0 s" in trace.summary() or "0.0-3.0 s" in trace.summary()


def test_a_streamed_video_trace_draws_and_round_trips(tmp_path):
    """End to end on a tiny Qwen3-VL: the streamer's trace keeps the frames it was given, draws one panel per
    frame group, names regions by their seconds, and saves and loads with its frames."""
    from hf_vattr import AttributionStreamer
    from hf_vattr.testing import example_video, example_video_inputs, tiny_vlm, video_metadata

    model, processor = tiny_vlm("qwen3_vl")
    video = example_video(6, 120, 160)
    inputs = example_video_inputs(processor, [video], fps=2.0)
    streamer = AttributionStreamer(model, processor, inputs=inputs, videos=[video], regions="grid", grid_k=4,
                                   video_metadata=[video_metadata(video, 2.0)], print_text=False)
    for _ in streamer.generate(**inputs, max_new_tokens=6, do_sample=False):
        pass
    streamer.join()
    trace = streamer.trace
    item = trace.regions.maps[0].image
    assert item.num_frame_groups == 3 and np.array_equal(trace.images[0], np.stack([np.asarray(f) for f in video]))
    scores = torch.arange(trace.regions.num_regions, dtype=torch.float32)
    picture = np.asarray(step_overlay(trace.regions, trace.images, scores, top=1))
    # the three first frames (0, 2, 4) are drawn in their colours: the square moved right between them
    square = np.asarray(video[0])[tuple(np.argwhere(np.asarray(video[0]) != 128)[0][:2])]
    columns = [np.nonzero((picture[LABEL:LABEL + 120, x0:x0 + 160] == square).all(-1).any(0))[0].mean()
               for x0 in (0, 166, 332)]
    assert columns[0] < columns[1] < columns[2]
    assert describe_location(trace.regions, trace.regions.num_regions - 1).startswith("2.0-3.0 s, ")
    trace.save(tmp_path / "v")
    back = AttributionTrace.load(tmp_path / "v")
    assert np.array_equal(back.images[0], trace.images[0])
    assert np.array_equal(np.asarray(step_overlay(back.regions, back.images, scores, top=1)), picture)
