"""Where (and, in a video, when) a region is, in words a person reads ("top-left, 12% of the image";
"0.0-1.0 s, top-left, 4% of the frame"), from its pixels.

The region's pixels come from ``RegionMap.pixel_labels(group)`` (the exact token -> pixel geometry, per frame
group of a video), memoised per region map so that a live view naming the top regions of every frame does
not recompute them.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from ..regions import PromptRegions, RegionMap
from .identity import Identity

__all__ = ["describe_location", "describe_regions", "format_seconds", "pixel_labels", "region_geometry",
           "clear_geometry"]


class _MapGeometry:
    """One region map's pixel labels (per frame group of a video, on first use) and, per region on first use, its
    centre and area."""

    def __init__(self, region_map: RegionMap) -> None:
        self.region_map = region_map
        self.labels = region_map.pixel_labels()
        self.group_labels: dict[int, np.ndarray] = {0: self.labels}
        self.regions: dict[int, tuple[float, float, float]] = {}

    def labels_of(self, group: int) -> np.ndarray:
        """The per-pixel region labels of one frame group (group 0: an image's only one)."""
        if group not in self.group_labels:
            self.group_labels[group] = self.region_map.pixel_labels(group)
        return self.group_labels[group]

    def region(self, local: int) -> tuple[float, float, float]:
        """(centre y fraction, centre x fraction, area fraction) of a local region; nan centre if it has no pixel.

        For a video: the centre of its pixels over every frame group it covers, and its mean area per such group
        as a share of one frame."""
        if local not in self.regions and self.region_map.image.is_video:
            self.regions[local] = self._video_region(local)
        if local not in self.regions:
            ys, xs = np.nonzero(self.labels == local)
            if len(ys) == 0:
                self.regions[local] = (float("nan"), float("nan"), 0.0)
            else:
                h, w = self.labels.shape
                self.regions[local] = ((ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w, len(ys) / self.labels.size)
        return self.regions[local]

    def _video_region(self, local: int) -> tuple[float, float, float]:
        groups = self.region_map.region_groups(local)
        count, y_sum, x_sum = 0, 0.0, 0.0
        for group in groups:
            ys, xs = np.nonzero(self.labels_of(group) == local)
            count, y_sum, x_sum = count + len(ys), y_sum + float(ys.sum()), x_sum + float(xs.sum())
        if count == 0:
            return float("nan"), float("nan"), 0.0
        h, w = self.labels.shape
        return (y_sum / count + 0.5) / h, (x_sum / count + 0.5) / w, count / (len(groups) * self.labels.size)


@functools.lru_cache(maxsize=16)
def _geometry(key: Identity) -> _MapGeometry:
    """The geometry of the 16 most recently used region maps, by identity."""
    return _MapGeometry(key.obj)


def pixel_labels(region_map: RegionMap, group: int = 0) -> np.ndarray:
    """``region_map.pixel_labels(group)``, memoised per region map and frame group (treat as read-only)."""
    return _geometry(Identity(region_map)).labels_of(int(group))


def region_geometry(regions: PromptRegions, region_id: int) -> tuple[int, float, float, float]:
    """(image index, centre y fraction, centre x fraction, area fraction) of a global region."""
    image_index, local = regions.region_owner(int(region_id))
    return (image_index, *_geometry(Identity(regions.maps[image_index])).region(local))


def clear_geometry() -> None:
    """Forget every memoised region map (after editing one in place)."""
    _geometry.cache_clear()


def _place(cy: float, cx: float) -> str:
    """One of nine places by thirds of the picture, or "no pixels"."""
    if math.isnan(cy):
        return "no pixels"
    row = "top" if cy < 1 / 3 else ("bottom" if cy >= 2 / 3 else "")
    col = "left" if cx < 1 / 3 else ("right" if cx >= 2 / 3 else "")
    return "-".join(p for p in (row, col) if p) or "centre"


def _share(area: float) -> str:
    pct = area * 100
    return "<1%" if 0 < pct < 1 else f"{pct:.0f}%"


def format_seconds(span: tuple[float, float]) -> str:
    """A time span as the views write it: ``"0.0-1.0 s"``."""
    return f"{span[0]:.1f}-{span[1]:.1f} s"


def describe_location(regions: PromptRegions, region_id: int) -> str:
    """Where a region is, in words a person reads: ``"top-left, 12% of the image"``.

    The region's pixel centre picks one of nine places (thirds of the image: ``top-left``, ``top``,
    ``top-right``, ``left``, ``centre``, ``right``, ``bottom-left``, ``bottom``, ``bottom-right``); the
    percentage is its share of the image's pixels. With several images the image is named first, counting
    from 1: ``"image 2, centre, 5%"``.

    A video's region says when first, then where: ``"0.0-1.0 s, top-left, 4% of the frame"``: the seconds
    of the frame groups it covers (from the first to the end of the last), the place of its pixel centre
    over those groups, and its mean area per group as a share of one frame. With several items the item is
    named first, counting images and videos apart: ``"video 1, 0.0-1.0 s, top-left, 4%"``.
    """
    image_index, cy, cx, area = region_geometry(regions, region_id)
    where, share = _place(cy, cx), _share(area)
    item = regions.maps[image_index].image
    if item.is_video:
        span = regions.maps[image_index].region_time_span(regions.region_owner(int(region_id))[1])
        when = "no frames" if span is None else format_seconds(span)
        if len(regions.maps) > 1:
            return f"video {item.kind_index + 1}, {when}, {where}, {share}"
        return f"{when}, {where}, {share} of the frame"
    if len(regions.maps) > 1:  # counted among the images when a video is beside them
        mixed = any(m.image.is_video for m in regions.maps)
        return f"image {(item.kind_index if mixed else image_index) + 1}, {where}, {share}"
    return f"{where}, {share} of the image"


def describe_regions(regions: PromptRegions, region_ids: Sequence[int]) -> str:
    """Plain-words locations of several regions, ``"#3 top-left, 12% of the image; #7 ..."``."""
    return "; ".join(f"#{int(rid)} {describe_location(regions, int(rid))}" for rid in region_ids)
