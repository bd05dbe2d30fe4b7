"""The trajectory plot: the reasoning path of a trace's steps through region-score space (PCA), and each
step's concentration. Only Pillow, NumPy and scikit-learn (PCA, imported when a plot is drawn)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .colours import colormap
from .evidence import span_evidence
from .images import font
from .protocols import SpanLike, TraceLike
from .scores import step_concentrations

__all__ = ["trajectory_plot", "pca_coordinates"]

_GREY = (110, 110, 110)
_BOX_MARGIN = 44  # below both boxes: axis text, ticks and the legend


def pca_coordinates(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
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
    c = colormap(np.array([0.15 + 0.7 * i / max(n - 1, 1)]))[0]
    return tuple(int(v) for v in c)


def _oblique_axes() -> tuple[np.ndarray, np.ndarray]:
    """The fixed oblique projection of a 3-D path onto the page: the page's x and y axes in PCA space."""
    az, el = math.radians(35), math.radians(25)
    rx = np.array([math.cos(az), -math.sin(az), 0.0])
    ry = np.array([math.sin(az) * math.sin(el), math.cos(az) * math.sin(el), -math.cos(el)])
    return rx, ry


class _PathBox:
    """The left box: the page position of a point of the projected path (the path fills the box's inside)."""

    def __init__(self, points: np.ndarray, w: int, h: int) -> None:
        pw = int(w * 0.55)
        self.box = (30, 24, pw - 10, h - _BOX_MARGIN)
        box = self.box
        self.inner = (box[0] + 18, box[1] + 14, box[2] - 22, box[3] - 14)  # markers and labels stay inside
        self.lo, hi = points.min(0), points.max(0)
        self.extent = np.where(hi - self.lo > 0, hi - self.lo, 1.0)

    def __call__(self, p: np.ndarray) -> tuple[float, float]:
        u = np.clip((p - self.lo) / self.extent, -0.08, 1.08)
        inner = self.inner
        return inner[0] + u[0] * (inner[2] - inner[0]), inner[1] + u[1] * (inner[3] - inner[1])


def _draw_axes(draw: ImageDraw.ImageDraw, to_px: _PathBox, points: np.ndarray, ratios: np.ndarray,
               dims: int) -> None:
    """3-D: the three PC axes from the path's centre; 2-D: which PC each page axis is, with its variance."""
    small = font(11)
    if dims == 3:
        rx, ry = _oblique_axes()
        centre = points.mean(0)
        scale = float(np.abs(points - centre).max() or 1.0) * 0.35
        for k, axis in enumerate(np.eye(3)):
            end = np.array([axis @ rx, axis @ ry]) * scale + centre
            draw.line([to_px(centre), to_px(end)], fill=(170, 170, 170), width=1)
            draw.text(to_px(end), f"PC{k + 1}", fill=(140, 140, 140), font=small)
    else:
        box = to_px.box
        draw.text((box[0], box[3] + 2), f"x: PC1 ({ratios[0] * 100:.0f}% of variance), y: PC2 ({ratios[1] * 100:.0f}%)",
                  fill=_GREY, font=small)


def _draw_path(draw: ImageDraw.ImageDraw, pix: list[tuple[float, float]], spans: Sequence[SpanLike]) -> None:
    """The steps joined in order, dark (first) to light (last); answers hollow; each numbered."""
    small = font(11)
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
        draw.text((px[0] + 6, px[1] - 6), str(span.index), fill=(40, 40, 40), font=small)


