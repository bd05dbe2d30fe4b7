"""Per-token features for region clustering, exactly aligned with a VLM's visual tokens.

Alignment is the whole point: a region is a set of *VLM* tokens, so the
features we cluster must describe exactly the pixels each VLM token saw.
Every VLM processor we support resizes the whole image (no crop, no pad) to
``grid_h * u`` x ``grid_w * u`` pixels (``u`` = patch * merge: 28 px for
Qwen2.5-VL / GLM-4.1V, 32 px for Qwen3-VL), with each side rounded
independently and its own min/max pixel rule (GLM counts two temporal frames
against its limits, and upsamples images thinner than one token first). The
layout's ``grid_thw`` already encodes the outcome of those rules. So for a
self-supervised ViT with patch ``p`` we resize the *original* image to
``grid_h * m * p`` x ``grid_w * m * p`` pixels: then ViT patch block
``[r*m, (r+1)*m) x [c*m, (c+1)*m)`` covers exactly the same original-image
pixels as VLM token (r, c), whatever the aspect ratio, and average pooling
the m x m patch features gives one feature per VLM token with no
interpolation of features. ``m`` (patches per token side) trades detail for
speed; by default it is 2 for small images and 1 beyond ~400 tokens (so a
1000 px photo costs one DINO-S pass of about 1,000 patches).

Sources:

* :class:`TimmPatchFeatures` - DINOv3 / DINOv2 (with registers) through timm.
  Weights come from a local file or the Hugging Face cache; when they are
  absent and the Hub is unreachable we fail in seconds with instructions,
  instead of huggingface_hub's retry loop (about 25 s offline).
* :func:`vlm_token_features` - the VLM's own vision tower (``get_image_features``,
  ``get_video_features``), already 1:1 with the visual tokens; needs no extra model or weights.
* :class:`ColorFeatures` - mean CIE-Lab colour per token; weights-free, for
  tests and as a cheap baseline.

Videos: the image extractors run on every frame the vision tower saw (the same boxes in
every frame) and average the frames of each frame group, as the tower fuses them into one
token group (:func:`per_frame_group`); the VLM's own features are per token group already.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AttributionError
from ..layouts import ImageTokens, VideoInputError, channels_first, video_frames

__all__ = [
    "TokenFeatureExtractor",
    "TimmPatchFeatures",
    "ColorFeatures",
    "WeightsUnavailableError",
    "DINO_MODELS",
    "find_local_weights",
    "dino_features",
    "vlm_token_features",
    "VisionFeatureRecorder",
    "image_to_tensor",
    "resize_to_token_grid",
    "per_frame_group",
    "VideoNotSupportedError",
]

#: method name -> default timm architecture.
DINO_MODELS: dict[str, str] = {
    "dinov3": "vit_small_patch16_dinov3",
    "dinov2": "vit_small_patch14_reg4_dinov2",
}
#: environment variables that may point at a weights file (checked when ``weights`` is not given).
WEIGHTS_ENV = {"dinov3": "HF_VATTR_DINOV3_WEIGHTS", "dinov2": "HF_VATTR_DINOV2_WEIGHTS"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class WeightsUnavailableError(AttributionError, FileNotFoundError):
    """Pretrained feature-extractor weights are neither local nor downloadable right now."""


class VideoNotSupportedError(AttributionError, NotImplementedError):
    """A region method that works on single images was asked for a video's regions."""


@runtime_checkable
class TokenFeatureExtractor(Protocol):
    """Anything that maps (image, its visual tokens) to (N_tokens, D) features."""

    name: str
    normalize: bool  # whether Ward should L2-normalise the features (True for ViT embeddings)

    def __call__(self, image: Any, tokens: ImageTokens) -> torch.Tensor: ...


# --------------------------------------------------------------------------- images and geometry


