"""Where each image's and video's visual tokens sit, and what pixels (and seconds) each one covers.

Model support is *declared*, never guessed from a model name: every supported
``config.model_type`` has one :class:`ArchitectureSpec` row saying which config
fields hold the image and video token ids, the ViT patch size and the spatial merge size,
and where the text decoder's attention modules live. Everything else comes
from the processor outputs: ``input_ids`` (token positions),
``image_grid_thw`` / ``video_grid_thw`` (patch grid per image or video, *in patches*; the LLM token grid is
``t x h / merge x w / merge``) and, for Qwen2.5-VL, ``second_per_grid_ts``.

Geometry: a visual token (row r, col c) of an image covers, in the resized
image the processor fed the vision tower, the box
``[r*u, (r+1)*u) x [c*u, (c+1)*u)`` with ``u = patch * merge`` pixels; in the
original image the same box scaled by separate y and x factors
(``orig_h / resized_h`` and ``orig_w / resized_w``), because processors round
each side to a multiple of ``u`` independently.

Videos are visual items with ``t`` frame groups: the vision tower fuses ``temporal_patch_size`` consecutive
frames (2 in every supported family; an odd count is padded with the last frame) into one group of
``h x w`` tokens, each with the same box in its frames as an image token, and a time span in seconds from
the frames' times (``video_metadata``: fps and frame indices, as the processor used them; else Qwen2.5-VL's
``second_per_grid_ts``; else the processors' own 24 fps fallback). How a family writes a video:

* Qwen2.5-VL: one block ``<|vision_start|>`` + ``<|video_pad|>`` x (t h w) + ``<|vision_end|>``;
* Qwen3-VL: one block per group, ``<{time:.1f} seconds><|vision_start|>`` + ``<|video_pad|>`` x (h w) +
  ``<|vision_end|>``, so the video's tokens are not contiguous;
* GLM-4.1V / 4.5V: ``<|begin_of_video|>``, then per group ``<|begin_of_image|>`` + the *image* token x (h w) +
  ``<|end_of_image|>`` + its time, then ``<|end_of_video|>``: the video markers tell its tokens from an image's.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .errors import AttributionError

__all__ = [
    "ArchitectureSpec",
    "ARCHITECTURES",
    "register_architecture",
    "architecture_spec",
    "UnsupportedModelError",
    "ImageTokens",
    "VisualLayout",
    "visual_layout",
    "LayoutError",
    "channels_first",
    "array_image_size",
    "check_image_size",
    "VideoInputError",
    "visual_token_masks",
    "video_frames",
    "as_video_list",
    "is_video",
    "input_device",
    "inputs_on_device",
]


class UnsupportedModelError(AttributionError, ValueError):
    """The model's architecture is not in the declarative table."""


class LayoutError(AttributionError, ValueError):
    """The inputs or images do not describe one prompt's visual tokens consistently."""


class ImageTypeError(AttributionError, TypeError):
    """An image is of a kind whose size cannot be read (not PIL, an array, a tensor or ``(h, w)``)."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Declarative facts about one VLM architecture family.

    Attribute paths are dotted paths relative to the top-level model
    (``XForConditionalGeneration``) or config.
    """

    image_token_id: str = "image_token_id"  # config attribute
    patch_size: str = "vision_config.patch_size"  # config attribute (pixels per ViT patch)
    merge_size: str = "vision_config.spatial_merge_size"  # config attribute (patches per LLM token side)
    decoder_layers: str = "model.language_model.layers"  # model attribute: the text decoder's layer list
    attention: str = "self_attn"  # attribute of each decoder layer holding its attention module
    output_projection: str = "o_proj"  # attribute of the attention module: heads -> hidden (for value-norm features)
    text_config: str = "text_config"  # config attribute holding num_hidden_layers / num_attention_heads
    family: str = ""  # human-readable family name for messages and docs
    # Videos (read only when a prompt has one): the token a video's frames are written with in input_ids, and,
    # where that is the image token, the config attributes of the markers that open and close a video.
    video_token_id: str = "video_token_id"  # config attribute
    video_start_token_id: str = ""  # config attribute; needed when videos are written with the image token
    video_end_token_id: str = ""  # config attribute; idem
    temporal_patch_size: str = "vision_config.temporal_patch_size"  # config attribute (frames per token group)


# GLM writes video frames with the image token, between <|begin_of_video|> and <|end_of_video|>.
_GLM_VIDEO = dict(video_token_id="image_token_id", video_start_token_id="video_start_token_id",
                  video_end_token_id="video_end_token_id")

