"""The linear attribution estimator: ``score(S, k) = sum_{l,h} w[l, h] * f[l, h](S, k)  (+ bias)``.

``f[l, h](S, k)`` is the attention that the query predicting each token of span ``S`` pays
to region ``k``, pooled over the region's visual tokens (``pooling``: sum or mean) and
averaged over the span's tokens: one weight per (layer, head) of the base model's language
decoder, ``L * H`` parameters. Because the map is linear, a span's score is the mean of its
tokens' scores, so per-token and per-span streaming agree.

Save, load, push and the model card are ``huggingface_hub.PyTorchModelHubMixin``'s:
``config.json`` holds the ``__init__`` arguments, ``model.safetensors`` holds ``weight``
(and ``bias``), ``README.md`` is rendered from ``estimator_card.md``. The mixin's hooks are
filled in where its defaults would differ: ``_save_pretrained`` (same bytes as always),
``_from_pretrained`` (a corrupt or mismatched file fails loudly instead of leaving the
initial weights), ``generate_model_card`` (per-estimator metadata). See ``docs/estimator.md``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import is_jsonable
from torch import nn
from transformers.utils import logging

from .errors import AttributionError
from .capture import FEATURE_KINDS
from .layouts import text_dims
from .metrics import metric_meaning

logger = logging.get_logger(__name__)

__all__ = ["LinearEstimator", "INHERITING_SECTIONS", "EstimatorError", "EstimatorConfigError", "EstimatorLoadError",
           "EstimatorNotFoundError", "EstimatorMismatchError", "POOLINGS", "MODEL_CARD_TEMPLATE"]

POOLINGS = ("sum", "mean")
#: Span sections that inherit the scores of the reasoning before them (see ``LinearEstimator.inherited``).
INHERITING_SECTIONS = ("answer",)
#: How the earlier steps' scores are pooled into an answer's inherited part.
INHERIT_POOLS = ("mean", "max")
WEIGHTS_NAME = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"

# First line of every card body we render. A README.md carrying it is regenerated on re-save
# (so the metrics never go stale); any other README.md is left alone, as the mixin does.
_CARD_MARKER = "<!-- hf_vattr:generated-card (delete this line to keep manual edits on re-save) -->"

_FIX_HINT = (
    "An estimator's weights belong to the (layer, head) grid of the one model it was trained on; they "
    "cannot be reused across architectures or sizes. Either load the estimator trained for this model "
    "(LinearEstimator.from_pretrained('<estimator repo or folder for this model>')), or train one for it: "
    "`hf-vattr collect --model <model>` (ablation ground truth) then `hf-vattr train` (fits the weights)."
)


class EstimatorError(AttributionError):
    """Base class of this module's errors."""


class EstimatorConfigError(EstimatorError, ValueError):
    """An estimator config (``__init__`` arguments or a ``config.json``) or its weights file is invalid."""


class EstimatorLoadError(EstimatorError, OSError):
    """The path or repo holds no estimator, or its weights file cannot be read."""


class EstimatorNotFoundError(EstimatorLoadError, FileNotFoundError):
    """No estimator folder of that name, and no Hub repo that could be looked up (offline, invalid id, missing)."""


class EstimatorMismatchError(EstimatorError, ValueError):
    """The estimator was trained for another model; ``mismatches[field] = (estimator_value, model_value)``."""

    def __init__(self, message: str, mismatches: dict[str, tuple[Any, Any]] | None = None):
        super().__init__(message)
        self.mismatches = dict(mismatches or {})


# The model card (README.md) template, rendered by huggingface_hub's ModelCard.from_template (jinja2).
MODEL_CARD_TEMPLATE = (Path(__file__).parent / "estimator_card.md").read_text(encoding="utf-8")


_MAX_DIM = 4096  # far above any real decoder's layers or heads: bigger values are a corrupt config


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 < value <= _MAX_DIM:
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
        raise EstimatorConfigError(f"{name} must be a positive integer of at most {_MAX_DIM}, got {shown}.")
    return int(value)


def _json_dict(value: Any, name: str) -> dict | None:
    """A plain-JSON copy of ``value`` (it goes to config.json), or a clear error."""
    if value is None:
        return None
    if not isinstance(value, dict) or not is_jsonable(value):
        raise EstimatorConfigError(
            f"{name} must be a dict of JSON values (str keys; str/int/float/bool/None/list/dict values), got "
            f"{value!r}. Convert numpy or torch scalars with float() / int()."
        )
    return json.loads(json.dumps(value))


