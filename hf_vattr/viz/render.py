"""Pictures of attribution: step overlays, plain-words region locations, evidence strength,
the trajectory plot and a self-contained HTML report.

One rendering code path serves the demo's report, the notebook display
(:meth:`hf_vattr.streaming.events.AttributionTrace.show`) and the web app: they all call
:func:`step_overlay`, :func:`describe_location`, :func:`span_evidence` and
:func:`trajectory_plot`.

Overlays paint each region's score through ``RegionMap.pixel_labels()`` (exact token -> pixel
geometry, separate y/x scales), so what is drawn is what the model saw. The original image is
never tinted: the task names objects by their colour, so a tint that turns a red cross orange
would mislead. Instead each image gets two panels side by side, the untouched original with the
top regions outlined, and a heatmap over a grey copy, plus a colour bar with values in the
estimator's units (predicted log-probability drop, nats). Only Pillow and NumPy are needed.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..layouts import channels_first
from ..regions import PromptRegions, RegionMap



class SpanLike(Protocol):
    """What the pictures need of a span (:class:`hf_vattr.streaming.events.SpanAttribution` has it). viz does not import
    events, whose display methods import viz."""

    index: int
    text: str
    section: str
    sequence: int
    region_scores: torch.Tensor

    def top_regions(self, k: int = 3) -> list[int]: ...


class TraceLike(Protocol):
    """What the pictures need of a trace (:class:`hf_vattr.streaming.events.AttributionTrace` has it)."""

    regions: PromptRegions | None
    spans: Sequence[SpanLike]
    images: list | None

__all__ = [
    "describe_location",
    "step_overlay",
    "OverlayRenderer",
    "overlay_renderer",
    "clear_cache",
    "span_evidence",
    "trajectory_plot",
    "colour_bar",
    "scale_ticks",
    "render_html",
    "trace_table_html",
    "span_row_html",
    "table_html",
    "overlay",
    "span_overlays",
    "describe_regions",
    "save_overlays",
    "EVIDENCE_LEVELS",
    "SpanLike",
    "TraceLike",
    "WEAK_FRACTION",
    "SCORE_UNITS",
    "UNCALIBRATED_UNITS",
    "UNCALIBRATED_NOTE",
    "score_units",
]

SCORE_UNITS = "predicted log-prob drop (nats) if the region were removed"
#: Units of a trace scored without an estimator (``trace.calibrated`` is False): rankings, not nats.
UNCALIBRATED_UNITS = "uncalibrated score (raw value-norm attention, no estimator)"
#: The sentence shown with every table, report, summary and page of such a trace (docs/streaming.md).
UNCALIBRATED_NOTE = ("uncalibrated: raw value-norm attention (no estimator), a ranking of regions, not a predicted "
                     "drop in nats")


def score_units(trace: Any) -> str:
    """What a trace's scores are: :data:`SCORE_UNITS`, or :data:`UNCALIBRATED_UNITS` for a trace without estimator."""
    return SCORE_UNITS if getattr(trace, "calibrated", True) else UNCALIBRATED_UNITS
EVIDENCE_LEVELS = ("grounded", "weak", "indirect", "inherited")
#: A thinking step is "weak" when its largest predicted region effect is below this fraction of the
#: median largest effect of the trace's thinking steps (or is not positive at all).
WEAK_FRACTION = 0.25

# "inferno"-like sequential ramp: black -> purple -> red -> orange -> pale yellow
_HOT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
_OUTLINE = [(255, 255, 255), (0, 200, 255), (255, 0, 255)]  # rank 1, 2, 3+: none is a toy object colour
_MIN_PANEL = 224  # small images are enlarged (nearest neighbour) so outlines and labels stay legible


# --------------------------------------------------------------------------- small helpers


@functools.lru_cache(maxsize=8)
def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a fixed bitmap font only
        return ImageFont.load_default()


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values to RGB along a perceptually ordered dark-purple-red-yellow ramp."""
    v = np.clip(values, 0, 1) * (len(_HOT) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_HOT) - 2)
    frac = (v - lo)[..., None]
    return _HOT[lo] * (1 - frac) + _HOT[lo + 1] * frac


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and channels_first(arr):  # transformers' rule, as the layout reads the size (layouts)
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8) if arr.max() <= 1 else arr.clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _image_or_blank(image: Any, region_map: RegionMap) -> Image.Image:
    """The picture to draw on: the image itself, or a grey canvas when only its size ``(h, w)`` is known."""
    if image is None or (isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(v, int) for v in image)):
        h, w = region_map.pixel_labels().shape
        return Image.new("RGB", (w, h), (128, 128, 128))
    return _as_pil(image)


def _scores_np(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float32).detach().cpu()).reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"Expected {n} region scores, got shape {tuple(s.shape)}.")
    return s


def _edges(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask, ``width`` pixels thick, inside the mask."""
    inner = mask.copy()
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.2f}"
    return f"{v:.1e}"


# --------------------------------------------------------------------------- locations in words


_CACHE_LOCK = threading.Lock()  # guards the memo tables below; the app draws from several threads
_MAP_MEMOS: OrderedDict[int, tuple[RegionMap, dict]] = OrderedDict()  # id(region map) -> (map, memo)


