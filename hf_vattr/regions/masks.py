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
``info["regions_without_tokens"]``. A video's masks are given per frame and pooled over each frame group.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..layouts import ImageTokens
from .features import frame_tokens
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

    A video takes one such entry per frame the processor was given (a list, a ``(T, H, W)`` label array or a
    ``(T, K, H, W)`` boolean array): a label value (or the k-th mask) is one region in every frame, so a
    region follows its object across frame groups; a token's membership pools the pixels of its group's frames.
    """
    frames = _frames_of(tokens, masks)
    parsed = [_as_mask_stack(m) for m in frames]
    if any((labels is None) != (parsed[0][0] is None) for labels, _ in parsed):
        raise ValueError("Give every frame's masks the same way: all label images, or all boolean masks.")
    info: dict = {"clustering": "user-masks"}
    values = None
    if parsed[0][0] is not None:
        values = np.unique(np.concatenate([labels.reshape(-1) for labels, _ in parsed]))
        info["label_values"] = [int(v) for v in values]
    else:
        if len({stack.shape[0] for _, stack in parsed}) != 1:
            raise ValueError(f"Every frame needs the same number of masks, got {[s.shape[0] for _, s in parsed]}.")
        uncovered = sum(int((stack.sum(0) == 0).sum()) for _, stack in parsed)
        if uncovered and not rest:
            raise ValueError(f"{uncovered} pixels are in no mask; pass rest=True to give them a region.")
        if uncovered:
            info["rest_region"] = parsed[0][1].shape[0]
        info["num_masks"] = parsed[0][1].shape[0]
        info["overlapping_pixels"] = sum(int((stack.sum(0) > 1).sum()) for _, stack in parsed)
    frame = tokens if not tokens.is_video else frame_tokens(tokens)
    counts = [_frame_counts(frame, labels, stack, values, "rest_region" in info) for labels, stack in parsed]
    if tokens.is_video:
        p = len(frames) // tokens.num_frame_groups
        counts = np.concatenate([sum(counts[g * p:(g + 1) * p]) for g in range(tokens.num_frame_groups)])
        info["frames"] = len(frames)
    else:
        counts = counts[0]
    membership = torch.as_tensor(counts / counts.sum(1, keepdims=True), dtype=torch.float32)
    k = membership.shape[1]
    owned = torch.bincount(membership.argmax(1), minlength=k)
    info["regions_without_tokens"] = torch.nonzero(owned == 0).flatten().tolist()
    if names is not None:
        info["names"] = list(names)
    return RegionMap(tokens, membership, "masks", info)


def _frames_of(tokens: ImageTokens, masks: Any) -> list[Any]:
    """One mask entry per frame the tower saw: an image's masks alone; a video's per frame, padded as the frames."""
    if not tokens.is_video:
        return [masks]
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray) and masks.ndim not in (3, 4):
        raise ValueError(f"A video's masks are one entry per frame: a (T, H, W) label array or a (T, K, H, W) "
                         f"boolean array, or a list; got shape {masks.shape}.")
    frames = list(masks)
    t, p = tokens.num_frame_groups, tokens.frames_per_group
    if not (t - 1) * p < len(frames) <= t * p:
        raise ValueError(f"Got masks for {len(frames)} frames, but video {tokens.kind_index} has {t} frame group(s) "
                         f"of {p} frames ({(t - 1) * p + 1} to {t * p} frames): one entry per frame given to the "
                         "processor.")
    return frames + [frames[-1]] * (t * p - len(frames))


def _frame_counts(tokens: ImageTokens, labels: np.ndarray | None, stack: np.ndarray | None,
                  values: np.ndarray | None, with_rest: bool) -> np.ndarray:
    """(tokens of one frame, K) pixel weight each token has in each region, in one image or video frame."""
    size = labels.shape if labels is not None else stack.shape[1:]
    tok = pixel_token_index(tokens, size).reshape(-1)
    n = tokens.tokens_per_group
    if labels is not None:
        k = len(values)
        inverse = np.searchsorted(values, labels.reshape(-1))
        counts = np.bincount(tok * k + inverse, minlength=n * k).reshape(n, k).astype(np.float64)
        pixel_region = inverse.reshape(size)
    else:
        flat = stack.reshape(stack.shape[0], -1).astype(np.float64)
        cover = flat.sum(0)
        weights = flat / np.maximum(cover, 1.0)
        if with_rest:
            weights = np.concatenate([weights, (cover == 0)[None].astype(np.float64)])
        counts = np.stack([np.bincount(tok, weights=wk, minlength=n) for wk in weights], 1)
        pixel_region = None
    for t in np.nonzero(counts.sum(1) == 0)[0].tolist():
        # a token that covers no pixel centre (heavily upsampled images): sample at the token centre
        y0, x0, y1, x1 = (tokens.token_box_original(t) if tokens.original_size is not None
                          else tokens.token_box_resized(t))
        y = min(max(int((y0 + y1) / 2), 0), size[0] - 1)
        x = min(max(int((x0 + x1) / 2), 0), size[1] - 1)
        if pixel_region is not None:
            counts[t, pixel_region[y, x]] = 1.0
        else:
            col = stack[:, y, x].astype(np.float64)
            if col.sum() == 0:
                col = np.concatenate([col, [1.0]]) if with_rest else col
            counts[t, : col.size] = col / max(col.sum(), 1.0)
            if counts[t].sum() == 0:
                raise ValueError(f"Token {t} covers no masked pixel and rest=False.")
    return counts
