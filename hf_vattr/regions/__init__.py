"""Region unitization: partition each image's (and video's) visual tokens into K regions.

Start with :func:`build_regions` (``method="auto" | "vlm" | "dinov3" | "dinov2" |
"slic" | "grid" | "masks" | "color" | "features"``); the lower-level pieces
(feature extractors, the Ward tree, the K policy) are exported for reuse.
"""

from .build import METHODS, build_regions, choose_method
from .features import (
    ColorFeatures,
    TimmPatchFeatures,
    TokenFeatureExtractor,
    VisionFeatureRecorder,
    WeightsUnavailableError,
    dino_features,
    find_local_weights,
    resize_to_token_grid,
    vlm_token_features,
)
from .map import PromptRegions, RegionMap, grid_regions, prompt_regions
from .masks import mask_regions
from .policy import DEFAULT_K_POLICY, KPolicy, resolve_k
from .slic import slic_regions
from .ward import WardTree, build_ward_tree, ward_regions

__all__ = [
    "RegionMap",
    "PromptRegions",
    "grid_regions",
    "prompt_regions",
    "build_regions",
    "choose_method",
    "METHODS",
    "KPolicy",
    "DEFAULT_K_POLICY",
    "resolve_k",
    "WardTree",
    "build_ward_tree",
    "ward_regions",
    "TokenFeatureExtractor",
    "TimmPatchFeatures",
    "ColorFeatures",
    "WeightsUnavailableError",
    "dino_features",
    "find_local_weights",
    "resize_to_token_grid",
    "vlm_token_features",
    "VisionFeatureRecorder",
    "slic_regions",
    "mask_regions",
]