class LinearEstimator(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hf_vattr",
    tags=["hf_vattr", "visual-attribution", "interpretability", "attention", "multimodal", "vlm"],
    model_card_template=MODEL_CARD_TEMPLATE,
):
    """Linear map from pooled attention features ``(..., L, H, K)`` to causal region effects ``(..., K)``.

    Args:
        num_layers: ``L``, decoder layers of the base model (``text_config.num_hidden_layers``).
        num_heads: ``H``, query heads per layer (``text_config.num_attention_heads``).
        use_bias: add a learned scalar bias (a constant shift: it changes neither rankings nor Pearson).
        model_type: top-level ``config.model_type`` of the base model, checked by :meth:`check_compatible`;
            ``None`` accepts any model (with a warning).
        base_model_id, base_model_revision: the base model it was trained on, shown in the model card.
        pooling: how a region's visual tokens are pooled into a feature, ``"sum"`` or ``"mean"``.
        feature_kind: what is pooled: ``"attention"`` (attention weights) or ``"value_norm"`` (attention times
            ``||W_O^h v_j||``, the norm of the token's contribution through the head; see
            :class:`hf_vattr.capture.attention.AttentionCapture`). Streamers and collections use the estimator's kind;
            ``config.json`` omits it for ``"attention"``, so older files keep their bytes.
        region_method: how regions were made at training time (``"grid"``, ``"ward"``, ``"vlm"`` ...).
        k_policy: how the number of regions K is chosen, e.g. ``{"k": 32}``.
        training_metrics: e.g. ``{"lds": 0.41, "r2": 0.65}``; names as in :data:`hf_vattr.metrics.METRICS`.
        training_data: summary of the data the weights were fit on.
        nonnegative: apply ``weight.clamp_min(0)`` (:attr:`effective_weight`).
        inherit_weight, inherit_decay, inherit_own, inherit_pool: indirect effects. A span of an inheriting
            section (the answer) scores ``bias + inherit_own * (own - bias) + inherit_weight * pool_i relu(step_i - bias)``
            over the thinking steps before it, ``pool`` being ``"max"`` or (default) ``"mean"``, a weighted mean
            with recency weights ``c_i`` proportional to ``inherit_decay ** (steps after i)`` (1: their mean;
            0: the last step only). Why: an answer depends on the image mostly through the reasoning, and
            the steps' scores are the estimator's account of that path. Fit by
            :func:`hf_vattr.pipeline.training.fit_estimator` on total answer effects; 0 (the default) turns it off.
            ``config.json`` omits them at their defaults (1 for ``inherit_own``).

    Every argument is a JSON value, so ``config.json`` rebuilds the same estimator.
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
        feature_kind: str = "attention",
        region_method: str = "grid",
        k_policy: dict | None = None,
        training_metrics: dict | None = None,
        training_data: dict | None = None,
        nonnegative: bool = False,
        inherit_weight: float = 0.0,
        inherit_decay: float = 1.0,
        inherit_own: float = 1.0,
        inherit_pool: str = "mean",
    ):
        super().__init__()
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_heads = _positive_int(num_heads, "num_heads")
        if pooling not in POOLINGS:
            raise EstimatorConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if feature_kind not in FEATURE_KINDS:
            raise EstimatorConfigError(f"feature_kind must be one of {FEATURE_KINDS}, got {feature_kind!r}.")
        self.feature_kind = feature_kind
        for name, value in (("use_bias", use_bias), ("nonnegative", nonnegative)):
            if not isinstance(value, bool):
                raise EstimatorConfigError(f"{name} must be a bool, got {value!r}.")
        for name, value, low, high in (("inherit_weight", inherit_weight, 0.0, math.inf),
                                       ("inherit_decay", inherit_decay, 0.0, 1.0),
                                       ("inherit_own", inherit_own, 0.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high \
                    or not math.isfinite(value):
                raise EstimatorConfigError(f"{name} must be a finite number in [{low}, {high}], got {value!r}.")
        self.inherit_weight, self.inherit_decay = float(inherit_weight), float(inherit_decay)
        self.inherit_own = float(inherit_own)
        if inherit_pool not in INHERIT_POOLS:
            raise EstimatorConfigError(f"inherit_pool must be one of {INHERIT_POOLS}, got {inherit_pool!r}.")
        self.inherit_pool = inherit_pool
        self.use_bias, self.nonnegative, self.pooling, self.region_method = use_bias, nonnegative, pooling, region_method
        self.model_type, self.base_model_id, self.base_model_revision = model_type, base_model_id, base_model_revision
        self.k_policy = _json_dict(k_policy, "k_policy")
        self.training_metrics = _json_dict(training_metrics, "training_metrics")
        self.training_data = _json_dict(training_data, "training_data")
        # Uniform init = mean attention over all (layer, head): a sensible untrained baseline,
        # and never all-zero (a zero predictor has no Pearson gradient).
        self.weight = nn.Parameter(torch.full((self.num_layers, self.num_heads), 1.0 / (self.num_layers * self.num_heads)))
        self.register_parameter("bias", nn.Parameter(torch.zeros(())) if use_bias else None)
        self._sync_config()

    def _sync_config(self) -> None:
        # The mixin writes `_hub_mixin_config` to config.json; it is built from the raw call
        # arguments, so make it the validated attributes instead (and keep it current).
        defaults = {"feature_kind": "attention", "inherit_weight": 0.0, "inherit_decay": 1.0, "inherit_own": 1.0,
                    "inherit_pool": "mean"}
        self._hub_mixin_config = {name: getattr(self, name) for name in list(self._hub_mixin_init_parameters)[1:]
                                  if not (name in defaults and getattr(self, name) == defaults[name])}

    def set_inheritance(self, weight: float, decay: float = 1.0, own: float = 1.0, pool: str = "mean") -> None:
        """Set how answer spans inherit the reasoning's scores (see the class docstring); weight 0 turns it off."""
        checked = LinearEstimator(1, 1, inherit_weight=weight, inherit_decay=decay, inherit_own=own,
                                  inherit_pool=pool)  # the same validation as __init__
        self.inherit_weight, self.inherit_decay = checked.inherit_weight, checked.inherit_decay
        self.inherit_own, self.inherit_pool = checked.inherit_own, checked.inherit_pool
        self._sync_config()

    def set_training_info(self, *, training_metrics: dict | None = None, training_data: dict | None = None) -> None:
        """Record metrics / a data summary after fitting (they go to config.json and the model card)."""
        if training_metrics is not None:
            self.training_metrics = _json_dict(training_metrics, "training_metrics")
        if training_data is not None:
            self.training_data = _json_dict(training_data, "training_data")
        self._sync_config()

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_heads={self.num_heads}, pooling={self.pooling!r}, "
                f"feature_kind={self.feature_kind!r}, "
                f"use_bias={self.use_bias}, nonnegative={self.nonnegative}, model_type={self.model_type!r}"
                + (f", inherit_weight={self.inherit_weight:.4g}, inherit_decay={self.inherit_decay:.4g}, "
                   f"inherit_own={self.inherit_own:.4g}, inherit_pool={self.inherit_pool!r}"
                   if self.inherit_weight else ""))

    # ----------------------------------------------------------------- scoring

    @property
    def effective_weight(self) -> torch.Tensor:
        """The (L, H) weights actually applied: ``weight``, clamped at 0 if ``nonnegative``."""
        return self.weight.clamp_min(0.0) if self.nonnegative else self.weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scores ``(..., K)`` from pooled attention features ``(..., L, H, K)``.

        The weights follow the features' device and floating dtype (no copy when they already
        match), so bfloat16 features on GPU are scored in place; integer features become float32.
        """
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}.")
        self.check_finite()
        if features.dim() < 3 or tuple(features.shape[-3:-1]) != (self.num_layers, self.num_heads):
            raise ValueError(f"features must have shape (..., L={self.num_layers}, H={self.num_heads}, K), "
                             f"got {tuple(features.shape)}.")
        if not features.is_floating_point():
            features = features.to(torch.float32)
        scores = torch.einsum("...lhk,lh->...k", features, self.effective_weight.to(features))
        return scores if self.bias is None else scores + self.bias.to(scores)

    def with_inherited(self, own: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
        """An answer's scores ``(K,)`` from its own scores ``(K,)`` and the earlier thinking steps' ``(n, K)``."""
        if self.inherit_weight == 0.0 or earlier.shape[0] == 0:
            return own
        bias = 0.0 if self.bias is None else self.bias.detach().to(own)
        return bias + self.inherit_own * (own - bias) + self.inherited(earlier).to(own)

    def inherited(self, earlier: torch.Tensor) -> torch.Tensor:
        """The inherited part ``(K,)`` of an answer's scores, from the earlier thinking steps' scores ``(n, K)``.

        ``inherit_weight`` times the pool (recency-weighted mean, or max) of ``relu(earlier - bias)``: a step's
        negative score says the region did not support it, which is no evidence for the answer either.
        Zeros when there is no earlier step or inheritance is off.
        """
        earlier = torch.as_tensor(earlier)
        if earlier.dim() != 2:
            raise ValueError(f"earlier must be (n, K) scores of the earlier steps, got {tuple(earlier.shape)}.")
        if self.inherit_weight == 0.0 or earlier.shape[0] == 0:
            return torch.zeros(earlier.shape[-1], dtype=earlier.dtype if earlier.is_floating_point() else torch.float32,
                               device=earlier.device)
        earlier = earlier.float() if not earlier.is_floating_point() else earlier
        shifted = earlier if self.bias is None else earlier - self.bias.detach().to(earlier)
        return self.inherit_weight * pool_steps(shifted, self.inherit_pool, self.inherit_decay)

    def span_scores(self, span_features: torch.Tensor, sections: Sequence[str]) -> torch.Tensor:
        """Scores ``(S, K)`` of a trace's spans in order: own features, plus the inherited part for answers.

        ``sections[s]`` is span ``s``'s section (``"thinking"`` / ``"answer"``, as the splitter names them).
        What the streamer yields for the same spans.
        """
        scores = self(span_features)
        if len(sections) != scores.shape[0]:
            raise ValueError(f"{len(sections)} sections for {scores.shape[0]} spans.")
        if self.inherit_weight == 0.0:
            return scores
        out = scores.clone()
        for s, section in enumerate(sections):
            if section in INHERITING_SECTIONS:
                steps = [j for j in range(s) if sections[j] not in INHERITING_SECTIONS]
                out[s] = self.with_inherited(scores[s], scores[steps])
        return out

    def check_finite(self) -> LinearEstimator:
        """Raise :class:`EstimatorConfigError` if a weight (or the bias) is NaN or infinite.

        Every score would be NaN and every ranking arbitrary, so scoring refuses such weights. On CPU the
        ``L * H`` weights are checked on every call (microseconds); on an accelerator only after they changed
        (their version counter or storage), so streaming never waits on the device. Returns ``self``.
        """
        key = None
        if self.weight.device.type != "cpu":
            key = tuple((t.data_ptr(), t._version, t.device) for t in (self.weight, self.bias) if t is not None)
            if self.__dict__.get("_finite_key") == key:
                return self
        for name, t in (("weight", self.weight), ("bias", self.bias)):
            if t is None:
                continue
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                where = ""
                if name == "weight":
                    layer, head = (int(i) for i in bad.nonzero()[0])
                    where = f", first at layer {layer}, head {head} ({float(t.detach()[layer, head])})"
                raise EstimatorConfigError(
                    f"This LinearEstimator's {name} holds {int(bad.sum())} non-finite values{where}: every score "
                    "would be NaN. Load the estimator again (LinearEstimator.from_pretrained) or train it again; "
                    "if you set the weights yourself, give finite numbers.")
        if key is not None:
            self.__dict__["_finite_key"] = key
        return self

    # ----------------------------------------------------------- compatibility

    def check_compatible(self, model_or_config: Any) -> LinearEstimator:
        """Raise :class:`EstimatorMismatchError` unless this estimator fits ``model_or_config``.

        Takes a transformers model or config. Its decoder's (layers, heads), read through the
        declared layout (:func:`hf_vattr.layouts.text_dims`), must equal (L, H), and its
        ``model_type`` the estimator's. Returns ``self`` so calls chain.
        """
        self.check_finite()
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        layers, heads = text_dims(config)
        found = {"num_hidden_layers": (self.num_layers, layers), "num_attention_heads": (self.num_heads, heads)}
        if self.model_type is None:
            logger.warning("This LinearEstimator records no model_type, so only L and H were checked against the "
                           f"{model_type!r} model. Set model_type when training.")
        else:
            found["model_type"] = (self.model_type, model_type)
        mismatches = {name: pair for name, pair in found.items() if pair[0] != pair[1]}
        if mismatches:
            trained_on = f" (trained on {self.base_model_id!r})" if self.base_model_id else ""
            lines = [f"  - {name}: estimator has {mine!r}, model has {theirs!r}" for name, (mine, theirs) in mismatches.items()]
            raise EstimatorMismatchError(
                f"This LinearEstimator{trained_on} does not match the model:\n" + "\n".join(lines) + "\n" + _FIX_HINT,
                mismatches,
            )
        return self

    # -------------------------------------------------------- hub mixin hooks

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write float32 ``model.safetensors``; first drop a README.md we generated, so it is rendered afresh.

        The one metadata key ``format: pt`` is what transformers' loaders expect (the mixin's
        default writes none) and keeps the bytes of saved estimators unchanged.
        """
        from safetensors.torch import save_file

        self.check_finite()  # from_pretrained refuses such a file: do not write one
        card = save_directory / constants.REPOCARD_NAME
        if card.is_file() and _CARD_MARKER in card.read_text(encoding="utf-8", errors="replace"):
            card.unlink()
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The mixin's card with this estimator's base model and type in its metadata.

        ``model_card_kwargs`` (of ``save_pretrained`` / ``push_to_hub``) may set ``repo_id``
        (shown in the usage snippet) and ``title``.
        """
        info = self._hub_mixin_info
        card_data = ModelCardData(**info.model_card_data.to_dict())
        card_data.base_model = self.base_model_id
        card_data.tags = sorted(set(card_data.tags or []) | ({self.model_type} if self.model_type else set()))
        values = {
            **self._hub_mixin_config,
            # omitted from config.json at their defaults, but the card shows them whenever inheritance is on
            "inherit_weight": self.inherit_weight, "inherit_decay": self.inherit_decay, "inherit_own": self.inherit_own,
            "inherit_pool": self.inherit_pool,
            "k_policy_md": ", ".join(f"{k}={_fmt(v)}" for k, v in (self.k_policy or {}).items()),
            "metric_rows": [(k, _fmt(v), metric_meaning(k)) for k, v in (self.training_metrics or {}).items()],
            "data_rows": [(k, _fmt(v)) for k, v in (self.training_data or {}).items()],
            **kwargs,
        }
        return ModelCard.from_template(card_data, template_str=info.model_card_template, **values)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> LinearEstimator:
        """Load from a folder written by ``save_pretrained`` or a Hub repo id (the mixin's loader).

        Takes the mixin's arguments (``revision``, ``cache_dir``, ``local_files_only``, ``token``
        ...) plus ``map_location`` and ``strict`` (default True: extra tensors are an error).
        A path that is not a folder fails here rather than as an invalid repo id.
        """
        source = str(pretrained_model_name_or_path)
        if not os.path.isdir(source) and (os.path.isabs(source) or source.startswith(("./", "../", "~"))
                                          or source.count("/") > 1 or os.path.exists(source)):
            raise EstimatorLoadError(f"No estimator folder at {source!r}. Pass a folder written by "
                                     "LinearEstimator.save_pretrained, or a Hub repo id like 'namespace/name'.")
        try:
            return super().from_pretrained(source, **kwargs)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:  # the mixin parses config.json before our hook
            raise EstimatorConfigError(f"The estimator's config.json at {source!r} is not valid JSON ({e}). Re-save "
                                       "the estimator with LinearEstimator.save_pretrained.") from e
        except EstimatorError:
            raise
        except (EntryNotFoundError, HFValidationError, HfHubHTTPError, OfflineModeIsEnabled) as e:
            if os.path.isdir(source):
                raise
            raise EstimatorNotFoundError(_not_found_message(source, e)) from e

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu", strict: bool = True,
                         **model_kwargs: Any) -> LinearEstimator:
        """Build from the config the mixin read, then load and check ``model.safetensors``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
        if "num_layers" not in model_kwargs or "num_heads" not in model_kwargs:
            if not os.path.isdir(model_id):  # the mixin only logs Hub errors on config.json: let the Hub's own surface
                hf_hub_download(model_id, constants.CONFIG_NAME, **hub)
            raise EstimatorLoadError(
                f"{model_id!r} has no config.json with num_layers and num_heads: it is not a LinearEstimator "
                "(save_pretrained / push_to_hub write config.json and model.safetensors; a base model is not one)."
            )
        try:
            model = cls(**model_kwargs)
        except (EstimatorConfigError, TypeError) as e:
            raise EstimatorConfigError(f"Invalid estimator config.json in {model_id!r}: {e}") from e
        if os.path.isdir(model_id):
            weights_file = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights_file):
                raise EstimatorLoadError(f"{Path(model_id).resolve()} has a config.json but no {WEIGHTS_NAME}.")
        else:
            weights_file = hf_hub_download(model_id, WEIGHTS_NAME, **hub)
        try:
            state = load_file(weights_file)
        except (SafetensorError, OSError) as e:
            raise EstimatorLoadError(f"Could not read estimator weights {weights_file}: {e}") from e
        try:  # missing tensors or wrong shapes always fail; unexpected ones unless strict=False
            if missing := model.load_state_dict(state, strict=strict).missing_keys:
                raise RuntimeError(f"Missing key(s) in state_dict: {missing}.")
        except RuntimeError as e:
            raise EstimatorConfigError(f"{weights_file} does not match its config (L={model.num_layers}, "
                                       f"H={model.num_heads}, use_bias={model.use_bias}): {e}") from e
        if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in state.values()):
            raise EstimatorConfigError(f"{weights_file}: the weights must be finite floats.")
        return model.to(map_location).eval()


