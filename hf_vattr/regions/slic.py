"""SLIC superpixels, snapped to the VLM token grid.

Why snap instead of keeping pixel-exact superpixels: attribution and
ablation act on visual tokens, so a region must be a set of tokens. We run
SLIC on the image resized so that every token is an exact ``f x f`` pixel
block (same geometry as the VLM's own resize, see :mod:`.features`), give each
token the superpixel covering most of its block, then repair the result to
meet the region guarantees: pieces that fell apart on the token grid become
their own regions, and the smallest regions are merged into their most
similar (Lab colour) neighbour until exactly K remain. SLIC only
approximates its segment count, so when it returns too few we retry with more
segments; if it still cannot reach K (tiny or flat images) the map has fewer
regions and says so in ``info``.

SLIC and the Lab conversion come from scikit-image (a dependency of hf_vattr).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..layouts import ImageTokens
from .features import VideoNotSupportedError, resize_to_token_grid
from .map import RegionMap
from .partition import merge_to_k, split_components
from .policy import KPolicy, resolve_k
from .ward import _hard_map

__all__ = ["slic_regions", "require_skimage"]


def require_skimage() -> Any:
    """Import ``skimage.segmentation`` or explain how to get it."""
    try:
        from skimage import segmentation
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "method='slic' needs scikit-image (a dependency of hf_vattr): `pip install scikit-image`; "
            "or use method='vlm', 'dinov3', 'dinov2' or 'grid'."
        ) from err
    return segmentation


def _token_majority(seg: np.ndarray, h: int, w: int, f: int) -> np.ndarray:
    """(h, w) label of the superpixel covering most of each token's f x f block."""
    n_seg = int(seg.max()) + 1
    blocks = seg.reshape(h, f, w, f).transpose(0, 2, 1, 3).reshape(h * w, f * f)
    counts = np.zeros((h * w, n_seg), dtype=np.int32)
    np.add.at(counts, (np.repeat(np.arange(h * w), f * f), blocks.reshape(-1)), 1)
    return counts.argmax(1).reshape(h, w)


def slic_regions(tokens: ImageTokens, image: Any, k: int | None | Sequence[int | None] = None, *,
                 policy: KPolicy | None = None, compactness: float = 10.0, sigma: float = 0.5,
                 px_per_token: int = 8, max_tries: int = 4) -> RegionMap | dict[int, RegionMap]:
    """SLIC regions of one image on its token grid: contiguous, covering, K or a reported fewer."""
    segmentation = require_skimage()
    from skimage.color import rgb2lab

    if tokens.is_video:
        raise VideoNotSupportedError("SLIC regions are per image; for a video use method='vlm', 'dinov3', "
                                     "'dinov2', 'color', 'grid' or 'masks' (regions across frames).")
    many = isinstance(k, (list, tuple, range))
    ks = list(k) if many else [k]
    h, w = tokens.grid_hw
    f = int(px_per_token)
    chw = resize_to_token_grid(image, tokens, f, mode="bilinear")[0].numpy()
    img = chw.transpose(1, 2, 0).astype(np.float64)
    lab = rgb2lab(chw, channel_axis=0)
    color = lab.reshape(3, h, f, w, f).mean(axis=(2, 4)).reshape(3, -1).T  # mean Lab per token
    out: dict[int, RegionMap] = {}
    for kk in ks:
        used, kinfo = resolve_k(kk, tokens.num_tokens, policy)
        n_seg, labels, tries = used, None, 0
        for tries in range(1, max_tries + 1):
            seg = segmentation.slic(img, n_segments=n_seg, compactness=compactness, sigma=sigma, start_label=0,
                                    enforce_connectivity=True, channel_axis=-1)
            labels = split_components(_token_majority(seg, h, w, f))
            found = int(labels.max()) + 1
            if found >= used or n_seg >= tokens.num_tokens:
                break
            n_seg = min(tokens.num_tokens, int(math.ceil(n_seg * used / max(found, 1) * 1.3)) + 1)
        labels = merge_to_k(labels, used, color)
        got = int(labels.max()) + 1
        info = {**kinfo, "clustering": "slic", "compactness": compactness, "px_per_token": f,
                "slic_n_segments": n_seg, "slic_tries": tries}
        if got < used:
            info["fewer_regions"] = {"requested": used, "got": got,
                                     "why": "SLIC found fewer superpixels than K on this image"}
        out[kk] = _hard_map(tokens, labels.reshape(-1), "slic", info)
    return out if many else next(iter(out.values()))
