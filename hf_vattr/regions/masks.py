"""User-supplied regions: a label image or a list of boolean masks (Captum-style image masks).

Why fractional membership: user masks are drawn in pixels and rarely follow
the token grid. Each token's membership in region j is the fraction of the
original-image pixels it covers that lie in mask j (pixels belong to the token
whose original-image box contains their centre, the same rule the overlays
use), so attention pooled through the membership respects the user's
boundaries. Pixels covered by several masks are split equally between them;
pixels covered by none form an extra "rest" region so that every token stays
fully covered. The regions are the user's: they need not be contiguous, and a
mask smaller than half a token may own no token outright (its fractional
membership is still used for pooling); such regions are listed in
``info["regions_without_tokens"]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..layouts import ImageTokens
from .map import RegionMap

__all__ = ["mask_regions", "pixel_token_index"]


def pixel_token_index(tokens: ImageTokens, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) index of the token covering each pixel (centre rule) of the original image.

    Without a known original size the masks are taken to be at the resized
    resolution ``grid * token_size``.
    """
    h, w = tokens.grid_hw
    if tokens.original_size is not None:
        ys, xs = tokens.grid_to_original_index()
        ys, xs = ys.numpy(), xs.numpy()
    else:
        rh, rw = tokens.resized_size
        ys, xs = np.arange(rh) // tokens.token_size, np.arange(rw) // tokens.token_size
    idx = ys[:, None] * w + xs[None, :]
    if size is not None and tuple(idx.shape) != tuple(size):
        expected = "original" if tokens.original_size is not None else "resized (size unknown in the layout)"
        raise ValueError(f"Masks are {tuple(size)} (h, w) but the {expected} image is {tuple(idx.shape)}.")
    return idx


def _as_mask_stack(masks: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """-> (label image, None) or (None, (K, H, W) bool stack)."""
    if hasattr(masks, "convert") and hasattr(masks, "size") and not hasattr(masks, "shape"):  # PIL label image
        masks = np.asarray(masks)
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray):
        if masks.ndim == 2:
            if masks.dtype == bool:
                return None, masks[None]
            return masks.astype(np.int64), None
        if masks.ndim == 3:
            return None, masks.astype(bool)
        raise ValueError(f"A mask array must be (H, W) labels or (K, H, W) booleans, got shape {masks.shape}.")
    stack = [np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m).astype(bool) for m in masks]
    if not stack:
        raise ValueError("Got an empty list of masks.")
    if len({m.shape for m in stack}) != 1 or stack[0].ndim != 2:
        raise ValueError(f"Boolean masks must all be (H, W) of one size, got {[m.shape for m in stack]}.")
    return None, np.stack(stack)


def mask_regions(tokens: ImageTokens, masks: Any, *, rest: bool = True,
                 names: Sequence[str] | None = None) -> RegionMap:
    """Regions from user masks at the original image resolution.

    ``masks``: an (H, W) integer label image (one region per distinct value,
    in increasing value order) or K boolean (H, W) masks (a list, or a
    (K, H, W) array). ``rest``: give uncovered pixels their own last region;
    with ``rest=False`` uncovered pixels are an error.
    """
    labels, stack = _as_mask_stack(masks)
    size = labels.shape if labels is not None else stack.shape[1:]
    tok = pixel_token_index(tokens, size).reshape(-1)
    n = tokens.num_tokens
    info: dict = {"clustering": "user-masks"}
    if labels is not None:
        values, inverse = np.unique(labels.reshape(-1), return_inverse=True)
        k = len(values)
        counts = np.bincount(tok * k + inverse.reshape(-1), minlength=n * k).reshape(n, k).astype(np.float64)
        info["label_values"] = [int(v) for v in values]
        pixel_region = inverse.reshape(size)
    else:
        k0 = stack.shape[0]
        flat = stack.reshape(k0, -1).astype(np.float64)
        cover = flat.sum(0)
        uncovered = cover == 0
        weights = flat / np.maximum(cover, 1.0)
        if uncovered.any():
            if not rest:
                raise ValueError(f"{int(uncovered.sum())} pixels are in no mask; pass rest=True to give them a region.")
            weights = np.concatenate([weights, uncovered[None].astype(np.float64)])
            info["rest_region"] = k0
        k = weights.shape[0]
        counts = np.stack([np.bincount(tok, weights=wk, minlength=n) for wk in weights], 1)
        info["num_masks"] = k0
        info["overlapping_pixels"] = int((cover > 1).sum())
        pixel_region = None
    total = counts.sum(1)
    empty = np.nonzero(total == 0)[0]
    if empty.size:  # tokens that cover no pixel centre (heavily upsampled images): sample at the token centre
        for t in empty.tolist():
            y0, x0, y1, x1 = (tokens.token_box_original(t) if tokens.original_size is not None
                              else tokens.token_box_resized(t))
            y = min(max(int((y0 + y1) / 2), 0), size[0] - 1)
            x = min(max(int((x0 + x1) / 2), 0), size[1] - 1)
            if pixel_region is not None:
                counts[t, pixel_region[y, x]] = 1.0
            else:
                col = stack[:, y, x].astype(np.float64)
                if col.sum() == 0:
                    col = np.concatenate([col, [1.0]]) if "rest_region" in info else col
                counts[t, : col.size] = col / max(col.sum(), 1.0)
                if counts[t].sum() == 0:
                    raise ValueError(f"Token {t} covers no masked pixel and rest=False.")
        total = counts.sum(1)
    membership = torch.as_tensor(counts / total[:, None], dtype=torch.float32)
    hard = membership.argmax(1)
    owned = torch.bincount(hard, minlength=k)
    info["regions_without_tokens"] = torch.nonzero(owned == 0).flatten().tolist()
    if names is not None:
        info["names"] = list(names)
    return RegionMap(tokens, membership, "masks", info)
