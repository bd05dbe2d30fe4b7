"""Pictures: plain-words locations, overlays that keep the original colours, evidence labels,
the trajectory plot and the HTML report. Built on hand-made layouts (no model needed)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hf_vattr.streaming.events import AttributionTrace, SpanAttribution, TokenAttribution
from hf_vattr.layouts import ImageTokens, VisualLayout
from hf_vattr.regions import PromptRegions, RegionMap
from hf_vattr.viz import (
    WEAK_FRACTION,
    OverlayRenderer,
    clear_cache,
    colour_bar,
    describe_location,
    overlay_renderer,
    render_html,
    scale_ticks,
    span_evidence,
    step_overlay,
    trajectory_plot,
)
from hf_vattr.viz.path_plot import pca_coordinates

RED, GREEN, BG = (220, 50, 40), (30, 170, 60), (212, 204, 206)


def toy_image(size: int = 96) -> Image.Image:
    """A red cross bottom-right and a green circle top-left, like the toy task."""
    im = Image.new("RGB", (size, size), BG)
    d = ImageDraw.Draw(im)
    d.ellipse([8, 8, 24, 24], fill=GREEN)
    d.rectangle([76, 68, 80, 88], fill=RED)
    d.rectangle([68, 76, 88, 80], fill=RED)
    return im


def three_by_three(image_index: int = 0, size: tuple[int, int] = (96, 96), start: int = 3) -> RegionMap:
    """A 3x3 token grid (32 px tokens) with one region per token, row-major: region r is cell r."""
    tokens = ImageTokens(image_index, torch.arange(start, start + 9), (1, 3, 3), 32, size)
    return RegionMap.from_assignment(tokens, list(range(9)), method="custom")


def regions_for(*maps: RegionMap) -> PromptRegions:
    layout = VisualLayout([m.image for m in maps], sequence_length=40, model_type="qwen3_vl")
    return PromptRegions(layout, list(maps))


def hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


# --------------------------------------------------------------------------- locations


def test_describe_location_names_the_cell_and_its_share():
    regions = regions_for(three_by_three())
    assert describe_location(regions, 0) == "top-left, 11% of the image"
    assert describe_location(regions, 4) == "centre, 11% of the image"
    assert describe_location(regions, 5) == "right, 11% of the image"
    assert describe_location(regions, 7) == "bottom, 11% of the image"
    assert describe_location(regions, 8) == "bottom-right, 11% of the image"


def test_describe_location_counts_images_from_one_when_there_are_several():
    regions = regions_for(three_by_three(0), three_by_three(1, start=20))
    assert describe_location(regions, 9 + 4) == "image 2, centre, 11%"
    assert describe_location(regions, 2) == "image 1, top-right, 11%"


def test_describe_location_uses_original_pixels_with_separate_scales():
    # 3x3 tokens stretched onto a 60 (high) x 300 (wide) image: a cell is still 1/9 of it
    regions = regions_for(three_by_three(size=(60, 300)))
    assert describe_location(regions, 6) == "bottom-left, 11% of the image"
    two = ImageTokens(0, torch.arange(3, 12), (1, 3, 3), 32, (96, 96))
    big = RegionMap.from_assignment(two, [0, 0, 0, 0, 0, 0, 0, 0, 1])  # 8 cells vs 1
    assert describe_location(regions_for(big), 0).endswith("89% of the image")


# --------------------------------------------------------------------------- overlays


def overlay_panels(picture: Image.Image, image: Image.Image) -> tuple[np.ndarray, np.ndarray, int]:
    scale = int(np.ceil(224 / image.height))
    side = image.height * scale
    arr = np.asarray(picture)
    return arr[:side, :side], arr[:side, side + 6: 2 * side + 6], scale


def test_overlay_keeps_original_colours_outside_the_outlines():
    image = toy_image()
    regions = regions_for(three_by_three())
    scores = torch.zeros(9)
    scores[8], scores[0] = 5.0, 2.0  # cross cell first, circle cell second
    picture = step_overlay(regions, [image], scores, top=2)
    left, heat, scale = overlay_panels(picture, image)
    original = np.asarray(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    labels = regions.maps[0].pixel_labels().repeat(scale, 0).repeat(scale, 1)
    outside = ~np.isin(labels, [0, 8])
    assert np.array_equal(left[outside], original[outside])  # not one pixel of the other regions changed
    # inside the outlined regions, away from the outline and the rank tag, the object keeps its exact colour
    cross = original[..., 0] == RED[0]
    circle = original[..., 1] == GREEN[1]
    assert cross.any() and circle.any()
    assert np.array_equal(left[cross & (labels == 8)], original[cross & (labels == 8)])
    assert hue(left[circle].mean(0)) == pytest.approx(hue(GREEN), abs=0.02)
    # the outline is drawn: the top region's border pixels changed
    assert (left[labels == 8] != original[labels == 8]).any(axis=-1).sum() > 0
    # heatmap: the highest-scoring region is the brightest
    bright = heat.astype(float).mean(-1)
    assert bright[labels == 8].mean() > bright[labels == 0].mean() > bright[labels == 4].mean()


def test_overlay_has_a_colour_bar_with_values_from_zero_to_the_top_score():
    image = toy_image()
    regions = regions_for(three_by_three())
    scores = torch.linspace(-1, 7.5, 9)
    picture = step_overlay(regions, [image], scores)
    assert [label for _, label in scale_ticks(0.0, 7.5)] == ["0", "1.88", "3.75", "5.62", "7.50"]
    left, _, scale = overlay_panels(picture, image)
    bar = np.asarray(picture)[left.shape[0]:].astype(float)
    assert bar.shape[0] >= 30  # a bar with tick labels under the panels
    ramp = bar[8, 10:-10].mean(-1)  # one row through the ramp: dark (0) on the left, light (vmax) on the right
    assert ramp[0] < 20 and ramp[-1] > 200
    assert np.all(np.diff(ramp[:: max(len(ramp) // 20, 1)]) >= -2)


def test_shared_vmax_dims_the_heat_and_bad_inputs_are_refused():
    image = toy_image()
    regions = regions_for(three_by_three())
    scores = torch.zeros(9)
    scores[4] = 1.0
    own = overlay_panels(step_overlay(regions, [image], scores, top=0), image)[1]
    shared = overlay_panels(step_overlay(regions, [image], scores, top=0, vmax=4.0), image)[1]
    labels = regions.maps[0].pixel_labels().repeat(3, 0).repeat(3, 1)
    assert shared[labels == 4].mean() < own[labels == 4].mean()
    with pytest.raises(ValueError, match="images"):
        step_overlay(regions, [image, image], scores)
    with pytest.raises(ValueError, match="9 region scores"):
        step_overlay(regions, [image], torch.zeros(8))
    with pytest.raises(ValueError, match="evidence"):
        step_overlay(regions, [image], scores, evidence="strong")


def test_weak_evidence_is_painted_fainter_and_labelled():
    image = toy_image()
    regions = regions_for(three_by_three())
    scores = torch.arange(9, dtype=torch.float32)
    strong = step_overlay(regions, [image], scores)
    weak = step_overlay(regions, [image], scores, evidence="weak")
    assert weak.height == strong.height + 18  # a caption line: "[weak evidence]"
    heat_strong = overlay_panels(strong, image)[1].astype(float)
    heat_weak = np.asarray(weak)[18:18 + heat_strong.shape[0], heat_strong.shape[1] + 6:].astype(float)
    sat = lambda a: (a.max(-1) - a.min(-1)).mean()  # noqa: E731 - colourfulness
    assert sat(heat_weak) < 0.6 * sat(heat_strong)


def test_overlay_for_several_images_and_for_a_size_only_image():
    regions = regions_for(three_by_three(0), three_by_three(1, start=20))
    scores = torch.zeros(18)
    scores[13] = 1.0
    picture = step_overlay(regions, [toy_image(), (96, 96)], scores)
    assert picture.width == 4 * 288 + 3 * 6  # four panels: original + heatmap per image


def test_heatmap_colours_read_on_the_colour_bar():
    """Each region's colour sits on the picture's colour bar where its score is: scores at or below 0 at the dark
    end, the top score at the light end, and the colours' order along the bar is the scores' order."""
    image = Image.new("RGB", (96, 96), (128, 128, 128))  # one grey level: a region's colour is its score alone
    regions = regions_for(three_by_three())
    scores = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    picture = step_overlay(regions, [image], scores, top=0)
    _, heat, scale = overlay_panels(picture, image)
    ramp = np.asarray(picture)[heat.shape[0] + 8, 10:-10].astype(float)  # a row through the bar's ramp
    labels = regions.maps[0].pixel_labels().repeat(scale, 0).repeat(scale, 1)
    where = []  # each region's colour, located on the bar (0 = left end, 1 = right end)
    for region in range(9):
        colours = heat[labels == region].astype(float)
        assert (colours == colours[0]).all()  # a region is one colour
        where.append(np.argmin(((ramp - colours[0]) ** 2).sum(-1)) / (len(ramp) - 1))
    assert where[0] == where[1] < 0.1  # -1 and 0: no support, both at the dark end
    assert where[-1] > 0.9  # the top score: the light end
    assert all(a < b for a, b in zip(where[1:], where[2:]))
    assert np.allclose(where, np.clip(scores.numpy() / 6.0, 0, 1), atol=0.12)


def test_weak_heatmaps_are_struck_through_and_the_original_is_not():
    image = toy_image()
    regions = regions_for(three_by_three())
    scores = torch.linspace(-1, 7.5, 9)
    strong = np.asarray(step_overlay(regions, [image], scores, top=0))
    weak = np.asarray(step_overlay(regions, [image], scores, top=0, evidence="weak"))[18:]  # below the caption
    side = 288
    labels = regions.maps[0].pixel_labels().repeat(3, 0).repeat(3, 1)
    lines = (weak[:side, side + 6:2 * side + 6] == 235).all(-1)  # the light strike-through lines
    assert not (strong[:side, side + 6:2 * side + 6] == 235).all(-1).any()
    assert all(lines[labels == r].any() for r in range(9))  # they cross every region, whatever its score
    assert 0.02 < lines.mean() < 0.2  # lines, not a fill
    assert np.array_equal(weak[:side, :side], strong[:side, :side])  # the original is never faded


def test_the_top_region_is_ringed_in_its_rank_colour():
    image = toy_image()
    regions = regions_for(three_by_three())
    scores = torch.zeros(9)
    scores[4], scores[8] = 1.0, 3.0  # centre second, bottom-right first
    left, _, scale = overlay_panels(step_overlay(regions, [image], scores, top=2), image)
    labels = regions.maps[0].pixel_labels().repeat(scale, 0).repeat(scale, 1)
    for region, colour in ((8, (255, 255, 255)), (4, (0, 200, 255))):
        rows, cols = np.nonzero(labels == region)
        top, bottom, first, last = rows.min(), rows.max(), cols.min(), cols.max()
        ring = np.concatenate([left[top, first:last + 1], left[bottom, first:last + 1],
                               left[top:bottom + 1, first], left[top:bottom + 1, last]])
        assert (ring == colour).all()  # the region's outermost pixels, all the way round
        inside = left[top + 10:bottom - 9, first + 10:last - 9]
        original = np.asarray(image.resize((288, 288), Image.NEAREST))[top + 10:bottom - 9, first + 10:last - 9]
        assert (inside != colour).any(-1).any() and (inside == original).all(-1).mean() > 0.9  # not filled


def _edges_by_definition(mask: np.ndarray, width: int) -> np.ndarray:
    """Edge pixels by definition: mask pixels with a pixel outside the mask (or the array) within ``width``
    4-neighbour steps."""
    h, w = mask.shape
    edge = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask)):
        for dy in range(-width, width + 1):
            for dx in range(-(width - abs(dy)), width - abs(dy) + 1):
                yy, xx = y + dy, x + dx
                if not (0 <= yy < h and 0 <= xx < w) or not mask[yy, xx]:
                    edge[y, x] = True
    return edge


@pytest.mark.parametrize("seed", range(6))
def test_outline_pixels_are_the_masks_edges_by_definition(seed):
    from hf_vattr.viz.overlays import mask_edges

    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 24, size=2))
    for density in (0.3, 0.7, 0.95, 1.0):
        mask = rng.random(shape) < density
        for width in (1, 2, 3, 4):
            assert np.array_equal(mask_edges(mask, width), _edges_by_definition(mask, width)), (shape, density, width)
    blob = np.zeros((20, 30), dtype=bool)
    blob[3:15, 5:25] = True
    assert mask_edges(blob, 2).sum() == blob.sum() - blob[5:13, 7:23].sum()  # a 2-px ring of a rectangle


def test_pictures_follow_objects_whose_ids_are_reused():
    """The caches match images and region maps by identity: objects made after others were dropped (often at
    the same addresses) are drawn from their own pixels and labels, never from an entry of the dropped ones."""
    scores = torch.arange(9, dtype=torch.float32)

    def draw(i: int) -> tuple[np.ndarray, tuple[int, int, int], int]:
        colour = (i * 3 % 256, 255 - i * 3 % 256, i * 37 % 256)
        height = 96 if i % 3 else 48
        image = np.full((height, 96, 3), colour, dtype=np.uint8)
        picture = step_overlay(regions_for(three_by_three(size=(height, 96))), [image], scores, top=0)
        return np.asarray(picture), colour, height  # the image and the regions are dropped here

    for i in range(80):
        picture, colour, height = draw(i)
        assert (picture[1, 1] == colour).all(), i
        assert picture.shape[0] == height * int(np.ceil(224 / height)) + colour_bar(0, 1, picture.shape[1]).height, i


def test_cached_pictures_equal_fresh_ones_and_follow_new_objects():
    image = toy_image()
    regions = regions_for(three_by_three())
    scores = torch.arange(9, dtype=torch.float32)
    first = np.asarray(step_overlay(regions, [image], scores, caption="step 1"))
    again = np.asarray(step_overlay(regions, [image], scores, caption="step 1"))
    clear_cache()
    fresh = np.asarray(step_overlay(regions, [image], scores, caption="step 1"))
    own = np.asarray(OverlayRenderer(regions, [image]).render(scores, caption="step 1"))
    assert np.array_equal(first, again) and np.array_equal(first, fresh) and np.array_equal(first, own)
    # a new PromptRegions over the same maps (what a streamer's trace holds) reuses the prepared panels
    same_maps = PromptRegions(regions.layout, list(regions.maps))
    assert overlay_renderer(same_maps, [image]).panels[0] is overlay_renderer(regions, [image]).panels[0]
    assert np.array_equal(np.asarray(step_overlay(same_maps, [image], scores, caption="step 1")), first)
    # another image object is drawn from its own pixels, never from the cache of the first
    other = image.copy()
    ImageDraw.Draw(other).rectangle([0, 0, 95, 40], fill=(0, 0, 255))
    left = overlay_panels(step_overlay(regions, [other], scores, caption="step 1"), other)[0][18:]
    assert (left[:60, 150:] == [0, 0, 255]).all(-1).mean() > 0.5
    # prepare() computes every region's outline and location up front; pictures are unchanged
    renderer = OverlayRenderer(regions, [image]).prepare()
    assert len(renderer.panels[0]._outlines) == 9
    assert np.array_equal(np.asarray(renderer.render(scores, caption="step 1")), first)


# --------------------------------------------------------------------------- evidence


def span(i: int, scores, section: str = "thinking") -> SpanAttribution:
    return SpanAttribution(i, f"step {i}", (i, i + 1), torch.as_tensor(scores, dtype=torch.float32), section)


def test_span_evidence_rule():
    regions = regions_for(three_by_three())
    spans = [span(0, [10.0] + [0] * 8), span(1, [0, 8.0] + [0] * 7), span(2, [0, 0, 12.0] + [0] * 6),
             span(3, [0.5] + [0] * 8), span(4, [-1.0] * 9), span(5, [20.0] + [0] * 8, "answer")]
    trace = AttributionTrace(regions, spans=spans)
    median_peak = float(np.median([10, 8, 12, 0.5, -1]))  # thinking steps only: 8
    assert 0.5 < WEAK_FRACTION * median_peak
    assert [span_evidence(s, trace) for s in spans] == ["grounded", "grounded", "grounded", "weak", "weak",
                                                        "indirect"]


# --------------------------------------------------------------------------- trajectory


def test_path_plot_coordinates_draw_the_reasoning_path_without_distortion():
    """The trajectory plot's coordinates are a faithful picture of the steps' region scores: a path that moves
    within a plane keeps every distance (so its length and tortuosity), steps that visit two different regions
    stay in two separate groups, and a wider path is only ever shortened, never stretched."""
    from scipy.spatial.distance import pdist

    from hf_vattr.trajectory import path_length, tortuosity

    rng = np.random.default_rng(0)
    plane = rng.normal(size=(8, 2)) @ rng.normal(size=(2, 9)) + rng.normal(size=9)  # 8 steps, 9 regions, rank 2
    coords, ratios = pca_coordinates(plane, 2)
    assert np.allclose(pdist(coords), pdist(plane))
    assert path_length(coords) == pytest.approx(path_length(plane))
    assert tortuosity(coords) == pytest.approx(tortuosity(plane))
    assert ratios.sum() == pytest.approx(1.0)  # nothing of the path is left out of the picture

    grounded = np.zeros((10, 9))
    grounded[::2, 0], grounded[1::2, 5] = 10.0, 8.0  # steps alternate between two regions
    grounded += rng.normal(scale=0.3, size=grounded.shape)
    coords, _ = pca_coordinates(grounded, 2)
    first, second = coords[::2], coords[1::2]
    within = max(pdist(first).max(), pdist(second).max())
    between = np.linalg.norm(first[:, None] - second[None], axis=-1).min()
    assert between > 5 * within

    wide = rng.normal(size=(12, 9))
    coords, ratios = pca_coordinates(wide, 3)
    assert np.all(np.linalg.norm(np.diff(coords, axis=0), axis=1) <= np.linalg.norm(np.diff(wide, axis=0), axis=1)
                  + 1e-9)
    assert ratios[0] >= ratios[1] >= ratios[2] > 0


def test_path_plot_coordinates_of_a_path_that_never_moves():
    one, ratios = pca_coordinates(np.ones((1, 9)), 2)  # one step: no direction to find
    assert np.array_equal(one, np.zeros((1, 2))) and np.array_equal(ratios, np.zeros(2))
    still, _ = pca_coordinates(np.tile(np.arange(9.0), (4, 1)), 3)  # the same scores at every step
    assert np.array_equal(still, np.zeros((4, 3)))
    two, _ = pca_coordinates(np.array([[0.0] * 9, [3.0, 4.0] + [0.0] * 7]), 3)  # one direction, the rest padded
    assert two.shape == (2, 3) and np.array_equal(two[:, 1:], np.zeros((2, 2)))
    assert abs(two[1, 0] - two[0, 0]) == pytest.approx(5.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_trajectory_plot_draws_every_step(dims):
    regions = regions_for(three_by_three())
    rng = np.random.default_rng(1)
    spans = [span(i, rng.random(9) * 5) for i in range(6)] + [span(6, rng.random(9), "answer")]
    picture = trajectory_plot(AttributionTrace(regions, spans=spans), dims=dims, size=(640, 300))
    assert picture.size == (640, 300)
    arr = np.asarray(picture).astype(int)
    assert (np.abs(arr - 255).sum(-1) > 60).mean() > 0.01  # something besides the white background
    empty = np.asarray(trajectory_plot(AttributionTrace(regions), dims=dims))
    assert (np.abs(arr[:, :350] - 255).sum() > np.abs(empty[:, :350].astype(int) - 255).sum())
    with pytest.raises(ValueError, match="dims"):
        trajectory_plot(AttributionTrace(regions, spans=spans), dims=4)


# --------------------------------------------------------------------------- report


def test_report_uses_the_trace_images_and_marks_weak_and_indirect_steps(tmp_path):
    regions = regions_for(three_by_three())
    spans = [span(0, [9.0] + [0] * 8), span(1, [0] * 8 + [7.0]), span(2, [0.1] * 9), span(3, [3.0] * 9, "answer")]
    tokens = [TokenAttribution(i, 10 + i, f"t{i}", s.region_scores, s.section) for i, s in enumerate(spans)]
    trace = AttributionTrace(regions, tokens, spans, images=[toy_image()])
    page = render_html(trace, path=tmp_path / "r.html", question="Where is the red cross?")
    assert (tmp_path / "r.html").read_text() == page
    assert page.count("data:image/png;base64,") == 1 + len(spans) + 1  # input, one overlay per step, trajectory
    assert page.count("class='ev grounded'") == 2 and "weak evidence</span>" in page and "indirect</span>" in page
    assert "top-left, 11% of the image" in page and "bottom-right, 11% of the image" in page
    assert "predicted log-prob drop" in page and "does not predict their effects" in page
    assert "http://" not in page and "https://" not in page
    assert trace._repr_html_().count("<tr class=") == len(spans)


def test_an_answer_that_inherits_the_steps_is_marked_inherited_and_drawn_like_grounded_evidence():
    regions = regions_for(three_by_three())
    steps = [span(0, [9.0] + [0] * 8), span(1, [0] * 8 + [7.0])]
    answer = span(2, [4.0] + [0] * 7 + [3.5], "answer")
    plain = AttributionTrace(regions, spans=steps + [answer])
    assert span_evidence(answer, plain) == "indirect"
    inherited = SpanAttribution(answer.index, answer.text, answer.token_range, answer.region_scores, "answer",
                                inherited=True)
    trace = AttributionTrace(regions, spans=steps + [inherited])
    assert span_evidence(inherited, trace) == "inherited"
    html = trace._repr_html_()
    assert "class='ev inherited'" in html and "class='ev indirect'" not in html
    image = toy_image()
    muted = np.asarray(step_overlay(regions, [image], answer.region_scores, evidence="indirect"))
    shown = np.asarray(step_overlay(regions, [image], answer.region_scores, evidence="inherited"))
    grounded = np.asarray(step_overlay(regions, [image], answer.region_scores, evidence="grounded"))
    assert np.array_equal(shown, grounded)  # full strength, no "evidence" caption
    assert muted.shape != shown.shape or not np.array_equal(muted, shown)


def test_report_without_images_draws_grey_canvases():
    regions = regions_for(three_by_three())
    trace = AttributionTrace(regions, spans=[span(0, [1.0] * 9)])
    page = render_html(trace)
    assert page.count("data:image/png;base64,") == 2  # overlay and trajectory, no input image


# --------------------------------------------------------------------------- colour bar


def _ink_bands(bar: np.ndarray, first_row: int) -> list[tuple[int, int]]:
    """Runs of rows (start, end-exclusive) from ``first_row`` down that hold any non-white pixel: lines of text."""
    inked = (bar[first_row:] < 250).any(axis=(1, 2))
    bands, start = [], None
    for row, ink in enumerate(inked.tolist() + [False]):
        if ink and start is None:
            start = row
        elif not ink and start is not None:
            bands.append((first_row + start, first_row + row))
            start = None
    return bands


@pytest.mark.parametrize("label, width", [
    ("predicted log-prob drop (nats) if the region were removed; scores below 0 drawn as 0", 774),
    ("uncalibrated score (raw value-norm attention, no estimator); scores below 0 drawn as 0", 320),
    ("predicted log-prob drop (nats) if the region were removed", 582),
])
def test_colour_bar_caption_clears_the_tick_values_and_the_edges(label, width):
    """Read on the pixels: below the ramp's tick marks, the tick values and each caption line are separate bands
    of ink with at least 3 blank rows between them (so they stay apart when a browser shrinks the picture), the
    last band ends 3 rows before the bar's edge (no clipped descenders), and no ink touches the sides."""
    from hf_vattr.viz.colours import bar_layout

    for vmax in (7.5, 20.4, 0.004, 123.0):
        bar = np.asarray(colour_bar(0.0, vmax, width, label=label))
        below_ticks = 16 + 3 + 1  # the ramp ends at row 16, its tick marks 3 rows lower
        bands = _ink_bands(bar, below_ticks)
        lines = bar_layout(width, label)[2]
        assert len(bands) == 1 + len(lines), (bands, lines)  # the tick values, then one band per caption line
        gaps = [b[0] - a[1] for a, b in zip(bands, bands[1:])]
        assert all(g >= 3 for g in gaps), gaps
        assert bands[0][0] - below_ticks >= 3
        assert bar.shape[0] - bands[-1][1] >= 3
        caption = bar[bands[1][0]:]
        assert (caption[:, :2] >= 250).all() and (caption[:, -2:] >= 250).all()  # the caption is not cut at a side
    assert [line for line, _ in lines] and " ".join(line for line, _ in lines) == label
