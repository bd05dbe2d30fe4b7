"""The picture of one step's region scores: the original image with the top regions outlined, a heatmap over
a grey copy, and a colour bar in the scores' units. A video is drawn as a filmstrip: one panel per frame
group, the group's first frame above its heatmap, with the outlines and the group's seconds above it.

Overlays paint each region's score through ``RegionMap.pixel_labels()`` (exact token -> pixel geometry,
separate y/x scales), so what is drawn is what the model saw. The original image is never tinted: the task
names objects by their colour, so a tint that turns a red cross orange would mislead. Everything that does
not depend on the scores is prepared once per ``(regions, images)`` (:class:`OverlayRenderer`), so live
views can draw a picture per update.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from ..layouts import video_frames
from ..regions import PromptRegions, RegionMap
from .colours import colormap, colour_bar, rank_colour
from .evidence import EVIDENCE_LEVELS, MUTED_EVIDENCE, evidence_wording
from .identity import Identity, image_key, image_of
from .images import as_pil, font, is_size
from .locations import clear_geometry, pixel_labels, region_geometry
from .scores import SCORE_UNITS, ranked_regions, scores_array, top_positive_regions

__all__ = ["OverlayRenderer", "overlay_renderer", "step_overlay", "clear_cache", "overlay", "span_overlays",
           "mask_edges", "group_frame"]

_MIN_PANEL = 224  # small images are enlarged (nearest neighbour) so outlines and labels stay legible
_CACHE_SIZE = 4  # (regions, images) pairs whose fixed drawing parts are kept (see overlay_renderer)
_GAP = 6  # pixels between panels
_HEADER = 18  # height of the caption strip
_VIDEO_ROWS = (112, 224)  # a video frame's panel: enlarged below the first height, shrunk above the second
_STRIP_COLUMNS = 6  # most frame-group panels in one row of a filmstrip; more groups wrap into balanced rows
_TIME_LABEL = 16  # height of the strip above each frame-group panel that gives its seconds


def mask_edges(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask, ``width`` (>= 1) pixels thick, inside the mask: what ``width``
    erosions by the 4-neighbour cross remove (pixels beyond the array count as outside the mask)."""
    return mask & ~ndimage.binary_erosion(mask, iterations=width)


