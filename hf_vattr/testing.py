"""Tiny, download-free models of every supported VLM family.

Why: tests (ours and downstream users') must exercise the real transformers
modeling code of each architecture without fetching weights or tokenizers.
Everything here is built from configs: a byte-level BPE tokenizer trained on a
few sentences, the family's own image processor class with small pixel
limits, and a randomly initialised model at toy size.

    from hf_vattr.testing import tiny_vlm
    model, processor = tiny_vlm("qwen3_vl")
    inputs = processor.apply_chat_template(messages_with_image, ...)

The fixtures are deterministic (seeded) so tests can compare runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "FAMILIES",
    "FamilyRecipe",
    "build_tokenizer",
    "build_processor",
    "build_model",
    "tiny_vlm",
    "example_inputs",
    "example_image",
    "example_video",
    "video_metadata",
    "example_video_inputs",
    "THINKING_FAMILIES",
    "ThinkingFamily",
    "tiny_thinking_vlm",
    "thinking_inputs",
    "ForcedTokens",
    "forced_ids",
]

# Shared text decoder size: small enough for CPU tests, big enough to have
# grouped-query attention (4 query heads over 2 key/value heads).
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)

CORPUS = [
    "The red circle is left of the blue square.",
    "Look at the image. There is a green triangle near the top.",
    "Step 1: find the shape. Step 2: read its colour. The answer is red.",
    "How many objects are yellow? Two objects are yellow.",
    "The cat sits on the mat; the dog looks at the ball.",
    "0 1 2 3 4 5 6 7 8 9 yes no left right above below answer",
]


@dataclass(frozen=True)
class FamilyRecipe:
    """How to build a tiny model + processor for one architecture family."""

    model_type: str
    config_class: str
    model_class: str
    processor_class: str
    image_processor_class: str
    video_processor_class: str | None
    special_tokens: dict[str, str]
    chat_template: str
    vision_config: dict[str, Any]
    text_extra: dict[str, Any] = field(default_factory=dict)
    top_extra: dict[str, Any] = field(default_factory=dict)
    # Patch size (px) of the vision tower; the LLM token covers patch * merge px.
    patch_size: int = 14


_QWEN_TOKENS = {
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image": "<|image_pad|>",
    "video": "<|video_pad|>",
    "think": "<think>",
    "end_think": "</think>",
    "eos": "<|endoftext|>",
}
_GLM_TOKENS = {
    "gmask": "[gMASK]",
    "sop": "<sop>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "begin_image": "<|begin_of_image|>",
    "end_image": "<|end_of_image|>",
    "image": "<|image|>",
    "video": "<|video|>",
    "begin_video": "<|begin_of_video|>",
    "end_video": "<|end_of_video|>",
    "think": "<think>",
    "end_think": "</think>",
    "eos": "<|endoftext|>",
}

# Chat templates in the families' own style, reduced to what the tiny models need:
# user turn with images, videos and text, then an assistant turn that opens the thinking block.
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
_GLM_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}"
)

_QWEN25_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
    fullatt_block_indexes=[1],
)
_QWEN3_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
    deepstack_visual_indexes=[0],
)
_GLM_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=112,
)
_MOE_TEXT = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)

FAMILIES: dict[str, FamilyRecipe] = {
    "qwen2_5_vl": FamilyRecipe(
        "qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
        "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor", _QWEN_TOKENS, _QWEN_TEMPLATE, _QWEN25_VISION,
        text_extra=dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        patch_size=14,
    ),
    "qwen3_vl": FamilyRecipe(
        "qwen3_vl", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor",
        "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor", _QWEN_TOKENS, _QWEN_TEMPLATE, _QWEN3_VISION,
        text_extra=dict(rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                         "mrope_interleaved": True, "rope_theta": 10000.0}),
        patch_size=16,
    ),
    "qwen3_vl_moe": FamilyRecipe(
        "qwen3_vl_moe", "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor",
        "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor", _QWEN_TOKENS, _QWEN_TEMPLATE, _QWEN3_VISION,
        text_extra=dict(_MOE_TEXT, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                    "mrope_interleaved": True, "rope_theta": 10000.0}),
        patch_size=16,
    ),
    "glm4v": FamilyRecipe(
        "glm4v", "Glm4vConfig", "Glm4vForConditionalGeneration", "Glm4vProcessor",
        "Glm4vImageProcessor", "Glm4vVideoProcessor", _GLM_TOKENS, _GLM_TEMPLATE, _GLM_VISION,
        text_extra=dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.5}),
        patch_size=14,
    ),
    "glm4v_moe": FamilyRecipe(
        "glm4v_moe", "Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", "Glm4vProcessor",
        "Glm4vImageProcessor", "Glm4vVideoProcessor", _GLM_TOKENS, _GLM_TEMPLATE, _GLM_VISION,
        text_extra=dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1,
                        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.5}),
        patch_size=14,
    ),
}


def _recipe(family: str) -> FamilyRecipe:
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; choose one of {sorted(FAMILIES)}.")
    return FAMILIES[family]


def build_tokenizer(special_tokens: dict[str, str], corpus: list[str] | None = None, vocab_size: int = 400,
                    added_tokens: tuple[str, ...] = (), split_regex: str | None = None):
    """A byte-level BPE tokenizer trained in milliseconds on `corpus`.

    Byte-level so that any text round-trips through encode/decode (streamers
    decode incrementally and must never lose characters). ``added_tokens`` are single,
    non-special tokens (like Qwen3's ``<think>``: they survive ``skip_special_tokens``);
    ``split_regex`` replaces GPT-2's pre-tokenizer split (e.g. Qwen2's, as real Qwen2.5 tokenizers).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split_regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(special_tokens.values()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=special_tokens["eos"],
        pad_token=special_tokens["eos"],
        additional_special_tokens=[t for t in specials if t != special_tokens["eos"]],
    )
    if added_tokens:
        fast.add_tokens(list(added_tokens))  # special=False: decoded with skip_special_tokens too
    return fast


