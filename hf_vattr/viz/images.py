"""Pillow plumbing every picture shares: any image as RGB, the one font, PNG data URIs.

A data URI inlines a picture into HTML (the report, the notebook view, the web page) so that nothing is
fetched from anywhere.
"""

from __future__ import annotations

import base64
import functools
import io
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFont

from ..layouts import channels_first

__all__ = ["as_pil", "font", "png_data_uri", "is_size"]


@functools.lru_cache(maxsize=8)
def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (one fixed bitmap size on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a fixed bitmap font only
        return ImageFont.load_default()


def as_pil(image: Any) -> Image.Image:
    """A PIL image, an array or a tensor (HWC or CHW, uint8 or [0, 1] floats) as an RGB PIL image."""
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


def is_size(image: Any) -> bool:
    """Whether an ``images`` entry is only a size ``(h, w)`` (drawn as a grey canvas)."""
    return isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(v, int) for v in image)


def png_data_uri(image: Image.Image, *, compress_level: int | None = None) -> str:
    """``image`` as a ``data:image/png;base64,...`` URI.

    ``compress_level`` is zlib's (0-9; ``None``: Pillow's default). The live web page passes 1: about half the
    encoding time for 1.5x the bytes, which a local page does not feel.
    """
    buffer = io.BytesIO()
    options = {} if compress_level is None else {"compress_level": compress_level}
    image.save(buffer, format="PNG", **options)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
