"""The linear attribution estimator (DESIGN.md, "The method", step 3).

``score(S, k) = sum_{l,h} w[l, h] * f[l, h](S, k)  (+ bias)``

``f[l, h](S, k)`` is the attention that the query predicting each token of span ``S``
pays to region ``k``, pooled over the region's visual tokens (``pooling``: sum or mean)
and averaged over the span's tokens. One weight per (layer, head) of the base model's
language decoder: ``L * H`` parameters (plus an optional scalar bias).

Because the map is linear, the score of a span is the mean of its tokens' scores, so
per-token and per-span streaming agree, and a streaming capture can score layer by
layer (:meth:`LinearEstimator.score_layer`) without ever holding all ``L`` layers.

Serialization is the ``huggingface_hub`` mixin's: ``config.json`` holds every
``__init__`` argument (all JSON values), ``model.safetensors`` holds ``weight`` (and
``bias``), ``README.md`` is a generated model card. ``from_pretrained`` takes a local
folder or a Hub repo id. See ``docs/estimator.md``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import SoftTemporaryDirectory, validate_hf_hub_args
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "LinearEstimator",
    "EstimatorError",
    "EstimatorConfigError",
    "EstimatorLoadError",
    "EstimatorMismatchError",
    "POOLINGS",
]

POOLINGS = ("sum", "mean")
CONFIG_NAME = constants.CONFIG_NAME  # "config.json"
WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"

# First line of the body of every card we generate. `save_pretrained` regenerates a
# README.md that carries it (so metrics never go stale) and leaves any other alone.
_CARD_MARKER = "<!-- hf_vattr:generated-card (delete this line to keep manual edits on re-save) -->"

_FIX_HINT = (
    "An estimator's weights belong to the (layer, head) grid of the one model it was trained on; they "
    "cannot be reused across architectures or sizes. Either load the estimator trained for this model "
    "(LinearEstimator.from_pretrained('<estimator repo or folder for this model>')), or train one for it: "
    "`hf-vattr collect --model <model>` (ablation ground truth) then `hf-vattr train` (fits the weights)."
)


class EstimatorError(Exception):
    """Base class of this module's errors."""


class EstimatorConfigError(EstimatorError, ValueError):
    """An estimator config (``__init__`` arguments or a ``config.json``) is invalid."""


class EstimatorLoadError(EstimatorError, OSError):
    """An estimator could not be found or read (missing folder/repo/file, offline, corrupt weights)."""


class EstimatorMismatchError(EstimatorError, ValueError):
    """The estimator was trained for a different model than the one it is used with.

    ``mismatches`` maps each mismatching field (``num_hidden_layers``, ``num_attention_heads``,
    ``model_type``) to ``(estimator_value, model_value)``.
    """

    def __init__(self, message: str, mismatches: dict[str, tuple[Any, Any]] | None = None):
        super().__init__(message)
        self.mismatches = dict(mismatches or {})


_MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

{{ marker }}

# {{ title }}

A **visual-attribution estimator** for {{ base_model_md }}, made with the
`hf_vattr` library (a transformers plugin). It predicts, from the attention the model
computes anyway, how much each image region causally supports each step of the model's
reasoning (the log-probability drop of the step when the region is ablated), so
attribution can stream beside generation at no extra forward passes
(method: arXiv 2604.16587, "vSTREAM").

    score(S, k) = sum over layers l, heads h of  w[l, h] * f[l, h](S, k){{ bias_formula }}

