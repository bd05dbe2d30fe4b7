"""Where each image's visual tokens sit, and what pixels each one covers.

Model support is *declared*, never guessed from a model name: every supported
``config.model_type`` has one :class:`ArchitectureSpec` row saying which config
fields hold the image token id, the ViT patch size and the spatial merge size,
and where the text decoder's attention modules live. Everything else comes
from the processor outputs: ``input_ids`` (token positions) and
``image_grid_thw`` (patch grid per image, *in patches*; the LLM token grid is
``h / merge x w / merge``).

Geometry: a visual token (row r, col c) of an image covers, in the resized
image the processor fed the vision tower, the box
``[r*u, (r+1)*u) x [c*u, (c+1)*u)`` with ``u = patch * merge`` pixels; in the
original image the same box scaled by separate y and x factors
(``orig_h / resized_h`` and ``orig_w / resized_w``), because processors round
each side to a multiple of ``u`` independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

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


#: ``config.model_type`` -> spec. Extend with :func:`register_architecture`.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "qwen2_5_vl": ArchitectureSpec(family="Qwen2.5-VL (MiMo-VL, Cosmos-Reason1)"),
    "qwen3_vl": ArchitectureSpec(family="Qwen3-VL"),
    "qwen3_vl_moe": ArchitectureSpec(family="Qwen3-VL-MoE"),
    "glm4v": ArchitectureSpec(family="GLM-4.1V"),
    "glm4v_moe": ArchitectureSpec(family="GLM-4.5V (GLM-4.1V MoE)"),
}


def register_architecture(model_type: str, spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Declare support for another ``config.model_type`` (explicit, never inferred)."""
    if model_type in ARCHITECTURES and not overwrite:
        raise LayoutError(f"{model_type!r} is already declared; pass overwrite=True to replace it.")
    ARCHITECTURES[model_type] = spec


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


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
    is not a plain matrix (``hf_vattr.capture.attention.output_norms``).
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


@dataclass
class ImageTokens:
    """One image's visual tokens in the sequence, with their pixel geometry."""

    image_index: int
    positions: torch.Tensor  # (N,) sequence positions of this image's visual tokens, row-major
    grid_thw: tuple[int, int, int]  # token grid (t, h, w) after merging
    token_size: int  # pixels per token side in the resized image (patch * merge)
    original_size: tuple[int, int] | None = None  # (height, width) of the image the user passed

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

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
        """(row, col) of a token in the token grid (frame 0 for images)."""
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

    def token_at_original(self, y: float, x: float) -> int:
        """Index of the token covering original-image pixel (y, x)."""
        sy, sx = self.scale_yx
        u = self.token_size
        h, w = self.grid_hw
        r = min(max(int((y / sy) // u), 0), h - 1)
        c = min(max(int((x / sx) // u), 0), w - 1)
        return r * w + c

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
    """All images of one prompt (batch of one)."""

    images: list[ImageTokens]
    sequence_length: int
    model_type: str = ""
    extras: dict = field(default_factory=dict)

    @property
    def positions(self) -> torch.Tensor:
        """Sequence positions of every visual token, image after image."""
        return torch.cat([im.positions for im in self.images])

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


def check_image_size(index: int, size: tuple[int, int], grid_hw: tuple[int, int], token_size: int) -> None:
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
        raise LayoutError(f"Image {index} has size {(oh, ow)} (height, width); both sides must be at least 1 pixel.")
    low = max((gh - 1) * u / oh, (gw - 1) * u / ow)
    high = min((gh + 1) * u / oh, (gw + 1) * u / ow)
    if low < high:
        return
    swapped = max((gh - 1) * u / ow, (gw - 1) * u / oh) < min((gh + 1) * u / ow, (gw + 1) * u / oh)
    hint = (f" It fits as ({ow}, {oh}): the size looks swapped. Give sizes as (height, width) (PIL's image.size is "
            "(width, height)) and a batch's images in row order." if swapped else
            " Pass the image the prompt was built from (if you resized or cropped it before the processor, that "
            "resized image), its size as (height, width), and a batch's images in row order.")
    raise LayoutError(f"Image {index} is {oh}x{ow} pixels (height x width), but the processor made a {gh}x{gw} token "
                      f"grid ({gh * u}x{gw * u} pixels) from the image at that place in the prompt: the aspect ratios "
                      f"disagree, so regions would land on the wrong pixels.{hint}")


def visual_layout(
    model_or_config: Any,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    images: Sequence[Any] | None = None,
) -> VisualLayout:
    """Locate every image's visual tokens in ``input_ids`` (batch of one).

    ``images`` (PIL images, arrays or ``(height, width)`` tuples, in prompt order)
    is optional; without it boxes are given in resized-image pixels only.
    """
    config = _config_of(model_or_config)
    spec = architecture_spec(config)
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise LayoutError(
                f"hf_vattr attributes one sequence at a time, got a batch of {input_ids.shape[0]}. "
                "Call it once per example (batching is not supported yet)."
            )
        input_ids = input_ids[0]
    image_token_id = int(_get_path(config, spec.image_token_id))
    patch = int(_get_path(config, spec.patch_size))
    merge = int(_get_path(config, spec.merge_size))
    positions = (input_ids == image_token_id).nonzero().flatten().cpu()
    if positions.numel() == 0 or image_grid_thw is None or len(image_grid_thw) == 0:
        raise LayoutError(
            "The prompt has no image: no token equals the image token id "
            f"{image_token_id} (config.{spec.image_token_id}) or image_grid_thw is missing. Build the inputs with the "
            "model's processor from a chat message that contains an image."
        )
    grids = [tuple(int(v) for v in row) for row in torch.as_tensor(image_grid_thw).tolist()]
    counts = [t * (h // merge) * (w // merge) for t, h, w in grids]
    if sum(counts) != positions.numel():
        raise LayoutError(
            f"image_grid_thw {grids} implies {sum(counts)} visual tokens (merge size {merge}) but input_ids holds "
            f"{positions.numel()} image tokens. Were input_ids and image_grid_thw produced by the same processor call?"
        )
    sizes = _image_sizes(images)
    if sizes is not None and len(sizes) != len(grids):
        raise LayoutError(f"Got {len(sizes)} images but the prompt has {len(grids)}; pass them all, in prompt order.")
    if sizes is not None:
        for i, (size, (_, h, w)) in enumerate(zip(sizes, grids)):
            check_image_size(i, size, (h // merge, w // merge), patch * merge)
    out, start = [], 0
    for i, ((t, h, w), n) in enumerate(zip(grids, counts)):
        out.append(
            ImageTokens(
                image_index=i,
                positions=positions[start:start + n],
                grid_thw=(t, h // merge, w // merge),
                token_size=patch * merge,
                original_size=None if sizes is None else sizes[i],
            )
        )
        start += n
    return VisualLayout(images=out, sequence_length=int(input_ids.numel()), model_type=config.model_type)


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
