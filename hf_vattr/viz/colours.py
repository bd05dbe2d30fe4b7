"""Colours: the sequential ramp that encodes scores, the outline colour of each rank, and the colour bar
that reads the ramp back in the scores' units."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from .images import font
from .scores import SCORE_UNITS, format_score

__all__ = ["colormap", "RANK_COLOURS", "rank_colour", "rank_colour_hex", "scale_ticks", "colour_bar", "bar_layout",
           "TICKS"]

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


_BAR_X0, _BAR_Y0, _BAR_Y1 = 8, 4, 16  # the ramp: left margin, top and bottom rows
_TICK_LENGTH = 3  # tick marks below the ramp
_TEXT_GAP = 4  # blank rows between the tick marks, the tick values, each caption line and the bottom edge


def _text_rows(text: str) -> tuple[int, int]:
    """(top, bottom) rows, end-exclusive, that ``text`` inks when drawn at y = 0 with the bar's font."""
    _, top, _, bottom = font(11).getbbox(text)
    return int(top), int(bottom)


def _wrap(label: str, width: int) -> list[str]:
    """``label`` in lines that fit ``width`` pixels of the bar's font, broken at spaces (a longer word stands alone)."""
    small, lines = font(11), []
    for word in label.split(" "):
        if lines and small.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


@functools.lru_cache(maxsize=32)
def bar_layout(width: int, label: str) -> tuple[int, int, tuple[tuple[str, int], ...]]:
    """Where a colour bar of ``width`` pixels puts its text: ``(y of the tick values, height of the bar,
    [(caption line, its y)])``.

    Measured from the font's ink, so nothing touches: the tick values start ``_TEXT_GAP`` rows below the tick
    marks, the caption ``_TEXT_GAP`` rows below the lowest ink any tick value can have (digits, sign, point,
    exponent), each further caption line as far below the previous one, and the bar ends ``_TEXT_GAP`` rows
    below the caption's descenders. A caption wider than the bar is wrapped at spaces.
    """
    ink_top, ink_bottom = _text_rows("0123456789.-+e")
    tick_y = _BAR_Y1 + _TICK_LENGTH + _TEXT_GAP - ink_top
    below = tick_y + ink_bottom + _TEXT_GAP
    lines = []
    for line in _wrap(label, width - 4):
        top, bottom = _text_rows(line) if line.strip() else (0, 0)
        lines.append((line, below - top))
        below += bottom - top + _TEXT_GAP
    return tick_y, below, tuple(lines)


@functools.lru_cache(maxsize=32)
def _bar_base(width: int, height: int, label: str) -> Image.Image:
    """Everything of a colour bar but its tick values: the ramp, its frame, the tick marks and the units."""
    lines = bar_layout(width, label)[2]
    bar = Image.new("RGB", (width, height), "white")
    x0, x1, y0, y1 = _BAR_X0, width - _BAR_X0, _BAR_Y0, _BAR_Y1
    ramp = colormap(np.linspace(0, 1, max(x1 - x0, 2)))[None].repeat(y1 - y0, 0)
    bar.paste(Image.fromarray(ramp.astype(np.uint8)), (x0, y0))
    draw = ImageDraw.Draw(bar)
    draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(80, 80, 80))
    small = font(11)
    for i in range(TICKS):
        x = x0 + (x1 - x0) * i / (TICKS - 1)
        draw.line([(x, y1), (x, y1 + _TICK_LENGTH)], fill=(60, 60, 60))
    for line, y in lines:
        tw = draw.textlength(line, font=small)
        draw.text((max((width - tw) / 2, 2), y), line, fill=(60, 60, 60), font=small)
    return bar


def colour_bar(vmin: float, vmax: float, width: int, *, height: int | None = None, label: str = SCORE_UNITS,
               clipped_low: bool = False) -> Image.Image:
    """A horizontal colour bar with tick values, ``vmin`` (left) to ``vmax`` (right), and its units below them.

    Its height follows from the text (:func:`bar_layout`): the tick values and each line of the caption on
    rows of their own (``height``, when given, is a minimum). Only the tick values are drawn per call; the rest
    is cached per (width, height, label)."""
    if clipped_low:
        label = label + "; scores below 0 drawn as 0"
    width = int(width)
    bar = _bar_base(width, max(int(height or 0), bar_layout(width, label)[1]), label).copy()
    tick_y = bar_layout(width, label)[0]
    x0, x1 = _BAR_X0, width - _BAR_X0
    draw = ImageDraw.Draw(bar)
    small = font(11)
    ticks = scale_ticks(vmin, vmax, TICKS)
    for i, (_, text) in enumerate(ticks):
        x = x0 + (x1 - x0) * i / (len(ticks) - 1)
        tw = draw.textlength(text, font=small)
        tx = min(max(x - tw / 2, 0), width - tw)
        draw.text((tx, tick_y), text, fill=(30, 30, 30), font=small)
    return bar
