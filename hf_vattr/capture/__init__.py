"""Stage 2, capture: the predicting query's attention on the visual keys, pooled to regions, recorded
inside ``generate`` through transformers' ``AttentionInterface``.

The modules, from the bottom up: :mod:`.pooling` (rows on the visual keys pooled to regions, the feature
kinds), :mod:`.value_norms` (``||W_O^h v_j||`` through the output projection), :mod:`.kernels` (sdpa
kernels that also return the log-sum-exp), :mod:`.dispatch` (the capturing attention function and the
per-model switch), then :mod:`.attention` (:class:`AttentionCapture`, the recording) and
:mod:`.intervention` (mask rewrites for ablations).
"""

from .attention import AttentionCapture
from .dispatch import capture_active, own_implementation
from .intervention import attention_intervention
from .pooling import FEATURE_KINDS, CaptureError, attention_row_features, visual_row_features_from_lse
from .value_norms import output_norms, plain_projection_weight, value_norm_weights, value_norm_weights_from_module

__all__ = [
    "AttentionCapture",
    "attention_row_features",
    "visual_row_features_from_lse",
    "value_norm_weights",
    "value_norm_weights_from_module",
    "plain_projection_weight",
    "output_norms",
    "FEATURE_KINDS",
    "attention_intervention",
    "CaptureError",
    "capture_active",
    "own_implementation",
]