def _lru(table: OrderedDict, key: Any, owners: tuple, make: Any, size: int) -> Any:
    """``table[key]``'s value if it was made for the same ``owners`` (by identity), else a new ``make()`` kept
    there; the ``size`` most recently used entries are kept. An entry holds its owners, so their ids are not
    reused while it lives."""
    with _CACHE_LOCK:
        entry = table.get(key)
        if entry is not None and len(entry[0]) == len(owners) and all(a is b for a, b in zip(entry[0], owners)):
            table.move_to_end(key)
            return entry[1]
    value = make()  # outside the lock: other threads keep drawing meanwhile
    with _CACHE_LOCK:
        table[key] = (owners, value)
        while len(table) > size:
            table.popitem(last=False)
    return value


def _map_memo(region_map: RegionMap) -> dict:
    """Memo table of one region map (the 16 most recent maps, by identity): its pixel labels, its regions' geometry."""
    return _lru(_MAP_MEMOS, id(region_map), (region_map,), dict, 16)


def _pixel_labels(region_map: RegionMap) -> np.ndarray:
    """``region_map.pixel_labels()``, memoised (treat as read-only)."""
    memo = _map_memo(region_map)
    labels = memo.get("labels")
    if labels is None:
        labels = memo["labels"] = region_map.pixel_labels()
    return labels


def _region_geometry(regions: PromptRegions, region_id: int) -> tuple[int, float, float, float]:
    """(image index, centre y fraction, centre x fraction, area fraction) of a global region.

    Memoised per region map, so that a live view naming the top regions of every frame does not recompute
    pixel label maps."""
    image_index, local = regions.region_owner(int(region_id))
    region_map = regions.maps[image_index]
    memo = _map_memo(region_map)
    if local not in memo:
        labels = _pixel_labels(region_map)
        ys, xs = np.nonzero(labels == local)
        if len(ys) == 0:
            memo[local] = (float("nan"), float("nan"), 0.0)
        else:
            h, w = labels.shape
            memo[local] = ((ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w, len(ys) / labels.size)
    return (image_index, *memo[local])


def describe_location(regions: PromptRegions, region_id: int) -> str:
    """Where a region is, in words a person reads: ``"top-left, 12% of the image"``.

    The region's pixel centre picks one of nine places (thirds of the image: ``top-left``, ``top``,
    ``top-right``, ``left``, ``centre``, ``right``, ``bottom-left``, ``bottom``, ``bottom-right``); the percentage is its share of the image's pixels. With several
    images the image is named first, counting from 1: ``"image 2, centre, 5%"``.
    """
    image_index, cy, cx, area = _region_geometry(regions, region_id)
    if math.isnan(cy):
        where = "no pixels"
    else:
        row = "top" if cy < 1 / 3 else ("bottom" if cy >= 2 / 3 else "")
        col = "left" if cx < 1 / 3 else ("right" if cx >= 2 / 3 else "")
        where = "-".join(p for p in (row, col) if p) or "centre"
    pct = area * 100
    share = "<1%" if 0 < pct < 1 else f"{pct:.0f}%"
    if len(regions.maps) > 1:
        return f"image {image_index + 1}, {where}, {share}"
    return f"{where}, {share} of the image"


def describe_regions(regions: PromptRegions, region_ids: Sequence[int]) -> str:
    """Plain-words locations of several regions, ``"#3 top-left, 12% of the image; #7 ..."``."""
    return "; ".join(f"#{int(rid)} {describe_location(regions, int(rid))}" for rid in region_ids)


# --------------------------------------------------------------------------- colour bar


def scale_ticks(vmin: float, vmax: float, n: int = 5) -> list[tuple[float, str]]:
    """The ``n`` evenly spaced (value, label) ticks a colour bar from ``vmin`` to ``vmax`` shows."""
    return [(float(t), _fmt(float(t))) for t in np.linspace(vmin, vmax, n)]


@functools.lru_cache(maxsize=32)
def _bar_base(width: int, height: int, label: str) -> Image.Image:
    """Everything of a colour bar but its tick values: the ramp, its frame, the tick marks and the units."""
    bar = Image.new("RGB", (width, height), "white")
    x0, x1, y0, y1 = 8, width - 8, 4, 16
    ramp = _colormap(np.linspace(0, 1, max(x1 - x0, 2)))[None].repeat(y1 - y0, 0)
    bar.paste(Image.fromarray(ramp.astype(np.uint8)), (x0, y0))
    draw = ImageDraw.Draw(bar)
    draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(80, 80, 80))
    font = _font(11)
    for i in range(_TICKS):
        x = x0 + (x1 - x0) * i / (_TICKS - 1)
        draw.line([(x, y1), (x, y1 + 3)], fill=(60, 60, 60))
    tw = draw.textlength(label, font=font)
    draw.text((max((width - tw) / 2, 2), y1 + 16), label, fill=(60, 60, 60), font=font)
    return bar


_TICKS = 5


def colour_bar(vmin: float, vmax: float, width: int, *, height: int = 44, label: str = SCORE_UNITS,
               clipped_low: bool = False) -> Image.Image:
    """A horizontal colour bar with tick values, ``vmin`` (left) to ``vmax`` (right), and its units.

    Only the tick values are drawn per call; the rest is cached per (width, height, label)."""
    if clipped_low:
        label = label + "; scores below 0 drawn as 0"
    bar = _bar_base(int(width), int(height), label).copy()
    x0, x1, y1 = 8, width - 8, 16
    draw = ImageDraw.Draw(bar)
    font = _font(11)
    ticks = scale_ticks(vmin, vmax, _TICKS)
    for i, (_, text) in enumerate(ticks):
        x = x0 + (x1 - x0) * i / (len(ticks) - 1)
        tw = draw.textlength(text, font=font)
        tx = min(max(x - tw / 2, 0), width - tw)
        draw.text((tx, y1 + 4), text, fill=(30, 30, 30), font=font)
    return bar