@functools.lru_cache(maxsize=64)
def _tag_patch(rank: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """A rank tag (black box, number in the rank's outline colour) as (RGB patch, mask of its pixels), drawn
    exactly as ``ImageDraw`` draws it at any integer position: box at (0, 0), text 2 px in."""
    tag_font = font(12)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    tw = probe.textlength(tag, font=tag_font)
    w, h = int(math.ceil(tw)) + 8, 20
    patch, mask = Image.new("RGB", (w, h)), Image.new("L", (w, h))
    box = [0, 0, tw + 4, 14]
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    ImageDraw.Draw(mask).text((2, 0), tag, fill=255, font=tag_font)  # (inside the box for digits)
    d = ImageDraw.Draw(patch)
    d.rectangle(box, fill=(0, 0, 0))
    d.text((2, 0), tag, fill=rank_colour(rank), font=tag_font)
    return np.asarray(patch), np.asarray(mask) > 0


def _paste(arr: np.ndarray, patch: np.ndarray, mask: np.ndarray, x: int, y: int) -> None:
    """``arr[y:, x:][mask] = patch[mask]``, clipped to ``arr`` (what drawing off the edge does)."""
    h, w = arr.shape[:2]
    ph, pw = mask.shape
    ys, xs = max(y, 0), max(x, 0)
    ye, xe = min(y + ph, h), min(x + pw, w)
    if ye <= ys or xe <= xs:
        return
    m = mask[ys - y:ye - y, xs - x:xe - x]
    arr[ys:ye, xs:xe][m] = patch[ys - y:ye - y, xs - x:xe - x][m]


def _grey_of_sum() -> np.ndarray:
    """grey(R + G + B): the float32 mean over channels that a pixel with that channel sum gets (same operation)."""
    g = np.arange(766)
    rgb = np.stack([g.clip(0, 255), (g - 255).clip(0, 255), (g - 510).clip(0, 255)], -1).astype(np.float32)
    return rgb.mean(-1)


_GREY_OF_SUM = _grey_of_sum()


def _image_or_blank(image: Any, region_map: RegionMap) -> Image.Image:
    """The picture to draw on: the image itself, or a grey canvas when only its size ``(h, w)`` is known."""
    if image is None or is_size(image):
        h, w = region_map.pixel_labels().shape
        return Image.new("RGB", (w, h), (128, 128, 128))
    return as_pil(image)


class _Panel:
    """One image's (or one frame group's) fixed drawing parts: the (resized) original, its grey copy, the
    per-pixel region labels, and, per region on first use, its outline pixels and tag corner.

    An image smaller than ``_MIN_PANEL`` rows is enlarged by a whole factor (nearest neighbour). A video frame
    is fitted to ``_VIDEO_ROWS`` (enlarged by a whole factor below it, shrunk above it) so that a filmstrip
    of many groups stays a readable size.
    """

    def __init__(self, image: Any, region_map: RegionMap, labels: np.ndarray | None = None, *,
                 video: bool = False) -> None:
        pil = _image_or_blank(image, region_map)
        labels = region_map.pixel_labels() if labels is None else labels
        if labels.shape != (pil.height, pil.width):
            what = "video frame" if video else "image"
            raise ValueError(
                f"Region map is for a {labels.shape[1]}x{labels.shape[0]} {what} but got {pil.width}x{pil.height}; "
                f"pass the original {what} the prompt was built from."
            )
        low, high = _VIDEO_ROWS if video else (_MIN_PANEL, None)
        scale = max(1, int(math.ceil(low / max(pil.height, 1)))) if pil.height < low else 1
        if scale > 1:
            pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
            labels = labels.repeat(scale, 0).repeat(scale, 1)
        elif high is not None and pil.height > high:  # shrink: the frame by area, the labels at pixel centres
            size = (max(1, round(pil.width * high / pil.height)), high)
            ys = ((np.arange(size[1]) + 0.5) * pil.height / size[1]).astype(int)
            xs = ((np.arange(size[0]) + 0.5) * pil.width / size[0]).astype(int)
            pil, labels = pil.resize(size, Image.BOX), labels[ys][:, xs]
        self.k = max(region_map.num_regions, 1)
        self.labels = labels
        self.width = max(2, scale)  # outline thickness
        self.base = np.asarray(pil, dtype=np.uint8)
        self.shape = labels.shape
        self._pair_tables()
        self._outlines: dict[int, tuple[np.ndarray, np.ndarray, tuple[int, int]] | None] = {}
        self._hatch: np.ndarray | None = None

    def _pair_tables(self) -> None:
        """The heatmap's value at a pixel depends only on its region and its grey level, and the grey level (the
        mean of R, G, B) only on R + G + B (0..765): each frame colours the (region, R + G + B) pairs present
        and gathers, instead of colouring every pixel."""
        k = self.k
        rgb = self.base.reshape(-1, 3)
        grey_sum = rgb[:, 0].astype(np.int64) + rgb[:, 1] + rgb[:, 2]
        key = (self.labels.reshape(-1).astype(np.int64) % k) * 766 + grey_sum  # % k: label -1 takes the last
        present = np.zeros(k * 766, dtype=bool)                                 # region's colour, as indexing did
        present[key] = True
        pairs = np.flatnonzero(present)
        lookup = np.zeros(k * 766, dtype=np.intp)
        lookup[pairs] = np.arange(len(pairs))
        self.pair_of_pixel = lookup[key]
        self.pair_region = pairs // 766
        pair_grey = _GREY_OF_SUM[pairs % 766]
        self.pair_grey22 = (0.22 * pair_grey)[:, None]
        self.pair_faint = (0.6 * (150 + 0.3 * pair_grey))[:, None]

    def outline(self, region: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
        """(flat edge pixels, flat halo pixels, top-left (x, y) of the region's top row), or None if empty."""
        if region not in self._outlines:
            ys, xs = np.nonzero(self.labels == region)
            if len(ys) == 0:
                self._outlines[region] = None
            else:
                y0, y1, x0, x1 = ys[0], ys[-1] + 1, int(xs.min()), int(xs.max()) + 1
                mask = self.labels[y0:y1, x0:x1] == region  # a crop: outside it the mask is False anyway
                edge = mask_edges(mask, self.width)
                halo = mask_edges(mask, self.width + 1) & ~edge
                w = self.shape[1]
                flat = [(yy + y0) * w + (xx + x0) for yy, xx in (np.nonzero(edge), np.nonzero(halo))]
                self._outlines[region] = (flat[0], flat[1], (int(xs[0]), int(ys[0])))
        return self._outlines[region]

    def hatch(self) -> np.ndarray:
        """Flat pixels of the diagonal strike-through of weak / indirect heatmaps."""
        if self._hatch is None:
            h, w = self.shape
            mask = Image.new("L", (w, h))
            d = ImageDraw.Draw(mask)
            for x in range(-h, w, 10):
                d.line([(x, h), (x + h, 0)], fill=255, width=1)
            self._hatch = np.flatnonzero(np.asarray(mask))
        return self._hatch

    def heatmap(self, s: np.ndarray, vmin: float, vmax: float, hatch: bool = False) -> np.ndarray:
        """Every region's score coloured over the grey copy, (H, W, 3) uint8 (a strided view)."""
        h, w = self.shape
        norm = np.clip((s - vmin) / max(vmax - vmin, 1e-12), 0, 1)
        colours = 0.78 * colormap(norm)  # (K, 3): luminance from the grey copy keeps object shapes findable
        heat = colours[self.pair_region] + self.pair_grey22
        if hatch:  # weak or indirect evidence: paint it faintly, so it does not look like grounding
            heat = 0.4 * heat + self.pair_faint
        table = np.zeros((len(heat), 4), dtype=np.uint8)  # RGB + padding: one 4-byte word per pair, one gather
        table[:, :3] = heat.clip(0, 255).astype(np.uint8)
        return np.take(table.view(np.uint32).reshape(-1), self.pair_of_pixel).view(np.uint8).reshape(h, w, 4)[..., :3]

    def draw(self, s: np.ndarray, order: Sequence[int], vmin: float, vmax: float,
             hatch: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(original with the top regions outlined, heatmap over a grey copy) as (H, W, 3) uint8 arrays."""
        h, w = self.shape
        heat = self.heatmap(s, vmin, vmax, hatch)
        left = self.base.copy()
        lf, hf = left.reshape(-1, 3), heat.reshape(h * w, 3)  # (views: heat is strided, reshape keeps it a view)
        tags = []
        for rank, region in enumerate(order):
            geometry = self.outline(int(region)) if region >= 0 else None
            if geometry is None:
                continue
            edge, halo, corner = geometry
            colour = rank_colour(rank)
            for flat in (lf, hf):
                flat[halo] = 0
                flat[edge] = colour
            tags.append((rank, corner))
        if hatch:  # the heatmap is struck through so it does not read as grounding
            hf[self.hatch()] = 235
        for rank, (x0, y0) in tags:  # rank tags in each outlined region's top-left corner, off the object
            patch, mask = _tag_patch(rank, str(rank + 1))
            for arr in (left, heat):
                _paste(arr, patch, mask, x0 + self.width + 1, y0 + self.width + 1)
        return left, heat


def group_frame(video: Any, group: int, frames_per_group: int) -> Any:
    """The frame a video's panel of frame group ``group`` is drawn over: the group's first frame.

    ``video`` is what a trace keeps (a ``(T, H, W, C)`` array, as the streamer stores the frames the vision tower
    saw, a tensor, or a list of frames), or ``None`` / ``(h, w)`` (a grey canvas). The first frame is the one the
    group's time label starts at; a group padded past the last frame (an odd count) shows the last frame.
    """
    if video is None or is_size(video):
        return video
    frames = video if isinstance(video, (list, tuple)) else video_frames(video)
    return frames[min(int(group) * int(frames_per_group), len(frames) - 1)]


class _Block:
    """Where one item of the prompt is drawn: its panels and their tiles' offsets within the item's block.

    An image has one panel and two tiles side by side (original, heatmap); a video one panel per frame group,
    a column of its time label, the original frame and the heatmap, in balanced rows of at most
    ``_STRIP_COLUMNS`` columns.
    """

    def __init__(self, image: Any, region_map: RegionMap, offset: int) -> None:
        item = region_map.image
        self.offset, self.video = offset, item.is_video
        if not self.video:
            panel = _panel(Identity(region_map), image_key(image))
            h, w = panel.shape
            self.panels = [panel]
            self.tiles = [(0, 0), (w + _GAP, 0)]  # (x, y) of the original and of the heatmap
            self.labels: list[tuple[int, int, str]] = []
            self.width, self.height = 2 * w + _GAP, h
            return
        groups = item.num_frame_groups
        self.panels = [_panel(Identity(region_map), image_key(image), group) for group in range(groups)]
        h, w = self.panels[0].shape
        rows = -(-groups // _STRIP_COLUMNS)
        columns = -(-groups // rows)
        self.tiles, self.labels = [], []
        row_height = _TIME_LABEL + 2 * h + _GAP
        for group in range(groups):
            x = (group % columns) * (w + _GAP)
            y = (group // columns) * (row_height + _GAP)
            self.tiles += [(x, y + _TIME_LABEL), (x, y + _TIME_LABEL + h + _GAP)]
            span = item.frame_group_span(group)
            self.labels.append((x, y, f"{span[0]:.1f}-{span[1]:.1f} s" if span is not None else f"group {group + 1}"))
        self.width = columns * w + (columns - 1) * _GAP
        self.height = rows * row_height + (rows - 1) * _GAP


class OverlayRenderer:
    """Draws :func:`step_overlay` pictures of one ``(regions, images)`` pair, fast enough for live views.

    Everything that does not depend on the scores is prepared once: the enlarged originals, their grey copies,
    the per-pixel region labels, each region's outline pixels and tag position (on first use), the header, the
    time labels of a video's panels and the colour bar's ramp and units. A picture then costs a table lookup per
    (region, grey level), a gather, a few hundred outline pixels and six short texts (a few ms at the toy's
    size). The output is the same, pixel for pixel, as drawing from scratch.

    :func:`step_overlay` keeps one per ``(regions, images)`` for you (:func:`overlay_renderer`); build one
    yourself to hold it explicitly. Images are read once: a renderer does not see later in-place edits.
    """

    def __init__(self, regions: PromptRegions, images: Sequence[Any]) -> None:
        if len(images) != len(regions.maps):
            raise ValueError(f"Got {len(images)} images for {len(regions.maps)} region maps.")
        self.regions = regions
        self.images = list(images)
        self.offsets = regions.region_offsets()
        # panels are kept per (region map, image[, frame group]): a new PromptRegions over the same maps reuses them
        self.blocks = [_Block(image, m, offset) for image, m, offset in zip(self.images, regions.maps, self.offsets)]
        self.panels = [panel for block in self.blocks for panel in block.panels]
        self.num_regions = regions.num_regions
        self.width = sum(block.width for block in self.blocks) + _GAP * (len(self.blocks) - 1)
        self.height = max(block.height for block in self.blocks)
        self.bar_width = max(self.width, 320)
        self.canvas_width = max(self.width, self.bar_width)
        self._header: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def prepare(self) -> "OverlayRenderer":
        """Compute now what is otherwise computed on first use: every region's outline and tag position and its
        location in words (:func:`~hf_vattr.viz.locations.describe_location`). Call it before decoding starts,
        so that no picture drawn during decoding pays for it. Returns ``self``."""
        for block in self.blocks:
            for panel in block.panels:
                for local in range(panel.k):
                    panel.outline(local)
            for local in range(block.panels[0].k):
                region_geometry(self.regions, block.offset + local)
        return self

    def _header_strip(self) -> np.ndarray:
        """The white header, with "image n" over each image's panels when there are several ("image n" and
        "video n", counted apart, when a video is among them)."""
        if self._header is None:
            strip = Image.new("RGB", (self.canvas_width, _HEADER), "white")
            if len(self.blocks) > 1:
                draw = ImageDraw.Draw(strip)
                mixed = any(block.video for block in self.blocks)
                x = 0
                for i, (block, m) in enumerate(zip(self.blocks, self.regions.maps)):
                    name = f"{m.image.kind} {m.image.kind_index + 1}" if mixed else f"image {i + 1}"
                    draw.text((x + 2, 2), name, fill=(40, 40, 40), font=font(12))
                    x += block.width + _GAP
            self._header = np.asarray(strip)
        return self._header

    def _time_labels(self) -> np.ndarray:
        """The panels' area with every video panel's time label drawn on white (the tiles are pasted over it)."""
        if self._labels is None:
            area = Image.new("RGB", (self.canvas_width, self.height), "white")
            draw = ImageDraw.Draw(area)
            x = 0
            for block in self.blocks:
                for lx, ly, text in block.labels:
                    draw.text((x + lx + 2, ly + 2), text, fill=(40, 40, 40), font=font(12))
                x += block.width + _GAP
            self._labels = np.asarray(area)
        return self._labels

    def render(self, scores: torch.Tensor | np.ndarray, *, top: int = 3, vmax: float | None = None,
               caption: str | None = None, evidence: str = "grounded", units: str = SCORE_UNITS) -> Image.Image:
        """The picture of one score vector; arguments as :func:`step_overlay`."""
        wording = evidence_wording(evidence)
        muted = evidence in MUTED_EVIDENCE
        s = scores_array(scores, self.num_regions)
        hi = float(vmax) if vmax is not None else float(max(s.max(), 0.0))
        if not hi > 0:
            hi = 1e-6
        order = top_positive_regions(s, top) if top else []
        header = _HEADER if (caption or muted or len(self.blocks) > 1) else 0
        bar = colour_bar(0.0, hi, self.bar_width, clipped_low=bool((s < 0).any()), label=units)
        canvas = np.full((header + self.height + bar.height, self.canvas_width, 3), 255, dtype=np.uint8)
        if header:
            canvas[:header] = self._header_strip()
        if any(block.video for block in self.blocks):
            canvas[header:header + self.height] = self._time_labels()
        self._paint_panels(canvas, header, s, order, hi, muted)
        canvas[header + self.height:, :bar.width] = np.asarray(bar)
        picture = Image.fromarray(canvas)
        if caption or muted:
            draw = ImageDraw.Draw(picture)
            text = ((caption or "") + (f"  [{wording.caption}]" if muted else "")).strip()
            draw.text((max(picture.width - draw.textlength(text, font=font(12)) - 4, 2), 2), text,
                      fill=(150, 60, 0) if muted else (40, 40, 40), font=font(12))
        return picture

    def _paint_panels(self, canvas: np.ndarray, header: int, s: np.ndarray, order: list[int], hi: float,
                      muted: bool) -> None:
        """Each item's tiles, left to right, below the header; ``order``: the outlined regions, best first."""
        x = 0
        for block in self.blocks:
            offset, k = block.offset, block.panels[0].k
            local = s[offset:offset + k]
            # keep global ranks for colours: ranks held by another item's regions become -1 (nothing drawn)
            ranked = [(r - offset) if offset <= r < offset + k else -1 for r in order]
            tiles = iter(block.tiles)
            for panel in block.panels:
                h, w = panel.shape
                for tile in panel.draw(local, ranked, 0.0, hi, hatch=muted):
                    tx, ty = next(tiles)
                    canvas[header + ty:header + ty + h, x + tx:x + tx + w] = tile
            x += block.width + _GAP


@functools.lru_cache(maxsize=8 * _CACHE_SIZE)
def _panel(map_key: Identity, image: Any, group: int | None = None) -> _Panel:
    """The panel of one (region map, image), or of one frame group of a (region map, video), kept for the 32 most
    recent (a video has one per frame group)."""
    region_map = map_key.obj
    if group is None:
        return _Panel(image_of(image), region_map, pixel_labels(region_map))
    frame = group_frame(image_of(image), group, region_map.image.frames_per_group)
    return _Panel(frame, region_map, pixel_labels(region_map, group), video=True)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _renderer(regions_key: Identity, images: tuple) -> OverlayRenderer:
    return OverlayRenderer(regions_key.obj, [image_of(key) for key in images])


def overlay_renderer(regions: PromptRegions, images: Sequence[Any]) -> OverlayRenderer:
    """The :class:`OverlayRenderer` of ``(regions, images)``, built on first use and kept (the 4 most recent
    pairs, by object identity; a ``(h, w)`` size entry matches by value). Its per-image parts are kept per
    (region map, image), so a new ``PromptRegions`` over the same maps and images is ready at once.
    :func:`clear_cache` drops them all."""
    return _renderer(Identity(regions), tuple(image_key(image) for image in images))


def clear_cache() -> None:
    """Forget every cached renderer and region geometry (after editing an image or regions in place)."""
    _renderer.cache_clear()
    _panel.cache_clear()
    clear_geometry()


def step_overlay(regions: PromptRegions, images: Sequence[Any], scores: torch.Tensor, *, top: int = 3,
                 vmax: float | None = None, caption: str | None = None, evidence: str = "grounded",
                 units: str = SCORE_UNITS) -> Image.Image:
    """The picture of one step's (or one token's) region scores.

    Per image, side by side: the original, colours untouched, with the ``top`` regions outlined and
    numbered (white = 1st, cyan = 2nd, magenta = 3rd); and a heatmap of every region's score over a
    grey copy. Below: a colour bar with values in the estimator's units. The scale runs from 0 to
    ``vmax`` (default: this step's largest score; pass one value to compare steps); scores at or
    below 0 (no support) get the darkest colour. ``evidence="weak"`` or ``"indirect"`` (see
    :func:`~hf_vattr.viz.evidence.span_evidence`) hatches the heatmap and labels the picture "weak evidence" /
    "indirect evidence". ``units`` labels the colour bar (:func:`~hf_vattr.viz.scores.score_units` of the
    trace: "uncalibrated ..." without an estimator). ``images`` entries may be PIL images, arrays, or
    ``None`` / ``(h, w)`` when only the size is known (a grey canvas is drawn).

    A video (its entry: the frames the vision tower saw, a ``(T, H, W, C)`` array as the streamer keeps them or
    a list of frames) is drawn as a filmstrip: one panel per frame group, left to right (more than
    ``_STRIP_COLUMNS`` wrap into balanced rows), each a column under the group's seconds ("0.0-1.0 s"): the
    group's *first* frame (:func:`group_frame`), colours untouched, above the heatmap over its grey copy, both
    with the top regions outlined and numbered wherever they have pixels in that group. Every panel and image
    shares the one colour bar.

    The parts that do not depend on the scores are prepared once per ``(regions, images)`` objects and
    reused (:class:`OverlayRenderer`, :func:`overlay_renderer`): the first picture of a pair costs tens of
    ms, the next ones a few ms. Call :func:`clear_cache` after editing an image in place.
    """
    if len(images) != len(regions.maps):
        raise ValueError(f"Got {len(images)} images for {len(regions.maps)} region maps.")
    if evidence not in EVIDENCE_LEVELS:
        raise ValueError(f"evidence must be one of {EVIDENCE_LEVELS}, got {evidence!r}.")
    scores_array(scores, regions.num_regions)  # refuse a wrong length before any preparation
    return overlay_renderer(regions, images).render(scores, top=top, vmax=vmax, caption=caption, evidence=evidence,
                                                    units=units)


def overlay(image: Any, region_map: RegionMap, scores: torch.Tensor | np.ndarray, *, alpha: float = 0.6,
            outline_top: int = 1, vmax: float | None = None) -> Image.Image:
    """One image tinted by region score (kept for callers of 0.1; prefer :func:`step_overlay`, which
    leaves the original's colours untouched)."""
    pil = as_pil(image)
    labels = region_map.pixel_labels()
    if labels.shape != (pil.height, pil.width):
        raise ValueError(
            f"Region map is for a {labels.shape[1]}x{labels.shape[0]} image but got {pil.width}x{pil.height}; "
            "pass the original image the prompt was built from."
        )
    s = scores_array(scores, region_map.num_regions)
    top = float(vmax) if vmax is not None else float(max(s.max(), 1e-12))
    norm = np.clip(s, 0, None) / top
    heat = colormap(norm[labels])
    base = np.asarray(pil, dtype=np.float32)
    weight = (alpha * norm[labels])[..., None]
    mixed = base * (1 - weight) + heat * weight
    out = mixed.clip(0, 255).astype(np.uint8)
    for region in ranked_regions(s, outline_top):
        out[mask_edges(labels == region)] = 255
    return Image.fromarray(out)


def span_overlays(regions: PromptRegions, images: Sequence[Any], scores: torch.Tensor, **kwargs: Any) -> Image.Image:
    """Alias of :func:`step_overlay` (the 0.1 name)."""
    return step_overlay(regions, images, scores, **kwargs)
