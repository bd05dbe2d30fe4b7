"""Counterfactual ground truth: teacher-forced span log-probs with image regions ablated.

``effect(S, k) = log p(S | x) - log p(S | x with region k ablated)`` is what the
estimator learns to predict, so this module is the definition of "right". It
runs on the model's own forward (no modeling code is copied) and is built to
be cheap enough to compute for thousands of (span, mask) pairs:

* **Attention ablation (default).** A region's visual tokens are removed from
  the attention of every *later* query position, in every decoder layer, via
  :func:`hf_vattr.capture.intervention.attention_intervention`: the mask handed to the
  model's own attention function (sdpa or eager) gets those key columns
  switched off. Exact, no pixels touched, and every batch row can carry a
  different mask, so many masks run in one forward.
* **One vision pass.** The image embeddings are computed once per example and
  handed to the model as ``mm_encoder_outputs`` (the precomputed-encoder
  input every supported family accepts); the vision tower never re-runs.
* **Explicit positions.** Qwen2.5-VL, Qwen3-VL and GLM-4.1V derive M-RoPE
  position ids from ``input_ids`` + ``image_grid_thw`` (``get_rope_index`` of
  the base model). We compute them once for the full sequence and pass
  slices, so a suffix-only forward gets exactly the positions of the full
  forward and the model's stateful ``rope_deltas`` is never touched.
* **Prefix KV-cache reuse.** Keys/values at positions ``<= p`` do not depend on
  whether a visual token at position ``p`` is ablated (it only disappears for
  *later* queries). One unablated forward yields the cache; every batch
  restarts from the earliest ablated visual token of its masks (masks are
  sorted by that position so batches share long prefixes).
  ``reuse_prefix="prompt"`` restarts at the first visual token instead (the
  text prefix before the image), ``"none"`` recomputes everything.
* **Pixel ablation (option).** ``method="pixel"`` replaces the region's pixels
  (its rows of ``pixel_values``) by the image's per-channel mean or by a
  Gaussian blur of the image, then re-encodes the image (batched over masks).
  Since the vision tower mixes tokens, the restart point is the first visual
  token.
* **Videos.** A video's tokens are ablated like an image's: its region's key
  columns in every frame group (attention), or its rows of ``pixel_values_videos``
  (pixels: the region's boxes in both frames of each of its frame groups, the
  fill the video's mean or each frame blurred). Its embeddings come from the
  tower's video call, handed over as ``mm_encoder_outputs["video"]``.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from typing import Any, Callable, Sequence

import torch
from scipy import ndimage
from transformers.utils import logging

from ..capture import attention_intervention, own_implementation
from ..errors import AttributionError
from ..layouts import _get_path, architecture_spec, extend_inputs, input_device

logger = logging.get_logger(__name__)

__all__ = [
    "AblationEngine",
    "span_logprobs",
    "span_effects",
    "span_logprobs_naive",
    "leave_one_out_masks",
    "random_subset_masks",
    "ablation_attention_mask",
    "pixel_patch_rows",
    "regenerated_span_effects",
]


# ----------------------------------------------------------------------------- masks


def leave_one_out_masks(num_regions: int) -> torch.Tensor:
    """(K, K) bool: row k ablates region k only (True = ablated)."""
    return torch.eye(int(num_regions), dtype=torch.bool)


def random_subset_masks(num_regions: int, num_masks: int, keep_prob: float = 0.5,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(M, K) bool random subsets in the ContextCite / AT2 style: each region is *kept* with ``keep_prob``.

    True marks an ablated (not kept) region, the convention of every mask in this module. ``keep_prob`` must
    be in (0, 1): at 0 or 1 every subset ablates everything or nothing, and the subsets measure nothing.
    """
    if isinstance(keep_prob, bool) or not isinstance(keep_prob, numbers.Real) or not 0.0 < float(keep_prob) < 1.0:
        raise AblationValueError(f"keep_prob must be in (0, 1), got {keep_prob!r}: at 0 or 1 every random subset "
                                 "ablates all regions or none.")
    if isinstance(num_masks, bool) or int(num_masks) != num_masks or int(num_masks) < 0:
        raise AblationValueError(f"num_masks must be an integer >= 0, got {num_masks!r}.")
    keep = torch.rand(int(num_masks), int(num_regions), generator=generator) < keep_prob
    return ~keep


