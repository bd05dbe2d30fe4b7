"""Where a region is, in words a person reads ("top-left, 12% of the image"), from its pixels.

The region's pixels come from ``RegionMap.pixel_labels()`` (the exact token -> pixel geometry), memoised per
region map so that a live view naming the top regions of every frame does not recompute them.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from ..regions import PromptRegions, RegionMap
from .identity import Identity

__all__ = ["describe_location", "describe_regions", "pixel_labels", "region_geometry", "clear_geometry"]


class _MapGeometry:
    """One region map's pixel labels and, per region on first use, its centre and area."""

    def __init__(self, region_map: RegionMap) -> None:
        self.labels = region_map.pixel_labels()
        self.regions: dict[int, tuple[float, float, float]] = {}

    def region(self, local: int) -> tuple[float, float, float]:
        """(centre y fraction, centre x fraction, area fraction) of a local region; nan centre if it has no pixel."""
        if local not in self.regions:
            ys, xs = np.nonzero(self.labels == local)
            if len(ys) == 0:
                self.regions[local] = (float("nan"), float("nan"), 0.0)
            else:
                h, w = self.labels.shape
                self.regions[local] = ((ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w, len(ys) / self.labels.size)
        return self.regions[local]


@functools.lru_cache(maxsize=16)
def _geometry(key: Identity) -> _MapGeometry:
    """The geometry of the 16 most recently used region maps, by identity."""
    return _MapGeometry(key.obj)


def pixel_labels(region_map: RegionMap) -> np.ndarray:
    """``region_map.pixel_labels()``, memoised per region map (treat as read-only)."""
    return _geometry(Identity(region_map)).labels


def region_geometry(regions: PromptRegions, region_id: int) -> tuple[int, float, float, float]:
    """(image index, centre y fraction, centre x fraction, area fraction) of a global region."""
    image_index, local = regions.region_owner(int(region_id))
    return (image_index, *_geometry(Identity(regions.maps[image_index])).region(local))


def clear_geometry() -> None:
    """Forget every memoised region map (after editing one in place)."""
    _geometry.cache_clear()


def describe_location(regions: PromptRegions, region_id: int) -> str:
    """Where a region is, in words a person reads: ``"top-left, 12% of the image"``.

    The region's pixel centre picks one of nine places (thirds of the image: ``top-left``, ``top``,
    ``top-right``, ``left``, ``centre``, ``right``, ``bottom-left``, ``bottom``, ``bottom-right``); the
    percentage is its share of the image's pixels. With several images the image is named first, counting
    from 1: ``"image 2, centre, 5%"``.
    """
    image_index, cy, cx, area = region_geometry(regions, region_id)
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
