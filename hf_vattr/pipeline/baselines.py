"""Attribution methods behind one interface: the estimator and the paper's baselines.

Every method maps a collected :class:`~hf_vattr.pipeline.collection.ExampleRecord` (one generated
trace: its sequence, spans, image regions and span features), plus the model and the
prompt's processor outputs for the methods that run it, to a ``(S, K)`` tensor of
span-by-region scores, higher = the region matters more to the span. Evaluation
(:mod:`hf_vattr.pipeline.evaluation`) runs them all through the same code path and times them.

=====================  ======================================================  ==============
method                 score(S, k)                                             cost per trace
=====================  ======================================================  ==============
``EstimatorMethod``    ``sum_lh w[l,h] f[l,h](S,k)`` (+ bias)                  one einsum
``RawAttention``       mean over layers and heads of ``f(S, k)``               one mean
``LeaveOneOut``        ``log p(S|x) - log p(S|x, region k ablated)``           K+1 forwards
``GradientXInput``     ``sum_{i in R_k} grad_{e_i} log p(S) . e_i``            1 fwd + S bwd
``IntegratedGradients``same, path-integrated from zero visual embeddings       steps x (1 fwd + S bwd)
``RandomScores``       i.i.d. standard normal (seeded per example)             free
=====================  ======================================================  ==============

Span convention: ``spans`` are ``[start, end)`` indices among the *generated* tokens
(token ``i`` sits at sequence position ``prompt_len + i``), as produced by
:class:`hf_vattr.reasoning.spans.ReasoningStepSplitter` and stored by collection. A span's
log-probability is the sum of its tokens' teacher-forced log-probabilities.

The gradient methods differentiate with respect to the *input embeddings of the visual
tokens* (what the text decoder receives at the image-token positions after the model
merged its vision-tower output into the token embeddings). They get there without
re-implementing any model: a forward pre-hook on the text decoder
(``model.model.language_model``, the parent of the declared
:attr:`~hf_vattr.layouts.ArchitectureSpec.decoder_layers`) replaces the rows of
``inputs_embeds`` at the visual positions by a leaf tensor. Per-architecture extras that
bypass the input embeddings (Qwen3-VL's deepstack visual features added inside early
decoder layers) are left as they are: integrated gradients therefore satisfies
completeness with respect to ``f(x) - f(x with zero visual input embeddings, deepstack
kept)``.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from transformers.utils import logging

from ..errors import AttributionError
from ..layouts import _get_path, architecture_spec, extend_inputs, inputs_on_device

if TYPE_CHECKING:
    from .collection import ExampleRecord

logger = logging.get_logger(__name__)

__all__ = [
    "AttributionMethod",
    "EstimatorMethod",
    "RawAttention",
    "LeaveOneOut",
    "GradientXInput",
    "IntegratedGradients",
    "RandomScores",
    "compute_span_features",
    "span_logprobs_with_embeddings",
    "visual_embedding_override",
    "text_decoder",
    "METHODS",
    "make_method",
]


# ----------------------------------------------------------------------------- helpers


def _model_inputs(model: Any, inputs: Mapping[str, Any], sequence: torch.Tensor) -> dict:
    return inputs_on_device(model, extend_inputs(dict(inputs), sequence.to(inputs["input_ids"].device)))


def _require_model(record: ExampleRecord, model: Any, inputs: Mapping[str, Any] | None, what: str) -> None:
    missing = [n for n, v in (("model", model), ("inputs", inputs), ("the record's regions", record.regions))
               if v is None]
    if missing:
        raise MethodError(f"{what} needs {', '.join(missing)} (run with the model loaded and the prompt's inputs).")


def _check_spans(spans: Sequence[tuple[int, int]], num_generated: int) -> None:
    for a, b in spans:
        if not 0 <= a < b <= num_generated:
            raise MethodError(
                f"span [{a}, {b}) is not a non-empty range of the {num_generated} generated tokens "
                "(spans are [start, end) indices among generated tokens)."
            )


@torch.no_grad()
def compute_span_features(model: Any, inputs: Mapping[str, Any], sequence: torch.Tensor,
                          spans: Sequence[tuple[int, int]], regions: Any, *, pooling: str = "sum",
                          feature_kind: str = "attention") -> torch.Tensor:
    """``(S, L, H, K)`` span features from one teacher-forced forward (no cache).

    Row ``i`` of the capture is the query at position ``prompt_len - 1 + i``, which predicts
    generated token ``i``; a span's feature is the mean of its tokens' rows (as in capture).
    """
    from ..capture.attention import AttentionCapture

    if sequence.dim() == 1:
        sequence = sequence[None]
    prompt_len = int(inputs["input_ids"].shape[-1])
    _check_spans(spans, sequence.shape[-1] - prompt_len)
    cap = AttentionCapture(model, regions.layout.positions, regions.membership(), pooling=pooling,
                           feature_kind=feature_kind, rows="all",
                           first_row=prompt_len - 1)
    with cap:
        model(**_model_inputs(model, inputs, sequence), use_cache=False)
        rows = cap.pop()  # (T - prompt_len + 1, L, H, K)
    return torch.stack([rows[a:b].mean(0) for a, b in spans]).float().cpu()


def text_decoder(model: Any) -> torch.nn.Module:
    """The text decoder module: the parent of the declared decoder layer list."""
    spec = architecture_spec(model)
    return _get_path(model, spec.decoder_layers.rsplit(".", 1)[0])


@contextmanager
def visual_embedding_override(model: Any, positions: torch.Tensor,
                              transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict]:
    """Rewrite the text decoder's ``inputs_embeds`` rows at ``positions`` as ``transform(original_rows)``.

    ``original_rows`` is ``(Nv, D)``, detached. The yielded dict receives ``"original"`` (those
    rows) on each forward. Only forwards whose ``inputs_embeds`` covers the positions (a full
    forward, not a cached decode step) are rewritten. Restored on exit, also on error.
    """
    state: dict = {}
    decoder = text_decoder(model)

    def pre_hook(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is None or emb.shape[1] <= int(positions.max()):
            return None
        pos = positions.to(emb.device)
        original = emb[0, pos].detach()
        state["original"] = original
        rows = transform(original).to(emb.dtype)
        new = emb.detach().index_put((torch.zeros_like(pos), pos), rows)
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = new
        return args, kwargs

    handle = decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


@contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """Parameters do not require grad inside (only the embeddings we differentiate do); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def span_logprobs_with_embeddings(model: Any, inputs: Mapping[str, Any], sequence: torch.Tensor,
                                  spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``(S,)`` teacher-forced span log-probs (sum over the span's tokens), differentiable.

    Run it inside :func:`visual_embedding_override` to make it a function of the visual
    embeddings. Only the logits of generated positions are computed (``logits_to_keep``).
    """
    if sequence.dim() == 1:
        sequence = sequence[None]
    prompt_len = int(inputs["input_ids"].shape[-1])
    n_gen = sequence.shape[-1] - prompt_len
    _check_spans(spans, n_gen)
    out = model(**_model_inputs(model, inputs, sequence), use_cache=False, logits_to_keep=n_gen + 1)
    logits = out.logits[0, -(n_gen + 1):-1]  # position prompt_len - 1 + i predicts generated token i
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = sequence[0, prompt_len:].to(logits.device)
    token_lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    return torch.stack([token_lp[a:b].sum() for a, b in spans])


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bfloat16/float16 are widened; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _region_pool(token_scores: torch.Tensor, regions: Any) -> torch.Tensor:
    """(S, Nv) per-visual-token scores -> (S, K) summed over each region's tokens (membership weights)."""
    membership = regions.membership().to(token_scores.device, token_scores.dtype)
    return token_scores @ membership


# ----------------------------------------------------------------------------- methods


class AttributionMethod:
    """Interface: ``span_scores(record, model, inputs) -> (S, K)`` float tensor on CPU.

    ``name`` labels the method in reports; ``requires_model`` says whether it runs the VLM
    (evaluation without a model skips those). ``inputs`` are the processor outputs of the
    record's prompt (batch of one); ``batch_size`` / ``ablation_method`` are for methods that
    ablate (default: the record's collection method).
    """

    name: str = "method"
    requires_model: bool = False

    def span_scores(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None, *,
                    batch_size: int = 16, ablation_method: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None,
                 **options: Any) -> torch.Tensor:
        return self.span_scores(record, model, inputs, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class EstimatorMethod(AttributionMethod):
    """The trained :class:`~hf_vattr.estimator.LinearEstimator` applied to span features."""

    requires_model = False

    def __init__(self, estimator: Any, name: str = "estimator") -> None:
        self.estimator = estimator.eval()
        self.name = name

    @torch.no_grad()
    def span_scores(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None,
                    **options: Any) -> torch.Tensor:
        # span_scores: answers inherit the thinking steps' scores when the estimator was fit to do so
        return self.estimator.span_scores(record.span_features, [sp.get("section") for sp in record.spans]).float().cpu()


class RawAttention(AttributionMethod):
    """Mean over layers and heads of the span features: free, but not causal."""

    name = "raw_attention"
    requires_model = False

    @torch.no_grad()
    def span_scores(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None,
                    **options: Any) -> torch.Tensor:
        return record.span_features.float().mean(dim=(-3, -2)).cpu()


class RandomScores(AttributionMethod):
    """I.i.d. standard normal scores, seeded by ``seed`` and the example id (reproducible)."""

    name = "random"
    requires_model = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def span_scores(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None,
                    **options: Any) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(str(record.example_id).encode()))
        return torch.randn(record.num_spans, record.num_regions, generator=g)


class LeaveOneOut(AttributionMethod):
    """Exhaustive leave-one-out ablation: ``span_effects`` of the K single-region masks."""

    name = "leave_one_out"
    requires_model = True

    def __init__(self, batch_size: int | None = None, method: str | None = None) -> None:
        self.batch_size = batch_size
        self.method = method

    @torch.no_grad()
    def span_scores(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None, *,
                    batch_size: int = 16, ablation_method: str | None = None) -> torch.Tensor:
        from .ablation import AblationEngine, leave_one_out_masks
        from .collection import total_answer_effects

        _require_model(record, model, inputs, "leave-one-out")
        masks = leave_one_out_masks(record.num_regions)
        method = self.method or ablation_method or record.config.get("method") or "attention"
        batch = self.batch_size or batch_size
        if not record.spans:
            return torch.zeros(0, record.num_regions)
        engine = AblationEngine(model, inputs, record.sequence[None], record.prompt_regions(),
                                max_generated=max(e for _, e in record.span_ranges))
        eff = engine.span_effects(record.span_ranges, masks, batch_size=batch, method=method)
        eff = total_answer_effects(engine, record, masks, eff, batch_size=batch)  # answers as they were collected
        return torch.as_tensor(eff).float().cpu().T.contiguous()  # (K, S) -> (S, K)


class GradientXInput(AttributionMethod):
    """Gradient x input on the visual token embeddings, summed over each region's tokens.

    ``score(S, k) = sum_{i in R_k} (d log p(S) / d e_i) . e_i`` with ``e_i`` the input
    embedding of visual token ``i`` (one forward, one backward per span).
    """

    name = "grad_x_input"
    requires_model = True

    def span_scores(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None,
                    **options: Any) -> torch.Tensor:
        _require_model(record, model, inputs, "gradient x input")
        regions, spans, sequence = record.prompt_regions(), record.span_ranges, record.sequence[None]
        positions = regions.layout.positions
        leaf: dict = {}

        def transform(original: torch.Tensor) -> torch.Tensor:
            leaf["x"] = original.clone().requires_grad_(True)
            return leaf["x"]

        with _frozen(model), torch.enable_grad(), visual_embedding_override(model, positions, transform):
            logp = span_logprobs_with_embeddings(model, inputs, sequence, spans)
            x = leaf["x"]
            token_scores = []
            for s in range(len(spans)):
                (g,) = torch.autograd.grad(logp[s], x, retain_graph=s + 1 < len(spans))
                token_scores.append((_wide(g) * _wide(x.detach())).sum(-1))
        return _region_pool(torch.stack(token_scores), regions).cpu()


class IntegratedGradients(AttributionMethod):
    """Integrated gradients on the visual token embeddings from a zero baseline.

    ``score(S, k) = sum_{i in R_k} e_i . sum_j w_j grad_{e_i} log p(S)(alpha_j e)``: a
    quadrature of the path integral from zero visual embeddings to the real ones. Default
    rule: ``steps`` equal intervals, evaluated at their midpoints
    (``alpha_j = (j + 0.5) / steps``, ``w_j = 1 / steps``): ``steps`` forwards and
    ``steps * S`` backwards. ``breakpoints`` (increasing, from 0 to 1) replaces that grid by
    custom intervals (midpoints, weights = widths), e.g. a geometric grid.

    Completeness: the scores of all regions sum to about
    ``log p(S | x) - log p(S | zero visual embeddings)``, exactly in the limit of a fine
    grid. Caveat worth knowing: decoders normalise their input (RMSNorm), so scaling the
    visual embeddings by ``alpha`` changes little until ``alpha`` is small; most of the
    path integral can sit near ``alpha = 0`` (seen on the tiny Qwen models), where a
    uniform grid with few steps is coarse. A geometric ``breakpoints`` grid resolves it.
    """

    name = "integrated_gradients"
    requires_model = True

    def __init__(self, steps: int = 16, breakpoints: Sequence[float] | None = None) -> None:
        if breakpoints is None:
            if steps < 1:
                raise MethodError(f"steps must be >= 1, got {steps}.")
            edges = torch.linspace(0.0, 1.0, int(steps) + 1, dtype=torch.float64)
        else:
            edges = torch.as_tensor(list(breakpoints), dtype=torch.float64)
            if edges.dim() != 1 or edges.numel() < 2 or edges[0] != 0 or edges[-1] != 1 or \
                    not bool((edges[1:] > edges[:-1]).all()):
                raise MethodError("breakpoints must increase strictly from 0 to 1, e.g. [0, 0.001, 0.01, 0.1, 1].")
        self.alphas = ((edges[1:] + edges[:-1]) / 2).tolist()
        self.weights = (edges[1:] - edges[:-1]).tolist()
        self.steps = len(self.alphas)

    @staticmethod
    def geometric_breakpoints(steps: int = 32, smallest: float = 1e-4) -> list[float]:
        """``[0, smallest, ..., 1]`` with ``steps`` intervals, geometric after the first."""
        if steps < 2:
            raise MethodError("a geometric grid needs steps >= 2")
        pts = torch.logspace(torch.log10(torch.tensor(smallest)), 0.0, steps, dtype=torch.float64)
        return [0.0] + pts.tolist()

    def span_scores(self, record: ExampleRecord, model: Any = None, inputs: Mapping[str, Any] | None = None,
                    **options: Any) -> torch.Tensor:
        _require_model(record, model, inputs, "integrated gradients")
        regions, spans, sequence = record.prompt_regions(), record.span_ranges, record.sequence[None]
        positions = regions.layout.positions
        num_spans = len(spans)
        total = None
        original = None
        for alpha, weight in zip(self.alphas, self.weights):
            leaf: dict = {}

            def transform(orig: torch.Tensor, alpha=alpha) -> torch.Tensor:
                leaf["x"] = (orig * alpha).clone().requires_grad_(True)
                return leaf["x"]

            with _frozen(model), torch.enable_grad(), \
                    visual_embedding_override(model, positions, transform) as state:
                logp = span_logprobs_with_embeddings(model, inputs, sequence, spans)
                grads = torch.stack([
                    _wide(torch.autograd.grad(logp[s], leaf["x"], retain_graph=s + 1 < num_spans)[0])
                    for s in range(num_spans)
                ])  # (S, Nv, D)
                original = _wide(state["original"])
            total = grads * weight if total is None else total + grads * weight
        token_scores = (total * original[None]).sum(-1)  # (S, Nv)
        return _region_pool(token_scores, regions).cpu()


METHODS: dict[str, Callable[..., AttributionMethod]] = {
    "raw_attention": RawAttention,
    "leave_one_out": LeaveOneOut,
    "loo": LeaveOneOut,
    "grad_x_input": GradientXInput,
    "gxi": GradientXInput,
    "integrated_gradients": IntegratedGradients,
    "ig": IntegratedGradients,
    "random": RandomScores,
}


class MethodError(AttributionError, ValueError):
    """An attribution method was asked for by an unknown name, or with inputs or settings it cannot use."""


def make_method(name: str, *, estimator: Any = None, **kwargs: Any) -> AttributionMethod:
    """A method by name: ``estimator`` (needs ``estimator=``), or a key of :data:`METHODS`."""
    if name == "estimator":
        if estimator is None:
            raise MethodError("method 'estimator' needs an estimator (pass --estimator).")
        return EstimatorMethod(estimator)
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose from {['estimator', *sorted(METHODS)]}.")
    return METHODS[name](**kwargs)