def build_processor(family: str, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    corpus: list[str] | None = None, tokenizer: Any = None, chat_template: str | None = None):
    """The family's real processor class around a tiny tokenizer.

    Pixel limits default to a few dozen visual tokens per image (and per video) so tests stay fast.
    """
    import transformers

    recipe = _recipe(family)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(recipe.special_tokens, corpus)
    unit = recipe.patch_size * 2  # pixels per LLM token side (patch * merge)
    size = {
        "shortest_edge": min_pixels if min_pixels is not None else 4 * unit * unit,
        "longest_edge": max_pixels if max_pixels is not None else 64 * unit * unit,
    }
    image_processor = getattr(transformers, recipe.image_processor_class)(
        size=size, patch_size=recipe.patch_size, merge_size=2, temporal_patch_size=2
    )
    video_processor = None
    if recipe.video_processor_class is not None:
        video_cls = getattr(transformers, recipe.video_processor_class)
        # the reference per-frame pixel cap, where the processor has the option (silences its warning)
        capped = {"cap_pixels_per_frame": True} if "cap_pixels_per_frame" in getattr(
            video_cls.valid_kwargs, "__annotations__", {}) else {}
        video_processor = video_cls(size=dict(size), patch_size=recipe.patch_size, merge_size=2,
                                    temporal_patch_size=2, **capped)
    processor_cls = getattr(transformers, recipe.processor_class)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template or recipe.chat_template,
    )


