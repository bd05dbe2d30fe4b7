"""Ground-truth collection: generate, split spans, record features and ablation effects, on disk.

One example = one greedy generation. For each reasoning span it records the
estimator's input (span features, ``(L, H, K)``: the mean over the span's
tokens of region-pooled attention of each token's predicting query) and the
targets (leave-one-out effects per region and effects of ``M`` random region
subsets, from :mod:`hf_vattr.pipeline.ablation`).

Why this shape: training needs per-span (features, effects) pairs; LDS needs
the subset masks with their effects; everything else (text, spans, region
map, sequence) is kept so that evaluation and plots can be redone without
re-generating.

Scale-out: :func:`collect` shards a dataset across processes started by
``accelerate launch`` (example ``i`` goes to process ``i % num_processes``),
writes one file per example atomically, and skips examples whose file
exists, so an interrupted run resumes where it stopped and produces the
same bytes as an uninterrupted one. The on-disk format is documented in
``docs/collection.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from transformers.utils import logging

from .ablation import AblationEngine, leave_one_out_masks, random_subset_masks, regenerated_span_effects
from ..capture.attention import AttentionCapture
from ..reasoning.text import decode_pieces
from ..errors import AttributionError
from ..layouts import inputs_on_device, text_dims, visual_layout
from ..options import ConfigError, check_fields
from ..reasoning.formats import FORMATS, ThinkingFormat, detect_format, resolve_format
from ..reasoning.spans import ReasoningStepSplitter, SpanSplitter, splitter_format, tag_texts, think_tags

logger = logging.get_logger(__name__)

__all__ = [
    "CollectionConfig",
    "ExampleRecord",
    "PromptRow",
    "Video",
    "collect_example",
    "total_answer_effects",
    "collect",
    "load_collection",
    "read_manifest",
    "read_prompts",
    "check_ground_truth",
    "check_settings",
    "CollectionError",
    "CollectionNotFoundError",
    "GroundTruthError",
    "REGION_METHODS",
    "dataset_fingerprint",
    "decode_pieces",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]

FORMAT_NAME = "hf_vattr.collection"  # the on-disk format id (not a module path): collections keep reading
FORMAT_VERSION = 1
MANIFEST = "collection.json"
EXAMPLES_DIR = "examples"

class CollectionError(AttributionError, ValueError):
    """A collection folder, example file, prompts file or its ground truth cannot be used as it is."""


class CollectionNotFoundError(AttributionError, FileNotFoundError):
    """A collection folder or prompts file does not exist."""


#: region methods a collection can build from the images and the model alone (build_regions' "masks" and
#: "features" need per-example inputs: pass CollectionConfig.regions_fn for those)
REGION_METHODS = ("grid", "auto", "vlm", "dinov3", "dinov2", "slic", "color")

RegionsFn = Callable[[Any, Any, Any, Sequence[Any]], Any]  # (model, processor, layout, images) -> PromptRegions


@dataclass
class CollectionConfig:
    """What to collect. Fields that change the data are checked against the manifest on resume.

    Each field's ``help`` metadata documents it (``hf-vattr collect --help`` prints the same text).
    """

    num_subsets: int = field(
        default=32, metadata={"help": "random region subsets per example (LDS ground truth; AT2 uses 32)",
                              "range": "[0, inf)"})
    keep_prob: float = field(
        default=0.5, metadata={"help": "probability that a region is kept in a random subset (as in ContextCite/AT2)",
                               "range": "(0, 1)"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget per example (greedy)",
                                                       "range": "[1, inf)"})
    region_method: str = field(default="grid", metadata={
        "help": "how images are split into regions: grid (needs nothing) or a method of "
                "hf_vattr.regions.build_regions",
        "choices": REGION_METHODS})
    k: int = field(default=16, metadata={"help": "regions per image", "range": "[1, inf)"})
    regions_fn: RegionsFn | None = field(default=None, metadata={
        "help": "hook (model, processor, layout, images) -> PromptRegions that overrides region_method; "
                "recorded by name only"})
    pooling: str = field(
        default="sum", metadata={"help": "pooling of attention over a region's tokens", "choices": ("sum", "mean")})
    feature_kind: str = field(default="attention", metadata={
        "help": "what is pooled: attention weights, or attention times the norm of each visual token's "
                "contribution through the head's output projection (value_norm)",
        "choices": ("attention", "value_norm")})
    answer_effects: str = field(default="direct", metadata={
        "help": "effects on spans after the reasoning (the answer): direct (teacher-forced, the thinking text "
                "kept) or total (the thinking is regenerated under each ablation, so the path from the image "
                "through the reasoning counts; costs up to one regeneration per mask)",
        "choices": ("direct", "total")})
    batch_size: int = field(default=16, metadata={"help": "ablation masks per forward pass", "range": "[1, inf)"})
    seed: int = field(default=0, metadata={
        "help": "seeds the random subsets (with the example id, so shards agree with one process)"})
    method: str = field(default="attention", metadata={
        "help": "ablation: knock the region's tokens out of attention, or replace its pixels",
        "choices": ("attention", "pixel")})
    pixel_fill: str = field(default="mean", metadata={
        "help": "what replaces an ablated region's pixels (pixel method)", "choices": ("mean", "blur")})
    keep_token_features: bool = field(default=False, metadata={"help": "also store per-token (G, L, H, K) features"})
    generate_kwargs: dict = field(
        default_factory=dict, metadata={"help": "extra keyword arguments for generate (sampling stays off)"})
    format: ThinkingFormat | str | None = field(default=None, metadata={  # noqa: A003 - the public name
        "help": "the model family's thinking format (hf_vattr.reasoning.formats: a ThinkingFormat or its name); "
                "None detects it from the processor and prompt, as the streamer does"})

    #: fields that do not change the collected numbers (safe to change when resuming)
    RUNTIME_FIELDS = ("batch_size",)

    def __post_init__(self) -> None:
        check_fields(self)  # ranges and choices declared on the fields (the CLI shows the same ones)
        if self.regions_fn is not None and not callable(self.regions_fn):
            raise ConfigError(f"CollectionConfig.regions_fn must be callable, got {self.regions_fn!r}.")
        if not isinstance(self.generate_kwargs, dict):
            raise ConfigError(f"CollectionConfig.generate_kwargs must be a dict, got {self.generate_kwargs!r}.")
        try:
            self.format = resolve_format(self.format)
        except AttributionError as error:
            raise ConfigError(f"CollectionConfig.format: {error}") from error

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "format" and value is not None:
                value = value.name if FORMATS.get(value.name) == value else value.to_dict()
            if f.name == "regions_fn":
                if value is not None:
                    value = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
            out[f.name] = value
        return json.loads(json.dumps(out, default=str))

    @classmethod
    def from_dict(cls, data: dict) -> "CollectionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names and k != "regions_fn"}
        return cls(**kwargs)


@dataclass
class ExampleRecord:
    """Everything collected for one example (tensors on CPU): the one record shape of the pipeline.

    Collection writes it, training fits on it, evaluation and the baselines score it; nothing
    converts it to another shape. Shapes: ``span_features (S, L, H, K)``, ``loo_effects (S, K)``,
    ``subset_masks (M, K)`` (True = ablated; ``M`` may be 0), ``subset_effects (S, M)``,
    ``base_logprobs (S,)``.
    """

    example_id: int
    span_features: torch.Tensor  # (S, L, H, K) float32
    loo_effects: torch.Tensor  # (S, K) float32
    subset_masks: torch.Tensor  # (M, K) bool, True = ablated
    subset_effects: torch.Tensor  # (S, M) float32
    base_logprobs: torch.Tensor  # (S,) float32
    sequence: torch.Tensor  # (T,) int64, prompt + generated ids
    prompt_len: int
    spans: list[dict]  # {"start", "end", "text", "section"}; start/end among generated tokens
    text: str  # generated text as displayed (special tokens other than think tags removed)
    num_regions: int
    model_type: str = ""
    config: dict = field(default_factory=dict)
    regions: dict | None = None  # PromptRegions.to_dict()
    token_features: torch.Tensor | None = None  # (G', L, H, K) when keep_token_features
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        s, k = int(self.span_features.shape[0]), int(self.span_features.shape[-1])
        where = f"example {self.example_id}"
        if self.span_features.dim() != 4:
            raise CollectionError(f"{where}: span_features must be (S, L, H, K), got {tuple(self.span_features.shape)}.")
        checks = [("loo_effects", self.loo_effects, (s, k)), ("base_logprobs", self.base_logprobs, (s,))]
        if self.subset_masks.dim() != 2 or self.subset_masks.shape[1] != k:
            raise CollectionError(f"{where}: subset_masks must be (M, K={k}), got {tuple(self.subset_masks.shape)}.")
        checks.append(("subset_effects", self.subset_effects, (s, int(self.subset_masks.shape[0]))))
        for name, value, shape in checks:
            if tuple(value.shape) != shape:
                raise CollectionError(f"{where}: {name} must have shape {shape}, got {tuple(value.shape)}.")
        if len(self.spans) != s:
            raise CollectionError(f"{where}: {len(self.spans)} spans but span_features holds {s}.")

    @property
    def num_spans(self) -> int:
        return len(self.spans)

    @property
    def num_generated(self) -> int:
        return int(self.sequence.numel()) - self.prompt_len

    @property
    def num_subsets(self) -> int:
        return int(self.subset_masks.shape[0])

    @property
    def dims(self) -> tuple[int, int]:
        """``(L, H)``: the estimator shape these features are for."""
        return int(self.span_features.shape[1]), int(self.span_features.shape[2])

    @property
    def span_ranges(self) -> list[tuple[int, int]]:
        """``[start, end)`` of each span among the generated tokens."""
        return [(int(sp["start"]), int(sp["end"])) for sp in self.spans]

    @property
    def pooling(self) -> str:
        return str(self.config.get("pooling") or "sum")

    @property
    def feature_kind(self) -> str:
        return str(self.config.get("feature_kind") or "attention")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "span_features": self.span_features.float().contiguous(),
            "loo_effects": self.loo_effects.float().contiguous(),
            "subset_masks": self.subset_masks.bool().contiguous(),
            "subset_effects": self.subset_effects.float().contiguous(),
            "base_logprobs": self.base_logprobs.float().contiguous(),
            "sequence": self.sequence.long().contiguous(),
        }
        if self.token_features is not None:
            out["token_features"] = self.token_features.float().contiguous()
        return out

    def metadata(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "example_id": self.example_id,
            "prompt_len": self.prompt_len,
            "spans": self.spans,
            "text": self.text,
            "num_regions": self.num_regions,
            "model_type": self.model_type,
            "config": self.config,
            "regions": self.regions,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same folder, then ``os.replace``)."""
        from safetensors.torch import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"hf_vattr": json.dumps(self.metadata(), sort_keys=True)}
        with _atomic_path(path) as tmp:  # serialised here and written by Python: safetensors' own file is 0600
            tmp.write_bytes(save(self.tensors(), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExampleRecord":
        """Read one example file; an empty, truncated or foreign file raises a ValueError naming it."""
        from safetensors import safe_open

        redo = "Delete it and run `hf-vattr collect` again with the same settings to recollect that example."
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["hf_vattr"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # SafetensorError (empty / truncated file), missing or bad metadata
            raise CollectionError(f"{path} is not a readable hf_vattr collection example ({type(e).__name__}: {e}). "
                                  f"{redo}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CollectionError(f"{path} is not an hf_vattr collection example (format={found!r}).")
        missing = [name for name in ("span_features", "loo_effects", "subset_masks", "subset_effects",
                                     "base_logprobs", "sequence") if name not in tensors]
        missing += [name for name in ("example_id", "prompt_len", "spans", "text", "num_regions") if name not in meta]
        if missing:
            raise CollectionError(f"{path} lacks {', '.join(missing)}. {redo}")
        try:
            return cls._from_parts(meta, tensors)
        except (TypeError, ValueError) as e:
            raise CollectionError(f"{path}: {e} {redo}") from e

    @classmethod
    def _from_parts(cls, meta: dict, tensors: dict) -> "ExampleRecord":
        return cls(
            example_id=int(meta["example_id"]),
            span_features=tensors["span_features"],
            loo_effects=tensors["loo_effects"],
            subset_masks=tensors["subset_masks"].bool(),
            subset_effects=tensors["subset_effects"],
            base_logprobs=tensors["base_logprobs"],
            sequence=tensors["sequence"],
            prompt_len=int(meta["prompt_len"]),
            spans=list(meta["spans"]),
            text=meta["text"],
            num_regions=int(meta["num_regions"]),
            model_type=meta.get("model_type", ""),
            config=meta.get("config", {}),
            regions=meta.get("regions"),
            token_features=tensors.get("token_features"),
            extra=meta.get("extra", {}),
        )

    def prompt_regions(self):
        """The region maps the effects refer to (a :class:`~hf_vattr.regions.PromptRegions`), built once."""
        from ..regions import PromptRegions

        if self.regions is None:
            raise CollectionError(f"example {self.example_id} was saved without its region maps.")
        cached = self.__dict__.get("_prompt_regions")
        if cached is None or cached[0] is not self.regions:
            cached = (self.regions, PromptRegions.from_dict(self.regions))
            self.__dict__["_prompt_regions"] = cached
        return cached[1]


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path``, moved onto it on success and removed on failure.

    The file is created by an ordinary ``open``, so it gets the usual umask-respecting mode
    (``tempfile.mkstemp`` would make every collection file 0600, unreadable to a team).
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _build_inputs(processor: Any, images: Sequence[Any], prompt: Any) -> Any:
    """Processor outputs for (images, prompt): chat messages, raw question text, formatted text, or ready inputs.

    ``images`` are the prompt's visual items in prompt order: images, and videos as :class:`DecodedVideo`
    (their frames go in as decoded, with their fps, as :func:`_load_video` made them).
    """
    if hasattr(prompt, "keys") and "input_ids" in prompt:
        return prompt
    items = list(images)
    pictures = [item for item in items if not isinstance(item, DecodedVideo)]
    videos = [item for item in items if isinstance(item, DecodedVideo)]
    if isinstance(prompt, str):
        tokens = [getattr(processor, name, None) for name in ("image_token", "video_token")]
        if any(token and token in prompt for token in tokens):
            text = prompt
        else:
            content = [{"type": "video" if isinstance(item, DecodedVideo) else "image"} for item in items]
            content.append({"type": "text", "text": prompt})
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
    else:
        text = processor.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    if not videos:
        return processor(text=[text], images=pictures or None, return_tensors="pt")
    try:
        return processor(text=[text], images=pictures or None, videos=[v.frames for v in videos],
                         video_metadata=[v.metadata for v in videos], do_sample_frames=False, return_tensors="pt")
    except (ValueError, TypeError, RuntimeError) as error:  # e.g. too few frames, or frames too small to patch
        names = ", ".join(v.source for v in videos)
        raise CollectionError(f"the processor cannot take the video ({names}): {_first_line(error)}") from error


def _regions_for(model: Any, processor: Any, layout: Any, images: Sequence[Any], inputs: Any,
                 config: CollectionConfig):
    if config.regions_fn is not None:
        return config.regions_fn(model, processor, layout, images)
    if config.region_method == "grid":
        from ..regions import prompt_regions

        return prompt_regions(layout, k=config.k)
    from ..regions import build_regions

    return build_regions(layout, method=config.region_method, k=config.k, images=list(images), model=model,
                         inputs=inputs)


class Video(NamedTuple):
    """One video of a prompt, as a dataset names it: a video file, or its frames in order.

    ``source`` is a path to a video file (decoded by transformers' ``load_video``, sampled at ``fps`` frames
    per second, or every frame when ``fps`` is None), or a list of frames (image paths, PIL images or arrays of
    one size) taken at ``fps`` (default :data:`DEFAULT_FRAMES_FPS`), all of which go to the model.
    """

    source: Any
    fps: float | None = None


class DecodedVideo(NamedTuple):
    """A video ready for the processor: its frames, the metadata that times them, and a name for messages."""

    frames: Any  # (T, H, W, C) array or a list of PIL images
    metadata: dict  # fps, total_num_frames, frames_indices (as transformers' VideoMetadata)
    source: str


#: frames per second of a video given as a list of frames without "fps" (Qwen3-VL's and GLM's sampling rate)
DEFAULT_FRAMES_FPS = 2.0


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _load_video(video: Video) -> DecodedVideo:
    """Decode one :class:`Video`: a file through transformers' ``load_video``, a frame list opened frame by frame.

    Anything that makes it unusable (an unreadable file, fewer than two frames, frames of different sizes) is a
    :class:`CollectionError` naming the video.
    """
    source = video.source
    if isinstance(source, (str, os.PathLike)):
        from transformers.video_utils import load_video

        name = str(source)
        try:
            frames, meta = load_video(name, fps=video.fps)
        except Exception as error:  # the decoder's own errors (no file, corrupt container, no video stream)
            raise CollectionError(f"video {name} cannot be read ({_first_line(error)}).") from error
        metadata = {"fps": float(meta.fps), "total_num_frames": int(meta.total_num_frames),
                    "frames_indices": [int(i) for i in meta.frames_indices]}
        _check_frames(name, [tuple(frames.shape[1:3])] * int(frames.shape[0]))
        return DecodedVideo(frames, metadata, name)
    frames = [_load_image(frame) for frame in source]
    name = f"{source[0]}, ... ({len(source)} frames)" if source and isinstance(source[0], (str, os.PathLike)) \
        else f"a video of {len(frames)} frames"
    _check_frames(name, [_frame_size(frame) for frame in frames])
    fps = float(video.fps) if video.fps is not None else DEFAULT_FRAMES_FPS
    metadata = {"fps": fps, "total_num_frames": len(frames), "frames_indices": list(range(len(frames)))}
    return DecodedVideo(frames, metadata, name)


def _frame_size(frame: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or an ``(H, W, C)`` array."""
    if hasattr(frame, "size") and not hasattr(frame, "shape"):
        return int(frame.size[1]), int(frame.size[0])
    return int(frame.shape[0]), int(frame.shape[1])


def _check_frames(name: str, sizes: Sequence[tuple[int, int]]) -> None:
    """A video needs at least one frame group (two frames), all of one size."""
    if len(sizes) < 2:
        raise CollectionError(f"video {name} has {len(sizes)} frame(s); a video needs at least 2 (one frame group "
                              "of the vision tower).")
    if len(set(sizes)) > 1:
        raise CollectionError(f"video {name}: its frames have different sizes ({sorted(set(sizes))}); a video's "
                              "frames share one size.")


def _load_visual(item: Any) -> Any:
    """A dataset's visual item opened for the model: an image (see :func:`_load_image`) or a :class:`Video`."""
    return _load_video(item) if isinstance(item, Video) else _load_image(item)


def _load_image(image: Any) -> Any:
    """Paths are opened here, so a dataset can list files and each process reads only its own shard."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            return im.convert("RGB")
    return image


def _example_generator(seed: int, example_id: int) -> torch.Generator:
    # Depends only on (seed, id): the same masks whichever process or order collects the example.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(example_id)) % (2**63 - 1))


# ----------------------------------------------------------------------------- one example


def collect_example(model: Any, processor: Any, images: Sequence[Any] | Any, prompt: Any,
                    config: CollectionConfig | None = None, splitter: SpanSplitter | None = None,
                    example_id: int = 0) -> ExampleRecord:
    """Generate greedily, split spans, and record span features and ablation effects for one example.

    Args:
        images: one image or a list (PIL, arrays, or file paths), in prompt order; a :class:`Video` entry is a
            video (a file, or its frames, at its fps).
        prompt: chat messages, a question (wrapped in a user turn with the images and videos), chat-formatted
            text containing the image (video) token, or ready processor outputs.
        splitter: span splitter; default :class:`~hf_vattr.reasoning.spans.ReasoningStepSplitter`.
        example_id: recorded, and seeds the random subsets together with ``config.seed``.

    Features are the captured attention of each token's predicting query, recomputed in one
    teacher-forced forward over the generated sequence (the same rows the streamer sees during
    generation; tested to agree). That forward is the ablation engine's unablated pass, so it
    costs nothing extra.
    """
    config = config or CollectionConfig()
    _check_answer_effects(config)
    if isinstance(images, Video) or not isinstance(images, (list, tuple)):
        images = [images]
    items = [_load_visual(item) for item in images]
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = _build_inputs(processor, items, prompt)
    prompt_len = int(inputs["input_ids"].shape[-1])
    layout, images = _prompt_layout(model, inputs, items)
    regions = _regions_for(model, processor, layout, images, inputs, config)
    sequence = _generate(model, inputs, config)
    generated = sequence[0, prompt_len:].tolist()

    splitter = splitter or ReasoningStepSplitter()
    pieces, spans, fmt = _split_trace(processor, tokenizer, splitter, inputs, generated, config)
    span_ranges = [(s["start"], s["end"]) for s in spans]
    scored = len(generated) if config.keep_token_features else max([e for _, e in span_ranges] + [1])
    engine, token_features = _engine_and_features(model, inputs, sequence, layout, regions, prompt_len, scored,
                                                  config)
    extra: dict = {"num_generated": len(generated), "format": splitter_format(splitter, fmt).name,
                   "image_sizes": [list(im.original_size) if im.original_size else None for im in layout.images]}
    videos = [item for item in items if isinstance(item, DecodedVideo)]
    if videos:  # what a video's regions and times are read against: its frames' count, times and source
        extra["videos"] = [{"source": v.source, "num_frames": len(v.frames), **v.metadata} for v in videos]
    subset_masks = random_subset_masks(int(regions.num_regions), config.num_subsets, config.keep_prob,
                                       _example_generator(config.seed, example_id))
    ground_truth = _span_ground_truth(engine, tokenizer, splitter, sequence, generated, spans, token_features,
                                      subset_masks, text_dims(model), int(regions.num_regions), config, extra)
    return ExampleRecord(
        example_id=int(example_id),
        **ground_truth,
        subset_masks=subset_masks,
        sequence=sequence[0],
        prompt_len=prompt_len,
        spans=spans,
        text="".join(pieces),
        num_regions=int(regions.num_regions),
        model_type=str(model.config.model_type),
        config={k: v for k, v in config.to_dict().items() if k not in CollectionConfig.RUNTIME_FIELDS},
        regions=regions.to_dict() if hasattr(regions, "to_dict") else None,
        token_features=token_features if config.keep_token_features else None,
        extra=extra,
    )


def _prompt_layout(model: Any, inputs: Any, items: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The prompt's visual layout, and its items' pixels in prompt order (a video's entry: its frames).

    The processor takes images and videos apart, so the prompt order comes from the layout (each item's kind and
    index among its kind), whatever order the dataset listed them in.
    """
    pictures = [item for item in items if not isinstance(item, DecodedVideo)]
    videos = [item for item in items if isinstance(item, DecodedVideo)]
    if not videos:
        return visual_layout(model, inputs["input_ids"], inputs.get("image_grid_thw"), pictures), pictures
    layout = visual_layout(model, inputs["input_ids"], inputs.get("image_grid_thw"), pictures,
                           video_grid_thw=inputs.get("video_grid_thw"), videos=[v.frames for v in videos],
                           video_metadata=[v.metadata for v in videos],
                           second_per_grid_ts=inputs.get("second_per_grid_ts"))
    by_kind = {"image": pictures, "video": [v.frames for v in videos]}
    return layout, [by_kind[item.kind][item.kind_index] for item in layout.images]


def _check_answer_effects(config: CollectionConfig) -> None:
    if config.answer_effects not in ("direct", "total"):
        raise CollectionError(f"answer_effects must be 'direct' or 'total', got {config.answer_effects!r}.")
    if config.answer_effects == "total" and config.method != "attention":
        raise CollectionError("answer_effects='total' regenerates the reasoning under attention ablation; it needs "
                         f"method='attention', got method={config.method!r}.")


def _generate(model: Any, inputs: Any, config: CollectionConfig) -> torch.Tensor:
    """The greedy generation ``(1, T)`` (prompt and generated ids) on CPU."""
    gen_kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=False)
    gen_kwargs.update(config.generate_kwargs)
    with torch.no_grad():
        sequence = model.generate(**inputs_on_device(model, inputs), **gen_kwargs)
    if not isinstance(sequence, torch.Tensor):
        sequence = sequence.sequences
    return sequence[:1].cpu()


def _split_trace(processor: Any, tokenizer: Any, splitter: SpanSplitter, inputs: Any, generated: list[int],
                 config: CollectionConfig) -> tuple[list[str], list[dict], ThinkingFormat]:
    """Decode the generated tokens and cut them into spans, as the streamer does; returns pieces, spans, format."""
    prompt_text = tokenizer.decode(inputs["input_ids"][0].tolist(), skip_special_tokens=False)
    fmt = config.format or detect_format(processor, prompt_text)  # as the streamer does
    if getattr(splitter, "auto_format", False):
        splitter.set_format(fmt)  # type: ignore[attr-defined]
    splitter.reset(prompt_text)
    pieces = decode_pieces(tokenizer, generated, tag_texts(splitter, fmt))
    closed = []
    for i, piece in enumerate(pieces):
        closed += splitter.push(i, piece)
    closed += splitter.flush()
    spans = [{"start": int(s.start), "end": int(s.end), "text": s.text, "section": s.section} for s in closed]
    return pieces, spans, fmt


def _engine_and_features(model: Any, inputs: Any, sequence: torch.Tensor, layout: Any, regions: Any, prompt_len: int,
                         scored: int, config: CollectionConfig) -> tuple[AblationEngine, torch.Tensor]:
    """The ablation engine of the trace, and the region-pooled features ``(scored, L, H, K)`` of its tokens.

    The engine's unablated forward runs with the capture on: one pass gives features and base log-probs.
    """
    capture = AttentionCapture(model, layout.positions, regions.membership(), pooling=config.pooling,
                               feature_kind=config.feature_kind, rows="all",
                               first_row=prompt_len - 1)
    with capture:
        engine = AblationEngine(model, inputs, sequence, regions, max_generated=scored)
        token_features = capture.pop().float().cpu()  # (scored, L, H, K)
    if token_features.shape[0] != scored:
        raise RuntimeError(f"captured {token_features.shape[0]} feature rows for {scored} generated tokens.")
    return engine, token_features


def _span_ground_truth(engine: AblationEngine, tokenizer: Any, splitter: SpanSplitter, sequence: torch.Tensor,
                       generated: list[int], spans: list[dict], token_features: torch.Tensor,
                       subset_masks: torch.Tensor, dims: tuple[int, int], num_regions: int,
                       config: CollectionConfig, extra: dict) -> dict[str, torch.Tensor]:
    """Per span: mean features, leave-one-out and subset effects, base log-probs (``ExampleRecord`` fields).

    With total answer effects, where the reasoning ends goes into ``extra``.
    """
    if not spans:
        num_layers, num_heads = dims
        return {"span_features": torch.zeros(0, num_layers, num_heads, num_regions),
                "loo_effects": torch.zeros(0, num_regions), "subset_effects": torch.zeros(0, config.num_subsets),
                "base_logprobs": torch.zeros(0)}
    span_ranges = [(s["start"], s["end"]) for s in spans]
    span_features = torch.stack([token_features[s:e].mean(0) for s, e in span_ranges])
    masks = torch.cat([leave_one_out_masks(num_regions), subset_masks])
    effects = engine.span_effects(span_ranges, masks, batch_size=config.batch_size, method=config.method,
                                  pixel_fill=config.pixel_fill)  # (K + M, S)
    if config.answer_effects == "total":
        end = reasoning_end(tokenizer, splitter, generated, spans)
        if end is not None:
            extra.update(reasoning_end=end[0], reasoning_stop_token=end[1])
            effects = _with_total_answer_effects(engine, sequence[0], spans, masks, effects, *end,
                                                 config.to_dict(), config.batch_size)
    return {"span_features": span_features, "loo_effects": effects[:num_regions].T.contiguous(),
            "subset_effects": effects[num_regions:].T.contiguous(), "base_logprobs": engine.base_logprobs(span_ranges)}


def reasoning_end(tokenizer: Any, splitter: SpanSplitter, generated: Sequence[int], spans: Sequence[dict]
                  ) -> tuple[int, int] | None:
    """``(index after the end-of-reasoning tag, its token id)`` among the generated tokens, or None.

    None when there is no answer span after a single-token tag (nothing to regenerate for).
    """
    answer = [sp["start"] for sp in spans if sp["section"] == "answer"]
    if not answer:
        return None
    close = think_tags(splitter)[1]
    close_id = tokenizer.convert_tokens_to_ids(close)
    if not isinstance(close_id, int) or close_id == getattr(tokenizer, "unk_token_id", None):
        raise CollectionError(f"answer_effects='total' needs the end-of-reasoning tag {close!r} to be one token of the "
                         "tokenizer; it is not. Use answer_effects='direct'.")
    ends = [i + 1 for i, t in enumerate(list(generated)[:min(answer)]) if int(t) == close_id]
    return (ends[-1], int(close_id)) if ends else None


def total_answer_effects(engine: AblationEngine, record: ExampleRecord, masks: torch.Tensor, effects: torch.Tensor,
                         batch_size: int = 16) -> torch.Tensor:
    """``effects (M, S)`` (teacher-forced, for ``record``'s spans) with the answer spans' columns made total.

    Uses the reasoning end that collection stored in ``record.extra``; unchanged when the record
    was collected with ``answer_effects="direct"`` or has nothing to regenerate.
    """
    end = record.extra.get("reasoning_end")
    if record.config.get("answer_effects") != "total" or end is None:
        return effects
    return _with_total_answer_effects(engine, record.sequence, record.spans, masks, effects, int(end),
                                      int(record.extra["reasoning_stop_token"]), record.config, batch_size)


def _with_total_answer_effects(engine: AblationEngine, sequence: torch.Tensor, spans: Sequence[dict],
                               masks: torch.Tensor, effects: torch.Tensor, end: int, stop_token: int,
                               config: Mapping[str, Any], batch_size: int) -> torch.Tensor:
    """The one place collection and evaluation turn answer columns of ``effects (M, S)`` into total effects."""
    answer = [i for i, sp in enumerate(spans) if sp["section"] == "answer"]
    out = torch.as_tensor(effects).clone()
    out[:, answer] = regenerated_span_effects(
        engine, sequence, [(int(spans[i]["start"]), int(spans[i]["end"])) for i in answer], masks,
        reasoning_end=end, teacher_forced=out[:, answer], stop_token_id=stop_token,
        max_new_tokens=int(config.get("max_new_tokens", 256)), batch_size=batch_size,
        generate_kwargs=config.get("generate_kwargs") or None)
    return out


# ----------------------------------------------------------------------------- datasets


class PromptRow(NamedTuple):
    """One validated row of a JSON-lines prompts file (image paths resolved, not opened; a video as a :class:`Video`)."""

    example_id: int
    images: list[Any]  # image paths and Video entries, in prompt order
    prompt: Any  # a question (str) or chat messages (list of dicts)
    answer: Any = None


PROMPTS_FORMAT = """One JSON object per line:
    {"id": 0, "image": "cat.png", "prompt": "What is the cat doing?", "answer": "sleeping"}
    {"id": 1, "images": ["a.png", "b.png"], "messages": [{"role": "user", "content": [...]}]}
    {"id": 2, "video": "clip.mp4", "fps": 2, "prompt": "What happens?"}
    {"id": 3, "video": ["f0.png", "f1.png", "f2.png", "f3.png"], "fps": 1, "prompt": "What moves?"}
"id" (an integer) defaults to the line number (0-based); image paths are relative to the images folder,
else to the file's folder; "answer" (optional) labels traces for trajectory analysis.
"video" is a video file (decoded by transformers' load_video, sampled at "fps" frames per second, or every
frame without "fps") or a list of at least 2 frame images of one size, all shown to the model, taken at
"fps" (default 2). A row may have a video and images; with "prompt" the video comes first."""


def _row_error(path: Path, line: int, message: str) -> ValueError:
    return CollectionError(f"{path}:{line}: {message} The format: `hf-vattr collect --help` "
                           "(hf_vattr.pipeline.collection.PROMPTS_FORMAT).")


def read_prompts(path: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[PromptRow]:
    """Parse and check a JSON-lines prompts file (format: :data:`PROMPTS_FORMAT`).

    Every problem raises a ValueError naming the file, the line and the field, so a bad row
    fails before any model is loaded or anything is written. Image files must exist.
    """
    path = Path(path)
    if not path.is_file():
        raise CollectionNotFoundError(f"prompts file {path} not found; pass an existing JSON-lines file.")
    base = Path(images_dir) if images_dir else path.parent
    rows: list[PromptRow] = []
    seen: set[int] = set()
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        n = index + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _row_error(path, n, f"not valid JSON ({e}).") from None
        if not isinstance(row, dict):
            raise _row_error(path, n, f"expected a JSON object, got a {type(row).__name__}.")
        eid = row.get("id", index)
        if isinstance(eid, str) and eid.isdigit():
            eid = int(eid)
        if isinstance(eid, bool) or not isinstance(eid, int) or eid < 0:
            raise _row_error(path, n, f"'id' must be a non-negative integer, got {eid!r}.")
        if eid in seen:
            raise _row_error(path, n, f"duplicate id {eid}; ids must be unique.")
        seen.add(eid)
        names: list[str] = []
        if "images" in row:
            names = row["images"]
            if not isinstance(names, list) or not names or not all(isinstance(x, str) and x for x in names):
                raise _row_error(path, n, f"'images' must be a non-empty list of file names, got {names!r}.")
        elif "image" in row:
            if not isinstance(row["image"], str) or not row["image"]:
                raise _row_error(path, n, f"'image' must be a file name (a string), got {row['image']!r}.")
            names = [row["image"]]
        elif "video" not in row:
            raise _row_error(path, n, "no 'image' / 'images' / 'video' given.")
        images: list[Any] = [str(Path(x) if os.path.isabs(x) else base / x) for x in names]
        for im in images:
            if not Path(im).is_file():
                raise _row_error(path, n, f"image {im} not found.")
        if "video" in row:
            try:
                images.insert(0, _row_video(row, base))
            except CollectionError as error:
                raise _row_error(path, n, str(error)) from None
        elif "fps" in row:
            raise _row_error(path, n, "'fps' goes with 'video' (a row without a video has no frame rate).")
        if "messages" in row:
            prompt = row["messages"]
            if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
                raise _row_error(path, n, "'messages' must be a non-empty list of chat messages (objects with "
                                          f"'role' and 'content'), got {prompt!r}.")
        elif "prompt" in row:
            prompt = row["prompt"]
            if not isinstance(prompt, str):
                raise _row_error(path, n, f"'prompt' must be a string, got {prompt!r}.")
        else:
            raise _row_error(path, n, "no 'prompt' / 'messages' given.")
        answer = row.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
            raise _row_error(path, n, f"'answer' must be a string or a number, got {answer!r}.")
        rows.append(PromptRow(eid, images, prompt, answer))
    return rows


def _row_video(row: Mapping[str, Any], base: Path) -> Video:
    """The row's ``"video"`` (and ``"fps"``), checked without decoding: files exist, a file opens as a video,
    a frame list has at least two frames of one size."""
    value, fps = row["video"], row.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf")):
        raise CollectionError(f"'fps' must be a positive number, got {fps!r}.")
    fps = None if fps is None else float(fps)

    def resolve(name: str) -> str:
        return str(Path(name) if os.path.isabs(name) else base / name)

    if isinstance(value, str) and value:
        file = resolve(value)
        if not Path(file).is_file():
            raise CollectionError(f"video {file} not found.")
        _probe_video(file)
        return Video(file, fps)
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise CollectionError(f"'video' must be a video file name or a list of frame file names, got {value!r}.")
    frames = [resolve(x) for x in value]
    for frame in frames:
        if not Path(frame).is_file():
            raise CollectionError(f"video frame {frame} not found.")
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for frame in frames:
        try:
            with Image.open(frame) as im:  # reads the header only
                sizes.append((int(im.size[1]), int(im.size[0])))
        except (OSError, UnidentifiedImageError) as error:
            raise CollectionError(f"video frame {frame} cannot be read ({_first_line(error)}).") from None
    _check_frames(f"{frames[0]}, ... ({len(frames)} frames)" if frames else "[]", sizes)
    return Video(frames, fps)


def _probe_video(file: str) -> None:
    """Open a video file's container and find a video stream in it, without decoding (PyAV, the backend
    transformers' ``load_video`` uses by default; skipped when it is not installed)."""
    try:
        import av
    except ImportError:
        return
    try:
        with av.open(file) as container:
            if not container.streams.video:
                raise CollectionError(f"video {file} holds no video stream.")
    except CollectionError:
        raise
    except Exception as error:  # av.error.InvalidDataError and friends: not a video container
        raise CollectionError(f"video {file} cannot be read ({_first_line(error)}).") from None


def dataset_fingerprint(dataset: Mapping[str, Any]) -> str:
    """A hash of what a dataset *contains*, so a collection folder is never resumed with another one.

    ``dataset`` is a JSON-ready description, ``{"kind": ..., **params}``. For ``kind="jsonl"`` it is
    the bytes of the prompts file at ``dataset["path"]`` (moving the file does not change it; editing
    it does); for other kinds every parameter except ``path``, ``images_dir``, ``model`` and ``revision``
    (a toy dataset: its seed and count; a ``datasets`` dataset: its split, columns, system prompt and
    ``content``, the content hash :func:`hf_vattr.pipeline.datasets.hf_dataset_spec` records, and its name only
    when that is a Hub id, so moving a local folder changes nothing).
    """
    desc = {k: v for k, v in dataset.items() if k not in ("path", "images_dir", "model", "revision")}
    if dataset.get("kind") == "datasets" and str(dataset.get("content", "")).startswith(("sha256:", "datasets:")):
        desc.pop("dataset", None)  # a local folder: its content hash says what it holds, wherever it lies
    if dataset.get("kind") == "jsonl":
        path = Path(dataset["path"])
        if not path.is_file():
            raise CollectionNotFoundError(f"prompts file {path} not found; pass an existing JSON-lines file.")
        desc["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def check_dataset(out_dir: str | os.PathLike, dataset: Mapping[str, Any]) -> str:
    """Fingerprint ``dataset`` and refuse if ``out_dir`` already holds a collection of another dataset.

    Writes nothing: call it before anything goes into ``out_dir`` (:func:`collect` does).
    Returns the fingerprint.
    """
    fingerprint = dataset_fingerprint(dataset)
    path = Path(out_dir) / MANIFEST
    if path.exists() and _has_examples(out_dir):  # a folder with no example in it pins nothing
        old = _read_json(path).get("dataset_fingerprint")
        if old is None:
            logger.warning(f"{path} records no dataset fingerprint (made by an older hf_vattr); cannot check that "
                           "the examples on disk come from the same dataset.")
        elif old != fingerprint:
            raise CollectionError(
                f"{out_dir} already holds a collection of a different dataset (collection.json has "
                f"dataset_fingerprint {old[:12]}..., this dataset is {fingerprint[:12]}...: another prompts file, "
                "or another toy seed or count). Collect into a new folder, or pass the same dataset to resume."
            )
    return fingerprint


# ----------------------------------------------------------------------------- many examples


def _model_summary(model: Any) -> dict:
    num_layers, num_heads = text_dims(model)
    text_config = model.config.get_text_config()
    return {
        "model_type": str(model.config.model_type),
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "num_layers": num_layers,
        "num_heads": num_heads,
        "hidden_size": int(getattr(text_config, "hidden_size", 0) or 0),
        "vocab_size": int(getattr(text_config, "vocab_size", 0) or 0),
    }


def _write_json(path: Path, data: dict) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(path: str | os.PathLike) -> dict:
    """The ``collection.json`` of a collection folder (a missing file raises a ``FileNotFoundError``)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise CollectionNotFoundError(f"{file} not found; is {path} a collection folder made by `hf-vattr collect`?")
    return _read_json(file)


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a :class:`CollectionError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CollectionError(f"{path} is not readable JSON ({type(e).__name__}: {e}); it may be truncated. If the "
                              "folder holds no examples yet, delete the file; else restore it or collect anew.") from e
    if not isinstance(data, dict):
        raise CollectionError(f"{path} holds a JSON {type(data).__name__}, not an object; it is not a collection "
                              "manifest.")
    return data


def _has_examples(out_dir: str | os.PathLike) -> bool:
    """Whether a collection folder holds at least one example file (only then do its settings bind a resume)."""
    folder = Path(out_dir) / EXAMPLES_DIR
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def check_settings(out_dir: str | os.PathLike, config: CollectionConfig) -> None:
    """Refuse resuming ``out_dir`` with another :class:`CollectionConfig` (the model is checked by :func:`collect`).

    Writes and loads nothing: the CLI calls it before the model loads. A folder without an example pins nothing.
    """
    _check_resume(Path(out_dir), {"config": config.to_dict()})


def _check_resume(out_dir: Path, manifest: dict) -> None:
    path = out_dir / MANIFEST
    if not path.exists() or not _has_examples(out_dir):  # e.g. left by a refused or failed start: pins nothing
        return
    old = _read_json(path)
    ignore = set(CollectionConfig.RUNTIME_FIELDS)
    old_cfg = {k: v for k, v in old.get("config", {}).items() if k not in ignore}
    new_cfg = {k: v for k, v in manifest["config"].items() if k not in ignore}
    differences = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    if "model" in manifest and old.get("model") != manifest["model"]:
        differences.append("model")
    if differences:
        raise CollectionError(
            f"{out_dir} already holds a collection made with different settings ({', '.join(differences)}). "
            "Resume with the same model and CollectionConfig, or collect into a new folder."
        )


def example_path(out_dir: str | os.PathLike, example_id: int) -> Path:
    """Where an example's file lives: ``examples/{id:06d}.safetensors``."""
    return Path(out_dir) / EXAMPLES_DIR / f"{int(example_id):06d}.safetensors"


def collect(model: Any, processor: Any, examples: Iterable[tuple[int, Any, Any]], out_dir: str | os.PathLike,
            config: CollectionConfig | None = None, accelerator: Any = None, *,
            dataset: Mapping[str, Any] | None = None,
            splitter_factory: Callable[[], SpanSplitter] | None = None,
            callback: Callable[[int, Path], None] | None = None, progress: bool = True,
            dataset_ids: Iterable[int] | None = None) -> dict:
    """Collect ground truth for ``(example_id, images, prompt)`` items into ``out_dir``; resumable and sharded.

    Run it under ``accelerate launch --num_processes N`` (or pass an ``Accelerator``): item ``i`` of
    ``examples`` is handled by process ``i % N``. Every process needs the model: load it per process
    (``device_map={"": accelerator.device}``) or, for a model too big for one device, run one process
    and load it with ``device_map="auto"``. Items whose file already exists are skipped, so re-running
    after an interruption finishes the job. The main process writes ``collection.json`` at the start
    and again, listing every example on disk, once all processes are done.

    Args:
        examples: iterable of ``(example_id, images, prompt)``; ids are non-negative ints, unique. It is
            iterated lazily by every process; give image *paths* so each process only opens its own shard.
        dataset: JSON-ready description of where ``examples`` come from (``{"kind": "jsonl", "path": ...}``,
            ``{"kind": "toy", "n": ..., "seed": ...}``); its :func:`dataset_fingerprint` goes into the
            manifest, and resuming with another dataset is refused. Checked before anything is written.
        splitter_factory: makes a fresh span splitter per example (default ReasoningStepSplitter).
        callback: called as ``callback(example_id, path)`` after each example is written.
        dataset_ids: every example id of the whole dataset, when ``examples`` is only part of it (``--limit``):
            the manifest says ``complete`` once all of these are on disk, not just the ones iterated.

    Returns:
        ``{"written": [...], "skipped": [...]}`` example ids of this process.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    config = config or CollectionConfig()
    # ACCELERATE_USE_CPU=1 makes CPU processes started by `accelerate launch` form a gloo group.
    if accelerator is not None:
        state = accelerator.state
    else:
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out_dir = Path(out_dir)
    # Everything that can fail on bad input runs before the first write: a failed start leaves no manifest.
    fingerprint = check_dataset(out_dir, dataset) if dataset is not None else None
    total = None
    if hasattr(examples, "__len__"):
        n = len(examples)  # type: ignore[arg-type]  # a JSONL dataset parses (and checks) its rows here
        total = n // state.num_processes + (1 if state.process_index < n % state.num_processes else 0)
    manifest = _manifest(model, config, dataset, fingerprint)
    _check_resume(out_dir, manifest)
    (out_dir / EXAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    if state.is_main_process and (not (out_dir / MANIFEST).exists() or not _has_examples(out_dir)):
        _write_json(out_dir / MANIFEST, dict(manifest, examples=[], complete=False))

    all_ids, written, skipped = _collect_shard(model, processor, examples, out_dir, config, state, total,
                                               splitter_factory, callback, progress)
    if skipped:
        logger.info(f"process {state.process_index}: skipped {len(skipped)} examples already on disk.")

    state.wait_for_everyone()
    if state.is_main_process:
        ids = sorted(int(p.stem) for p in (out_dir / EXAMPLES_DIR).glob("*.safetensors"))
        expected = set(all_ids) if dataset_ids is None else {int(i) for i in dataset_ids} | set(all_ids)
        _write_json(out_dir / MANIFEST, dict(manifest, examples=ids, complete=expected <= set(ids)))
    return {"written": written, "skipped": skipped}


def _manifest(model: Any, config: CollectionConfig, dataset: Mapping[str, Any] | None,
              fingerprint: str | None) -> dict:
    """``collection.json`` without its example list: what a resume must match."""
    num_layers, num_heads = text_dims(model)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": config.to_dict(),
        "model": _model_summary(model),
        "num_layers": num_layers,
        "num_heads": num_heads,
        "layout": f"{EXAMPLES_DIR}/{{example_id:06d}}.safetensors",
    }
    if dataset is not None:
        manifest.update(dataset=dict(dataset), dataset_fingerprint=fingerprint)
    return manifest


def _collect_shard(model: Any, processor: Any, examples: Iterable[tuple[int, Any, Any]], out_dir: Path,
                   config: CollectionConfig, state: Any, total: int | None,
                   splitter_factory: Callable[[], SpanSplitter] | None, callback: Callable[[int, Path], None] | None,
                   progress: bool) -> tuple[list[int], list[int], list[int]]:
    """Collect this process's share of ``examples`` (item ``i`` when ``i % N`` is its index), skipping files on disk.

    Returns every example id iterated, and the ids this process wrote and skipped.
    """
    from tqdm.auto import tqdm

    all_ids: list[int] = []
    written, skipped = [], []
    bar = tqdm(total=total, desc=f"collect [{state.process_index}/{state.num_processes}]", disable=not progress,
               position=state.process_index, leave=True)
    for index, (example_id, images, prompt) in enumerate(examples):  # lazy: datasets need not fit in memory
        all_ids.append(int(example_id))
        if index % state.num_processes != state.process_index:
            continue
        path = example_path(out_dir, example_id)
        if path.exists():
            skipped.append(int(example_id))
            bar.update(1)
            continue
        splitter = splitter_factory() if splitter_factory is not None else None
        record = collect_example(model, processor, images, prompt, config, splitter=splitter, example_id=example_id)
        record.save(path)
        written.append(int(example_id))
        bar.update(1)
        bar.set_postfix(spans=record.num_spans, tokens=record.num_generated)
        if callback is not None:
            callback(int(example_id), path)
    bar.close()
    return all_ids, written, skipped


class GroundTruthError(CollectionError):
    """The ablation effects of a collection cannot be trained on or evaluated against (all zero, or non-finite)."""


def check_ground_truth(records: Sequence[ExampleRecord], source: str | os.PathLike | None = None) -> None:
    """Refuse ground truth that would train or score nothing: non-finite values, or effects that are all 0.

    All-zero effects mean nothing was ablated (or nothing the model does depends on the image): a fit on them
    is noise and every metric reads 0. ``source`` (the collection folder) is named in the message.
    """
    where = f"{source}: " if source else ""
    fix = ("Delete that file and run `hf-vattr collect` again with the same settings" if source
           else "Collect that example again")
    values = 0
    for r in records:
        for name in ("loo_effects", "subset_effects", "base_logprobs", "span_features"):
            t = getattr(r, name)
            if t is None or t.numel() == 0:
                continue
            bad = ~torch.isfinite(t.float())
            if bool(bad.any()):
                span = int(bad.nonzero()[0, 0])
                file = f" ({EXAMPLES_DIR}/{int(r.example_id):06d}.safetensors)" if source else ""
                raise GroundTruthError(
                    f"{where}example {r.example_id}{file} has non-finite {name} "
                    f"({int(bad.sum())} values, first at span {span}): the ablation ground truth is broken there. "
                    f"{fix}.")
        values += r.loo_effects.numel() + r.subset_effects.numel()
    if values and all(not bool(r.loo_effects.any()) and not bool(r.subset_effects.any()) for r in records):
        raise GroundTruthError(
            f"{where}every ablation effect of the {len(records)} examples is 0, so there is nothing to train on or "
            "score against (no ablation ran: was it collected with --batch-size < 1 by an older hf_vattr?). "
            "Collect again into a new folder.")


def load_collection(path: str | os.PathLike) -> list[ExampleRecord]:
    """Every example of a collection folder, in example-id order."""
    folder = Path(path) / EXAMPLES_DIR
    if not folder.is_dir():
        raise CollectionNotFoundError(f"{path} holds no '{EXAMPLES_DIR}/' folder; is it a collection made by collect()?")
    return [ExampleRecord.load(p) for p in sorted(folder.glob("*.safetensors"))]