def image_to_tensor(image: Any) -> torch.Tensor:
    """PIL image / HWC array / CHW or HWC tensor -> (3, H, W) float32 in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size") and not hasattr(image, "shape"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[None]  # one channel, first
        if arr.ndim != 3:
            raise ValueError(f"Expected an (H, W[, C]) or (C, H, W) image array, got shape {arr.shape}.")
        x = torch.from_numpy(np.array(arr, copy=True))
        if not channels_first(arr):  # channels last (the usual numpy layout), by the layout's rule
            x = x.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        x = image.detach().cpu()
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3:
            raise ValueError(f"Expected a (C, H, W) or (H, W, C) image tensor, got shape {tuple(x.shape)}.")
        if not channels_first(x):  # the same rule as the layout's (transformers')
            x = x.permute(2, 0, 1)
    else:
        raise TypeError(f"Cannot read pixels from {type(image).__name__}; pass a PIL image, an array or a tensor.")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
        if x.numel() and float(x.max()) > 1.5:  # 0..255 floats
            x = x / 255.0
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        x = x[:3]
    return x.contiguous()


def _check_size(pixels: torch.Tensor, tokens: ImageTokens) -> None:
    if tokens.original_size is not None and tuple(pixels.shape[-2:]) != tuple(tokens.original_size):
        raise ValueError(
            f"Image {tokens.image_index} is {tuple(pixels.shape[-2:])} (h, w) but the layout says the model saw an "
            f"original of {tuple(tokens.original_size)}. Pass the same images, in prompt order, as to the processor."
        )


def resize_to_token_grid(image: Any, tokens: ImageTokens, px_per_token: int, *,
                         mode: str = "bicubic") -> torch.Tensor:
    """The original image resized to ``(grid_h * px, grid_w * px)``: (1, 3, H', W') in [0, 1].

    Token (r, c) then covers exactly pixels ``[r*px, (r+1)*px) x [c*px, (c+1)*px)``,
    the same original-image area as in the VLM's own resize (both are
    whole-image resizes of the same image onto the same token grid).
    """
    pixels = image_to_tensor(image)
    _check_size(pixels, tokens)
    h, w = tokens.grid_hw
    size = (h * px_per_token, w * px_per_token)
    x = pixels[None]
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=mode in ("bilinear", "bicubic")
                         ).clamp_(0.0, 1.0)


def frame_tokens(tokens: ImageTokens) -> ImageTokens:
    """One frame of a video item, as an image item with the same grid and boxes (what per-frame extractors take)."""
    return ImageTokens(image_index=tokens.image_index, positions=tokens.positions[:tokens.tokens_per_group],
                       grid_thw=(1, *tokens.grid_hw), token_size=tokens.token_size,
                       original_size=tokens.original_size, kind_index=tokens.kind_index)


def video_group_frames(video: Any, tokens: ImageTokens) -> list[list[Any]]:
    """The frames of each frame group of a video item, padded as the processor pads (the last frame repeats)."""
    frames = video_frames(video, tokens.kind_index)
    t = tokens.num_frame_groups
    p = tokens.frames_per_group if tokens.frame_times is not None else -(-len(frames) // t)
    if not (t - 1) * p < len(frames) <= t * p:
        raise VideoInputError(f"Video {tokens.kind_index} has {len(frames)} frames but its tokens have {t} frame "
                              f"group(s) of {p} frames: pass the frames the processor used.")
    padded = list(frames) + [frames[-1]] * (t * p - len(frames))
    return [padded[g * p:(g + 1) * p] for g in range(t)]


def per_frame_group(extract: Callable[[Any, ImageTokens], torch.Tensor], video: Any,
                    tokens: ImageTokens) -> torch.Tensor:
    """(t * h * w, D): ``extract(frame, frame tokens)`` on every frame the tower saw, averaged over each group's
    frames (the tower fuses them into one token group), groups in order as the video's tokens are."""
    frame = frame_tokens(tokens)
    groups = [torch.stack([extract(f, frame) for f in group]).float().mean(0)
              for group in video_group_frames(video, tokens)]
    return torch.cat(groups)


# --------------------------------------------------------------------------- weights


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Quick check that the Hub endpoint answers a TCP connect (DNS included), bounded by ``timeout``."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # getaddrinfo has no timeout of its own
    return bool(result and result[0])


def _hub_id(model_name: str) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    return None if cfg is None else getattr(cfg, "hf_hub_id", None)