# --------------------------------------------------------------------------- the step overlay

_CACHE_SIZE = 4  # (regions, images) pairs whose fixed drawing parts are kept (see overlay_renderer)
_RENDERERS: OrderedDict[tuple, tuple] = OrderedDict()  # (id(regions), image keys) -> (owners, OverlayRenderer)
_PANELS: OrderedDict[tuple, tuple] = OrderedDict()  # (id(region map), image key) -> (owners, _Panel)
_GAP = 6  # pixels between panels


def _is_size(image: Any) -> bool:
    return isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(v, int) for v in image)


@functools.lru_cache(maxsize=64)
def _tag_patch(rank: int, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """A rank tag (black box, number in the rank's outline colour) as (RGB patch, mask of its pixels), drawn
    exactly as ``ImageDraw`` draws it at any integer position: box at (0, 0), text 2 px in."""
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    tw = probe.textlength(tag, font=font)
    w, h = int(math.ceil(tw)) + 8, 20
    patch, mask = Image.new("RGB", (w, h)), Image.new("L", (w, h))
    box = [0, 0, tw + 4, 14]
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    ImageDraw.Draw(mask).text((2, 0), tag, fill=255, font=font)  # (inside the box for digits)
    d = ImageDraw.Draw(patch)
    d.rectangle(box, fill=(0, 0, 0))
    d.text((2, 0), tag, fill=_OUTLINE[min(rank, len(_OUTLINE) - 1)], font=font)
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


class _Panel:
    """One image's fixed drawing parts: the (enlarged) original, its grey copy, the per-pixel region labels,
    and, per region on first use, its outline pixels and tag corner."""

    def __init__(self, image: Any, region_map: RegionMap, labels: np.ndarray | None = None) -> None:
        pil = _image_or_blank(image, region_map)
        labels = region_map.pixel_labels() if labels is None else labels
        if labels.shape != (pil.height, pil.width):
            raise ValueError(
                f"Region map is for a {labels.shape[1]}x{labels.shape[0]} image but got {pil.width}x{pil.height}; "
                "pass the original image the prompt was built from."
            )
        scale = max(1, int(math.ceil(_MIN_PANEL / max(pil.height, 1)))) if pil.height < _MIN_PANEL else 1
        if scale > 1:
            pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
            labels = labels.repeat(scale, 0).repeat(scale, 1)
        self.k = k = max(region_map.num_regions, 1)
        self.labels = labels
        self.width = max(2, scale)  # outline thickness
        self.base = np.asarray(pil, dtype=np.uint8)
        h, w = labels.shape
        self.shape = (h, w)
        # The heatmap's value at a pixel depends only on its region and its grey level, and the grey level
        # (the mean of R, G, B) only on R + G + B (0..765): colour the (region, R + G + B) pairs present
        # per frame and gather, instead of colouring every pixel.
        rgb = self.base.reshape(-1, 3)
        grey_sum = rgb[:, 0].astype(np.int64) + rgb[:, 1] + rgb[:, 2]
        key = (labels.reshape(-1).astype(np.int64) % k) * 766 + grey_sum  # % k: label -1 takes the last region's
        present = np.zeros(k * 766, dtype=bool)                            # colour, as indexing did before
        present[key] = True
        pairs = np.flatnonzero(present)
        lookup = np.zeros(k * 766, dtype=np.intp)
        lookup[pairs] = np.arange(len(pairs))
        self.pair_of_pixel = lookup[key]
        self.pair_region = pairs // 766
        pair_grey = _GREY_OF_SUM[pairs % 766]
        self.pair_grey22 = (0.22 * pair_grey)[:, None]
        self.pair_faint = (0.6 * (150 + 0.3 * pair_grey))[:, None]
        self._outlines: dict[int, tuple[np.ndarray, np.ndarray, tuple[int, int]] | None] = {}
        self._hatch: np.ndarray | None = None

    def outline(self, region: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
        """(flat edge pixels, flat halo pixels, top-left (x, y) of the region's top row), or None if empty."""
        if region not in self._outlines:
            ys, xs = np.nonzero(self.labels == region)
            if len(ys) == 0:
                self._outlines[region] = None
            else:
                y0, y1, x0, x1 = ys[0], ys[-1] + 1, int(xs.min()), int(xs.max()) + 1
                mask = self.labels[y0:y1, x0:x1] == region  # a crop: outside it the mask is False anyway
                edge = _edges(mask, self.width)
                halo = _edges(mask, self.width + 1) & ~edge
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

    def draw(self, s: np.ndarray, order: Sequence[int], vmin: float, vmax: float,
             hatch: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(original with the top regions outlined, heatmap over a grey copy) as (H, W, 3) uint8 arrays."""
        h, w = self.shape
        norm = np.clip((s - vmin) / max(vmax - vmin, 1e-12), 0, 1)
        colours = 0.78 * _colormap(norm)  # (K, 3): luminance from the grey copy keeps object shapes findable
        heat = colours[self.pair_region] + self.pair_grey22
        if hatch:  # weak or indirect evidence: paint it faintly, so it does not look like grounding
            heat = 0.4 * heat + self.pair_faint
        table = np.zeros((len(heat), 4), dtype=np.uint8)  # RGB + padding: one 4-byte word per pair, one gather
        table[:, :3] = heat.clip(0, 255).astype(np.uint8)
        heat = np.take(table.view(np.uint32).reshape(-1), self.pair_of_pixel).view(np.uint8).reshape(h, w, 4)[..., :3]
        left = self.base.copy()
        lf, hf = left.reshape(-1, 3), heat.reshape(h * w, 3)  # (views: heat is strided, reshape keeps it a view)
        tags = []
        for rank, region in enumerate(order):
            geometry = self.outline(int(region)) if region >= 0 else None
            if geometry is None:
                continue
            edge, halo, corner = geometry
            colour = _OUTLINE[min(rank, len(_OUTLINE) - 1)]
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


class OverlayRenderer:
    """Draws :func:`step_overlay` pictures of one ``(regions, images)`` pair, fast enough for live views.

    Everything that does not depend on the scores is prepared once: the enlarged originals, their grey copies,
    the per-pixel region labels, each region's outline pixels and tag position (on first use), the header and
    the colour bar's ramp and units. A picture then costs a table lookup per (region, grey level), a gather,
    a few hundred outline pixels and six short texts (a few ms at the toy's size). The output is the same,
    pixel for pixel, as drawing from scratch.

    :func:`step_overlay` keeps one per ``(regions, images)`` for you (:func:`overlay_renderer`); build one
    yourself to hold it explicitly. Images are read once: a renderer does not see later in-place edits.
    """

    def __init__(self, regions: PromptRegions, images: Sequence[Any]) -> None:
        if len(images) != len(regions.maps):
            raise ValueError(f"Got {len(images)} images for {len(regions.maps)} region maps.")
        self.regions = regions
        self.images = list(images)
        # panels are kept per (region map, image): a new PromptRegions over the same maps reuses them
        self.panels = [_panel(m, image) for image, m in zip(self.images, regions.maps)]
        self.offsets = regions.region_offsets()
        self.num_regions = regions.num_regions
        self.width = sum(2 * p.shape[1] for p in self.panels) + _GAP * (2 * len(self.panels) - 1)
        self.height = max(p.shape[0] for p in self.panels)
        self.bar_width = max(self.width, 320)
        self.canvas_width = max(self.width, self.bar_width)
        self._header: np.ndarray | None = None

    def prepare(self) -> "OverlayRenderer":
        """Compute now what is otherwise computed on first use: every region's outline and tag position and its
        location in words (:func:`describe_location`). Call it before decoding starts, so that no picture
        drawn during decoding pays for it. Returns ``self``."""
        for offset, panel in zip(self.offsets, self.panels):
            for local in range(panel.k):
                panel.outline(local)
                _region_geometry(self.regions, offset + local)
        return self

    def _header_strip(self) -> np.ndarray:
        """The white 18-px header, with "image n" over each image's panels when there are several."""
        if self._header is None:
            strip = Image.new("RGB", (self.canvas_width, 18), "white")
            if len(self.panels) > 1:
                draw = ImageDraw.Draw(strip)
                x = 0
                for i, panel in enumerate(self.panels):
                    draw.text((x + 2, 2), f"image {i + 1}", fill=(40, 40, 40), font=_font(12))
                    x += 2 * (panel.shape[1] + _GAP)
            self._header = np.asarray(strip)
        return self._header

    def render(self, scores: torch.Tensor | np.ndarray, *, top: int = 3, vmax: float | None = None,
               caption: str | None = None, evidence: str = "grounded", units: str = SCORE_UNITS) -> Image.Image:
        """The picture of one score vector; arguments as :func:`step_overlay`."""
        if evidence not in EVIDENCE_LEVELS:
            raise ValueError(f"evidence must be one of {EVIDENCE_LEVELS}, got {evidence!r}.")
        muted = evidence in ("weak", "indirect")
        s = _scores_np(scores, self.num_regions)
        hi = float(vmax) if vmax is not None else float(max(s.max(), 0.0))
        if not hi > 0:
            hi = 1e-6
        order_global = [int(r) for r in np.argsort(-s, kind="stable")[:max(int(top), 0)] if s[r] > 0] if top else []
        header = 18 if (caption or muted or len(self.panels) > 1) else 0
        bar = colour_bar(0.0, hi, self.bar_width, clipped_low=bool((s < 0).any()), label=units)
        canvas = np.full((header + self.height + bar.height, self.canvas_width, 3), 255, dtype=np.uint8)
        if header:
            canvas[:header] = self._header_strip()
        x = 0
        for offset, panel in zip(self.offsets, self.panels):
            local = s[offset:offset + panel.k]
            # keep global ranks for colours: ranks held by another image's regions become -1 (nothing drawn)
            ranked = [(r - offset) if offset <= r < offset + panel.k else -1 for r in order_global]
            h, w = panel.shape
            for tile in panel.draw(local, ranked, 0.0, hi, hatch=muted):
                canvas[header:header + h, x:x + w] = tile
                x += w + _GAP
        canvas[header + self.height:, :bar.width] = np.asarray(bar)
        picture = Image.fromarray(canvas)
        if caption or muted:
            draw = ImageDraw.Draw(picture)
            text = ((caption or "") + (f"  [{evidence} evidence]" if muted else "")).strip()
            draw.text((max(picture.width - draw.textlength(text, font=_font(12)) - 4, 2), 2), text,
                      fill=(150, 60, 0) if muted else (40, 40, 40), font=_font(12))
        return picture


def _image_key(image: Any) -> tuple:
    return ("size", tuple(image)) if _is_size(image) else ("id", id(image))


def _owners(*objects: Any) -> tuple:
    """What a cache entry must be the same objects as: a ``(h, w)`` size entry matches by value instead."""
    return tuple(o for o in objects if not _is_size(o))


def _panel(region_map: RegionMap, image: Any) -> _Panel:
    return _lru(_PANELS, (id(region_map), _image_key(image)), _owners(region_map, image),
                lambda: _Panel(image, region_map, _pixel_labels(region_map)), 2 * _CACHE_SIZE)


def overlay_renderer(regions: PromptRegions, images: Sequence[Any]) -> OverlayRenderer:
    """The :class:`OverlayRenderer` of ``(regions, images)``, built on first use and kept (the 4 most recent
    pairs, by object identity; a ``(h, w)`` size entry matches by value). Its per-image parts are kept per
    (region map, image), so a new ``PromptRegions`` over the same maps and images is ready at once.
    :func:`clear_cache` drops them all."""
    images = list(images)
    return _lru(_RENDERERS, (id(regions), tuple(_image_key(im) for im in images)), _owners(regions, *images),
                lambda: OverlayRenderer(regions, images), _CACHE_SIZE)


def clear_cache() -> None:
    """Forget every cached renderer and region geometry (after editing an image or regions in place)."""
    with _CACHE_LOCK:
        _RENDERERS.clear()
        _PANELS.clear()
        _MAP_MEMOS.clear()


def step_overlay(regions: PromptRegions, images: Sequence[Any], scores: torch.Tensor, *, top: int = 3,
                 vmax: float | None = None, caption: str | None = None, evidence: str = "grounded",
                 units: str = SCORE_UNITS) -> Image.Image:
    """The picture of one step's (or one token's) region scores.

    Per image, side by side: the original, colours untouched, with the ``top`` regions outlined and
    numbered (white = 1st, cyan = 2nd, magenta = 3rd); and a heatmap of every region's score over a
    grey copy. Below: a colour bar with values in the estimator's units. The scale runs from 0 to
    ``vmax`` (default: this step's largest score; pass one value to compare steps); scores at or
    below 0 (no support) get the darkest colour. ``evidence="weak"`` or ``"indirect"`` (see
    :func:`span_evidence`) hatches the heatmap and labels the picture "weak evidence" / "indirect evidence".
    ``units`` labels the colour bar (:func:`score_units` of the trace: "uncalibrated ..." without an
    estimator). ``images`` entries may be PIL images, arrays, or
    ``None`` / ``(h, w)`` when only the size is known (a grey canvas is drawn).

    The parts that do not depend on the scores are prepared once per ``(regions, images)`` objects and
    reused (:class:`OverlayRenderer`, :func:`overlay_renderer`): the first picture of a pair costs tens of
    ms, the next ones a few ms. Call :func:`clear_cache` after editing an image in place.
    """
    if len(images) != len(regions.maps):
        raise ValueError(f"Got {len(images)} images for {len(regions.maps)} region maps.")
    if evidence not in EVIDENCE_LEVELS:
        raise ValueError(f"evidence must be one of {EVIDENCE_LEVELS}, got {evidence!r}.")
    _scores_np(scores, regions.num_regions)  # refuse a wrong length before any preparation
    return overlay_renderer(regions, images).render(scores, top=top, vmax=vmax, caption=caption, evidence=evidence,
                                                    units=units)


# --------------------------------------------------------------------------- evidence strength


def span_evidence(span: SpanLike, trace: TraceLike) -> str:
    """How much a span's region scores can be trusted as visual evidence: grounded, weak, inherited or indirect.

    Rule (simple on purpose, so a reader can check it):

    * ``"inherited"``: answer spans whose scores include the thinking steps' (``span.inherited``:
      an estimator fit with inheritance). The image reaches the answer through the reasoning; the
      scores predict the answer's total effect, i.e. with the reasoning regenerated (docs/faithfulness.md).
    * ``"indirect"``: other answer spans. The answer follows from the thinking text, so an
      estimator without inheritance sees only the answer's own attention, which does not predict
      its effects (on the toy task Pearson 0.005 teacher-forced, below 0 against total effects).
      Its heatmap must not be read as grounding.
    * ``"weak"``: a thinking step whose largest predicted effect is not positive, or is below
      ``WEAK_FRACTION`` (0.25) of the median largest effect over the trace's thinking steps.
    * ``"grounded"``: every other thinking step.
    """
    if span.section == "answer":
        return "inherited" if getattr(span, "inherited", False) else "indirect"
    peak = float(torch.as_tensor(span.region_scores).max()) if torch.as_tensor(span.region_scores).numel() else 0.0
    if not peak > 0:
        return "weak"
    peaks = [float(s.region_scores.max()) for s in trace.spans
             if s.section != "answer" and s.sequence == span.sequence and s.region_scores.numel()]
    if peaks:
        ref = float(np.median(peaks))
        if ref > 0 and peak < WEAK_FRACTION * ref:
            return "weak"
    return "grounded"


# --------------------------------------------------------------------------- trajectory plot


def _pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, dims) PCA coordinates (zero-padded when fewer components exist) and explained ratios."""
    from sklearn.decomposition import PCA

    n = min(dims, x.shape[0], x.shape[1])
    out = np.zeros((x.shape[0], dims))
    ratios = np.zeros(dims)
    if n >= 1 and x.shape[0] >= 2 and np.ptp(x, axis=0).max() > 0:
        pca = PCA(n_components=n, svd_solver="full")
        out[:, :n] = pca.fit_transform(x)
        ratios[:n] = pca.explained_variance_ratio_
    return out, ratios


def _step_colour(i: int, n: int) -> tuple[int, int, int]:
    c = _colormap(np.array([0.15 + 0.7 * i / max(n - 1, 1)]))[0]
    return tuple(int(v) for v in c)


def trajectory_plot(trace: TraceLike, *, dims: int = 2, size: tuple[int, int] = (640, 300)) -> Image.Image:
    """The region-effect path over reasoning steps (paper fig. 7) and its concentration.

    Left: each step's region-score vector projected on its first ``dims`` (2 or 3) principal
    components (scikit-learn PCA over the trace's steps), joined in order and coloured from dark
    (first step) to light (last); answer spans are drawn hollow. Right: concentration of each step
    (:func:`hf_vattr.trajectory.concentration`, 1 = one region, 0 = spread evenly).
    """
    from ..trajectory import concentration

    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}.")
    w, h = size
    font = _font(11)
    spans = list(trace.spans)
    pw = int(w * 0.55)
    if not spans:
        canvas = _trajectory_titles(w, h, dims).copy()
        ImageDraw.Draw(canvas).text((10, h // 2), "no steps yet", fill=(120, 120, 120), font=font)
        return canvas
    canvas = _trajectory_frame(w, h, dims).copy()  # titles, boxes, axis ticks and legend: drawn once per size
    draw = ImageDraw.Draw(canvas)
    x = np.stack([np.asarray(s.region_scores, dtype=np.float64) for s in spans])
    coords, ratios = _pca(x, dims)
    if dims == 3:  # fixed oblique projection of the 3-D path
        az, el = math.radians(35), math.radians(25)
        rx = np.array([math.cos(az), -math.sin(az), 0.0])
        ry = np.array([math.sin(az) * math.sin(el), math.cos(az) * math.sin(el), -math.cos(el)])
        pts2 = np.stack([coords @ rx, coords @ ry], 1)
    else:
        pts2 = coords[:, :2] * np.array([1.0, -1.0])
    box = (30, 24, pw - 10, h - 44)
    inner = (box[0] + 18, box[1] + 14, box[2] - 22, box[3] - 14)  # margin so markers and labels stay inside
    lo, hi = pts2.min(0), pts2.max(0)
    span_xy = np.where(hi - lo > 0, hi - lo, 1.0)

    def to_px(p: np.ndarray) -> tuple[float, float]:
        u = np.clip((p - lo) / span_xy, -0.08, 1.08)
        return inner[0] + u[0] * (inner[2] - inner[0]), inner[1] + u[1] * (inner[3] - inner[1])

    if dims == 3:
        centre = pts2.mean(0)
        scale = float(np.abs(pts2 - centre).max() or 1.0) * 0.35
        for k, axis in enumerate(np.eye(3)):
            end = np.array([axis @ rx, axis @ ry]) * scale + centre
            draw.line([to_px(centre), to_px(end)], fill=(170, 170, 170), width=1)
            draw.text(to_px(end), f"PC{k + 1}", fill=(140, 140, 140), font=font)
    else:
        draw.text((box[0], box[3] + 2), f"x: PC1 ({ratios[0] * 100:.0f}% of variance), y: PC2 ({ratios[1] * 100:.0f}%)",
                  fill=(110, 110, 110), font=font)
    pix = [to_px(p) for p in pts2]
    n = len(spans)
    for i in range(n - 1):
        draw.line([pix[i], pix[i + 1]], fill=_step_colour(i, n), width=2)
    for i, (px, span) in enumerate(zip(pix, spans)):
        r = 5
        col = _step_colour(i, n)
        if span.section == "answer":
            draw.ellipse([px[0] - r, px[1] - r, px[0] + r, px[1] + r], outline=col, width=2, fill="white")
        else:
            draw.ellipse([px[0] - r, px[1] - r, px[0] + r, px[1] + r], fill=col, outline=(0, 0, 0))
        draw.text((px[0] + 6, px[1] - 6), str(span.index), fill=(40, 40, 40), font=font)
    # concentration over steps
    conc = []
    for s in spans:
        try:
            conc.append(concentration(np.asarray(s.region_scores, dtype=np.float64)))
        except ValueError:
            conc.append(float("nan"))
    cb = (pw + 34, 24, w - 10, h - 44)
    every = max(1, int(math.ceil(n / 12)))

    def cpx(i: int, v: float) -> tuple[float, float]:
        return (cb[0] + (i + 0.5) / n * (cb[2] - cb[0]), cb[3] - v * (cb[3] - cb[1]))

    for i in range(0, n, every):
        tick = str(spans[i].index)
        x = cb[0] + (i + 0.5) / n * (cb[2] - cb[0])
        draw.text((x - draw.textlength(tick, font=font) / 2, cb[3] + 2), tick, fill=(110, 110, 110), font=font)
    prev = None
    for i, (v, span) in enumerate(zip(conc, spans)):
        if math.isnan(v):
            prev = None
            continue
        p = cpx(i, v)
        if prev is not None:
            draw.line([prev, p], fill=(90, 90, 90), width=1)
        col = (120, 0, 160) if span_evidence(span, trace) == "grounded" else (175, 175, 175)
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        prev = p
    return canvas


@functools.lru_cache(maxsize=8)
def _trajectory_titles(w: int, h: int, dims: int) -> Image.Image:
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    pw = int(w * 0.55)
    draw.text((6, 4), f"reasoning path (PCA {dims}D of step region scores)", fill=(30, 30, 30), font=font)
    draw.text((pw + 10, 4), "concentration over steps (1 = one region)", fill=(30, 30, 30), font=font)
    return canvas


@functools.lru_cache(maxsize=8)
def _trajectory_frame(w: int, h: int, dims: int) -> Image.Image:
    """The trajectory plot's fixed furniture: titles, both boxes, the concentration axis and the legend."""
    canvas = _trajectory_titles(w, h, dims).copy()
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    pw = int(w * 0.55)
    draw.rectangle((30, 24, pw - 10, h - 44), outline=(200, 200, 200))
    cb = (pw + 34, 24, w - 10, h - 44)
    draw.rectangle(cb, outline=(200, 200, 200))
    for v in (0.0, 0.5, 1.0):
        y = cb[3] - v * (cb[3] - cb[1])
        draw.line([(cb[0] - 3, y), (cb[0], y)], fill=(120, 120, 120))
        draw.text((cb[0] - 26, y - 6), f"{v:.1f}", fill=(110, 110, 110), font=font)
    draw.text((cb[2] - 26, cb[3] + 14), "step", fill=(110, 110, 110), font=font)
    legend = "colour dark -> light: first -> last step; hollow: answer; grey dots: weak/indirect evidence"
    draw.text((6, h - 16), legend, fill=(110, 110, 110), font=font)
    return canvas


# --------------------------------------------------------------------------- legacy single-panel tint


def overlay(image: Any, region_map: RegionMap, scores: torch.Tensor | np.ndarray, *, alpha: float = 0.6,
            outline_top: int = 1, vmax: float | None = None) -> Image.Image:
    """One image tinted by region score (kept for callers of 0.1; prefer :func:`step_overlay`, which
    leaves the original's colours untouched)."""
    pil = _as_pil(image)
    labels = region_map.pixel_labels()
    if labels.shape != (pil.height, pil.width):
        raise ValueError(
            f"Region map is for a {labels.shape[1]}x{labels.shape[0]} image but got {pil.width}x{pil.height}; "
            "pass the original image the prompt was built from."
        )
    s = _scores_np(scores, region_map.num_regions)
    top = float(vmax) if vmax is not None else float(max(s.max(), 1e-12))
    norm = np.clip(s, 0, None) / top
    heat = _colormap(norm[labels])
    base = np.asarray(pil, dtype=np.float32)
    weight = (alpha * norm[labels])[..., None]
    mixed = base * (1 - weight) + heat * weight
    out = mixed.clip(0, 255).astype(np.uint8)
    for region in np.argsort(-s, kind="stable")[:outline_top]:
        out[_edges(labels == region)] = 255
    return Image.fromarray(out)


def span_overlays(regions: PromptRegions, images: Sequence[Any], scores: torch.Tensor, **kwargs: Any) -> Image.Image:
    """Alias of :func:`step_overlay` (the 0.1 name)."""
    return step_overlay(regions, images, scores, **kwargs)


# --------------------------------------------------------------------------- trace-level outputs


def _trace_images(trace: TraceLike, images: Sequence[Any] | None) -> list[Any]:
    if images is None:
        images = getattr(trace, "images", None)
    if trace.regions is None:
        raise ValueError("The trace has no regions yet (generation has not started).")
    if images is None:
        return [None] * len(trace.regions.maps)  # grey canvases of the right size
    return list(images)


def save_overlays(trace: TraceLike, images: Sequence[Any] | None = None, out_dir: str | Path = ".",
                  prefix: str = "step", top: int = 3) -> list[Path]:
    """Write one PNG per span (``step_000.png``, ...) with :func:`step_overlay`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _trace_images(trace, images)
    paths = []
    for span in trace.spans:
        path = out_dir / f"{prefix}_{span.index:03d}.png"
        evidence = span_evidence(span, trace)
        step_overlay(trace.regions, images, span.region_scores, top=top, evidence=evidence,
                     caption=f"{span.section} {span.index}", units=score_units(trace)).save(path)
        paths.append(path)
    return paths


_CSS = """
.vattr {{ font-family: system-ui, sans-serif; color: #222; }}
.vattr table {{ border-collapse: collapse; }}
.vattr td {{ border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: middle; text-align: left; }}
.vattr td.txt {{ font-family: ui-monospace, monospace; max-width: 30em; white-space: pre-wrap; }}
.vattr td.idx {{ color: #888; }}
.vattr td.sec.thinking {{ color: #7a4fb5; }} .vattr td.sec.answer {{ color: #1b7f3b; font-weight: bold; }}
.vattr img.ov {{ max-height: {h}px; image-rendering: pixelated; }}
.vattr .top {{ font-size: 0.85em; color: #555; }}
.vattr .ev {{ font-size: 0.8em; padding: 1px 6px; border-radius: 8px; white-space: nowrap; }}
.vattr .ev.grounded {{ background: #e3f4e6; color: #1b6b32; }}
.vattr .ev.weak, .vattr .ev.indirect {{ background: #eee; color: #777; }}
.vattr tr.weak img.ov, .vattr tr.indirect img.ov {{ outline: 2px dashed #bbb; }}
.vattr tr.weak td.txt, .vattr tr.indirect td.txt {{ color: #777; }}
.vattr .uncal {{ background: #fff4e0; color: #8a4b00; padding: 4px 8px; border-left: 3px solid #e08a00; }}
"""

_EVIDENCE_NOTE = {
    "grounded": "predicted effects are large for this trace; the outlined regions are what the step relies on",
    "weak": "largest predicted effect is small compared with this trace's other steps; little visual evidence",
    "indirect": "answer span: it follows from the thinking text, and this estimator scores it by its own attention "
                "only, which does not predict its effects (see docs/faithfulness.md)",
    "inherited": "answer span: its scores inherit the thinking steps' (the image reaches the answer through the "
                 "reasoning); they predict the answer's total effect (see docs/faithfulness.md)",
}


def span_row_html(span: SpanLike, trace: TraceLike, images: Sequence[Any] | None = None, *,
                  top_k: int = 3) -> str:
    """One ``<tr>`` of the step table: index, section, text, evidence label, overlay, top regions in words.
    Rendered once per finished step (the live notebook view caches it)."""
    images = _trace_images(trace, images)
    evidence = span_evidence(span, trace)
    top = [r for r in span.top_regions(top_k) if float(span.region_scores[r]) > 0]
    units = score_units(trace)
    picture = step_overlay(trace.regions, images, span.region_scores, top=top_k, evidence=evidence, units=units)
    where = "<br>".join(
        f"{i + 1}. {html.escape(describe_location(trace.regions, r))} "
        f"(<span title='{html.escape(units)}'>{_fmt(float(span.region_scores[r]))}</span>)"
        for i, r in enumerate(top)) or "no region with positive predicted effect"
    label = "weak evidence" if evidence == "weak" else evidence
    return (f"<tr class='{evidence}'><td class='idx'>{span.index}</td>"
            f"<td class='sec {html.escape(span.section)}'>{html.escape(span.section)}</td>"
            f"<td class='txt'>{html.escape(span.text.strip())}</td>"
            f"<td><span class='ev {evidence}' title='{html.escape(_EVIDENCE_NOTE[evidence])}'>{label}</span></td>"
            f"<td><img class='ov' src='{_png_data_uri(picture)}' alt='step {span.index} overlay'></td>"
            f"<td class='top'>{where}</td></tr>")


def uncalibrated_banner_html() -> str:
    """The line shown above every table or report of a trace scored without an estimator."""
    return (f"<p class='uncal' data-calibrated='false'><b>{html.escape(UNCALIBRATED_NOTE.split(':')[0])}</b>:"
            f"{html.escape(UNCALIBRATED_NOTE.split(':', 1)[1])}. Load an estimator for predicted effects.</p>")


def table_html(rows: Sequence[str], *, max_height: int = 300, calibrated: bool = True) -> str:
    """Wrap step rows (:func:`span_row_html`) in the table with its header and CSS; ``calibrated=False`` adds
    the "uncalibrated" banner and column label (a trace without an estimator)."""
    body = "".join(rows) or "<tr><td colspan='6'>no finished steps yet</td></tr>"
    banner, score = ("", "score") if calibrated else (uncalibrated_banner_html(), "uncalibrated score")
    return (f"<div class='vattr'><style>{_CSS.format(h=max_height)}</style>{banner}"
            "<table><tr><th>#</th><th>section</th><th>step</th><th>evidence</th><th>attribution</th>"
            f"<th>top regions ({score})</th></tr>{body}</table></div>")


def trace_table_html(trace: TraceLike, images: Sequence[Any] | None = None, *, top_k: int = 3,
                     max_height: int = 300) -> str:
    """The step table as an HTML fragment (inline CSS, PNGs as data URIs): one row per span with its
    text, evidence label, overlay and top regions in words. Used by the report and by Jupyter."""
    rows = []
    if trace.regions is not None:
        rows = [span_row_html(span, trace, images, top_k=top_k) for span in trace.spans]
    return table_html(rows, max_height=max_height, calibrated=getattr(trace, "calibrated", True))


def render_html(trace: TraceLike, images: Sequence[Any] | None = None, path: str | Path | None = None, *,
                title: str = "hf_vattr report", question: str | None = None, top_k: int = 3) -> str:
    """A self-contained HTML page (images inlined): the prompt image(s), how to read the pictures,
    the step table (:func:`trace_table_html`) and the trajectory plot. ``images`` default to
    ``trace.images``."""
    imgs = _trace_images(trace, images) if trace.regions is not None else list(images or trace.images or [])
    originals = "".join(f"<img src='{_png_data_uri(_as_pil(im))}' alt='input image {i + 1}' "
                        "style='max-height:220px;margin-right:6px'>"
                        for i, im in enumerate(imgs) if im is not None and not isinstance(im, tuple))
    trajectory = ""
    if trace.spans:
        trajectory = (f"<h2>Trajectory</h2><p><img src='{_png_data_uri(trajectory_plot(trace))}' "
                      "alt='reasoning path and concentration'></p>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ margin: 2em; }}</style></head><body class="vattr" style="font-family: system-ui, sans-serif">
<h1>{html.escape(title)}</h1>
{f"<p><b>Question:</b> {html.escape(question)}</p>" if question else ""}
<p>{originals}</p>
{"" if getattr(trace, "calibrated", True) else uncalibrated_banner_html()}
<p>How to read: for each reasoning step, the left picture is the original image with the regions the
estimator scores highest outlined and numbered (white 1, cyan 2, magenta 3); the right picture colours
every region by its score, the {html.escape(score_units(trace))}, on the scale drawn below it (dark = no effect).
Steps marked <i>weak evidence</i> (small predicted effects) or <i>indirect</i> (answer spans scored by their
own attention, which does not predict their effects) are greyed out: do not read their heatmaps as grounding.
Answers marked <i>inherited</i> take their scores from the thinking steps before them, the path by which
the image reaches the answer.</p>
{trace_table_html(trace, imgs if trace.regions is not None else None, top_k=top_k)}
{trajectory}
</body></html>
"""
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