def build_model(family: str, tokenizer, *, attn_implementation: str = "sdpa", seed: int = 0,
                text_overrides: dict[str, Any] | None = None, vision_overrides: dict[str, Any] | None = None):
    """A randomly initialised tiny model whose special-token ids match `tokenizer`."""
    import transformers

    recipe = _recipe(family)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in recipe.special_tokens.items()}
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), **recipe.text_extra)
    text.update(text_overrides or {})
    text.setdefault("eos_token_id", ids["eos"])
    text.setdefault("pad_token_id", ids["eos"])
    text.setdefault("bos_token_id", None)
    top: dict[str, Any] = dict(
        text_config=text,
        vision_config=dict(recipe.vision_config, out_hidden_size=text["hidden_size"], **(vision_overrides or {})),
        image_token_id=ids["image"],
        video_token_id=ids["video"],
    )
    if "vision_start" in ids:
        top.update(vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    else:
        top.update(image_start_token_id=ids["begin_image"], image_end_token_id=ids["end_image"],
                   video_start_token_id=ids["begin_video"], video_end_token_id=ids["end_video"])
    top.update(recipe.top_extra)
    config = getattr(transformers, recipe.config_class)(**top)
    config.eos_token_id = ids["eos"]
    config.pad_token_id = ids["eos"]
    torch.manual_seed(seed)
    model = getattr(transformers, recipe.model_class)._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    model.eval()
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["eos"]
    model.generation_config.do_sample = False
    return model


def tiny_vlm(family: str, *, attn_implementation: str = "sdpa", seed: int = 0):
    """(model, processor) for `family`, built offline in well under a second."""
    processor = build_processor(family)
    model = build_model(family, processor.tokenizer, attn_implementation=attn_implementation, seed=seed)
    return model, processor


def example_image(height: int = 150, width: int = 210, seed: int = 0):
    """A PIL image with a few coloured rectangles on a grey background."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 128, dtype=np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, height - 20), rng.integers(0, width - 20)
        h, w = rng.integers(10, 40), rng.integers(10, 40)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 255, size=3)
    return Image.fromarray(img)


def example_inputs(processor, images=None, text: str = "What colour is the circle?"):
    """Chat-formatted model inputs (batch of 1) with `images` (default: one example image)."""
    images = [example_image()] if images is None else list(images)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    return processor(text=[prompt], images=images or None, return_tensors="pt")


def example_video(frames: int = 4, height: int = 120, width: int = 160, seed: int = 0) -> list:
    """A short video as a list of PIL frames: a coloured square crossing a grey background, left to right."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 255, size=3)
    side = max(4, min(height, width) // 3)
    y0 = int(rng.integers(0, height - side + 1))
    out = []
    for f in range(frames):
        img = np.full((height, width, 3), 128, dtype=np.uint8)
        x0 = round(f * (width - side) / max(frames - 1, 1))
        img[y0:y0 + side, x0:x0 + side] = colour
        out.append(Image.fromarray(img))
    return out


def video_metadata(video: Any, fps: float = 2.0) -> dict:
    """What a processor needs to time pre-decoded frames: their fps, count and indices (no sampling)."""
    n = len(video)
    return {"fps": float(fps), "total_num_frames": n, "frames_indices": list(range(n))}


def example_video_inputs(processor, videos=None, images=(), *, fps: float = 2.0, video_first: bool = True,
                         text: str = "What moves in the video?"):
    """Chat-formatted model inputs (batch of 1) with ``videos`` (default: one example video) and ``images``.

    The frames go in as decoded, with their fps (``video_metadata``, ``do_sample_frames=False``), as a user
    with pre-decoded frames calls the processor; ``video_first`` puts the videos before the images.
    """
    videos = [example_video()] if videos is None else list(videos)
    images = list(images)
    clips, pictures = [{"type": "video"} for _ in videos], [{"type": "image"} for _ in images]
    content = (clips + pictures if video_first else pictures + clips) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    return processor(text=[prompt], images=images or None, videos=videos or None,
                     video_metadata=[video_metadata(v, fps) for v in videos] or None, do_sample_frames=False,
                     return_tensors="pt")


# ----------------------------------------------------------------------------- thinking families, real formats

#: Qwen2's pre-tokenizer split (Qwen2.5-VL's tokenizer): ``<think>`` in plain text becomes ``<think`` + ``>``
#: before BPE, ``.</think>`` starts with the punctuation run ``.</``.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_THINK_CORPUS = [
    "<think>\nThe red circle is left of the blue square.\n</think>\n\n<answer>\nred\n</answer>",
    "<think>\nLook at the image. The answer is red.</think>\n\n<answer>\nyes\n</answer>",
    "Answer the question in the following format: <think>\nyour reasoning\n</think>\n\n<answer>\nyour answer"
    "\n</answer>.",
]


@dataclass(frozen=True)
class ThinkingFamily:
    """A thinking VLM family as it really writes: its tags (single tokens or plain text) and generation prompt."""

    name: str
    arch: str  # a key of FAMILIES
    special_tokens: dict[str, str]
    added_tokens: tuple[str, ...]  # single non-special tokens
    chat_template: str
    split_regex: str | None = None
    system_prompt: str | None = None


_QWEN_NO_THINK = {k: v for k, v in _QWEN_TOKENS.items() if k not in ("think", "end_think")}
_GLM_REAL = dict({k: v for k, v in _GLM_TOKENS.items() if k not in ("think", "end_think")},
                 begin_box="<|begin_of_box|>", end_box="<|end_of_box|>")
_QWEN_CHAT = _QWEN_TEMPLATE.replace("<|im_start|>assistant\n<think>\n{% endif %}", "<|im_start|>assistant\n{% endif %}")
_GLM_CHAT = _GLM_TEMPLATE.replace("<|assistant|>\n<think>{% endif %}", "<|assistant|>{% endif %}")

#: Qwen3-VL-Thinking: ``<think>`` tokens, the template opens the block. GLM-4.1V-Thinking: the prompt ends
#: ``<|assistant|>``, the model writes ``<think>``; think and answer tags are non-special tokens, box markers
#: special. MiMo-VL (Qwen2.5-VL arch): ``<think>`` tokens, the model opens the block. Cosmos-Reason1
#: (Qwen2.5-VL arch and tokenizer): no think token; the format is asked for in the system prompt.
THINKING_FAMILIES: dict[str, ThinkingFamily] = {
    "qwen3_vl_thinking": ThinkingFamily("qwen3_vl_thinking", "qwen3_vl", _QWEN_NO_THINK, ("<think>", "</think>"),
                                        _QWEN_TEMPLATE),
    "glm4v_thinking": ThinkingFamily("glm4v_thinking", "glm4v", _GLM_REAL,
                                     ("<think>", "</think>", "<answer>", "</answer>"), _GLM_CHAT),
    "mimo_vl": ThinkingFamily("mimo_vl", "qwen2_5_vl", _QWEN_NO_THINK, ("<think>", "</think>"), _QWEN_CHAT),
    "cosmos_reason1": ThinkingFamily(
        "cosmos_reason1", "qwen2_5_vl", _QWEN_NO_THINK, (), _QWEN_CHAT, split_regex=QWEN2_SPLIT,
        system_prompt=("You are a helpful assistant. Answer the question in the following format: "
                       "<think>\nyour reasoning\n</think>\n\n<answer>\nyour answer\n</answer>.")),
}


def tiny_thinking_vlm(name: str, *, seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, processor) of a thinking family of :data:`THINKING_FAMILIES`, with its real tags and template."""
    if name not in THINKING_FAMILIES:
        raise ValueError(f"Unknown thinking family {name!r}; choose one of {sorted(THINKING_FAMILIES)}.")
    fam = THINKING_FAMILIES[name]
    tokenizer = build_tokenizer(fam.special_tokens, CORPUS + _THINK_CORPUS, added_tokens=fam.added_tokens,
                                split_regex=fam.split_regex)
    processor = build_processor(fam.arch, tokenizer=tokenizer, chat_template=fam.chat_template)
    model = build_model(fam.arch, tokenizer, attn_implementation=attn_implementation, seed=seed)
    return model, processor


def thinking_inputs(name: str, processor, images=None, text: str = "What colour is the circle?"):
    """Chat-formatted inputs for a thinking family (with its system prompt where it needs one) and the prompt."""
    images = [example_image()] if images is None else list(images)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    system = THINKING_FAMILIES[name].system_prompt
    if system:
        messages.insert(0, {"role": "system", "content": system})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=images or None, return_tensors="pt"), prompt


def forced_ids(tokenizer, pieces: list[str]) -> list[int]:
    """Token ids that decode to ``"".join(pieces)``, cut at least at every piece boundary.

    A piece that is one token of the vocabulary (special or added ones included) is that token;
    other pieces are encoded as the tokenizer would.
    """
    ids: list[int] = []
    vocab = tokenizer.get_vocab()
    for piece in pieces:
        if piece in vocab and tokenizer.decode([vocab[piece]], skip_special_tokens=False) == piece:
            ids.append(vocab[piece])
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


class ForcedTokens:
    """A logits processor that makes a model write ``ids`` (then ``eos_id``), whatever its weights.

    ``generate(..., logits_processor=LogitsProcessorList([ForcedTokens(ids, eos, prompt_len)]))``.
    """

    def __init__(self, ids: list[int], eos_id: int, prompt_len: int) -> None:
        self.ids, self.eos_id, self.prompt_len = list(ids), int(eos_id), int(prompt_len)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[-1] - self.prompt_len
        target = self.ids[step] if step < len(self.ids) else self.eos_id
        out = torch.full_like(scores, float("-inf"))
        out[:, target] = 0.0
        return out
