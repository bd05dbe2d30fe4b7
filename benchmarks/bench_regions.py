"""Region construction time for a 1000 x 750 photo, per method and K.

    python benchmarks/bench_regions.py [--repeats 5] [--families qwen2_5_vl qwen3_vl]

What is timed (best of ``--repeats`` runs after one warm-up: the minimum is the
uncontended cost, robust to other processes on a shared machine; model creation and
the VLM processor call are excluded and reported separately, because they
are paid once per model / are needed for generation anyway):

* features: image -> (N_tokens, D) token features (resize, forward, pooling);
* tree: the full Ward tree on the token grid (built once);
* cut K: labels + RegionMap for one K from that tree;
* total: features + tree + the four cuts (K = 16, 32, 64, 128).

DINO models use random weights (same architecture and cost as the real
ones). "vlm tiny" is the 2-layer, 32-wide vision tower of
``hf_vattr.testing``; "vlm mid" a random 8-layer, 384-wide tower of the same
family (about 14 M parameters), to show how the cost grows; "vlm captured"
is Ward on features already produced by the model's own forward pass (what
a real 0.7 B-parameter tower costs on top of generation: nothing but Ward;
recorded with ``VisionFeatureRecorder``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

from hf_vattr.layouts import ImageTokens
from hf_vattr.regions import (
    ColorFeatures,
    RegionMap,
    VisionFeatureRecorder,
    build_ward_tree,
    dino_features,
    grid_regions,
    slic_regions,
    vlm_token_features,
)
from hf_vattr.regions.features import _load_timm
from hf_vattr.testing import build_model, build_processor

KS = (16, 32, 64, 128)
# The released processors' pixel limits (preprocessor_config.json of each family's checkpoints).
REAL_LIMITS = {
    "qwen2_5_vl": (3136, 12845056),
    "qwen3_vl": (65536, 16777216),
    "glm4v": (12544, 9633792),
}


def photo_1000x750() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee()).resize((1000, 750), Image.BICUBIC)


CLOCK = time.perf_counter  # --clock cpu switches to process CPU time (see main)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = CLOCK()
        out = fn()
        times.append(CLOCK() - t)
    return min(times) * 1000, out


def tokens_and_inputs(family: str, image: Image.Image, processor) -> tuple[ImageTokens, dict]:
    out = processor.image_processor(images=[image], return_tensors="pt")
    t, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    merge = processor.image_processor.merge_size
    u = processor.image_processor.patch_size * merge
    tok = ImageTokens(0, torch.arange(t * gh * gw // merge**2), (t, gh // merge, gw // merge), u,
                      (image.height, image.width))
    return tok, out


def ward_row(name: str, tok: ImageTokens, features_fn: Callable[[], torch.Tensor], repeats: int,
             normalize: bool = True) -> dict:
    feat_ms, feats = timed(features_fn, repeats)
    tree_ms, tree = timed(lambda: build_ward_tree(feats, tok.grid_thw, normalize=normalize), repeats)
    cuts = {}
    for k in KS:
        cuts[k], rmap = timed(lambda k=k: tree.region_map(tok, k, name), repeats)
        assert isinstance(rmap, RegionMap) and rmap.num_regions == k
    return {"method": name, "features": feat_ms, "tree": tree_ms, **{f"cut {k}": v for k, v in cuts.items()},
            "total": feat_ms + tree_ms + sum(cuts.values()), "dim": int(feats.shape[1])}


MID_VISION = dict(depth=8, hidden_size=384, intermediate_size=1536, num_heads=6, out_hidden_size=1024)


def build_vlm(family: str, tokenizer, mid: bool):
    """The tiny test model, or the same with a mid-size random vision tower."""
    model = build_model(family, tokenizer)
    if not mid:
        return model
    config = copy.deepcopy(model.config)
    for key, value in MID_VISION.items():
        setattr(config.vision_config, key, value)
    if family == "qwen2_5_vl":
        config.vision_config.fullatt_block_indexes = [3, 7]
    if family == "qwen3_vl":
        config.vision_config.deepstack_visual_indexes = [3]
    torch.manual_seed(0)
    return type(model)._from_config(config, dtype=torch.float32).eval()


def bench_family(family: str, image: Image.Image, repeats: int) -> tuple[list[dict], dict]:
    lo, hi = REAL_LIMITS[family]
    processor = build_processor(family, min_pixels=lo, max_pixels=hi)
    tok, inputs = tokens_and_inputs(family, image, processor)
    rows, meta = [], {"grid": tok.grid_hw, "tokens": tok.num_tokens, "token_px": tok.token_size}

    for method in ("dinov3", "dinov2"):
        ext = dino_features(method, weights="random")
        t = time.perf_counter()
        fresh = ext._model is None and not _load_timm.cache_info().currsize
        ext._resolve()
        if fresh or (time.perf_counter() - t) > 0.01:
            meta[f"{method} load ms"] = (time.perf_counter() - t) * 1000
        row = ward_row(f"{method}-S (random)", tok, lambda: ext(image, tok), repeats)
        row["method"] += f", m={ext.choose_m(tok)}"
        rows.append(row)

    for label in ("tiny", "mid"):
        model = build_vlm(family, processor.tokenizer, label == "mid")
        params = sum(p.numel() for p in model.model.visual.parameters()) / 1e6
        row = ward_row(f"vlm {label} ({params:.1f} M)", tok,
                       lambda: vlm_token_features(model, inputs["pixel_values"], inputs["image_grid_thw"])[0],
                       repeats)
        rows.append(row)
        if label == "tiny":
            with torch.inference_mode(), VisionFeatureRecorder(model) as rec:
                model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            captured = rec.features()[0]
            rows.append(ward_row("vlm captured (any tower size)", tok, lambda: captured, repeats))
        del model

    rows.append(ward_row("color (Lab)", tok, lambda: ColorFeatures()(image, tok), repeats, normalize=False))

    slic_ms = {}
    for k in KS:
        slic_ms[k], rmap = timed(lambda k=k: slic_regions(tok, image, k), repeats)
    rows.append({"method": "slic (per K)", "features": float("nan"), "tree": float("nan"),
                 **{f"cut {k}": v for k, v in slic_ms.items()}, "total": sum(slic_ms.values()), "dim": 0})
    grid_ms = {}
    for k in KS:
        grid_ms[k], _ = timed(lambda k=k: grid_regions(tok, k), repeats)
    rows.append({"method": "grid", "features": float("nan"), "tree": float("nan"),
                 **{f"cut {k}": v for k, v in grid_ms.items()}, "total": sum(grid_ms.values()), "dim": 0})
    return rows, meta


def fmt(v: float) -> str:
    return "-" if v != v else (f"{v:.0f}" if v >= 10 else f"{v:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=["qwen2_5_vl", "qwen3_vl", "glm4v"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time with one torch thread, which "
                             "approximates the uncontended single-core cost on a machine shared with other jobs")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    image = photo_1000x750()
    print(f"# bench_regions: 1000x750 photo, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.2f}, {args.clock} clock, best of {args.repeats}\n")
    for family in args.families:
        rows, meta = bench_family(family, image, args.repeats)
        loads = ", ".join(f"{k} {v:.0f}" for k, v in meta.items() if k.endswith("load ms")) or "already loaded"
        print(f"## {family}: token grid {meta['grid'][0]}x{meta['grid'][1]} = {meta['tokens']} tokens of "
              f"{meta['token_px']} px (DINO model creation, not in the table: {loads})\n")
        cols = ["features", "tree"] + [f"cut {k}" for k in KS] + ["total"]
        print("| method | " + " | ".join(c + " ms" for c in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for r in rows:
            print(f"| {r['method']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
        print()
    np.random.seed(0)


if __name__ == "__main__":
    main()
