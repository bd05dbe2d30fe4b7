"""``build_regions``: one entry point for every region method.

Why one entry point: the streamer, training and the CLI all need "regions
for this prompt", and the right method depends on what is on the machine
(DINO weights or not, a model at hand or not). ``method="auto"`` picks, in
order: precomputed ``features`` or user ``masks`` when given; DINOv3 when its
weights are *already local* (never a download behind the user's back); the
VLM's own vision tower when the model and its pixel inputs are given; a
regular grid otherwise. The choice and the reason are recorded in each map's
``info["auto"]``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

import torch

from ..layouts import ImageTokens, VisualLayout, is_video
from .features import (
    DINO_MODELS,
    WEIGHTS_ENV,
    ColorFeatures,
    TokenFeatureExtractor,
    as_feature_list,
    dino_features,
    find_local_weights,
    vlm_token_features,
)
from .map import PromptRegions, RegionMap, grid_regions
from .masks import mask_regions
from .policy import KPolicy, resolve_k
from .slic import slic_regions
from .ward import build_ward_tree, ward_regions

__all__ = ["build_regions", "METHODS", "choose_method"]

METHODS = ("auto", "vlm", "dinov3", "dinov2", "slic", "grid", "masks", "color", "features")

KType = Union[int, None, Sequence[Union[int, None]]]
Result = Union[RegionMap, PromptRegions, dict]


def _dino_available(method: str, weights: Any, extractor: Any) -> bool:
    if extractor is not None:
        return True
    if weights is not None:
        return str(weights) == "random" or find_local_weights(DINO_MODELS[method], weights)[0] is not None
    env = os.environ.get(WEIGHTS_ENV[method])
    if env:
        return find_local_weights(DINO_MODELS[method], env)[0] is not None
    return find_local_weights(DINO_MODELS[method])[0] is not None


def choose_method(*, images: Any = None, model: Any = None, pixel_values: Any = None, features: Any = None,
                  masks: Any = None, weights: Any = None, extractor: Any = None,
                  pixel_values_videos: Any = None) -> tuple[str, str]:
    """(method, reason) that ``method="auto"`` resolves to for these arguments; touches no network."""
    if features is not None:
        return "features", "precomputed features were given"
    if masks is not None:
        return "masks", "user masks were given"
    if images is not None and _dino_available("dinov3", weights, extractor):
        return "dinov3", "DINOv3 weights are available locally"
    if model is not None and (pixel_values is not None or pixel_values_videos is not None):
        return "vlm", "no local DINOv3 weights; using the VLM's own vision-tower features"
    if images is not None:
        return "grid", "no local DINOv3 weights and no model/pixel_values for vision-tower features"
    return "grid", "no images, features, masks or model inputs were given"


def _per_image(value: Any, tokens: list[ImageTokens], single: bool, what: str) -> list[Any]:
    """Spread a per-item argument (one entry per image or video, in prompt order) over the target items."""
    if value is None:
        return [None] * len(tokens)
    if single:
        # one item: the value itself, or the prompt's list from which image_index is taken
        if isinstance(value, (list, tuple)) and what == "images" and len(value) > tokens[0].image_index and \
                not _looks_like_image(value) and not (tokens[0].is_video and is_video(value)):
            return [value[tokens[0].image_index]]
        return [value]
    if not isinstance(value, (list, tuple)):
        if len(tokens) == 1:
            return [value]
        raise ValueError(f"Pass {what} as a list with one entry per image ({len(tokens)} images).")
    if len(value) != len(tokens):
        hint = " (for one image's list of boolean masks, wrap it: masks=[[mask_a, mask_b]])" if what == "masks" else ""
        raise ValueError(f"Got {len(value)} {what} for {len(tokens)} images; pass one per image, in prompt "
                         f"order{hint}.")
    return list(value)


def _looks_like_image(value: Any) -> bool:
    """A nested list of numbers (an image given as lists) rather than a list of images."""
    return bool(value) and isinstance(value[0], (int, float))


def build_regions(
    target: ImageTokens | VisualLayout,
    method: str = "auto",
    k: KType = None,
    *,
    images: Any = None,
    model: Any = None,
    inputs: Mapping[str, Any] | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    features: Any = None,
    masks: Any = None,
    weights: str | os.PathLike | None = None,
    extractor: TokenFeatureExtractor | None = None,
    policy: KPolicy | None = None,
    **options: Any,
) -> Result:
    """Region maps for one image or video (``ImageTokens`` -> :class:`RegionMap`) or a prompt (``VisualLayout`` ->
    :class:`PromptRegions`).

    Args:
        target: one item's tokens, or the prompt layout (every image and video gets its own map).
        method: ``"auto"``, ``"vlm"``, ``"dinov3"``, ``"dinov2"``, ``"slic"``, ``"grid"``, ``"masks"``,
            ``"color"`` (Lab colour + Ward) or ``"features"`` (your own ``features`` + Ward).
        k: regions per image; ``None`` = the K policy (16..128 by token count); a sequence of K returns
            ``{k: map}`` with one clustering tree per image serving all of them. A video's K is over all its
            tokens (its regions may span frame groups), except for ``"grid"``: ``k`` cells per frame group.
        images: the original images (PIL / arrays / tensors), needed by dinov*, slic and color; a video's
            entry is its frames (a list, or a ``(T, H, W, C)`` array). For a single ``ImageTokens`` pass that
            image (or the prompt's list; its ``image_index`` is used).
        model, inputs / pixel_values, image_grid_thw: for ``"vlm"``: the VLM and its processor outputs
            (videos: ``pixel_values_videos`` and ``video_grid_thw``, read from ``inputs`` or ``options``).
        features: precomputed (N_tokens, D) features per image (e.g. captured from a forward pass).
        masks: per image, an (H, W) label image or a list of boolean masks at original resolution; per video,
            one such entry per frame.
        weights: DINO weights (file / folder path) or ``"random"`` (timing and tests only).
        extractor: a custom :class:`TokenFeatureExtractor` (used with ``dinov*``/``color``/``auto``).
        policy: the :class:`KPolicy` for ``k=None``.
        options: method options: ``normalize``/``max_dim`` (Ward), ``patches_per_token``/``max_patches``
            /``model_name`` (DINO), ``compactness``/``px_per_token`` (SLIC), ``rest``/``names`` (masks).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown region method {method!r}; choose one of {METHODS}.")
    tokens, single = _targets(target)
    pixels = _vision_inputs(inputs, pixel_values, image_grid_thw, options)
    extra_info: dict = {}
    if method == "auto":
        method, extra_info["auto"] = choose_method(
            images=images, model=model, pixel_values=pixels["image"][0], features=features, masks=masks,
            weights=weights, extractor=extractor, pixel_values_videos=pixels["video"][0])
    many = isinstance(k, (list, tuple, range))
    ks = list(k) if many else [k]
    if method == "grid":
        per_item = _grid_maps(tokens, ks, policy, extra_info)
    elif method == "masks":
        per_item = _mask_maps(tokens, _per_image(masks, tokens, single, "masks"), ks, extra_info, options)
    elif method == "slic":
        per_item = _slic_maps(tokens, _per_image(images, tokens, single, "images"), ks, policy, extra_info, options)
    else:
        ward_opts = {key: options.pop(key) for key in ("normalize", "max_dim") if key in options}
        feats, describe = _features(method, tokens, single, images=images, model=model, pixels=pixels,
                                    features=features, weights=weights, extractor=extractor, options=options)
        per_item = _ward_maps(method, tokens, feats, ks, policy, {**describe, **extra_info}, ward_opts)
    if single:
        out = {kk: per_item[0][kk] for kk in ks}
    else:
        out = {kk: PromptRegions(target, [maps[kk] for maps in per_item]) for kk in ks}
    return out if many else out[ks[0]]


def _targets(target: ImageTokens | VisualLayout) -> tuple[list[ImageTokens], bool]:
    """(the items to build maps for, whether one item was asked for)."""
    if isinstance(target, ImageTokens):
        return [target], True
    if isinstance(target, VisualLayout):
        return list(target.images), False
    raise TypeError(f"target must be ImageTokens or VisualLayout, got {type(target).__name__}.")


def _vision_inputs(inputs: Mapping[str, Any] | None, pixel_values: Any, image_grid_thw: Any,
                   options: dict) -> dict[str, tuple[Any, Any]]:
    """Per kind, ``(pixels, grid)`` for the VLM's own features: the arguments, else ``inputs``' entries."""
    videos = (options.pop("pixel_values_videos", None), options.pop("video_grid_thw", None))
    if inputs is not None:
        pixel_values = inputs.get("pixel_values") if pixel_values is None else pixel_values
        image_grid_thw = inputs.get("image_grid_thw") if image_grid_thw is None else image_grid_thw
        videos = (inputs.get("pixel_values_videos") if videos[0] is None else videos[0],
                  inputs.get("video_grid_thw") if videos[1] is None else videos[1])
    return {"image": (pixel_values, image_grid_thw), "video": videos}


def _grid_maps(tokens: list[ImageTokens], ks: list, policy: KPolicy | None, extra_info: dict) -> list[dict]:
    """Regular grids: K resolved per frame group (the whole image's tokens for an image)."""
    per_item = []
    for im in tokens:
        maps = {}
        for kk in ks:
            used, kinfo = resolve_k(kk, im.tokens_per_group, policy)
            maps[kk] = _tag(grid_regions(im, used), {**kinfo, **extra_info})
        per_item.append(maps)
    return per_item


def _mask_maps(tokens: list[ImageTokens], masks: list, ks: list, extra_info: dict, options: dict) -> list[dict]:
    per_item = []
    for im, m in zip(tokens, masks):
        if m is None:
            raise ValueError(f"method='masks' needs masks for {im.kind} {im.image_index}.")
        note = {} if ks == [None] else {"k_ignored": "masks define the regions"}
        rmap = _tag(mask_regions(im, m, **options), {**extra_info, **note})
        per_item.append({kk: rmap for kk in ks})
    return per_item


def _slic_maps(tokens: list[ImageTokens], images: list, ks: list, policy: KPolicy | None, extra_info: dict,
               options: dict) -> list[dict]:
    per_item = []
    for im, img in zip(tokens, images):
        if img is None:
            raise ValueError("method='slic' needs the original images (images=...).")
        maps = slic_regions(im, img, ks, policy=policy, **options)
        per_item.append({kk: _tag(v, extra_info) for kk, v in maps.items()})
    return per_item


def _ward_maps(method: str, tokens: list[ImageTokens], feats: list[torch.Tensor], ks: list,
               policy: KPolicy | None, info: dict, ward_opts: dict) -> list[dict]:
    """One connectivity-constrained Ward tree per item (spatio-temporal for a video), cut at every K."""
    per_item = []
    for im, f in zip(tokens, feats):
        if f.shape[0] != im.num_tokens:
            raise ValueError(f"Features for {im.kind} {im.image_index} have {f.shape[0]} rows but the {im.kind} has "
                             f"{im.num_tokens} visual tokens; were they computed for this prompt?")
        tree = build_ward_tree(f, im.grid_thw, info=info,
                               normalize=ward_opts.get("normalize", info.get("ward_normalize", True)),
                               max_dim=ward_opts.get("max_dim"))
        per_item.append(ward_regions(im, tree, ks, policy=policy, method=method))
    return per_item


def _tag(rmap: RegionMap, info: dict) -> RegionMap:
    rmap.info = {**rmap.info, **info}
    return rmap


def _features(method: str, tokens: list[ImageTokens], single: bool, *, images: Any, model: Any,
              pixels: dict[str, tuple[Any, Any]], features: Any, weights: Any, extractor: Any,
              options: dict) -> tuple[list[torch.Tensor], dict]:
    """Per-item (N_tokens, D) features for the Ward-based methods, and a description for ``info``."""
    if method == "features":
        if features is None:
            raise ValueError("method='features' needs features=[(N_tokens, D) per image].")
        if single and not isinstance(features, (list, tuple)):
            return [torch.as_tensor(features)], {"extractor": "user"}
        return as_feature_list(features, len(tokens)), {"extractor": "user"}
    if method == "vlm":
        return _vlm_features(tokens, model, pixels)
    # image-based extractors
    ilist = _per_image(images, tokens, single, "images")
    if any(img is None for img in ilist):
        raise ValueError(f"method={method!r} needs the original images (images=...).")
    if extractor is None:
        if method == "color":
            extractor = ColorFeatures(**options)
        else:
            extractor = dino_features(method, weights=weights, **options)
    feats = [extractor(img, im) for im, img in zip(tokens, ilist)]
    describe = extractor.describe() if hasattr(extractor, "describe") else {"extractor": getattr(extractor, "name", "custom")}
    normalize = getattr(extractor, "normalize", True)
    return feats, {**describe, "ward_normalize": bool(normalize)}


def _vlm_features(tokens: list[ImageTokens], model: Any, pixels: dict[str, tuple[Any, Any]]
                  ) -> tuple[list[torch.Tensor], dict]:
    """The VLM's own vision-tower features of each item: one tower call per kind the targets hold."""
    names = {"image": "pixel_values and image_grid_thw", "video": "pixel_values_videos and video_grid_thw"}
    by_kind = {}
    for kind in dict.fromkeys(im.kind for im in tokens):
        values, grid = pixels[kind]
        if model is None or values is None or grid is None:
            raise ValueError(f"method='vlm' needs model= and the processor outputs (inputs= with {names[kind]}).")
        by_kind[kind] = vlm_token_features(model, values, grid, kind=kind)
    picked = []
    for im in tokens:
        if im.kind_index >= len(by_kind[im.kind]):
            raise ValueError(f"{names[im.kind].split(' and ')[0]} hold {len(by_kind[im.kind])} {im.kind}s; "
                             f"{im.kind} {im.kind_index} is missing.")
        picked.append(by_kind[im.kind][im.kind_index])
    name = type(getattr(getattr(model, "model", model), "visual", model)).__name__
    calls = " / ".join(f"get_{kind}_features().pooler_output" for kind in by_kind)
    return picked, {"extractor": f"vlm:{name}", "features": calls}