def _not_found_message(source: str, error: BaseException) -> str:
    """Why ``source``, which is no folder, could not be loaded as a Hub repo either, and what to do."""
    head = (f"No estimator folder {source!r} exists (looked in {os.getcwd()}). Pass a folder written by "
            "LinearEstimator.save_pretrained or `hf-vattr train`")
    if isinstance(error, HFValidationError):
        return f"{head}; {source!r} is not a valid Hub repo id either ('namespace/name')."
    if isinstance(error, OfflineModeIsEnabled) or (isinstance(error, LocalEntryNotFoundError) and constants.HF_HUB_OFFLINE):
        return (f"{head}. As a Hub repo id it cannot be looked up: offline mode is on (HF_HUB_OFFLINE=1) and it is "
                "not in the local cache; unset HF_HUB_OFFLINE to download it.")
    if isinstance(error, RevisionNotFoundError):
        return f"{head}. The Hub repo {source!r} has no such revision; check the revision name."
    if isinstance(error, RepositoryNotFoundError):
        return (f"{head}. There is no Hub repo {source!r} either (or it is private or gated: log in with "
                "`hf auth login` or pass token=...).")
    if isinstance(error, LocalEntryNotFoundError):
        return f"{head}. As a Hub repo id it could not be looked up: the Hub was not reachable (no network?)."
    if isinstance(error, EntryNotFoundError):
        return f"{head}. The Hub repo {source!r} has no estimator files (config.json, {WEIGHTS_NAME})."
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{head}. Looking {source!r} up on the Hub failed: {first}"


def pool_steps(values: torch.Tensor, pool: str, decay: float = 1.0) -> torch.Tensor:
    """``(K,)`` pool over the steps ``(n, K)`` of ``relu(values)``: their max, or their recency-weighted mean."""
    values = values.clamp_min(0)
    return values.max(0).values if pool == "max" else recency_mean(values, decay)


def recency_mean(values: torch.Tensor, decay: float) -> torch.Tensor:
    """Weighted mean over the first axis of ``(n, K)`` values, weights ``decay ** (n - 1 - i)`` (latest counts most)."""
    age = torch.arange(values.shape[0] - 1, -1, -1, device=values.device, dtype=torch.float64)
    c = torch.pow(torch.tensor(float(decay), dtype=torch.float64, device=values.device), age)
    return ((c / c.sum()).to(values.dtype)[:, None] * values).sum(0)


def _fmt(value: Any) -> str:
    """A config value as the card shows it: floats to 4 significant digits, lists and dicts as JSON."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