def _draw_concentration(draw: ImageDraw.ImageDraw, w: int, h: int, trace: TraceLike,
                        spans: Sequence[SpanLike]) -> None:
    """The right box: each step's concentration over its index, grounded steps purple, the others grey."""
    small = font(11)
    n = len(spans)
    conc = step_concentrations(spans)
    cb = (int(w * 0.55) + 34, 24, w - 10, h - _BOX_MARGIN)
    every = max(1, int(math.ceil(n / 12)))

    def cpx(i: int, v: float) -> tuple[float, float]:
        return (cb[0] + (i + 0.5) / n * (cb[2] - cb[0]), cb[3] - v * (cb[3] - cb[1]))

    for i in range(0, n, every):
        tick = str(spans[i].index)
        x = cb[0] + (i + 0.5) / n * (cb[2] - cb[0])
        draw.text((x - draw.textlength(tick, font=small) / 2, cb[3] + 2), tick, fill=_GREY, font=small)
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


def trajectory_plot(trace: TraceLike, *, dims: int = 2, size: tuple[int, int] = (640, 300)) -> Image.Image:
    """The region-effect path over reasoning steps (paper fig. 7) and its concentration.

    Left: each step's region-score vector projected on its first ``dims`` (2 or 3) principal
    components (scikit-learn PCA over the trace's steps), joined in order and coloured from dark
    (first step) to light (last); answer spans are drawn hollow. Right: concentration of each step
    (:func:`hf_vattr.trajectory.concentration`, 1 = one region, 0 = spread evenly).
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}.")
    w, h = size
    spans = list(trace.spans)
    if not spans:
        canvas = _trajectory_titles(w, h, dims).copy()
        ImageDraw.Draw(canvas).text((10, h // 2), "no steps yet", fill=(120, 120, 120), font=font(11))
        return canvas
    canvas = _trajectory_frame(w, h, dims).copy()  # titles, boxes, axis ticks and legend: drawn once per size
    draw = ImageDraw.Draw(canvas)
    coords, ratios = pca_coordinates(np.stack([np.asarray(s.region_scores, dtype=np.float64) for s in spans]), dims)
    if dims == 3:
        rx, ry = _oblique_axes()
        points = np.stack([coords @ rx, coords @ ry], 1)
    else:
        points = coords[:, :2] * np.array([1.0, -1.0])
    to_px = _PathBox(points, w, h)
    _draw_axes(draw, to_px, points, ratios, dims)
    _draw_path(draw, [to_px(p) for p in points], spans)
    _draw_concentration(draw, w, h, trace, spans)
    return canvas


@functools.lru_cache(maxsize=8)
def _trajectory_titles(w: int, h: int, dims: int) -> Image.Image:
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    small = font(11)
    pw = int(w * 0.55)
    draw.text((6, 4), f"reasoning path (PCA {dims}D of step region scores)", fill=(30, 30, 30), font=small)
    draw.text((pw + 10, 4), "concentration over steps (1 = one region)", fill=(30, 30, 30), font=small)
    return canvas


@functools.lru_cache(maxsize=8)
def _trajectory_frame(w: int, h: int, dims: int) -> Image.Image:
    """The trajectory plot's fixed furniture: titles, both boxes, the concentration axis and the legend."""
    canvas = _trajectory_titles(w, h, dims).copy()
    draw = ImageDraw.Draw(canvas)
    small = font(11)
    pw = int(w * 0.55)
    draw.rectangle((30, 24, pw - 10, h - _BOX_MARGIN), outline=(200, 200, 200))
    cb = (pw + 34, 24, w - 10, h - _BOX_MARGIN)
    draw.rectangle(cb, outline=(200, 200, 200))
    for v in (0.0, 0.5, 1.0):
        y = cb[3] - v * (cb[3] - cb[1])
        draw.line([(cb[0] - 3, y), (cb[0], y)], fill=(120, 120, 120))
        draw.text((cb[0] - 26, y - 6), f"{v:.1f}", fill=_GREY, font=small)
    draw.text((cb[2] - 26, cb[3] + 14), "step", fill=_GREY, font=small)
    legend = "colour dark -> light: first -> last step; hollow: answer; grey dots: weak/indirect evidence"
    draw.text((6, h - 16), legend, fill=_GREY, font=small)
    return canvas