`f[l, h](S, k)` is the attention of the query predicting each token of span `S` on the
visual tokens of region `k` ({{ pooling }} over the region's tokens), averaged over the span.

## Estimator

| Field | Value |
|---|---|
{{ spec_rows }}

## Training metrics

{{ metrics_md }}

## Training data

{{ training_data_md }}

## Usage

```python
from transformers import AutoConfig
from hf_vattr.estimator import LinearEstimator
estimator = LinearEstimator.from_pretrained("{{ repo_id }}")
estimator.check_compatible(AutoConfig.from_pretrained("{{ base_model_load }}"))
scores = estimator(features)  # features (..., L, H, K) pooled attention -> (..., K) region effects
```

## Files

- `config.json`: the estimator's arguments (L, H, pooling, region method, K policy, base model, metrics).
- `model.safetensors`: `weight` of shape ({{ num_layers }}, {{ num_heads }}){{ bias_file }}, float32.
"""

_METRIC_MEANINGS = {
    "lds": "Linear datamodeling score: Spearman of predicted vs actual effects of random region subsets",
    "r2": "R^2 of predicted vs actual single-region ablation effects",
    "pearson": "Pearson correlation of predicted vs actual single-region effects",
    "spearman": "Spearman correlation of predicted vs actual single-region effects",
    "topk_drop": "Log-prob drop when the top-K attributed regions are ablated (higher is more faithful)",
    "top_k_drop": "Log-prob drop when the top-K attributed regions are ablated (higher is more faithful)",
    "loss": "Training loss (negative Pearson, lower is better)",
    "val_loss": "Validation loss (negative Pearson, lower is better)",
}


def _to_jsonable(value: Any, where: str) -> Any:
    """Recursively turn ``value`` into plain JSON values (numpy / 0-d torch scalars included)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise EstimatorConfigError(f"{where}: tensors are not JSON values (got shape {tuple(value.shape)}).")
        value = value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise EstimatorConfigError(f"{where}: keys must be strings, got {k!r}.")
            out[k] = _to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy scalars without importing numpy
    if callable(item) and getattr(value, "shape", None) == ():
        return _to_jsonable(item(), where)
    raise EstimatorConfigError(f"{where}: {type(value).__name__} is not a JSON value: {value!r}.")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise EstimatorConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise EstimatorConfigError(f"{name} must be a non-empty string or None, got {value!r}.")
    return value


def _optional_dict(value: Any, name: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise EstimatorConfigError(f"{name} must be a dict or None, got {type(value).__name__}: {value!r}.")
    return _to_jsonable(value, name)


class LinearEstimator(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hf_vattr",
    tags=["hf_vattr", "visual-attribution", "interpretability", "attention", "multimodal", "vlm"],
    model_card_template=_MODEL_CARD_TEMPLATE,
):
    """Linear map from pooled attention features to causal region effects.

    Args:
        num_layers: ``L``, decoder layers of the base model (``text_config.num_hidden_layers``).
        num_heads: ``H``, query heads per layer (``text_config.num_attention_heads``).
        use_bias: add a learned scalar bias to every score (a constant shift; it does not
            change rankings nor the Pearson training loss).
        model_type: ``config.model_type`` of the base model (top-level, e.g. ``"qwen3_vl"``);
            checked by :meth:`check_compatible`. ``None`` accepts any model (with a warning).
        base_model_id: Hub id or path of the base model, shown in the model card.
        base_model_revision: commit / revision of the base model the estimator was trained on.
        pooling: how a region's visual tokens are pooled into a feature, ``"sum"`` or ``"mean"``.
        region_method: how regions were made at training time (``"grid"``, ``"ward"``, ...).
        k_policy: how the number of regions K is chosen, e.g. ``{"k": 32}`` or ``{"min": 16, "max": 128}``.
        training_metrics: e.g. ``{"lds": 0.41, "r2": 0.65, "topk_drop": 1.9}``; shown as a table in the card.
        training_data: summary of the data the weights were fit on (counts, task, masks per example...).
        nonnegative: constrain weights to be >= 0: :attr:`effective_weight` is ``weight.clamp_min(0)``
            (training can also call :meth:`project_` after each optimizer step).

    Every argument is a JSON value, so ``save_pretrained`` / ``push_to_hub`` write them all to
    ``config.json`` and ``from_pretrained`` rebuilds the same estimator.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        *,
        use_bias: bool = False,
        model_type: str | None = None,
        base_model_id: str | None = None,
        base_model_revision: str | None = None,
        pooling: str = "sum",
        region_method: str = "grid",
        k_policy: dict | None = None,
        training_metrics: dict | None = None,
        training_data: dict | None = None,
        nonnegative: bool = False,
    ):
        super().__init__()
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_heads = _positive_int(num_heads, "num_heads")
        if pooling not in POOLINGS:
            raise EstimatorConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if not isinstance(use_bias, bool):
            raise EstimatorConfigError(f"use_bias must be a bool, got {use_bias!r}.")
        if not isinstance(nonnegative, bool):
            raise EstimatorConfigError(f"nonnegative must be a bool, got {nonnegative!r}.")
        if not isinstance(region_method, str) or not region_method:
            raise EstimatorConfigError(f"region_method must be a non-empty string, got {region_method!r}.")
        self.use_bias = use_bias
        self.nonnegative = nonnegative
        self.pooling = pooling
        self.region_method = region_method
        self.model_type = _optional_str(model_type, "model_type")
        self.base_model_id = _optional_str(base_model_id, "base_model_id")
        self.base_model_revision = _optional_str(base_model_revision, "base_model_revision")
        self.k_policy = _optional_dict(k_policy, "k_policy")
        self.training_metrics = _optional_dict(training_metrics, "training_metrics")
        self.training_data = _optional_dict(training_data, "training_data")

        # Uniform init = mean attention over all (layer, head): a sensible untrained baseline,
        # and never all-zero (a zero predictor has no Pearson gradient).
        init = torch.full((self.num_layers, self.num_heads), 1.0 / (self.num_layers * self.num_heads))
        self.weight = nn.Parameter(init)
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(()))
        else:
            self.register_parameter("bias", None)

        # The mixin builds its config from the raw call arguments in __new__ and silently drops
        # values it cannot serialize; make the normalized arguments authoritative instead.
        self._hub_mixin_config = self.config

    # ------------------------------------------------------------------ config

    @property
    def config(self) -> dict[str, Any]:
        """The ``__init__`` arguments as a JSON-ready dict (what ``config.json`` holds)."""
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "use_bias": self.use_bias,
            "model_type": self.model_type,
            "base_model_id": self.base_model_id,
            "base_model_revision": self.base_model_revision,
            "pooling": self.pooling,
            "region_method": self.region_method,
            "k_policy": json.loads(json.dumps(self.k_policy)),
            "training_metrics": json.loads(json.dumps(self.training_metrics)),
            "training_data": json.loads(json.dumps(self.training_data)),
            "nonnegative": self.nonnegative,
        }

    def set_training_info(self, *, training_metrics: dict | None = None, training_data: dict | None = None) -> None:
        """Record metrics / data summary after fitting (they go to config.json and the model card)."""
        if training_metrics is not None:
            self.training_metrics = _optional_dict(training_metrics, "training_metrics")
        if training_data is not None:
            self.training_data = _optional_dict(training_data, "training_data")
        self._hub_mixin_config = self.config

    def extra_repr(self) -> str:
        parts = [f"num_layers={self.num_layers}", f"num_heads={self.num_heads}", f"pooling={self.pooling!r}"]
        if self.use_bias:
            parts.append("use_bias=True")
        if self.nonnegative:
            parts.append("nonnegative=True")
        parts.append(f"model_type={self.model_type!r}")
        return ", ".join(parts)

    # ----------------------------------------------------------------- scoring

    @property
    def effective_weight(self) -> torch.Tensor:
        """The (L, H) weights actually applied: ``weight``, clamped at 0 if ``nonnegative``."""
        return self.weight.clamp_min(0.0) if self.nonnegative else self.weight

    @torch.no_grad()
    def project_(self) -> LinearEstimator:
        """Clamp ``weight`` in place to the feasible set (>= 0 if ``nonnegative``); a no-op otherwise."""
        if self.nonnegative:
            self.weight.clamp_(min=0.0)
        return self

    @staticmethod
    def _as_float(x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else x.to(torch.float32)

    def _cast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # `.to` returns `t` itself when dtype and device already match: no copy.
        return t.to(device=like.device, dtype=like.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scores ``(..., K)`` from pooled attention features ``(..., L, H, K)``.

        Features may be on any device and in any floating dtype; the weights are cast to them
        (no copy when they already match). Integer features are promoted to float32.
        """
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}.")
        if features.dim() < 3 or tuple(features.shape[-3:-1]) != (self.num_layers, self.num_heads):
            raise ValueError(
                f"features must have shape (..., L={self.num_layers}, H={self.num_heads}, K), "
                f"got {tuple(features.shape)}."
            )
        features = self._as_float(features)
        scores = torch.einsum("...lhk,lh->...k", features, self._cast(self.effective_weight, features))
        return self.add_bias(scores)

    def score_layer(self, layer_idx: int, pooled: torch.Tensor) -> torch.Tensor:
        """Partial score of one layer: ``sum_h w[layer_idx, h] * pooled[..., h, :]``.

        ``pooled`` is ``(H, K)`` (or ``(..., H, K)``); returns ``(K,)`` (or ``(..., K)``).
        The bias is *not* included: ``forward(f) == add_bias(sum_l score_layer(l, f[..., l, :, :]))``.
        Negative indices count from the last layer.
        """
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, numbers.Integral):
            raise TypeError(f"layer_idx must be an int, got {layer_idx!r}.")
        if not -self.num_layers <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx {layer_idx} out of range for an estimator with {self.num_layers} layers.")
        if pooled.dim() < 2 or pooled.shape[-2] != self.num_heads:
            raise ValueError(f"pooled must have shape (..., H={self.num_heads}, K), got {tuple(pooled.shape)}.")
        pooled = self._as_float(pooled)
        w = self._cast(self.effective_weight[layer_idx], pooled)
        return torch.einsum("...hk,h->...k", pooled, w)

    def add_bias(self, scores: torch.Tensor) -> torch.Tensor:
        """Add the bias (if any) to summed per-layer scores."""
        if self.bias is None:
            return scores
        return scores + self._cast(self.bias, scores)

    # ----------------------------------------------------------- compatibility

    def check_compatible(self, model_or_config: Any) -> LinearEstimator:
        """Raise :class:`EstimatorMismatchError` unless this estimator fits ``model_or_config``.

        Accepts a transformers model, a ``PreTrainedConfig`` or a config dict. The decoder's
        text config (``get_text_config(decoder=True)``, else ``config.text_config``, else the
        config itself) must have ``num_hidden_layers == L`` and ``num_attention_heads == H``; the
        top-level ``model_type`` must equal the estimator's (the text config's ``model_type`` is
        accepted too). An estimator with ``model_type=None`` accepts any type, with a warning.
        Returns ``self`` so calls chain.
        """
        config = _resolve_config(model_or_config)
        text = _text_config(config)
        top_type = _get(config, "model_type")
        text_type = _get(text, "model_type")
        n_layers = _get(text, "num_hidden_layers")
        n_heads = _get(text, "num_attention_heads")
        if n_layers is None or n_heads is None:
            raise EstimatorMismatchError(
                f"Cannot check compatibility: the model's text config ({type(text).__name__}) has no "
                f"num_hidden_layers / num_attention_heads (got {n_layers!r} / {n_heads!r}). "
                "Pass the model or its transformers config."
            )
        mismatches: dict[str, tuple[Any, Any]] = {}
        lines = []
        if n_layers != self.num_layers:
            mismatches["num_hidden_layers"] = (self.num_layers, n_layers)
            lines.append(f"  - num_hidden_layers: estimator has {self.num_layers}, model has {n_layers}")
        if n_heads != self.num_heads:
            mismatches["num_attention_heads"] = (self.num_heads, n_heads)
            lines.append(f"  - num_attention_heads: estimator has {self.num_heads}, model has {n_heads}")
        if self.model_type is None:
            logger.warning(
                "This LinearEstimator records no model_type, so it cannot check that it was trained for a "
                f"'{top_type}' model; only L and H were checked. Set model_type when training."
            )
        elif self.model_type not in {top_type, text_type}:
            mismatches["model_type"] = (self.model_type, top_type)
            lines.append(f"  - model_type: estimator was trained for {self.model_type!r}, model is {top_type!r}")
        if mismatches:
            trained_on = f" (trained on {self.base_model_id!r})" if self.base_model_id else ""
            raise EstimatorMismatchError(
                f"This LinearEstimator{trained_on} does not match the model:\n" + "\n".join(lines) + "\n" + _FIX_HINT,
                mismatches,
            )
        return self

    # ------------------------------------------------------------- model card

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The README.md written by ``save_pretrained`` / ``push_to_hub``.

        ``model_card_kwargs`` may set ``repo_id`` (used in the usage snippet; ``push_to_hub``
        sets it) and ``title``.
        """
        card_data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        if self.base_model_id:
            card_data.base_model = self.base_model_id
        if self.model_type:
            card_data.tags = sorted(set(card_data.tags or []) | {self.model_type})
        values = self._card_values(**kwargs)
        template = self._hub_mixin_info.model_card_template
        try:
            import jinja2  # noqa: F401  (the mixin's renderer needs it)
        except ImportError:
            fields = {"card_data": card_data.to_yaml(), **values}
            return ModelCard(re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(fields[m[1]]), template))
        return ModelCard.from_template(card_data=card_data, template_str=template, **values)

    def _card_values(self, repo_id: str | None = None, title: str | None = None, **extra: Any) -> dict[str, Any]:
        base = self.base_model_id
        base_md = f"[`{base}`](https://huggingface.co/{base})" if base and _looks_like_repo_id(base) else (
            f"`{base}`" if base else "an unspecified base model"
        )
        if base and self.model_type:
            base_md += f" (`{self.model_type}`)"
        elif self.model_type:
            base_md = f"a `{self.model_type}` model"
        n_params = self.num_layers * self.num_heads + (1 if self.use_bias else 0)
        rows = [
            ("Base model", f"`{base}`" if base else "unspecified"),
            ("Base model revision", f"`{self.base_model_revision}`" if self.base_model_revision else "unspecified"),
            ("Model type", f"`{self.model_type}`" if self.model_type else "any (not recorded)"),
            ("Layers (L)", self.num_layers),
            ("Heads per layer (H)", self.num_heads),
            ("Parameters", f"{n_params} (L x H{' + bias' if self.use_bias else ''})"),
            ("Pooling over a region's tokens", self.pooling),
            ("Region method", self.region_method),
            ("K policy (number of regions)", _inline(self.k_policy) if self.k_policy else "not recorded"),
            ("Non-negative weights", "yes" if self.nonnegative else "no"),
        ]
        values = {
            "marker": _CARD_MARKER,
            "title": title or (f"hf_vattr linear estimator for {base}" if base else "hf_vattr linear estimator"),
            "base_model_md": base_md,
            "bias_formula": " + b" if self.use_bias else "",
            "pooling": self.pooling,
            "spec_rows": "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows),
            "metrics_md": _metrics_table(self.training_metrics),
            "training_data_md": _bullets(self.training_data) or "No training data summary was recorded.",
            "repo_id": repo_id or "<estimator repo id or folder>",
            "base_model_load": base or "<base model id>",
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "bias_file": " and scalar `bias`" if self.use_bias else "",
        }
        values.update(extra)
        return values

    # ------------------------------------------------------------ save / push

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"weight": self.weight.detach().to("cpu", torch.float32).contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.detach().to("cpu", torch.float32).contiguous()
        # A single metadata key: safetensors serializes metadata in hash-map order, so more keys
        # would make identical weights produce different bytes (and spurious Hub commits).
        save_file(tensors, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` to ``save_directory``.

        A README.md this library generated earlier is regenerated (metrics stay current); a
        README.md without the generated-card marker line is left untouched.
        """
        readme = Path(save_directory) / constants.REPOCARD_NAME
        if readme.is_file() and _CARD_MARKER in readme.read_text(encoding="utf-8", errors="replace"):
            readme.unlink()
        return super().save_pretrained(
            save_directory,
            config=config,
            repo_id=repo_id,
            push_to_hub=push_to_hub,
            model_card_kwargs=model_card_kwargs,
            **push_to_hub_kwargs,
        )

    @validate_hf_hub_args
    def push_to_hub(
        self,
        repo_id: str,
        *,
        config: dict | None = None,
        commit_message: str = "Push hf_vattr LinearEstimator",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Create ``repo_id`` if needed and upload config, weights and model card in one commit.

        Same arguments as ``PyTorchModelHubMixin.push_to_hub``; the card's usage snippet names
        the resolved repo id. Returns the commit URL.
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        with SoftTemporaryDirectory() as tmp:
            saved_path = Path(tmp) / repo_id
            self.save_pretrained(saved_path, config=config, model_card_kwargs=card_kwargs)
            return api.upload_folder(
                repo_id=repo_id,
                repo_type="model",
                folder_path=saved_path,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                delete_patterns=delete_patterns,
            )

    # ------------------------------------------------------------------- load

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> LinearEstimator:
        """Load from a local folder or a Hub repo id (``config.json`` + ``model.safetensors``).

        ``model_kwargs`` override ``config.json`` values. Raises :class:`EstimatorLoadError`
        (an ``OSError``) when the folder / repo / a file cannot be found or read (including
        offline mode with an empty cache), and :class:`EstimatorConfigError` (a ``ValueError``)
        for an invalid config or weights that do not match it.
        """
        source = str(pretrained_model_name_or_path)
        hub_kwargs = dict(
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        config_file = _resolve_file(source, CONFIG_NAME, hub_kwargs)
        config = _read_config(config_file, source)
        known = set(cls._hub_mixin_init_parameters) - {"self"}
        unknown = sorted(set(config) - known)
        if unknown:
            logger.warning(
                f"Ignoring unknown keys {unknown} in {config_file} (written by a newer hf_vattr?)."
            )
        kwargs = {k: v for k, v in config.items() if k in known}
        kwargs.update(model_kwargs)
        for required in ("num_layers", "num_heads"):
            if required not in kwargs:
                raise EstimatorConfigError(f"{config_file} has no {required!r}: not a hf_vattr LinearEstimator config.")
        try:
            model = cls(**kwargs)
        except EstimatorConfigError as e:
            raise EstimatorConfigError(f"Invalid estimator config in {config_file}: {e}") from e
        except TypeError as e:
            raise EstimatorConfigError(f"Invalid estimator config in {config_file}: {e}") from e
        weights_file = _resolve_file(source, WEIGHTS_NAME, hub_kwargs)
        model._load_weights(weights_file, strict=strict)
        model.to(map_location)
        model.eval()
        return model

    def _load_weights(self, weights_file: str, *, strict: bool = True) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(weights_file, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise EstimatorLoadError(f"Could not read estimator weights {weights_file}: {e}") from e
        expected = {"weight": (self.num_layers, self.num_heads)}
        if self.bias is not None:
            expected["bias"] = ()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or (strict and unexpected):
            raise EstimatorConfigError(
                f"{weights_file} does not match its config (L={self.num_layers}, H={self.num_heads}, "
                f"use_bias={self.use_bias}): missing tensors {missing}, unexpected tensors {unexpected}."
            )
        for name, shape in expected.items():
            if tuple(state[name].shape) != shape:
                raise EstimatorConfigError(
                    f"{weights_file}: tensor {name!r} has shape {tuple(state[name].shape)}, but the config "
                    f"(L={self.num_layers}, H={self.num_heads}) needs {shape}."
                )
            if not state[name].is_floating_point() or not bool(torch.isfinite(state[name]).all()):
                raise EstimatorConfigError(f"{weights_file}: tensor {name!r} must hold finite floats.")
        with torch.no_grad():
            for name in expected:
                getattr(self, name).copy_(state[name])


# ---------------------------------------------------------------------- helpers


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _resolve_config(model_or_config: Any) -> Any:
    if isinstance(model_or_config, Mapping):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if isinstance(model_or_config, nn.Module) or (config is not None and hasattr(config, "model_type")):
        if config is None:
            raise TypeError(f"{type(model_or_config).__name__} has no .config; pass a transformers model or config.")
        return config
    if hasattr(model_or_config, "model_type") or hasattr(model_or_config, "to_dict"):
        return model_or_config
    raise TypeError(
        f"check_compatible expects a transformers model, config or config dict, got {type(model_or_config).__name__}."
    )


def _text_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        text = config.get("text_config")
        return text if isinstance(text, Mapping) else config
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config(decoder=True)
        except TypeError:  # older signature without `decoder`
            return get_text_config()
    text = getattr(config, "text_config", None)
    return text if text is not None else config


def _looks_like_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", s)) and not s.startswith((".", "/"))


def _looks_like_path(s: str) -> bool:
    return (
        os.path.isabs(s)
        or s.startswith(("./", "../", "~", ".\\"))
        or s in {".", ".."}
        or s.count("/") > 1
        or (os.sep != "/" and os.sep in s)
        or os.path.exists(s)
    )


def _resolve_file(source: str, filename: str, hub_kwargs: dict[str, Any]) -> str:
    """Path of ``filename`` in a local folder or a Hub repo, with errors that say what to do."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            raise EstimatorLoadError(
                f"{Path(source).resolve()} has no {filename}: not a saved LinearEstimator folder "
                "(save_pretrained writes config.json and model.safetensors)."
            )
        return path
    if _looks_like_path(source):
        raise EstimatorLoadError(
            f"No estimator folder at {source!r}. Pass a folder written by LinearEstimator.save_pretrained, "
            "or a Hub repo id like 'namespace/name'."
        )
    revision = hub_kwargs.get("revision") or constants.DEFAULT_REVISION
    where = f"'{source}' (revision {revision!r}) on {constants.ENDPOINT}"
    try:
        return hf_hub_download(repo_id=source, filename=filename, **hub_kwargs)
    except HFValidationError as e:
        raise EstimatorLoadError(
            f"{source!r} is neither an existing folder nor a valid Hub repo id ('namespace/name'): {e}"
        ) from e
    except RepositoryNotFoundError as e:
        raise EstimatorLoadError(
            f"Estimator repository {where} was not found. Check the repo id, pass token=... for a private "
            "repo, or pass a local folder written by save_pretrained."
        ) from e
    except RevisionNotFoundError as e:
        raise EstimatorLoadError(f"Revision {revision!r} of estimator repository '{source}' does not exist.") from e
    except LocalEntryNotFoundError as e:
        offline = constants.is_offline_mode() or hub_kwargs.get("local_files_only")
        cache = hub_kwargs.get("cache_dir") or constants.HF_HUB_CACHE
        reason = (
            "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)"
            if offline
            else f"the Hub at {constants.ENDPOINT} could not be reached"
        )
        raise EstimatorLoadError(
            f"Cannot load estimator '{source}': {reason} and {filename} of revision {revision!r} is not in the "
            f"local cache ({cache}). Download it once while online, or pass a local folder written by "
            "save_pretrained."
        ) from e
    except EntryNotFoundError as e:
        raise EstimatorLoadError(
            f"Repository {where} has no {filename}: it is not a hf_vattr LinearEstimator repo "
            "(push_to_hub uploads config.json and model.safetensors)."
        ) from e
    except (HfHubHTTPError, OfflineModeIsEnabled) as e:
        raise EstimatorLoadError(f"Could not download {filename} of estimator {where}: {e}") from e


def _read_config(config_file: str, source: str) -> dict[str, Any]:
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise EstimatorConfigError(f"{config_file} (estimator {source!r}) is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise EstimatorConfigError(f"{config_file} must hold a JSON object, got {type(config).__name__}.")
    return config


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _inline(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v)}" for k, v in d.items())


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _metrics_table(metrics: Mapping[str, Any] | None) -> str:
    if not metrics:
        return "No training metrics were recorded."
    lines = ["| Metric | Value | Meaning |", "|---|---|---|"]
    for key, value in _flatten(metrics):
        leaf = key.rsplit(".", 1)[-1].lower()
        value_s = json.dumps(value) if isinstance(value, list) else _fmt(value)
        lines.append(f"| {_cell(key)} | {_cell(value_s)} | {_cell(_METRIC_MEANINGS.get(leaf, ''))} |")
    return "\n".join(lines)


def _bullets(d: Mapping[str, Any] | None) -> str:
    if not d:
        return ""
    lines = []
    for key, value in _flatten(d):
        value_s = json.dumps(value) if isinstance(value, list) else _fmt(value)
        lines.append(f"- **{key}**: {value_s}")
    return "\n".join(lines)