def find_local_weights(model_name: str, weights: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """Locate weights for ``model_name`` without touching the network.

    Order: ``weights`` (a file, or a folder holding ``model.safetensors``),
    then the Hugging Face cache entry of timm's ``hf_hub_id`` for the model.
    Returns ``(path or None, description of where it looked)``.
    """
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_dir():
            for name in _WEIGHT_FILES:
                if (p / name).is_file():
                    return p / name, f"local folder {p}"
            return None, f"folder {p} (no {' / '.join(_WEIGHT_FILES)} in it)"
        return (p, f"local file {p}") if p.is_file() else (None, f"file {p} (does not exist)")
    hub_id = _hub_id(model_name)
    if hub_id is None:
        return None, f"no Hub id known to timm for {model_name}"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None, "huggingface_hub not installed"
    for name in _WEIGHT_FILES:
        hit = try_to_load_from_cache(hub_id, name)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit), f"Hugging Face cache ({hub_id})"
    return None, f"Hugging Face cache ({hub_id}: not cached)"


def _unavailable(model_name: str, looked: str, reason: str) -> WeightsUnavailableError:
    hub_id = _hub_id(model_name) or f"timm/{model_name}"
    return WeightsUnavailableError(
        f"No pretrained weights for {model_name}: looked in {looked}; {reason}.\n"
        "Provide them in one of these ways:\n"
        f"  * pass weights='/path/to/model.safetensors' (a timm or original checkpoint of {model_name}),\n"
        f"    or set {WEIGHTS_ENV.get('dinov3' if 'dinov3' in model_name else 'dinov2')} to that path;\n"
        f"  * on a machine with internet: `hf download {hub_id} model.safetensors` and copy the Hugging Face\n"
        "    cache (~/.cache/huggingface/hub, or $HF_HOME) here (DINOv3 checkpoints may need the licence accepted\n"
        "    and HF_TOKEN set);\n"
        "  * or use method='vlm' (the model's own vision tower, no extra weights) or method='slic' / 'grid'."
    )


@lru_cache(maxsize=4)
def _load_timm(model_name: str, weights_key: str) -> tuple[torch.nn.Module, str]:
    """Create (and cache) a timm backbone. ``weights_key``: 'random', a file path, or 'hub'."""
    import timm

    kwargs: dict[str, Any] = dict(num_classes=0, dynamic_img_size=True)
    if weights_key == "random":
        with torch.random.fork_rng(devices=[]):  # reproducible random weights without touching the caller's RNG
            torch.manual_seed(0)
            model = timm.create_model(model_name, pretrained=False, **kwargs)
        source = "random (timing/tests only)"
    elif weights_key == "hub":
        model, source = timm.create_model(model_name, pretrained=True, **kwargs), f"Hub ({_hub_id(model_name)})"
    else:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=weights_key),
                                  **kwargs)
        source = weights_key
    return model.eval(), source


