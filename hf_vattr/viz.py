"""Pictures of attribution: region overlays on the original image, a self-contained HTML report,
and a one-line terminal summary per reasoning step.

Overlays paint each region's score onto the pixels of the *original* image through
``RegionMap.pixel_labels()`` (exact token -> pixel geometry, separate y/x scales), so
what is drawn is what the model saw. No plotting library is needed.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .regions import PromptRegions, RegionMap

__all__ = ["overlay", "span_overlays", "render_html", "describe_regions", "save_overlays"]

_HOT = np.array([[0, 0, 0], [120, 0, 160], [230, 40, 60], [255, 170, 0], [255, 255, 160]], dtype=np.float32)


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values to RGB along a perceptually ordered dark-purple-red-yellow ramp."""
    v = np.clip(values, 0, 1) * (len(_HOT) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_HOT) - 2)
    frac = (v - lo)[..., None]
    return _HOT[lo] * (1 - frac) + _HOT[lo + 1] * frac


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8) if arr.max() <= 1 else arr.astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def overlay(image: Any, region_map: RegionMap, scores: torch.Tensor | np.ndarray, *, alpha: float = 0.6,
            outline_top: int = 1, vmax: float | None = None) -> Image.Image:
    """The image with each region tinted by its (positive) score; the top regions outlined in white.

    Scores are normalised by ``vmax`` (default: the largest positive score), so colours compare
    regions within one step; pass a shared ``vmax`` to compare steps.
    """
    pil = _as_pil(image)
    labels = region_map.pixel_labels()
    if labels.shape != (pil.height, pil.width):
        raise ValueError(
            f"Region map is for a {labels.shape[1]}x{labels.shape[0]} image but got {pil.width}x{pil.height}; "
            "pass the original image the prompt was built from."
        )
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float32))
    if s.shape != (region_map.num_regions,):
        raise ValueError(f"Expected {region_map.num_regions} scores, got shape {s.shape}.")
    top = float(vmax) if vmax is not None else float(max(s.max(), 1e-12))
    norm = np.clip(s, 0, None) / top
    heat = _colormap(norm[labels])
    base = np.asarray(pil, dtype=np.float32)
    weight = (alpha * norm[labels])[..., None]
    mixed = base * (1 - weight) * 0.75 + heat * weight + base * 0.25 * (1 - weight)
    mixed = np.where(weight > 0, mixed, base * 0.55)  # regions without evidence are dimmed
    out = Image.fromarray(mixed.clip(0, 255).astype(np.uint8))
    if outline_top:
        order = np.argsort(-s, kind="stable")[:outline_top]
        edges = np.zeros_like(labels, dtype=bool)
        for region in order:
            mask = labels == region
            edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
            edges |= edge
        arr = np.asarray(out).copy()
        arr[edges] = 255
        out = Image.fromarray(arr)
    return out


def span_overlays(regions: PromptRegions, images: Sequence[Any], scores: torch.Tensor, **kwargs: Any) -> Image.Image:
    """One overlay per image of the prompt, side by side, for one step's global score vector."""
    if len(images) != len(regions.maps):
        raise ValueError(f"Got {len(images)} images for {len(regions.maps)} region maps.")
    panels = []
    for offset, region_map, image in zip(regions.region_offsets(), regions.maps, images):
        panels.append(overlay(image, region_map, scores[offset:offset + region_map.num_regions], **kwargs))
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), height), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + 8
    return canvas


def describe_regions(regions: PromptRegions, region_ids: Sequence[int]) -> str:
    """Human-readable location of regions: image index and centre in original-image pixels."""
    parts = []
    for rid in region_ids:
        image_index, local = regions.region_owner(int(rid))
        labels = regions.maps[image_index].pixel_labels()
        ys, xs = np.nonzero(labels == local)
        where = f"y~{int(ys.mean())}, x~{int(xs.mean())}" if len(ys) else "empty"
        parts.append(f"#{rid} (img {image_index}, {where})")
    return ", ".join(parts)


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def save_overlays(trace: Any, images: Sequence[Any], out_dir: str | Path, prefix: str = "step") -> list[Path]:
    """Write one PNG per span (``step_000.png``, ...) and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for span in trace.spans:
        path = out_dir / f"{prefix}_{span.index:03d}.png"
        span_overlays(trace.regions, images, span.region_scores).save(path)
        paths.append(path)
    return paths


def render_html(trace: Any, images: Sequence[Any], path: str | Path | None = None, *, title: str = "hf_vattr report",
                question: str | None = None, top_k: int = 3) -> str:
    """A self-contained HTML page (images inlined): the prompt image(s), then each step with its overlay."""
    rows = []
    for span in trace.spans:
        top = span.top_regions(top_k)
        rows.append(
            "<tr><td class='idx'>{i}</td><td class='sec {sec}'>{sec}</td><td class='txt'>{text}</td>"
            "<td><img src='{img}' alt='step {i} overlay'></td><td class='top'>{top}</td></tr>".format(
                i=span.index, sec=html.escape(span.section), text=html.escape(span.text),
                img=_png_data_uri(span_overlays(trace.regions, images, span.region_scores)),
                top=html.escape(describe_regions(trace.regions, top)),
            )
        )
    originals = "".join(f"<img src='{_png_data_uri(_as_pil(im))}' alt='input image {i}'>" for i, im in enumerate(images))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td {{ border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: middle; }}
td.txt {{ font-family: ui-monospace, monospace; max-width: 32em; }} td.idx {{ color: #888; }}
td.sec.thinking {{ color: #7a4fb5; }} td.sec.answer {{ color: #1b7f3b; font-weight: bold; }}
img {{ max-height: 180px; image-rendering: pixelated; margin-right: 6px; }} .top {{ font-size: 0.85em; color: #555; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{f"<p><b>Question:</b> {html.escape(question)}</p>" if question else ""}
<p>{originals}</p>
<p>Each reasoning step with the image regions its estimator scores highest (brighter = larger predicted
log-probability drop if the region were ablated; the top region is outlined).</p>
<table><tr><th>#</th><th>section</th><th>step</th><th>attribution</th><th>top regions</th></tr>
{''.join(rows)}
</table></body></html>
"""
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