#: ``config.model_type`` -> spec. Extend with :func:`register_architecture`.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "qwen2_5_vl": ArchitectureSpec(family="Qwen2.5-VL (MiMo-VL, Cosmos-Reason1)"),
    "qwen3_vl": ArchitectureSpec(family="Qwen3-VL"),
    "qwen3_vl_moe": ArchitectureSpec(family="Qwen3-VL-MoE"),
    "glm4v": ArchitectureSpec(family="GLM-4.1V", **_GLM_VIDEO),
    "glm4v_moe": ArchitectureSpec(family="GLM-4.5V (GLM-4.1V MoE)", **_GLM_VIDEO),
}


def register_architecture(model_type: str, spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Declare support for another ``config.model_type`` (explicit, never inferred)."""
    if model_type in ARCHITECTURES and not overwrite:
        raise LayoutError(f"{model_type!r} is already declared; pass overwrite=True to replace it.")
    ARCHITECTURES[model_type] = spec


def _get_path(obj: Any, path: str) -> Any:
    """The attribute at a dotted path of a config or model (``"vision_config.patch_size"``).

    The one lookup for every declared path; a missing part raises ``getattr``'s own AttributeError, which
    names the object and the attribute.
    """
    return operator.attrgetter(path)(obj)


def _config_of(model_or_config: Any):
    return getattr(model_or_config, "config", model_or_config)


def architecture_spec(model_or_config: Any) -> ArchitectureSpec:
    """The declared spec for a model or config; a clear error if there is none."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"hf_vattr has no layout declared for model_type={model_type!r}. Supported: "
            f"{sorted(ARCHITECTURES)}. To add one, declare where its facts live, e.g.\n"
            "    from hf_vattr.layouts import ArchitectureSpec, register_architecture\n"
            f"    register_architecture({model_type!r}, ArchitectureSpec(image_token_id='image_token_id', "
            "patch_size='vision_config.patch_size', merge_size='vision_config.spatial_merge_size', "
            "decoder_layers='model.language_model.layers', attention='self_attn'))"
        )
    spec = ARCHITECTURES[model_type]
    missing = []
    for name in ("image_token_id", "patch_size", "merge_size", "text_config"):
        try:
            _get_path(config, getattr(spec, name))
        except AttributeError:
            missing.append(f"{name} (config.{getattr(spec, name)})")
    if missing:
        raise UnsupportedModelError(
            f"The config of model_type={model_type!r} lacks what its declared layout needs: {', '.join(missing)}. "
            "Fix the ArchitectureSpec paths with register_architecture(..., overwrite=True)."
        )
    return spec


def output_projection(model: Any, attention_module: Any) -> Any:
    """The declared heads -> hidden projection of one decoder attention module (``W_O``): the module itself.

    Any module works, whatever holds its weights (a plain ``nn.Linear``, a bitsandbytes or other quantized
    layer, a layer accelerate offloads to CPU or disk): value-norm features call its forward where its weight
    is not a plain matrix (``hf_vattr.capture.value_norms.output_norms``).
    """
    spec = architecture_spec(model)
    proj = getattr(attention_module, spec.output_projection, None)
    if proj is None or not callable(proj):
        raise UnsupportedModelError(f"The attention module has no '{spec.output_projection}' projection; declare the "
                                    "right name in ArchitectureSpec(output_projection=...).")
    return proj


def text_dims(model_or_config: Any) -> tuple[int, int]:
    """(num_layers, num_heads) of the text decoder: the shape of the estimator's weights."""
    config = _config_of(model_or_config)
    text = _get_path(config, architecture_spec(config).text_config)
    return int(text.num_hidden_layers), int(text.num_attention_heads)


def attention_modules(model: Any) -> list[Any]:
    """The text decoder's attention modules, in layer order."""
    spec = architecture_spec(model)
    try:
        layers = _get_path(model, spec.decoder_layers)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"Could not find the decoder layers at model.{spec.decoder_layers} for "
            f"{type(model).__name__}: {err}. Pass the *ForConditionalGeneration model, or fix the "
            "declared path with register_architecture(..., overwrite=True)."
        ) from None
    return [getattr(layer, spec.attention) for layer in layers]


def input_device(model: Any) -> torch.device:
    """The device a model takes its inputs on: its input embedding's.

    For a model split with accelerate (``device_map``) that is the first stage, and accelerate's hooks move
    the activations on from there; for a model on one device it is that device.
    """
    return model.get_input_embeddings().weight.device


def inputs_on_device(model: Any, inputs: Any) -> dict:
    """A new dict of ``inputs`` (a mapping, e.g. a processor's ``BatchFeature``, left untouched) with its tensors
    on :func:`input_device`, moved by accelerate's ``send_to_device``."""
    from accelerate.utils import send_to_device

    return send_to_device(dict(inputs), input_device(model))