@dataclass
class TimmPatchFeatures:
    """DINOv3 / DINOv2 patch features of a timm ViT, pooled onto the VLM token grid.

    ``weights``: a path (file or folder), ``"random"`` (no download; for
    timing and tests), or ``None`` (the ``HF_VATTR_DINOV*_WEIGHTS`` env var,
    then the HF cache, then a download only if the Hub answers within
    seconds; otherwise :class:`WeightsUnavailableError`).
    """

    model_name: str = DINO_MODELS["dinov3"]
    weights: str | os.PathLike | None = None
    patches_per_token: int | None = None  # m; None = automatic (see max_patches)
    max_patches: int = 1600  # automatic m: the largest m <= round(u/p) with N * m^2 <= max_patches
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float32
    name: str = "dinov3"
    normalize: bool = True
    _model: Any = field(default=None, init=False, repr=False)
    source: str = field(default="", init=False)

    def _resolve(self) -> tuple[torch.nn.Module, str]:
        if self._model is not None:
            return self._model, self.source
        weights = self.weights
        env = WEIGHTS_ENV.get(self.name)
        if weights is None and env and os.environ.get(env):
            weights = os.environ[env]
        if weights is not None and str(weights) == "random":
            key = "random"
        else:
            path, looked = find_local_weights(self.model_name, weights)
            if path is not None:
                key = str(path)
            elif weights is not None:
                raise _unavailable(self.model_name, looked, "the given path has no weights")
            elif _hub_reachable():
                key = "hub"
            else:
                raise _unavailable(self.model_name, looked, "the Hugging Face Hub is unreachable (offline)")
        model, source = _load_timm(self.model_name, key)
        if self.device is not None or self.dtype != torch.float32:
            model = model.to(device=self.device, dtype=self.dtype)
        self._model, self.source = model, source
        return model, source

    @property
    def patch_size(self) -> int:
        model, _ = self._resolve()
        ps = model.patch_embed.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    def choose_m(self, tokens: ImageTokens) -> int:
        """Patches per token side: exact when given, else as fine as the patch budget allows."""
        if self.patches_per_token is not None:
            return int(self.patches_per_token)
        top = max(1, round(tokens.token_size / self.patch_size))
        m = 1
        for cand in range(top, 0, -1):
            if tokens.num_tokens * cand * cand <= self.max_patches:
                m = cand
                break
        return m

    @torch.inference_mode()
    def patch_features(self, image: Any, tokens: ImageTokens) -> tuple[torch.Tensor, int]:
        """((h*m, w*m, D) patch features, m) of one image (or video frame) on the token grid of ``tokens``."""
        model, _ = self._resolve()
        p = self.patch_size
        m = self.choose_m(tokens)
        x = resize_to_token_grid(image, tokens, m * p)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
        out = model.forward_features(x)
        h, w = tokens.grid_hw
        patches = out[:, getattr(model, "num_prefix_tokens", 0):]
        if patches.shape[1] != h * m * w * m:
            raise RuntimeError(f"{self.model_name} returned {patches.shape[1]} patch tokens for a "
                               f"{h * m}x{w * m} patch grid.")
        return patches[0].reshape(h * m, w * m, -1).float().cpu(), m

    def __call__(self, image: Any, tokens: ImageTokens) -> torch.Tensor:
        """(N_tokens, D): each VLM token's mean over its m x m ViT patches (of its group's frames, for a video)."""
        if tokens.is_video:
            return per_frame_group(self, image, tokens)
        feats, m = self.patch_features(image, tokens)
        h, w = tokens.grid_hw
        d = feats.shape[-1]
        return feats.reshape(h, m, w, m, d).mean(dim=(1, 3)).reshape(h * w, d)

    def describe(self) -> dict:
        return {"extractor": self.model_name, "weights": self.source, "patches_per_token": self.patches_per_token}


def dino_features(method: str = "dinov3", *, weights: str | os.PathLike | None = None,
                  model_name: str | None = None, **kwargs: Any) -> TimmPatchFeatures:
    """A :class:`TimmPatchFeatures` for ``"dinov3"`` or ``"dinov2"`` (default small models)."""
    if method not in DINO_MODELS:
        raise ValueError(f"Unknown DINO method {method!r}; choose one of {sorted(DINO_MODELS)}.")
    return TimmPatchFeatures(model_name=model_name or DINO_MODELS[method], weights=weights, name=method, **kwargs)


# --------------------------------------------------------------------------- colour


@dataclass
class ColorFeatures:
    """Mean (and spread of) CIE-Lab colour of the pixels each token covers.

    Weights-free and instant: a baseline, and an exact probe of the token
    geometry in tests (a coloured square must land in the tokens whose boxes hold it).
    """

    px_per_token: int = 8
    with_std: bool = True
    name: str = "color"
    normalize: bool = False  # Lab distances are meaningful as they are

    def __call__(self, image: Any, tokens: ImageTokens) -> torch.Tensor:
        if tokens.is_video:
            return per_frame_group(self, image, tokens)
        from skimage.color import rgb2lab

        f = self.px_per_token
        x = rgb2lab(resize_to_token_grid(image, tokens, f, mode="bilinear")[0].numpy(), channel_axis=0)
        h, w = tokens.grid_hw
        blocks = x.reshape(3, h, f, w, f)
        feats = [blocks.mean(axis=(2, 4))]
        if self.with_std:
            feats.append(blocks.std(axis=(2, 4), ddof=1))
        return torch.from_numpy(np.concatenate(feats, 0).reshape(-1, h * w).T.copy())

    def describe(self) -> dict:
        return {"extractor": "lab-colour", "px_per_token": self.px_per_token}


# --------------------------------------------------------------------------- the VLM's own vision tower