def _check_batch_size(batch_size: Any) -> None:
    """A batch size below 1 would silently skip every ablation (effects all 0): refuse it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise AblationValueError(f"batch_size (ablation masks per forward pass) must be an integer >= 1, got "
                                 f"{batch_size!r}.")


class AblationValueError(AttributionError, ValueError):
    """An ablation argument is out of range."""


# ----------------------------------------------------------------------------- attention masks


def ablation_attention_mask(key_ablated: torch.Tensor, num_queries: int, num_keys: int) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool (True = attend): causal, minus ablated keys for every *later* query.

    ``key_ablated`` is (B, >=Tk) bool over absolute positions. Queries are the last ``Tq`` of the
    ``Tk`` positions (a KV cache holds the first ``Tk - Tq``). An ablated token still attends to
    itself, so nothing at or before its position changes -- the property prefix reuse relies on.
    """
    device = key_ablated.device
    qpos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    kpos = torch.arange(num_keys, device=device)[None, :]
    causal = kpos <= qpos  # (Tq, Tk)
    later = kpos < qpos
    kill = key_ablated[:, None, :num_keys] & later[None]  # (B, Tq, Tk)
    return (causal[None] & ~kill)[:, None]


def _mask_for_implementation(module: Any, keep: torch.Tensor, given: Any, dtype: torch.dtype) -> torch.Tensor:
    """Combine ``keep`` with the mask the model built, in the form its attention function takes."""
    impl = own_implementation(getattr(module, "config", None)) or "sdpa"
    if given is not None and isinstance(given, torch.Tensor) and given.dim() == 4:
        g = given[..., -keep.shape[-2]:, : keep.shape[-1]]
        g = g if g.dtype == torch.bool else g > torch.finfo(g.dtype).min / 2
        keep = keep & g.to(keep.device)
    if impl == "eager":
        out = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
        return out.masked_fill_(~keep, torch.finfo(dtype).min)
    if "sdpa" in impl:
        return keep
    raise ValueError(
        f"Attention ablation needs per-row attention masks, which attn_implementation={impl!r} cannot take. "
        "Load the model with attn_implementation='sdpa' (or 'eager') for ground-truth collection."
    )


class _Knockout:
    """Intervention callable: rewrites every decoder layer's mask for one batch of ablation masks."""

    def __init__(self, key_ablated: torch.Tensor) -> None:
        self.key_ablated = key_ablated  # (B, T) bool, absolute positions
        self._memo: dict = {}

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: Any) -> torch.Tensor:
        # Every layer of one forward sees the same shapes and the same model-built mask object:
        # build the combined mask once per forward (the given mask is kept alive, so its id is stable).
        tq, tk = query.shape[2], key.shape[2]
        impl = own_implementation(getattr(module, "config", None))
        memo_key = (tq, tk, query.device, query.dtype, impl, id(attention_mask))
        hit = self._memo.get(memo_key)
        if hit is None:
            keep = ablation_attention_mask(self.key_ablated.to(query.device), tq, tk)
            hit = (_mask_for_implementation(module, keep, attention_mask, query.dtype), attention_mask)
            self._memo[memo_key] = hit
        return hit[0]


# ----------------------------------------------------------------------------- pixel helpers


