"""Colours: the sequential ramp that encodes scores, the outline colour of each rank, and the colour bar
that reads the ramp back in the scores' units."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from .images import font
from .scores import SCORE_UNITS, format_score

__all__ = ["colormap", "RANK_COLOURS", "rank_colour", "rank_colour_hex", "scale_ticks", "colour_bar", "TICKS"]

# "inferno"-like sequential ramp: black -> purple -> red -> orange -> pale yellow
_HOT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
#: Outline colours of the top regions, rank 1, 2, 3+ (white, cyan, magenta): none is a toy object colour.
RANK_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (0, 200, 255), (255, 0, 255))
#: Ticks on a colour bar.
TICKS = 5


def colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values to RGB (float) along a perceptually ordered dark-purple-red-yellow ramp."""
    v = np.clip(values, 0, 1) * (len(_HOT) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_HOT) - 2)
    frac = (v - lo)[..., None]
    return _HOT[lo] * (1 - frac) + _HOT[lo + 1] * frac


def rank_colour(rank: int) -> tuple[int, int, int]:
    """The outline colour of the region ranked ``rank`` (0 = highest score)."""
    return RANK_COLOURS[min(rank, len(RANK_COLOURS) - 1)]


def rank_colour_hex(rank: int) -> str:
    """:func:`rank_colour` as a CSS colour (``"#00c8ff"``), for legends drawn in HTML."""
    return "#{:02x}{:02x}{:02x}".format(*rank_colour(rank))


def scale_ticks(vmin: float, vmax: float, n: int = TICKS) -> list[tuple[float, str]]:
    """The ``n`` evenly spaced (value, label) ticks a colour bar from ``vmin`` to ``vmax`` shows."""
    return [(float(t), format_score(float(t))) for t in np.linspace(vmin, vmax, n)]


@functools.lru_cache(maxsize=32)
def _bar_base(width: int, height: int, label: str) -> Image.Image:
    """Everything of a colour bar but its tick values: the ramp, its frame, the tick marks and the units."""
    bar = Image.new("RGB", (width, height), "white")
    x0, x1, y0, y1 = 8, width - 8, 4, 16
    ramp = colormap(np.linspace(0, 1, max(x1 - x0, 2)))[None].repeat(y1 - y0, 0)
    bar.paste(Image.fromarray(ramp.astype(np.uint8)), (x0, y0))
    draw = ImageDraw.Draw(bar)
    draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(80, 80, 80))
    small = font(11)
    for i in range(TICKS):
        x = x0 + (x1 - x0) * i / (TICKS - 1)
        draw.line([(x, y1), (x, y1 + 3)], fill=(60, 60, 60))
    tw = draw.textlength(label, font=small)
    draw.text((max((width - tw) / 2, 2), y1 + 16), label, fill=(60, 60, 60), font=small)
    return bar


def colour_bar(vmin: float, vmax: float, width: int, *, height: int = 44, label: str = SCORE_UNITS,
               clipped_low: bool = False) -> Image.Image:
    """A horizontal colour bar with tick values, ``vmin`` (left) to ``vmax`` (right), and its units.

    Only the tick values are drawn per call; the rest is cached per (width, height, label)."""
    if clipped_low:
        label = label + "; scores below 0 drawn as 0"
    bar = _bar_base(int(width), int(height), label).copy()
    x0, x1, y1 = 8, width - 8, 16
    draw = ImageDraw.Draw(bar)
    small = font(11)
    ticks = scale_ticks(vmin, vmax, TICKS)
    for i, (_, text) in enumerate(ticks):
        x = x0 + (x1 - x0) * i / (len(ticks) - 1)
        tw = draw.textlength(text, font=small)
        tx = min(max(x - tw / 2, 0), width - tw)
        draw.text((tx, y1 + 4), text, fill=(30, 30, 30), font=small)
    return bar