def _vision_owner(model: Any) -> Any:
    for cand in (getattr(model, "model", None), model):
        if cand is not None and callable(getattr(cand, "get_image_features", None)):
            return cand
    raise TypeError(
        f"{type(model).__name__} has no get_image_features(pixel_values, image_grid_thw); pass the "
        "*ForConditionalGeneration model (or its .model) of a supported VLM, or precomputed features=."
    )


@torch.inference_mode()
def vlm_token_features(model: Any, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, *,
                       kind: str = "image") -> list[torch.Tensor]:
    """The VLM's own vision-tower output per image (``kind="video"``: per video): (N_tokens_i, D) float32 CPU tensors.

    Uses ``model.model.get_image_features(pixel_values, image_grid_thw)`` (or
    ``get_video_features(pixel_values_videos, video_grid_thw)``; Qwen2.5-VL, Qwen3-VL,
    GLM-4.1V and their MoE variants in transformers 5): its ``pooler_output`` holds
    the merged, projected token embeddings the LLM receives, one per visual token,
    in the same order as the visual tokens in ``input_ids`` (a video's frame group
    after frame group): aligned 1:1 by construction.
    """
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}.")
    owner = _vision_owner(model)
    param = next(owner.parameters())
    grid = torch.as_tensor(image_grid_thw).to(param.device)
    out = getattr(owner, f"get_{kind}_features")(pixel_values.to(param.device, param.dtype), grid)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[0] if isinstance(out, tuple) and not isinstance(out[0], torch.Tensor) else out
    if isinstance(pooled, torch.Tensor):
        merge = int(getattr(getattr(owner, "visual", None), "spatial_merge_size", 1))
        sizes = (torch.as_tensor(image_grid_thw).prod(-1) // merge**2).tolist()
        pooled = torch.split(pooled, sizes)
    return [p.detach().float().cpu() for p in pooled]


class VisionFeatureRecorder:
    """Keep the vision tower's token features from a forward / ``generate`` call the model makes anyway.

    Why: with a real vision tower (0.4-0.7 B parameters) recomputing its output
    just for regions costs as much as the prefill's vision pass; recording it
    during that pass makes ``method="features"`` regions cost only the Ward
    clustering. Every tower call is recorded: the models encode a prompt's images in one call, then its
    videos in another (for GLM, split per frame group: concatenate a video's groups)::

        with VisionFeatureRecorder(model) as rec:
            model(**inputs)          # or the prefill of generate
        regions = build_regions(layout, "features", features=rec.features())   # an image-only prompt
    """

    def __init__(self, model: Any, on_record: Callable[[list[torch.Tensor]], None] | None = None) -> None:
        """``on_record(features)`` (optional) runs inside the tower's forward hook, right after each
        call, with that call's per-image features: before the language model sees them."""
        owner = _vision_owner(model)
        self.visual = getattr(owner, "visual", None)
        if self.visual is None:
            raise TypeError(f"{type(owner).__name__} has no .visual vision tower to record from.")
        self.merge = int(getattr(self.visual, "spatial_merge_size", 1))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.on_record = on_record
        self._handle: Any = None

    def _hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        pooled = getattr(output, "pooler_output", None)
        if grid is not None and isinstance(pooled, torch.Tensor):
            self.calls.append((pooled.detach().float().cpu(), torch.as_tensor(grid).cpu()))
            if self.on_record is not None:
                self.on_record(self.features(len(self.calls) - 1))

    def __enter__(self) -> "VisionFeatureRecorder":
        self._handle = self.visual.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def features(self, call: int = 0) -> list[torch.Tensor]:
        """(N_tokens_i, D) per grid row of the ``call``-th recorded tower call (per image, or per video)."""
        if not self.calls:
            raise RuntimeError("No vision-tower call was recorded; run the model on inputs with pixel_values "
                               "inside the `with` block.")
        pooled, grid = self.calls[call]
        return list(torch.split(pooled, (grid.prod(-1) // self.merge**2).tolist()))


def as_feature_list(features: Any, n_images: int) -> list[torch.Tensor]:
    """Normalise user-supplied precomputed features to one (N_i, D) tensor per image."""
    if isinstance(features, (torch.Tensor, np.ndarray)):
        features = [features]
    feats = [torch.as_tensor(f) for f in features]
    if len(feats) != n_images:
        raise ValueError(f"Got features for {len(feats)} images, the prompt has {n_images}.")
    return feats

