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

from ..layouts import ImageTokens, VisualLayout
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
                  masks: Any = None, weights: Any = None, extractor: Any = None) -> tuple[str, str]:
    """(method, reason) that ``method="auto"`` resolves to for these arguments; touches no network."""
    if features is not None:
        return "features", "precomputed features were given"
    if masks is not None:
        return "masks", "user masks were given"
    if images is not None and _dino_available("dinov3", weights, extractor):
        return "dinov3", "DINOv3 weights are available locally"
    if model is not None and pixel_values is not None:
        return "vlm", "no local DINOv3 weights; using the VLM's own vision-tower features"
    if images is not None:
        return "grid", "no local DINOv3 weights and no model/pixel_values for vision-tower features"
    return "grid", "no images, features, masks or model inputs were given"


def _per_image(value: Any, tokens: list[ImageTokens], single: bool, what: str) -> list[Any]:
    """Spread a per-image argument over the target images."""
    if value is None:
        return [None] * len(tokens)
    if single:
        # one image: the value itself, or the prompt's list from which image_index is taken
        if isinstance(value, (list, tuple)) and what == "images" and len(value) > tokens[0].image_index and \
                not _looks_like_image(value):
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
    """Region maps for one image (``ImageTokens`` -> :class:`RegionMap`) or a prompt (``VisualLayout`` ->
    :class:`PromptRegions`).

    Args:
        target: one image's tokens, or the prompt layout (every image gets its own map).
        method: ``"auto"``, ``"vlm"``, ``"dinov3"``, ``"dinov2"``, ``"slic"``, ``"grid"``, ``"masks"``,
            ``"color"`` (Lab colour + Ward) or ``"features"`` (your own ``features`` + Ward).
        k: regions per image; ``None`` = the K policy (16..128 by token count); a sequence of K returns
            ``{k: map}`` with one clustering tree per image serving all of them.
        images: the original images (PIL / arrays / tensors), needed by dinov*, slic and color. For a
            single ``ImageTokens`` pass that image (or the prompt's list; its ``image_index`` is used).
        model, inputs / pixel_values, image_grid_thw: for ``"vlm"``: the VLM and its processor outputs.
        features: precomputed (N_tokens, D) features per image (e.g. captured from a forward pass).
        masks: per image, an (H, W) label image or a list of boolean masks at original resolution.
        weights: DINO weights (file / folder path) or ``"random"`` (timing and tests only).
        extractor: a custom :class:`TokenFeatureExtractor` (used with ``dinov*``/``color``/``auto``).
        policy: the :class:`KPolicy` for ``k=None``.
        options: method options: ``normalize``/``max_dim`` (Ward), ``patches_per_token``/``max_patches``
            /``model_name`` (DINO), ``compactness``/``px_per_token`` (SLIC), ``rest``/``names`` (masks).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown region method {method!r}; choose one of {METHODS}.")
    single = isinstance(target, ImageTokens)
    if single:
        tokens = [target]
    elif isinstance(target, VisualLayout):
        tokens = list(target.images)
    else:
        raise TypeError(f"target must be ImageTokens or VisualLayout, got {type(target).__name__}.")
    if inputs is not None:
        pixel_values = inputs.get("pixel_values") if pixel_values is None else pixel_values
        image_grid_thw = inputs.get("image_grid_thw") if image_grid_thw is None else image_grid_thw

    auto_reason = None
    if method == "auto":
        method, auto_reason = choose_method(images=images, model=model, pixel_values=pixel_values,
                                            features=features, masks=masks, weights=weights, extractor=extractor)
    many = isinstance(k, (list, tuple, range))
    ks = list(k) if many else [k]
    per_image: list[dict] = []  # per image: {requested k: RegionMap}
    extra_info: dict = {"auto": auto_reason} if auto_reason else {}

    ward_opts = {key: options.pop(key) for key in ("normalize", "max_dim") if key in options}

    if method == "grid":
        for im in tokens:
            maps = {}
            for kk in ks:
                used, kinfo = resolve_k(kk, im.num_tokens, policy)
                maps[kk] = _tag(grid_regions(im, used), {**kinfo, **extra_info})
            per_image.append(maps)
    elif method == "masks":
        mlist = _per_image(masks, tokens, single, "masks")
        for im, m in zip(tokens, mlist):
            if m is None:
                raise ValueError(f"method='masks' needs masks for image {im.image_index}.")
            note = {} if ks == [None] else {"k_ignored": "masks define the regions"}
            rmap = _tag(mask_regions(im, m, **options), {**extra_info, **note})
            per_image.append({kk: rmap for kk in ks})
    elif method == "slic":
        ilist = _per_image(images, tokens, single, "images")
        for im, img in zip(tokens, ilist):
            if img is None:
                raise ValueError("method='slic' needs the original images (images=...).")
            maps = slic_regions(im, img, ks, policy=policy, **options)
            per_image.append({kk: _tag(v, extra_info) for kk, v in maps.items()})
    else:
        feats, describe = _features(method, tokens, single, images=images, model=model, pixel_values=pixel_values,
                                    image_grid_thw=image_grid_thw, features=features, weights=weights,
                                    extractor=extractor, options=options)
        for im, f in zip(tokens, feats):
            if f.shape[0] != im.num_tokens:
                raise ValueError(f"Features for image {im.image_index} have {f.shape[0]} rows but the image has "
                                 f"{im.num_tokens} visual tokens; were they computed for this prompt?")
            tree = build_ward_tree(f, im.grid_thw, info={**describe, **extra_info},
                                   normalize=ward_opts.get("normalize", describe.get("ward_normalize", True)),
                                   max_dim=ward_opts.get("max_dim"))
            per_image.append(ward_regions(im, tree, ks, policy=policy, method=method))

    if single:
        out = {kk: per_image[0][kk] for kk in ks}
    else:
        out = {kk: PromptRegions(target, [maps[kk] for maps in per_image]) for kk in ks}
    return out if many else out[ks[0]]


def _tag(rmap: RegionMap, info: dict) -> RegionMap:
    rmap.info = {**rmap.info, **info}
    return rmap


def _features(method: str, tokens: list[ImageTokens], single: bool, *, images: Any, model: Any,
              pixel_values: Any, image_grid_thw: Any, features: Any, weights: Any, extractor: Any,
              options: dict) -> tuple[list[torch.Tensor], dict]:
    """Per-image (N_tokens, D) features for the Ward-based methods, and a description for ``info``."""
    if method == "features":
        if features is None:
            raise ValueError("method='features' needs features=[(N_tokens, D) per image].")
        if single and not isinstance(features, (list, tuple)):
            return [torch.as_tensor(features)], {"extractor": "user"}
        return as_feature_list(features, len(tokens)), {"extractor": "user"}
    if method == "vlm":
        if model is None or pixel_values is None or image_grid_thw is None:
            raise ValueError("method='vlm' needs model= and the processor outputs (inputs= with pixel_values and "
                             "image_grid_thw).")
        all_feats = vlm_token_features(model, pixel_values, image_grid_thw)
        picked = []
        for im in tokens:
            if im.image_index >= len(all_feats):
                raise ValueError(f"pixel_values hold {len(all_feats)} images; image {im.image_index} is missing.")
            picked.append(all_feats[im.image_index])
        name = type(getattr(getattr(model, "model", model), "visual", model)).__name__
        return picked, {"extractor": f"vlm:{name}", "features": "get_image_features().pooler_output"}
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