def pixel_patch_rows(layout_images: Sequence[Any], image_grid_thw: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per visual item, the rows of its pixel tensor holding each of its tokens' ``merge*merge`` patches.

    ``layout_images`` and ``image_grid_thw`` are the items of one kind and their grids: the images with
    ``pixel_values`` / ``image_grid_thw``, or the videos with ``pixel_values_videos`` / ``video_grid_thw``.
    The image and video processors of Qwen2.5-VL, Qwen3-VL and GLM-4.1V all patchify as
    ``(t, temporal, C, h/merge, merge, patch, w/merge, merge, patch)`` permuted to rows
    ``(t, h/merge, w/merge, merge, merge)``, so token ``j`` of an item (a video's tokens group by group,
    row-major inside a group, as the layout orders them) owns rows
    ``offset + j*merge**2 ... offset + (j+1)*merge**2 - 1``: both frames of its frame group, its box in each.
    """
    out, offset = [], 0
    for im, (t, h, w) in zip(layout_images, torch.as_tensor(image_grid_thw).tolist()):
        n = im.num_tokens
        base = offset + torch.arange(n)[:, None] * merge * merge
        out.append(base + torch.arange(merge * merge)[None, :])
        offset += t * h * w
    return out


def _fill_values(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, patch: int, merge: int,
                 temporal: int, fill: str, blur_sigma: float | None) -> torch.Tensor:
    """Replacement rows for every patch row: per-image channel mean, or the blurred image's patches."""
    dim = pixel_values.shape[-1]
    channels = dim // (temporal * patch * patch)
    out = torch.empty_like(pixel_values)
    offset = 0
    for t, h, w in torch.as_tensor(image_grid_thw).tolist():
        rows = pixel_values[offset: offset + t * h * w].float()
        r = rows.reshape(-1, channels, temporal * patch * patch)
        if fill == "mean":
            mean = r.mean(dim=(0, 2))  # per-channel mean of the *normalized* pixels = normalized mean colour
            filled = mean[None, :, None].expand_as(r).reshape(rows.shape)
        elif fill == "blur":
            hm, wm = h // merge, w // merge
            x = rows.reshape(t, hm, wm, merge, merge, channels, temporal, patch, patch)
            img = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, channels, h * patch, w * patch)
            sigma = blur_sigma if blur_sigma is not None else float(patch * merge)
            radius = max(1, math.ceil(3 * sigma))  # edges replicated ("nearest"), 3-sigma kernel
            img = torch.from_numpy(ndimage.gaussian_filter(
                img.cpu().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", radius=(0, 0, radius, radius),
            )).to(img.device)
            y = img.reshape(t, temporal, channels, hm, merge, patch, wm, merge, patch)
            filled = y.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(rows.shape)
        else:
            raise ValueError(f"pixel_fill must be 'mean' or 'blur', got {fill!r}.")
        out[offset: offset + t * h * w] = filled.to(pixel_values.dtype)
        offset += t * h * w
    return out


# ----------------------------------------------------------------------------- engine

#: The processor outputs of each kind of visual input: its pixels and its grid (``mm_encoder_outputs`` keys).
VISUAL_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def _token_kinds(items: Sequence[Any], device: Any) -> dict[str, torch.Tensor]:
    """Per kind, a (Nv,) bool over the prompt's visual tokens (prompt order): which tokens are that kind's."""
    kinds = [kind for item in items for kind in [getattr(item, "kind", "image")] * item.num_tokens]
    return {kind: torch.tensor([k == kind for k in kinds], dtype=torch.bool, device=device) for kind in VISUAL_INPUTS}



def _base_model(model: Any) -> Any:
    base = getattr(model, "model", None)
    if base is None:
        raise ValueError(f"{type(model).__name__} has no `.model`; pass the *ForConditionalGeneration model.")
    return base


def _call_filtered(fn: Callable, **kwargs: Any) -> Any:
    params = inspect.signature(fn).parameters
    accepts_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kept = {k: v for k, v in kwargs.items() if v is not None and (k in params or accepts_var)}
    return fn(**kept)