@dataclass
class ImageTokens:
    """One visual item's tokens in the sequence (an image, or a video of ``t`` frame groups), with their geometry.

    A video is an item like an image whose token grid has ``t > 1`` frame groups (or one, for a one-frame
    video): tokens are ordered group by group, row-major within a group, exactly as the vision tower emits
    them; every group has the same boxes, and :meth:`frame_group_span` gives its seconds.
    """

    image_index: int  # index of the item among the prompt's images and videos, in prompt order
    positions: torch.Tensor  # (N,) sequence positions of this item's visual tokens, in the tower's order
    grid_thw: tuple[int, int, int]  # token grid (t, h, w) after merging
    token_size: int  # pixels per token side in the resized image (patch * merge)
    original_size: tuple[int, int] | None = None  # (height, width) of the image (video frame) the user passed
    kind: str = "image"  # "image" or "video"
    kind_index: int | None = None  # index among the prompt's items of this kind (the processor's images= / videos=)
    frame_times: tuple[float, ...] | None = None  # videos: seconds of each frame the tower saw (padding repeats)
    frame_step: float | None = None  # videos: seconds one sampled frame stands for (1 / sampled fps)

    def __post_init__(self) -> None:
        if self.kind_index is None:
            self.kind_index = self.image_index

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def is_video(self) -> bool:
        return self.kind == "video"

    @property
    def num_frame_groups(self) -> int:
        """Frame groups of a video (``t``); 1 for an image."""
        return int(self.grid_thw[0])

    @property
    def tokens_per_group(self) -> int:
        return int(self.grid_thw[1] * self.grid_thw[2])

    @property
    def frames_per_group(self) -> int:
        """Frames the vision tower fused into one token group (the temporal patch size); 1 for an image."""
        return 1 if self.frame_times is None else len(self.frame_times) // self.num_frame_groups

    def token_frame_group(self, token: int) -> int:
        """The frame group a token belongs to (0 for images)."""
        return int(token) // self.tokens_per_group

    def frame_group_tokens(self, group: int) -> slice:
        """The tokens of one frame group, as a slice of this item's tokens."""
        if not 0 <= int(group) < self.num_frame_groups:
            raise LayoutError(f"Frame group {group} is outside 0..{self.num_frame_groups - 1}.")
        n = self.tokens_per_group
        return slice(int(group) * n, (int(group) + 1) * n)

    def frame_group_span(self, group: int) -> tuple[float, float] | None:
        """``(start, end)`` seconds a frame group covers (end-exclusive); ``None`` for an image.

        From the first frame of the group to one frame step past its last (a padded group's repeated frame
        adds nothing), so consecutive groups of an evenly sampled video tile the time line.
        """
        if self.frame_times is None:
            return None
        self.frame_group_tokens(group)  # range check
        p = self.frames_per_group
        frames = self.frame_times[int(group) * p:(int(group) + 1) * p]
        return float(frames[0]), float(max(frames) + (self.frame_step or 0.0))

    def token_time_span(self, token: int) -> tuple[float, float] | None:
        """``(start, end)`` seconds of the frame group holding ``token``; ``None`` for an image."""
        return self.frame_group_span(self.token_frame_group(token))

    @property
    def grid_hw(self) -> tuple[int, int]:
        return self.grid_thw[1], self.grid_thw[2]

    @property
    def resized_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the image as the vision tower saw it."""
        return self.grid_thw[1] * self.token_size, self.grid_thw[2] * self.token_size

    @property
    def scale_yx(self) -> tuple[float, float]:
        """Original pixels per resized pixel, separately for y and x."""
        if self.original_size is None:
            return 1.0, 1.0
        rh, rw = self.resized_size
        return self.original_size[0] / rh, self.original_size[1] / rw

    def token_rc(self, token: int) -> tuple[int, int]:
        """(row, col) of a token in the token grid of its frame group."""
        w = self.grid_thw[2]
        within = token % (self.grid_thw[1] * w)
        return within // w, within % w

    def token_box_resized(self, token: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) pixel box of a token in the resized image (end-exclusive)."""
        r, c = self.token_rc(token)
        u = self.token_size
        return r * u, c * u, (r + 1) * u, (c + 1) * u

    def token_box_original(self, token: int) -> tuple[float, float, float, float]:
        """(y0, x0, y1, x1) box of a token in original-image pixels (floats, end-exclusive)."""
        y0, x0, y1, x1 = self.token_box_resized(token)
        sy, sx = self.scale_yx
        return y0 * sy, x0 * sx, y1 * sy, x1 * sx

    def token_at_original(self, y: float, x: float, group: int = 0) -> int:
        """Index of the token covering original-image pixel (y, x) (in frame group ``group`` of a video)."""
        sy, sx = self.scale_yx
        u = self.token_size
        h, w = self.grid_hw
        r = min(max(int((y / sy) // u), 0), h - 1)
        c = min(max(int((x / sx) // u), 0), w - 1)
        return self.frame_group_tokens(group).start + r * w + c

    def grid_to_original_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per original-pixel row and column, the token row / col that covers it.

        Lets callers paint token-level maps onto the original image with two
        gathers (``grid[rows][:, cols]``) instead of a resize that could shift pixels.
        """
        if self.original_size is None:
            raise LayoutError("original_size is unknown; pass the images (or their sizes) when building the layout.")
        oh, ow = self.original_size
        sy, sx = self.scale_yx
        u = self.token_size
        h, w = self.grid_hw
        ys = ((torch.arange(oh, dtype=torch.float64) + 0.5) / sy // u).long().clamp_(0, h - 1)
        xs = ((torch.arange(ow, dtype=torch.float64) + 0.5) / sx // u).long().clamp_(0, w - 1)
        return ys, xs


@dataclass
class VisualLayout:
    """All visual items (images and videos) of one prompt (batch of one), in prompt order."""

    images: list[ImageTokens]  # every item, images and videos, in prompt order
    sequence_length: int
    model_type: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def positions(self) -> torch.Tensor:
        """Sequence positions of every visual token, item after item (the prompt's order)."""
        return torch.cat([im.positions for im in self.images])

    @property
    def videos(self) -> list[ImageTokens]:
        """The video items, in prompt order."""
        return [im for im in self.images if im.is_video]

    @property
    def num_visual_tokens(self) -> int:
        return sum(im.num_tokens for im in self.images)

    @property
    def first_visual_position(self) -> int:
        return int(self.images[0].positions[0])

    def image_slices(self) -> list[slice]:
        """Slices of each image's tokens in the concatenated visual-token order."""
        out, start = [], 0
        for im in self.images:
            out.append(slice(start, start + im.num_tokens))
            start += im.num_tokens
        return out


def channels_first(image: Any) -> bool:
    """Whether a 3-D image array or tensor is ``(C, H, W)`` (else ``(H, W, C)``): the one rule of the package.

    The channel axis is found the way transformers' image processors find it
    (:func:`transformers.image_utils.infer_channel_dimension_format` with 1, 3 or 4 channels): the first axis
    when it could be channels, else the last. So an ambiguous shape such as ``(1, 1, 3)`` is one channel of
    1 x 3 pixels, as the processor saw it, for the layout, the region features and every picture alike.
    A shape with no recognisable channel axis is refused.
    """
    from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

    shape = tuple(int(d) for d in image.shape)
    if len(shape) != 3:
        raise LayoutError(f"An image array must be (H, W), (H, W, C) or (C, H, W); got shape {shape}.")
    try:
        return infer_channel_dimension_format(image, num_channels=(1, 3, 4)) == ChannelDimension.FIRST
    except ValueError:
        raise LayoutError(f"Cannot tell the channel axis of an image array of shape {shape}: neither the first nor "
                          "the last axis has 1, 3 or 4 channels. Pass (H, W, C) or (C, H, W) arrays, or PIL images."
                          ) from None


def array_image_size(image: Any) -> tuple[int, int]:
    """``(height, width)`` of an image array or tensor, ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``.

    The channel axis is :func:`channels_first`'s (transformers' rule), so the boxes land where the processor
    put the pixels.
    """
    shape = tuple(int(d) for d in image.shape)
    if len(shape) == 2:
        return shape[0], shape[1]
    return (shape[1], shape[2]) if channels_first(image) else (shape[0], shape[1])


def _image_sizes(images: Sequence[Any] | None) -> list[tuple[int, int]] | None:
    if images is None:
        return None
    sizes = []
    for img in images:
        if isinstance(img, tuple) and len(img) == 2:
            sizes.append((int(img[0]), int(img[1])))
        elif hasattr(img, "size") and not hasattr(img, "shape"):  # PIL: (width, height)
            sizes.append((int(img.size[1]), int(img.size[0])))
        elif hasattr(img, "shape"):  # array or tensor, channels first or last: read as the processor reads it
            sizes.append(array_image_size(img))
        else:
            raise ImageTypeError(f"Cannot read the size of image {type(img).__name__}; pass PIL images, arrays or "
                                 "(h, w).")
    return sizes


def check_image_size(index: int, size: tuple[int, int], grid_hw: tuple[int, int], token_size: int, *,
                     what: str = "Image") -> None:
    """Refuse an image size ``(height, width)`` that the processor cannot have turned into this token grid.

    Processors resize both sides by one factor and round each to whole tokens (``smart_resize``: round,
    or floor / ceil when the pixel budget binds), so each side's token count is within one token of
    ``side * s / token_size`` for a common scale ``s``. No such ``s``: the size belongs to another image, or
    was given as ``(width, height)``, and every overlay would land on the wrong pixels.
    """
    oh, ow = (int(v) for v in size)
    gh, gw = (int(v) for v in grid_hw)
    u = int(token_size)
    if oh < 1 or ow < 1:
        raise LayoutError(f"{what} {index} has size {(oh, ow)} (height, width); both sides must be at least 1 pixel.")
    low = max((gh - 1) * u / oh, (gw - 1) * u / ow)
    high = min((gh + 1) * u / oh, (gw + 1) * u / ow)
    if low < high:
        return
    swapped = max((gh - 1) * u / ow, (gw - 1) * u / oh) < min((gh + 1) * u / ow, (gw + 1) * u / oh)
    hint = (f" It fits as ({ow}, {oh}): the size looks swapped. Give sizes as (height, width) (PIL's image.size is "
            "(width, height)) and a batch's images in row order." if swapped else
            " Pass the image the prompt was built from (if you resized or cropped it before the processor, that "
            "resized image), its size as (height, width), and a batch's images in row order.")
    raise LayoutError(f"{what} {index} is {oh}x{ow} pixels (height x width), but the processor made a {gh}x{gw} token "
                      f"grid ({gh * u}x{gw * u} pixels) from the {what.lower()} at that place in the prompt: the aspect "
                      f"ratios disagree, so regions would land on the wrong pixels.{hint}")


class VideoInputError(LayoutError):
    """A video (its frames, path or metadata) cannot be the one the processor turned into the prompt's video."""


def _is_frame(value: Any) -> bool:
    if hasattr(value, "convert") and hasattr(value, "size") and not hasattr(value, "shape"):  # PIL
        return True
    return hasattr(value, "shape") and len(value.shape) in (2, 3)


def _is_size(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value)


def is_video(value: Any) -> bool:
    """One video as processors take it: a path, a list of frames (PIL images or arrays) or a 4-D array."""
    if isinstance(value, (str, os.PathLike)):
        return True
    if hasattr(value, "shape"):
        return len(value.shape) == 4
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_frame(f) for f in value)


def as_video_list(videos: Any) -> list[Any] | None:
    """``videos=`` as one entry per video: one video alone (frames, a 4-D array, a path) is wrapped, as processors do."""
    if videos is None:
        return None
    if is_video(videos):
        return [videos]
    if not isinstance(videos, (list, tuple)):
        raise VideoInputError(f"Cannot read videos= of type {type(videos).__name__}: pass per video a list of frames "
                              "(PIL images or arrays), a (T, H, W, C) array, a path, or its (height, width).")
    return list(videos)


def _decode_video(path: Any, index: int, frames_indices: Sequence[int] | None) -> np.ndarray:
    """A video file's frames (those at ``frames_indices`` when given), read the way processors read videos."""
    from transformers.video_utils import load_video

    if not os.path.isfile(path):
        raise VideoInputError(f"Video {index}: {str(path)!r} is not a readable file.")
    try:
        from transformers.utils import is_torchcodec_usable

        backend = "torchcodec" if is_torchcodec_usable(decode="video") else None
    except ImportError:  # older transformers
        from transformers.utils import is_torchcodec_available

        backend = "torchcodec" if is_torchcodec_available() else None
    if backend is None:
        from transformers import video_utils

        decodes = getattr(video_utils, "is_torchvision_video_decoding_available", lambda: False)
        backend = "torchvision" if decodes() else None
    if backend is None:
        raise VideoInputError(f"Video {index}: cannot decode {str(path)!r}: no video decoder is installed (transformers "
                              "decodes videos with torchcodec: pip install torchcodec). Or pass the video's frames "
                              "(a list of images or a (T, H, W, C) array).")
    pick = None if frames_indices is None else (lambda metadata, **kwargs: np.asarray(frames_indices, dtype=int))
    try:
        frames, _ = load_video(str(path), backend=backend, sample_indices_fn=pick)
    except Exception as err:  # noqa: BLE001 - any decoder failure is the same mistake for the caller
        raise VideoInputError(f"Video {index}: {str(path)!r} could not be decoded ({type(err).__name__}: {err}). Is it "
                              "a video file? Or pass its frames (a list of images or a (T, H, W, C) array).") from err
    return video_frames(frames, index)


def video_frames(video: Any, index: int = 0, frames_indices: Sequence[int] | None = None) -> np.ndarray:
    """One video's frames as one ``(T, H, W, C)`` array (channels last), as the processor read them.

    Takes what processors take: a list of frames (PIL images, ``(H, W[, C])`` or ``(C, H, W)`` arrays or tensors,
    channels found by :func:`channels_first`), a 4-D array or tensor, or a path (decoded by transformers). Given
    the processor's ``frames_indices`` for a longer video, keeps those frames: the ones the tower saw.
    """
    if isinstance(video, (str, os.PathLike)):
        return _decode_video(video, index, frames_indices)
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray) and video.ndim == 4:
        frames = video if not channels_first(video[0]) else video.transpose(0, 2, 3, 1)
    elif isinstance(video, (list, tuple)) and video and all(_is_frame(f) for f in video):
        arrays = []
        for frame in video:
            a = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
            if a.ndim == 3 and channels_first(a):
                a = a.transpose(1, 2, 0)
            arrays.append(a if a.ndim == 3 else a[..., None])
        shapes = sorted({a.shape[:2] for a in arrays})
        if len(shapes) > 1:
            raise VideoInputError(f"Video {index} has frames of different sizes {shapes} (height, width): a video's "
                                  "frames share one size (processors stack them). Resize them to one size first.")
        if len({a.shape[2] for a in arrays}) > 1:
            raise VideoInputError(f"Video {index} mixes frames with different channel counts; convert them to one "
                                  "mode (e.g. RGB) first.")
        frames = np.stack(arrays)
    else:
        raise VideoInputError(f"Cannot read video {index} of type {type(video).__name__}: pass a list of frames (PIL "
                              "images or arrays), a (T, H, W, C) array, or a path.")
    if frames.shape[0] == 0:
        raise VideoInputError(f"Video {index} has no frames.")
    if frames_indices is not None and len(frames_indices) != frames.shape[0]:
        picked = np.asarray(frames_indices, dtype=int)
        if picked.size == 0 or picked.min() < 0 or picked.max() >= frames.shape[0]:
            raise VideoInputError(f"Video {index} has {frames.shape[0]} frames but its frames_indices reach "
                                  f"{int(picked.max()) if picked.size else None}: pass the video the metadata "
                                  "describes.")
        frames = frames[picked]
    return frames


def _video_size(video: Any, index: int) -> tuple[tuple[int, int], int | None]:
    """``((height, width), number of frames or None)`` of one video entry (frames, array, or a size tuple)."""
    if _is_size(video):
        return (int(video[0]), int(video[1])), None
    frames = video_frames(video, index)
    return (int(frames.shape[1]), int(frames.shape[2])), int(frames.shape[0])


def _metadata_list(video_metadata: Any, count: int) -> list[dict | None]:
    """``video_metadata`` as the processors take it (one dict or ``VideoMetadata``, or one per video) -> one per video."""
    if video_metadata is None:
        return [None] * count
    if isinstance(video_metadata, Mapping):
        video_metadata = [video_metadata]
    entries = [None if m is None else dict(m) for m in video_metadata]
    if len(entries) != count:
        raise VideoInputError(f"Got video_metadata for {len(entries)} videos but the prompt has {count}; pass one "
                              "entry per video, in prompt order (as to the processor).")
    return entries


def _frame_times(index: int, groups: int, per_group: int, frames: int | None, metadata: dict | None,
                 seconds_per_group: float | None) -> tuple[tuple[float, ...], float, str]:
    """``(time of each frame the tower saw, seconds per frame, where the times came from)`` for one video.

    The processors' own rules: a frame's time is ``frames_indices[i] / fps``; a frame stands for
    ``1 / sampled_fps`` seconds (``VideoMetadata.sampled_fps``); without fps every processor assumes 24.
    Qwen2.5-VL hands the model ``second_per_grid_ts`` (``temporal_patch_size / sampled_fps``) instead.
    """
    fps = None if metadata is None else metadata.get("fps")
    if fps is None and seconds_per_group is not None:
        step = float(seconds_per_group) / per_group
        count = frames or groups * per_group  # known frames: the padded ones repeat the last
        return tuple(min(k, count - 1) * step for k in range(groups * per_group)), step, "second_per_grid_ts"
    source = "video_metadata" if fps is not None else "24 fps: the processors' default when no fps is given"
    fps = 24.0 if fps is None else float(fps)
    if fps <= 0:
        raise VideoInputError(f"Video {index}: fps={fps} in video_metadata; it must be positive.")
    given = None if metadata is None else metadata.get("frames_indices")
    indices = [int(i) for i in (given if given is not None else range(frames or groups * per_group))]
    if not (groups - 1) * per_group < len(indices) <= groups * per_group:
        raise VideoInputError(
            f"Video {index}: video_metadata lists {len(indices)} frames, but the prompt's video has {groups} frame "
            f"group(s) of {per_group} frames ({(groups - 1) * per_group + 1} to {groups * per_group} frames). Pass the "
            "metadata the processor used (processor(..., return_metadata=True) returns it as video_metadata).")
    total = None if metadata is None else metadata.get("total_num_frames")
    sampled_fps = len(given) / total * fps if (given is not None and total) else fps  # VideoMetadata.sampled_fps
    step = 1.0 / sampled_fps
    if seconds_per_group is not None and abs(per_group * step - float(seconds_per_group)) > 1e-4 * per_group * step:
        raise VideoInputError(
            f"Video {index}: video_metadata makes a frame group {per_group * step:.4g} s long, but the processor gave "
            f"the model second_per_grid_ts={float(seconds_per_group):.4g}: pass the metadata (fps) the processor used.")
    padded = indices + [indices[-1]] * (groups * per_group - len(indices))
    return tuple(i / fps for i in padded), step, source


def _optional_path(config: Any, path: str) -> Any:
    if not path:
        return None
    try:
        return _get_path(config, path)
    except AttributeError:
        return None


def visual_token_masks(model_or_config: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image token mask, video token mask)`` over one row of ``input_ids``.

    A family that writes video frames with the image token (GLM) declares the markers around a video; a token
    between them is a video's, as in the processor's own ``mm_token_type_ids``.
    """
    config = _config_of(model_or_config)
    spec = architecture_spec(config)
    image = input_ids == int(_get_path(config, spec.image_token_id))
    video_id = _optional_path(config, spec.video_token_id)
    if video_id is None:
        return image, torch.zeros_like(image)
    if int(video_id) != int(_get_path(config, spec.image_token_id)):
        return image, input_ids == int(video_id)
    start = _optional_path(config, spec.video_start_token_id)
    end = _optional_path(config, spec.video_end_token_id)
    if start is None or end is None:
        raise UnsupportedModelError(
            f"model_type={config.model_type!r} writes videos with the image token but declares no video markers: set "
            "ArchitectureSpec(video_start_token_id=..., video_end_token_id=...) with register_architecture(..., "
            "overwrite=True).")
    inside = torch.cumsum(input_ids == int(start), -1) > torch.cumsum(input_ids == int(end), -1)
    return image & ~inside, image & inside


def _grid_rows(grid_thw: Any) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [tuple(int(v) for v in row) for row in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]


def _one_sequence(input_ids: torch.Tensor) -> torch.Tensor:
    """The one row of ``input_ids`` (1-D), or a LayoutError for a batch."""
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise LayoutError(
                f"hf_vattr attributes one sequence at a time, got a batch of {input_ids.shape[0]}. "
                "Call it once per example (batching is not supported yet)."
            )
        input_ids = input_ids[0]
    return input_ids


def _visual_items(config: Any, spec: ArchitectureSpec, input_ids: torch.Tensor, image_grid_thw: Any,
                  video_grid_thw: Any, merge: int) -> list[tuple[str, int, torch.Tensor, tuple[int, int, int]]]:
    """``(kind, index within the kind, positions, token grid)`` of every image and video, in prompt order;
    the token counts checked against the grids."""
    image_mask, video_mask = visual_token_masks(config, input_ids)
    kinds = {"image": (image_mask.nonzero().flatten().cpu(), _grid_rows(image_grid_thw)),
             "video": (video_mask.nonzero().flatten().cpu(), _grid_rows(video_grid_thw))}
    if all(len(grids) == 0 or positions.numel() == 0 for positions, grids in kinds.values()):
        raise LayoutError(
            "The prompt has no image or video: no token equals the image token id "
            f"{int(_get_path(config, spec.image_token_id))} (config.{spec.image_token_id}) or a video token, or "
            "image_grid_thw / video_grid_thw is missing. Build the inputs with the model's processor from a chat "
            "message that contains an image or a video."
        )
    items = []  # (kind, index within the kind, positions, token grid)
    for kind, (positions, grids) in kinds.items():
        counts = [t * (h // merge) * (w // merge) for t, h, w in grids]
        if sum(counts) != positions.numel():
            raise LayoutError(
                f"{kind}_grid_thw {grids} implies {sum(counts)} visual tokens (merge size {merge}) but input_ids holds "
                f"{positions.numel()} {kind} tokens. Were input_ids and {kind}_grid_thw produced by the same processor "
                "call?"
            )
        for j, ((t, h, w), start) in enumerate(zip(grids, np.cumsum([0, *counts[:-1]]).tolist())):
            items.append((kind, j, positions[start:start + counts[j]], (t, h // merge, w // merge)))
    items.sort(key=lambda item: int(item[2][0]))
    for a, b in zip(items, items[1:]):
        if int(a[2][-1]) > int(b[2][0]):
            raise LayoutError(f"The tokens of {a[0]} {a[1]} and {b[0]} {b[1]} interleave in input_ids. Were input_ids "
                              "and the grids produced by the same processor call?")
    return items


def _video_timing(index: int, grid: tuple[int, int, int], token_size: int, video: Any, per_group: int,
                  metadata: dict | None, seconds_per_group: float | None
                  ) -> tuple[tuple[int, int] | None, tuple[float, ...], float, str]:
    """``(frame size or None, frame times, seconds per frame, where the times came from)`` of one video, its
    frames (when given) checked against its token grid."""
    t, h, w = grid
    size, frames = None, None
    if video is not None:
        size, frames = _video_size(video, index)
        check_image_size(index, size, (h, w), token_size, what="Video")
        if frames is not None and not (t - 1) * per_group < frames <= t * per_group:
            raise VideoInputError(
                f"Video {index} has {frames} frames, but the prompt's video {index} has {t} frame group(s) of "
                f"{per_group} frames ({(t - 1) * per_group + 1} to {t * per_group} frames; the processor "
                "pads an odd count with the last frame). Pass the frames the processor used: after its own "
                "sampling, processor(..., return_metadata=True) returns them as video_metadata frames_indices.")
    times, step, source = _frame_times(index, t, per_group, frames, metadata, seconds_per_group)
    return size, times, step, source


def visual_layout(
    model_or_config: Any,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    images: Sequence[Any] | None = None,
    *,
    video_grid_thw: torch.Tensor | None = None,
    videos: Sequence[Any] | None = None,
    video_metadata: Any = None,
    second_per_grid_ts: Any = None,
) -> VisualLayout:
    """Locate every image's and video's visual tokens in ``input_ids`` (batch of one), in prompt order.

    ``images`` (PIL images, arrays or ``(height, width)`` tuples, in prompt order) and ``videos`` (per video a
    list of frames, a 4-D array, a path, or its frames' ``(height, width)``) are optional; without them boxes are
    given in resized-image pixels only, and nothing checks the sizes. ``video_metadata`` (as given to the
    processor: fps and, when the processor sampled frames, ``frames_indices``) and ``second_per_grid_ts`` (a
    Qwen2.5-VL processor output) time the frame groups.
    """
    config = _config_of(model_or_config)
    spec = architecture_spec(config)
    input_ids = _one_sequence(input_ids)
    patch = int(_get_path(config, spec.patch_size))
    merge = int(_get_path(config, spec.merge_size))
    items = _visual_items(config, spec, input_ids, image_grid_thw, video_grid_thw, merge)
    image_items = [item for item in items if item[0] == "image"]
    video_items = [item for item in items if item[0] == "video"]
    sizes = _image_sizes(images)
    if sizes is not None and len(sizes) != len(image_items):
        raise LayoutError(f"Got {len(sizes)} images but the prompt has {len(image_items)}; pass them all, in prompt "
                          "order.")
    video_list = as_video_list(videos)
    if video_list is not None and len(video_list) != len(video_items):
        raise VideoInputError(f"Got {len(video_list)} videos but the prompt has {len(video_items)}; pass them all, in "
                              "prompt order.")
    metadata = _metadata_list(video_metadata, len(video_items))
    per_group = int(_optional_path(config, spec.temporal_patch_size) or 1) if video_items else 1
    spg = [None] * len(video_items) if second_per_grid_ts is None else \
        [float(v) for v in torch.as_tensor(second_per_grid_ts).reshape(-1).tolist()]
    if len(spg) != len(video_items):
        raise VideoInputError(f"second_per_grid_ts has {len(spg)} entries for {len(video_items)} videos; pass the "
                              "processor's outputs of this prompt.")
    out, sources = [], []
    for order, (kind, j, positions, (t, h, w)) in enumerate(items):
        size, times, step = None, None, None
        if kind == "image" and sizes is not None:
            size = sizes[j]
            check_image_size(j, size, (h, w), patch * merge)
        elif kind == "video":
            size, times, step, source = _video_timing(j, (t, h, w), patch * merge,
                                                      None if video_list is None else video_list[j], per_group,
                                                      metadata[j], spg[j])
            sources.append(source)
        out.append(ImageTokens(image_index=order, positions=positions, grid_thw=(t, h, w), token_size=patch * merge,
                               original_size=size, kind=kind, kind_index=j, frame_times=times, frame_step=step))
    extras = {"video_times": sources} if sources else {}
    return VisualLayout(images=out, sequence_length=int(input_ids.numel()), model_type=config.model_type,
                        extras=extras)


def extend_inputs(inputs: Any, sequence: torch.Tensor) -> dict:
    """Model inputs for a teacher-forced forward over ``sequence`` (prompt + generated tokens).

    Copies the image tensors and extends every per-token input (attention mask,
    ``mm_token_type_ids``, ...) with values for text tokens, so the processor's
    multimodal bookkeeping still lines up with the longer sequence.
    """
    if sequence.dim() == 1:
        sequence = sequence[None]
    prompt_len = inputs["input_ids"].shape[-1]
    extra = sequence.shape[-1] - prompt_len
    if extra < 0 or not torch.equal(sequence[:, :prompt_len].cpu(), inputs["input_ids"].cpu()):
        raise LayoutError("sequence must start with the prompt's input_ids (pass the output of generate).")
    out = {}
    for name, value in inputs.items():
        if name == "input_ids":
            out[name] = sequence
        elif isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[-1] == prompt_len:
            fill = 1 if name == "attention_mask" else 0
            pad = torch.full((value.shape[0], extra), fill, dtype=value.dtype, device=value.device)
            out[name] = torch.cat([value, pad], dim=-1)
        else:
            out[name] = value
    return out