class AblationEngine:
    """Per-example state for many ablation queries: image embeddings, positions and the unablated cache.

    Build once per (example, generated sequence), then call :meth:`span_logprobs` with as many
    mask sets as needed (leave-one-out, random subsets): the vision tower and the unablated
    forward run once.

    Args:
        model: ``*ForConditionalGeneration`` with ``attn_implementation`` ``"sdpa"`` or ``"eager"``.
        inputs: the processor outputs for the prompt (batch of one).
        sequence: (1, T) or (T,) prompt + generated token ids (``generate``'s output).
        regions: the prompt's :class:`~hf_vattr.regions.PromptRegions`; ablation uses its hard
            assignment (``token_masks()``).
        max_generated: only the first ``max_generated`` generated tokens can be scored (saves compute
            when every span ends earlier); default all.
    """

    def __init__(self, model: Any, inputs: Any, sequence: torch.Tensor, regions: Any,
                 max_generated: int | None = None) -> None:
        architecture_spec(model)
        self.model = model
        self.device = input_device(model)
        if sequence.dim() == 1:
            sequence = sequence[None]
        self.prompt_len = int(inputs["input_ids"].shape[-1])
        self.num_generated = int(sequence.shape[-1]) - self.prompt_len
        if self.num_generated < 1:
            raise ValueError("sequence holds no generated tokens after the prompt.")
        if max_generated is not None:
            self.num_generated = min(self.num_generated, int(max_generated))
        # Inputs stop at the position that predicts the last scored token.
        self.length = self.prompt_len + self.num_generated - 1
        full = extend_inputs(inputs, sequence[:, : self.prompt_len + self.num_generated].cpu())
        self.full_ids = full["input_ids"].to(self.device)  # (1, prompt_len + G): inputs + targets
        self.input_ids = self.full_ids[:, : self.length]
        # Pixels and grids per kind of visual input ("image", "video"), as the processor returned them.
        self.visual_inputs = {kind: (inputs[pixels], inputs[grid]) for kind, (pixels, grid) in VISUAL_INPUTS.items()
                              if inputs.get(pixels) is not None and inputs.get(grid) is not None}
        if not self.visual_inputs:
            raise ValueError("inputs carry no image or video (pixel_values / image_grid_thw, pixel_values_videos / "
                             "video_grid_thw); nothing to ablate.")
        self.pixel_values, self.image_grid_thw = self.visual_inputs.get("image", (None, None))
        self.regions = regions
        self.prompt_inputs = dict(inputs)  # for regenerating the reasoning
        self.positions = regions.layout.positions.to(self.device)  # (Nv,) absolute positions, increasing
        self.token_kinds = _token_kinds(regions.layout.images, self.device)  # kind -> (Nv,) bool
        self.token_masks = regions.token_masks().to(self.device)  # (K, Nv)
        self.num_regions = int(self.token_masks.shape[0])
        if int(self.positions.max()) >= self.prompt_len:
            raise ValueError("visual tokens must all lie in the prompt.")
        self.first_visual = int(self.positions.min())
        self.position_ids = self._position_ids(full)
        with torch.no_grad():
            self.encoder = {kind: self._encode(kind, pixels, grid) for kind, (pixels, grid) in self.visual_inputs.items()}
            self.base_token_logprobs, self._cache_kv = self._run(
                torch.zeros(1, self.length, dtype=torch.bool, device=self.device), cut=0, encoder=self.encoder,
                keep_cache=True, intervene=False)
        self.base_token_logprobs = self.base_token_logprobs[0]  # (G,)

    # -- setup
    def _position_ids(self, full: dict) -> torch.Tensor | None:
        """(3, 1, T) M-RoPE positions of the full sequence, from the base model's own ``get_rope_index``."""
        base = _base_model(self.model)
        fn = getattr(base, "get_rope_index", None)
        if fn is None:
            return None  # plain 1-D RoPE: the model's default arange (offset by the cache) is right
        ids = full["input_ids"][:, : self.length].to(self.device)

        def cut(name):
            v = full.get(name)
            return v[:, : self.length].to(self.device) if isinstance(v, torch.Tensor) else v

        def dev(name):
            v = full.get(name)
            return v.to(self.device) if isinstance(v, torch.Tensor) else v

        out = _call_filtered(fn, input_ids=ids, mm_token_type_ids=cut("mm_token_type_ids"),
                             image_grid_thw=dev("image_grid_thw"), video_grid_thw=dev("video_grid_thw"),
                             second_per_grid_ts=dev("second_per_grid_ts"), attention_mask=cut("attention_mask"))
        pos = out[0] if isinstance(out, tuple) else out
        return pos.to(self.device)

    def _encode(self, kind: str, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Any:
        """The vision tower's output for one kind of input, in the form ``mm_encoder_outputs[kind]`` takes."""
        if kind == "video":
            return self.model.get_video_features(pixel_values_videos=pixel_values.to(self.device),
                                                 video_grid_thw=grid_thw.to(self.device), return_dict=True)
        return self.model.get_image_features(pixel_values=pixel_values.to(self.device),
                                             image_grid_thw=grid_thw.to(self.device), return_dict=True)

    # -- forward pieces
    def _suffix_encoder(self, encoders: dict, batch: int, cut: int, per_row: bool) -> dict:
        """``mm_encoder_outputs`` for a forward over positions ``>= cut`` of ``batch`` rows.

        ``per_row``: each encoder output already holds one copy of its images (videos) per row (pixel method).
        The model scatters each kind's concatenated embeddings over that kind's tokens in (row, position) order,
        so each kind drops its own tokens before ``cut``.
        """
        outputs = {}
        for kind, encoder in encoders.items():
            skip = int(((self.positions < cut) & self.token_kinds[kind]).sum())
            out = copy.copy(encoder)

            def tile(parts):
                parts = list(parts)
                if per_row:
                    per = len(parts) // batch
                    return tuple(torch.cat(parts[b * per:(b + 1) * per], 0)[skip:] for b in range(batch))
                return (torch.cat(parts, 0)[skip:],) * batch

            out.pooler_output = tile(encoder.pooler_output)
            deep = getattr(encoder, "deepstack_features", None)
            if deep is not None:
                out.deepstack_features = [tile(layer) for layer in deep]
            outputs[kind] = out
        return outputs

    def _run(self, key_ablated: torch.Tensor, cut: int, encoder: Any, *, keep_cache: bool = False,
             intervene: bool = True, per_row: bool = False):
        """Forward positions ``[cut, length)`` for ``B = key_ablated.shape[0]`` rows; token log-probs (B, G)."""
        from transformers import DynamicCache

        batch = key_ablated.shape[0]
        ids = self.input_ids[:, cut:].expand(batch, -1)
        pos = None if self.position_ids is None else self.position_ids[:, :, cut:].expand(-1, batch, -1)
        cache = None
        if cut > 0:
            layers = [(k[:, :, :cut].expand(batch, -1, -1, -1), v[:, :, :cut].expand(batch, -1, -1, -1))
                      for k, v in self._cache_kv]
            cache = DynamicCache(layers, config=self.model.config)
        elif keep_cache:
            cache = DynamicCache(config=self.model.config)
        kwargs = dict(input_ids=ids, position_ids=pos, cache=cache, use_cache=cache is not None,
                      mm_encoder_outputs=self._suffix_encoder(encoder, batch, cut, per_row))
        if pos is None and cut > 0:
            kwargs["position_ids"] = torch.arange(cut, self.length, device=self.device)[None].expand(batch, -1)
        base = _base_model(self.model)
        if intervene:
            with attention_intervention(self.model, _Knockout(key_ablated)):
                out = base(**kwargs)
        else:
            out = base(**kwargs)
        hidden = out.last_hidden_state  # (B, length - cut, D)
        logprobs = self._token_logprobs(hidden, cut)
        kv = None
        if keep_cache:
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return logprobs, kv

    def _token_logprobs(self, hidden: torch.Tensor, cut: int) -> torch.Tensor:
        """log p(generated token g) for g = 0..G-1 from the hidden states of positions ``>= cut``."""
        head = self.model.get_output_embeddings()
        first = self.prompt_len - 1 - cut  # row predicting generated token 0
        rows = hidden[:, first:]
        targets = self.full_ids[0, self.prompt_len:]  # (G,)
        batch, num, _ = rows.shape
        vocab = head.weight.shape[0]
        chunk = max(1, (1 << 25) // max(1, batch * vocab))  # bound the logits buffer to ~128 MB of float32
        outs = []
        for s in range(0, num, chunk):
            h = rows[:, s: s + chunk].to(head.weight.device)
            logits = head(h).float()
            lp = torch.log_softmax(logits, dim=-1)
            tgt = targets[s: s + chunk].to(lp.device)
            outs.append(lp.gather(-1, tgt[None, :, None].expand(batch, -1, 1))[..., 0])
        return torch.cat(outs, 1)

    # -- public
    def _span_matrix(self, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        mat = torch.zeros(self.num_generated, len(spans), dtype=torch.float64)
        for j, (s, e) in enumerate(spans):
            s, e = int(s), int(e)
            if not 0 <= s < e <= self.num_generated:
                raise ValueError(f"span {j} = [{s}, {e}) is outside the {self.num_generated} scored generated tokens.")
            mat[s:e, j] = 1.0
        return mat

    def base_logprobs(self, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
        """(S,) unablated span log-probs."""
        mat = self._span_matrix(spans)
        return (self.base_token_logprobs.double().cpu() @ mat).float()

    def key_ablation(self, masks: torch.Tensor) -> torch.Tensor:
        """(M, length) bool: absolute positions knocked out by each (M, K) region mask."""
        masks = torch.as_tensor(masks, dtype=torch.bool, device=self.device)
        tokens = (masks.float() @ self.token_masks.float()) > 0  # (M, Nv)
        out = torch.zeros(masks.shape[0], self.length, dtype=torch.bool, device=self.device)
        out[:, self.positions] = tokens
        return out

    def token_logprobs(self, ablation_masks: torch.Tensor, *, batch_size: int = 16, method: str = "attention",
                       pixel_fill: str = "mean", blur_sigma: float | None = None,
                       reuse_prefix: bool | str = "ablated", progress: bool = False) -> torch.Tensor:
        """(M, G) per-token log-probs of the generated tokens under each ablation mask."""
        masks = torch.as_tensor(ablation_masks, dtype=torch.bool)
        if masks.dim() != 2 or masks.shape[1] != self.num_regions:
            raise ValueError(f"ablation_masks must be (M, K={self.num_regions}) bool, got {tuple(masks.shape)}.")
        if method not in ("attention", "pixel"):
            raise ValueError(f"method must be 'attention' or 'pixel', got {method!r}.")
        _check_batch_size(batch_size)
        mode = {True: "ablated", False: "none"}.get(reuse_prefix, reuse_prefix)  # type: ignore[arg-type]
        if mode not in ("ablated", "prompt", "none"):
            raise ValueError(f"reuse_prefix must be 'ablated', 'prompt', 'none' or a bool, got {reuse_prefix!r}.")
        num = masks.shape[0]
        out = self.base_token_logprobs.cpu().expand(num, -1).clone()
        key_ablated = self.key_ablation(masks)
        active = key_ablated.any(1).cpu()
        todo = torch.nonzero(active).flatten()
        if todo.numel() == 0:
            return out
        # Restart point per mask: its first ablated position (earlier positions are unaffected).
        first = torch.where(key_ablated, torch.arange(self.length, device=self.device), self.length).min(1).values.cpu()
        if method == "pixel" or mode == "prompt":
            first = torch.full_like(first, self.first_visual)
        elif mode == "none":
            first = torch.zeros_like(first)
        order = todo[torch.argsort(first[todo], descending=True, stable=True)]
        if method == "pixel":
            fills = self._pixel_fills(pixel_fill, blur_sigma)
        batches = [order[i: i + batch_size] for i in range(0, order.numel(), batch_size)]
        bar = _progress(len(batches), progress, "ablation batches")
        with torch.no_grad():
            for idx in batches:
                cut = int(first[idx].min())
                if method == "attention":
                    lp, _ = self._run(key_ablated[idx.to(self.device)], cut, self.encoder)
                else:
                    encoder = self._pixel_encoder(masks[idx], fills)
                    lp, _ = self._run(key_ablated[idx.to(self.device)], cut, encoder, intervene=False, per_row=True)
                out[idx] = lp.cpu()
                bar.update(1)
        bar.close()
        return out

    def span_logprobs(self, spans: Sequence[tuple[int, int]], ablation_masks: torch.Tensor,
                      **kwargs: Any) -> torch.Tensor:
        """(M, S) teacher-forced span log-probs under each mask (see :func:`span_logprobs`)."""
        mat = self._span_matrix(spans)
        tokens = self.token_logprobs(ablation_masks, **kwargs)
        return (tokens.double() @ mat).float()

    def span_effects(self, spans: Sequence[tuple[int, int]], ablation_masks: torch.Tensor,
                     **kwargs: Any) -> torch.Tensor:
        """(M, S) ``log p(unablated) - log p(ablated)``: positive when the regions helped."""
        mat = self._span_matrix(spans)
        tokens = self.token_logprobs(ablation_masks, **kwargs)
        diff = self.base_token_logprobs.cpu().double()[None] - tokens.double()
        return (diff @ mat).float()

    # -- pixel method
    def _pixel_fills(self, fill: str, blur_sigma: float | None) -> dict[str, torch.Tensor]:
        """Per kind, the replacement of every patch row (a video's mean and blur are over its frames)."""
        spec = architecture_spec(self.model)
        patch = int(_get_path(self.model.config, spec.patch_size))
        merge = int(_get_path(self.model.config, spec.merge_size))
        temporal = int(getattr(self.model.config.vision_config, "temporal_patch_size", 1))
        self._merge = merge
        return {kind: _fill_values(pixels, grid, patch, merge, temporal, fill, blur_sigma)
                for kind, (pixels, grid) in self.visual_inputs.items()}

    def _pixel_encoder(self, masks: torch.Tensor, fills: dict[str, torch.Tensor]) -> dict:
        """Per kind, the tower's output on ``B`` copies of its pixels, each with its mask's regions filled."""
        tokens = (masks.float() @ self.token_masks.cpu().float()) > 0  # (B, Nv)
        items = self.regions.layout.images
        encoders = {}
        for kind, (pixels, grid) in self.visual_inputs.items():
            own = [item for item in items if item.kind == kind]
            rows_per_token = torch.cat(pixel_patch_rows(own, grid, self._merge))
            kind_tokens = tokens[:, self.token_kinds[kind].cpu()]  # (B, tokens of this kind), prompt order
            pv = []
            for b in range(masks.shape[0]):
                x = pixels.clone()
                rows = rows_per_token[kind_tokens[b]].flatten()
                x[rows] = fills[kind][rows]
                pv.append(x)
            encoders[kind] = self._encode(kind, torch.cat(pv, 0), grid.repeat(masks.shape[0], 1))
        return encoders


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled)


# ----------------------------------------------------------------------------- functional API


def span_logprobs(model: Any, inputs: Any, sequence: torch.Tensor, spans: Sequence[tuple[int, int]],
                  ablation_masks: torch.Tensor, regions: Any, *, batch_size: int = 16, method: str = "attention",
                  pixel_fill: str = "mean", blur_sigma: float | None = None, reuse_prefix: bool | str = "ablated",
                  progress: bool = False) -> torch.Tensor:
    """(M, S) teacher-forced ``sum log p(token)`` over each span with each mask's regions ablated.

    Args:
        model: a declared VLM (``*ForConditionalGeneration``), ``attn_implementation`` sdpa or eager.
        inputs: processor outputs of the prompt (batch of one).
        sequence: (1, T) prompt + generated ids (``generate``'s output).
        spans: ``[start, end)`` index ranges among the *generated* tokens.
        ablation_masks: (M, K) bool, True = region ablated. An all-False row gives the unablated log-probs.
        regions: the prompt's :class:`~hf_vattr.regions.PromptRegions` (hard assignment is ablated).
        batch_size: masks per forward.
        method: ``"attention"`` (knock the tokens out of every later query's attention) or
            ``"pixel"`` (replace the region's pixels and re-encode the image).
        pixel_fill: ``"mean"`` (per-channel image mean) or ``"blur"`` (Gaussian blur, sigma = one token).
        reuse_prefix: ``"ablated"`` (restart each batch at its earliest ablated token), ``"prompt"``
            (restart at the first visual token) or ``"none"``/``False`` (full forwards).
    """
    max_end = max((int(e) for _, e in spans), default=1)
    engine = AblationEngine(model, inputs, sequence, regions, max_generated=max(1, max_end))
    if not spans:
        return torch.zeros(torch.as_tensor(ablation_masks).shape[0], 0)
    return engine.span_logprobs(spans, ablation_masks, batch_size=batch_size, method=method, pixel_fill=pixel_fill,
                                blur_sigma=blur_sigma, reuse_prefix=reuse_prefix, progress=progress)


def span_effects(model: Any, inputs: Any, sequence: torch.Tensor, spans: Sequence[tuple[int, int]],
                 ablation_masks: torch.Tensor, regions: Any, **kwargs: Any) -> torch.Tensor:
    """(M, S) ``log p(S | x) - log p(S | x ablated)`` per mask and span (arguments as :func:`span_logprobs`)."""
    max_end = max((int(e) for _, e in spans), default=1)
    engine = AblationEngine(model, inputs, sequence, regions, max_generated=max(1, max_end))
    if not spans:
        return torch.zeros(torch.as_tensor(ablation_masks).shape[0], 0)
    return engine.span_effects(spans, ablation_masks, **kwargs)


def span_logprobs_naive(model: Any, inputs: Any, sequence: torch.Tensor, spans: Sequence[tuple[int, int]],
                        ablation_masks: torch.Tensor, regions: Any) -> torch.Tensor:
    """The slow route the engine replaces: one mask, one full forward (vision tower included), no cache.

    Kept for the throughput benchmark and as a readable statement of what is computed.
    """
    if sequence.dim() == 1:
        sequence = sequence[None]
    device = input_device(model)
    prompt_len = int(inputs["input_ids"].shape[-1])
    full = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in extend_inputs(inputs, sequence.cpu()).items()}
    ids = full["input_ids"][0]
    positions = regions.layout.positions.to(device)
    token_masks = regions.token_masks().to(device)
    out = torch.zeros(len(ablation_masks), len(spans))
    with torch.no_grad():
        for m, mask in enumerate(torch.as_tensor(ablation_masks, dtype=torch.bool)):
            ablated = torch.zeros(1, ids.numel(), dtype=torch.bool, device=device)
            ablated[0, positions[token_masks[mask.to(device)].any(0)]] = True
            with attention_intervention(model, _Knockout(ablated)):
                logits = model(**full, use_cache=False).logits[0].float()
            lp = torch.log_softmax(logits[prompt_len - 1: -1], -1).gather(-1, ids[prompt_len:, None])[:, 0].cpu()
            for j, (s, e) in enumerate(spans):
                out[m, j] = lp[s:e].double().sum().float()
    return out


# ----------------------------------------------------------------------------- total effects on answers


def regenerated_span_effects(engine: AblationEngine, sequence: torch.Tensor, spans: Sequence[tuple[int, int]],
                             ablation_masks: torch.Tensor, *, reasoning_end: int, teacher_forced: torch.Tensor,
                             stop_token_id: int, max_new_tokens: int, batch_size: int = 16,
                             generate_kwargs: dict | None = None) -> torch.Tensor:
    """(M, S) *total* effects on spans after the reasoning: the reasoning is regenerated under each ablation.

    Why: an answer depends on the image mostly through the thinking text before it. A
    teacher-forced ablation keeps that text fixed, so it cannot see this path (on the bundled
    toy three answers in four move by less than 1e-6 nats). Here each mask's regions are
    knocked out, the reasoning (generated tokens ``[0, reasoning_end)``, ending with
    ``stop_token_id``, e.g. ``</think>``) is regenerated greedily under the same ablation, the
    original tokens after it are appended, and the spans (which must start at or after
    ``reasoning_end``) are scored under the ablation:
    ``effect = log p(span | x) - log p(span | x ablated, reasoning regenerated)``.

    A mask whose regenerated reasoning equals the original gives exactly its teacher-forced
    effect (same tokens, same ablation), taken from ``teacher_forced`` ``(M, S)`` without a
    forward. A regeneration that does not reach ``stop_token_id`` within ``max_new_tokens``
    gets it appended (the answer is scored as if the reasoning had ended there).
    """
    masks = torch.as_tensor(ablation_masks, dtype=torch.bool)
    _check_batch_size(batch_size)
    sequence = sequence.reshape(-1).cpu()
    prompt_len = engine.prompt_len
    generated = sequence[prompt_len:]
    reasoning_end = int(reasoning_end)
    if not 0 < reasoning_end <= generated.numel() or int(generated[reasoning_end - 1]) != int(stop_token_id):
        raise ValueError(f"the reasoning must end with token {stop_token_id} at generated index {reasoning_end - 1}.")
    if any(int(s) < reasoning_end for s, _ in spans):
        raise ValueError(f"every span must start after the reasoning (index >= {reasoning_end}), got {list(spans)}.")
    original = generated[:reasoning_end].tolist()
    suffix = generated[reasoning_end:]
    base = engine.base_logprobs(spans)  # (S,)
    out = torch.as_tensor(teacher_forced, dtype=torch.float32).clone()
    model = engine.model
    kwargs = dict(generate_kwargs or {})
    kwargs.update(max_new_tokens=int(max_new_tokens), do_sample=False, eos_token_id=[int(stop_token_id)])
    kwargs.setdefault("pad_token_id", int(stop_token_id))
    prompt = {name: value.to(engine.device) if isinstance(value, torch.Tensor) else value
              for name, value in engine.prompt_inputs.items()}
    todo = torch.nonzero(masks.any(1)).flatten().tolist()
    changed: dict[tuple[int, ...], list[int]] = {}  # regenerated reasoning -> the masks that produced it
    with torch.no_grad():
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            key_ablated = torch.zeros(len(idx), prompt_len + int(max_new_tokens), dtype=torch.bool, device=engine.device)
            key_ablated[:, engine.positions] = (masks[idx].float().to(engine.device) @ engine.token_masks.float()) > 0
            with attention_intervention(model, _Knockout(key_ablated)):
                regenerated = model.generate(**_repeat_inputs(prompt, len(idx)), **kwargs)
            for row, m in enumerate(idx):
                new = regenerated[row, prompt_len:].tolist()
                new = new[: new.index(int(stop_token_id)) + 1] if int(stop_token_id) in new else new + [int(stop_token_id)]
                if new != original:  # else: same tokens, same ablation, so the teacher-forced effect is the total
                    changed.setdefault(tuple(new), []).append(m)
        # Masks that regenerated the same reasoning share one engine (one vision pass, one cache).
        for new, group in changed.items():
            shift = len(new) - reasoning_end
            seq = torch.cat([sequence[:prompt_len], torch.tensor(new, dtype=sequence.dtype), suffix])
            shifted = [(int(s) + shift, int(e) + shift) for s, e in spans]
            other = AblationEngine(model, prompt, seq, engine.regions, max_generated=max(e for _, e in shifted))
            ablated = other.span_logprobs(shifted, masks[group], batch_size=batch_size)  # (len(group), S)
            out[group] = (base[None] - ablated).float()
    return out


def _repeat_inputs(inputs: dict, n: int) -> dict:
    """``n`` copies of a batch-of-one prompt (images repeated in the flat vision layout the processors use)."""
    out = {}
    for name, value in inputs.items():
        out[name] = value.repeat(n, *([1] * (value.dim() - 1))) if isinstance(value, torch.Tensor) else value
    return out
