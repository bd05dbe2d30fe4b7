"""Build and train the embedded toy thinking VLM (tiny Qwen3-VL) on CPU.

    python scripts/toy/train_toy.py --out hf_vattr/toy/assets/toy-qwen3-vl
    python scripts/toy/train_toy.py --task hard --out hf_vattr/toy/assets/toy-qwen3-vl-hard
    python scripts/toy/train_toy.py --task video --out hf_vattr/toy/assets/toy-qwen3-vl-video

A development script (outside the wheel): it writes the checkpoint that ships in the package.

What it does, all offline and seeded:

1. a byte-level BPE tokenizer trained on the task's sentences
   (:func:`hf_vattr.testing.build_tokenizer`), large enough that every task word
   is one token; ``<think>``/``</think>`` are added as *non-special* tokens, as in
   the real Qwen3 tokenizers, so they survive ``skip_special_tokens=True``;
2. the real ``Qwen3VLProcessor`` (``Qwen2VLImageProcessor``: patch 16, merge 2,
   i.e. 32 px per LLM token; a 192 x 192 image gives 6 x 6 = 36 visual tokens)
   with the Qwen-style chat template of :mod:`hf_vattr.testing`, whose
   generation prompt ends with ``<|im_start|>assistant\\n<think>\\n``;
3. transformers' own ``Qwen3VLForConditionalGeneration`` at tiny size, trained
   from scratch with teacher forcing (loss on the assistant tokens only) on
   examples streamed from :mod:`hf_vattr.toy.task` (``--task hard``: :mod:`hf_vattr.toy.hard_task`), plus an auxiliary probe loss
   on the vision tower's output tokens (:class:`VisualProbe`, dropped after
   training) so that the tiny tower reliably learns what and where each object is;
4. ``save_pretrained`` of model (safetensors), processor, tokenizer, chat
   template and a greedy generation config;
5. greedy ``generate`` on held-out examples; ``metrics.json`` beside the checkpoint.

``--task video`` trains on the clips of :mod:`hf_vattr.toy.video_task` instead, starting from the
shipped image toy (``--init``): the same shapes, colours and cells, and both frames of a frame group
are one picture, so its vision tower already sees every object. The tower stays frozen and the probe
off; the decoder learns the new sentences and to pick the first or the last frame group. The
tokenizer is retrained on both tasks' sentences, and every token the image toy knew keeps its
embedding (mapped by its text).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from hf_vattr.testing import FAMILIES, build_tokenizer
from hf_vattr.toy import EVAL_SEED, toy_checkpoint_path
from hf_vattr.toy.hard_task import HARD_COLOURS, hard_task_vocabulary, make_hard_example, make_hard_examples
from hf_vattr.toy.task import (COLOURS, IMAGE_SIZE, SHAPES, TOKEN, ToyExample, check_answer, example_seed, make_example,
                   make_examples, prompt_messages, task_vocabulary)
from hf_vattr.toy.video_task import (VIDEO_FRAMES, VideoExample, make_video_example, make_video_examples,
                                     video_prompt_messages, video_task_vocabulary)

TASK_NAMES = ("default", "hard", "video")

FAMILY = FAMILIES["qwen3_vl"]
TRAIN_SEED = 0
THINK_TOKENS = ("<think>", "</think>")
END_OF_TURN = "<|im_end|>"

TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True,
                     "rope_theta": 10000.0},
)
VISION_CONFIG = dict(
    depth=2, hidden_size=64, intermediate_size=192, num_heads=2, out_hidden_size=128,
    patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
    num_position_embeddings=144,  # a 12 x 12 learned grid: one entry per patch of a 192 x 192 image
    deepstack_visual_indexes=[0],
)
MAX_PIXELS = 192 * 192  # any image is resized to at most 6 x 6 visual tokens
MIN_PIXELS = 2 * 2 * 32 * 32
VIDEO_STEPS = 600  # fine-tuning from the image toy
VIDEO_VOCAB_SIZE = 512  # room for the video sentences' words as single tokens, beside the image task's
REPO_ROOT = Path(__file__).resolve().parents[2]


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository when it lies inside it (metrics.json then reads the same on any machine)."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)


def video_vocabulary() -> list[str]:
    """The video model's tokenizer corpus: the image task's sentences (its starting point) and the video task's."""
    return task_vocabulary() + video_task_vocabulary()


# ----------------------------------------------------------------------------- building blocks


def build_toy_tokenizer(vocab_size: int = 448, vocabulary=task_vocabulary):
    """Byte-level BPE on the task sentences; every task word becomes a single token."""
    specials = {k: v for k, v in FAMILY.special_tokens.items() if v not in THINK_TOKENS}
    corpus = vocabulary() * 4
    tokenizer = build_tokenizer(specials, corpus, vocab_size=vocab_size)
    tokenizer.add_tokens(list(THINK_TOKENS), special_tokens=False)
    return tokenizer


def build_toy_processor(tokenizer=None, task: str = "default"):
    import transformers

    if tokenizer is None:
        if task == "video":
            tokenizer = build_toy_tokenizer(VIDEO_VOCAB_SIZE, video_vocabulary)
        else:
            tokenizer = build_toy_tokenizer(**({"vocabulary": hard_task_vocabulary} if task == "hard" else {}))
    image_processor = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=FAMILY.patch_size, merge_size=2, temporal_patch_size=2,
    )
    video_kwargs = {}
    if task == "video":
        # frames normalised as the image processor normalises images, so that the image toy's tower
        # sees a frame group as it saw an image; at most 6 x 6 tokens per group of the longest clip
        video_kwargs = dict(image_mean=image_processor.image_mean, image_std=image_processor.image_std,
                            size={"shortest_edge": 2 * MIN_PIXELS, "longest_edge": max(VIDEO_FRAMES) * MAX_PIXELS})
    video_processor = transformers.Qwen3VLVideoProcessor(patch_size=FAMILY.patch_size, merge_size=2,
                                                         temporal_patch_size=2, **video_kwargs)
    return transformers.Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         video_processor=video_processor, chat_template=FAMILY.chat_template)


def build_toy_model(tokenizer, seed: int = 0):
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in FAMILY.special_tokens.items()}
    eos = [tokenizer.convert_tokens_to_ids(END_OF_TURN), ids["eos"]]
    text = dict(TEXT_CONFIG, vocab_size=len(tokenizer), eos_token_id=eos[0], pad_token_id=ids["eos"],
                bos_token_id=None)
    config = transformers.Qwen3VLConfig(
        text_config=text, vision_config=dict(VISION_CONFIG), image_token_id=ids["image"],
        video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=True,
    )
    config.eos_token_id = eos[0]
    config.pad_token_id = ids["eos"]
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                      dtype=torch.float32)
    gc = model.generation_config
    gc.do_sample = False
    gc.num_beams = 1
    gc.eos_token_id = eos
    gc.pad_token_id = ids["eos"]
    gc.bos_token_id = None
    gc.max_new_tokens = 64
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)
    return model


def init_from_checkpoint(model, tokenizer, path: str | Path) -> None:
    """Start `model` from the checkpoint at `path` (same architecture, possibly another tokenizer).

    Every weight is copied except the token embeddings (tied to the output layer), which are copied row
    by row for the tokens both tokenizers share, by their text; new tokens keep their fresh init.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    state = load_file(str(Path(path) / "model.safetensors"))
    old_vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    embed_key = "model.language_model.embed_tokens.weight"
    old_embed = state.pop(embed_key)
    state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {embed_key, "lm_head.weight"}:
        raise ValueError(f"{path} does not match the toy architecture: missing {missing}, unexpected {unexpected}")
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        for token, new_id in tokenizer.get_vocab().items():
            if token in old_vocab:
                embed[new_id] = old_embed[old_vocab[token]]


def prompt_text(processor, example: ToyExample | VideoExample) -> str:
    messages = video_prompt_messages(example) if isinstance(example, VideoExample) else prompt_messages(example)
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def vision_inputs(examples: list[ToyExample | VideoExample]) -> dict:
    """The processor's visual arguments for `examples`: their images, or their clips with every frame kept."""
    if all(isinstance(ex, VideoExample) for ex in examples):
        return {"videos": [ex.frames for ex in examples], "video_metadata": [ex.video_metadata for ex in examples],
                "do_sample_frames": False}
    return {"images": [ex.image for ex in examples]}


def collate(processor, examples: list[ToyExample]):
    """Teacher-forcing batch: prompt + completion + <|im_end|>; labels only on the assistant part."""
    tok = processor.tokenizer
    prompts = [prompt_text(processor, ex) for ex in examples]
    texts = [p + ex.completion + END_OF_TURN for p, ex in zip(prompts, examples)]
    tok.padding_side = "right"
    batch = processor(text=texts, **vision_inputs(examples), return_tensors="pt", padding=True)
    # prompt lengths after image-token expansion: count tokens of the completion instead
    comp_lens = [len(tok(ex.completion + END_OF_TURN, add_special_tokens=False)["input_ids"]) for ex in examples]
    labels = torch.full_like(batch["input_ids"], -100)
    lengths = batch["attention_mask"].sum(1).tolist()
    for b, (n, c) in enumerate(zip(lengths, comp_lens)):
        labels[b, n - c:n] = batch["input_ids"][b, n - c:n]
    batch["labels"] = labels
    return batch


# ----------------------------------------------------------------------------- training


def _fast_patch_embed(model) -> None:
    """Training-time speed-up: the vision patch embedding as one matmul.

    ``Qwen3VLVisionPatchEmbed`` is a Conv3d whose kernel equals its stride and input,
    i.e. a linear map of each flattened patch; CPU conv3d backward is slow for it.
    Same parameters, same maths; only this process's module instance is patched.
    """
    import types

    pe = model.model.visual.patch_embed

    def forward(self, hidden_states):
        w = self.proj.weight
        x = hidden_states.view(-1, w[0].numel()).to(w.dtype)
        return torch.nn.functional.linear(x, w.view(w.shape[0], -1), self.proj.bias)

    pe.forward = types.MethodType(forward, pe)


def _init_for_grounding(model, scale: float = 0.5) -> None:
    """Give the vision tower's learned position table a smooth 2-D sinusoidal start.

    The default init (std 0.02) makes position nearly invisible next to patch
    content, so the text model long fails to tell *where* an object is; a
    structured table with a scale comparable to the patch embedding fixes that.
    Only initial values change; the architecture is the stock one.
    """
    emb = model.model.visual.pos_embed.weight
    n, dim = emb.shape
    side = int(round(n ** 0.5))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    n_freq = dim // 4
    freqs = torch.linspace(0.15, 1.6, n_freq)
    table = torch.cat([torch.sin(rows[:, None] * freqs), torch.cos(rows[:, None] * freqs),
                       torch.sin(cols[:, None] * freqs), torch.cos(cols[:, None] * freqs)], dim=1)
    with torch.no_grad():
        emb.copy_(table * scale)


def _lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def generate_texts(model, processor, examples: list[ToyExample | VideoExample], max_new_tokens: int = 64,
                   batch_size: int = 32) -> list[str]:
    """Greedy generations (decoded with special tokens kept), batched by equal prompt length (no padding)."""
    tok = processor.tokenizer
    prompts = [prompt_text(processor, ex) for ex in examples]
    # a clip's prompt grows with its frame count once the processor expands its video tokens
    lengths = [(len(tok(p, add_special_tokens=False)["input_ids"]), len(getattr(ex, "frames", ())))
               for p, ex in zip(prompts, examples)]
    out: list[str | None] = [None] * len(examples)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            inputs = processor(text=[prompts[i] for i in chunk], **vision_inputs([examples[i] for i in chunk]),
                               return_tensors="pt")
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = gen[:, inputs["input_ids"].shape[1]:]
            for i, row in zip(chunk, new):
                out[i] = tok.decode(row, skip_special_tokens=False)
    return out  # type: ignore[return-value]


def evaluate(model, processor, examples: list[ToyExample], **kw) -> dict:
    """Held-out greedy accuracy: answers, steps, and per question kind."""
    texts = generate_texts(model, processor, examples, **kw)
    rows = [check_answer(ex, t) for ex, t in zip(examples, texts)]
    by_kind: dict[str, list] = {}
    for ex, r in zip(examples, rows):
        by_kind.setdefault(ex.kind, []).append(r)
    summary = lambda rs: {"n": len(rs), "answer_accuracy": float(np.mean([a for a, _ in rs])),  # noqa: E731
                          "step_accuracy": float(np.mean([s for _, s in rs]))}
    result = summary(rows)
    result["by_kind"] = {k: summary(v) for k, v in sorted(by_kind.items())}
    result["failures"] = [{"seed": ex.seed, "question": ex.question, "target": ex.completion, "generated": t}
                          for ex, t, (a, s) in zip(examples, texts, rows) if not a or s < 1][:10]
    return result


#: Curriculum over the number of objects per training image: (progress fraction up to which the
#: row applies, probabilities of 1, 2, 3, 4 objects). Held-out evaluation uses 3 or 4 objects only.
CURRICULUM = (
    (0.12, (0.5, 0.5, 0.0, 0.0)),
    (0.30, (0.1, 0.3, 0.3, 0.3)),
    (1.00, (0.0, 0.1, 0.45, 0.45)),
)


#: The hard task's curriculum: (progress fraction up to which the row applies, probabilities of
#: 1..6 objects, probabilities of 0..2 distractors). Held-out evaluation uses 5-6 objects and 1-2 distractors.
HARD_CURRICULUM = (
    (0.12, (0.3, 0.4, 0.3, 0.0, 0.0, 0.0), (0.5, 0.5, 0.0)),
    (0.30, (0.05, 0.15, 0.2, 0.2, 0.2, 0.2), (0.3, 0.4, 0.3)),
    (1.00, (0.0, 0.05, 0.1, 0.15, 0.35, 0.35), (0.1, 0.45, 0.45)),
)


def curriculum_examples(seed: int, step: int, steps: int, batch_size: int, task: str = "default") -> list[ToyExample]:
    """The training batch of `step`: deterministic from (seed, step)."""
    if task == "video":  # no curriculum: the image toy already knows one object from four
        return [make_video_example(example_seed(seed, step * batch_size + i)) for i in range(batch_size)]
    progress = step / max(1, steps)
    if task == "hard":
        _, p_obj, p_dis = next(row for row in HARD_CURRICULUM if progress < row[0] or row[0] >= 1.0)
        rng = np.random.default_rng([seed, step, 11])
        ns = rng.choice(np.arange(1, 7), size=batch_size, p=p_obj)
        ds = rng.choice(np.arange(3), size=batch_size, p=p_dis)
        return [make_hard_example(example_seed(seed, step * batch_size + i), n_objects=int(n), n_distractors=int(d))
                for i, (n, d) in enumerate(zip(ns, ds))]
    probs = next(p for until, p in CURRICULUM if progress < until or until >= 1.0)
    rng = np.random.default_rng([seed, step, 7])
    ns = rng.choice(np.arange(1, 5), size=batch_size, p=probs)
    return [make_example(example_seed(seed, step * batch_size + i), n_objects=int(n)) for i, n in enumerate(ns)]


class VisualProbe(torch.nn.Module):
    """Training-time auxiliary heads on the vision tower's output tokens (never saved).

    Why: the decoder's loss reaches the vision tower only through attention, a weak and
    late signal; alone it taught a tiny tower to tell shapes apart in some runs and not
    in others. Four linear heads ask every visual token what object it holds (shape,
    colour, or none) and where it is (row, column), so the tower learns to encode them
    from the start. The heads are dropped after training: the shipped checkpoint is the
    stock ``Qwen3VLForConditionalGeneration``.
    """

    def __init__(self, dim: int, grid: tuple[int, int], n_colour_classes: int = len(COLOURS) + 1):
        super().__init__()
        self.shape = torch.nn.Linear(dim, len(SHAPES) + 1)
        self.colour = torch.nn.Linear(dim, n_colour_classes)
        self.row = torch.nn.Linear(dim, grid[0])
        self.col = torch.nn.Linear(dim, grid[1])

    @staticmethod
    def labels(examples: list[ToyExample], colours: tuple[str, ...] = tuple(COLOURS)) -> torch.Tensor:
        """(N_images * tokens, 4) long: shape, colour, row, column per visual token.

        Colour classes: ``colours``, then (hard task only) one class for distractors, then none.
        A distractor labels every token its pixels touch, with its shape and the distractor class.
        """
        rows, cols = IMAGE_SIZE[0] // TOKEN, IMAGE_SIZE[1] // TOKEN
        has_distractors = any(hasattr(ex, "distractors") for ex in examples)
        out = []
        for ex in examples:
            lab = torch.zeros(rows, cols, 4, dtype=torch.long)
            lab[..., 0], lab[..., 1] = len(SHAPES), len(colours) + int(has_distractors)
            lab[..., 2] = torch.arange(rows)[:, None]
            lab[..., 3] = torch.arange(cols)[None, :]
            for obj in getattr(ex, "distractors", ()):  # spread over several tokens
                touched = obj.mask.reshape(rows, TOKEN, cols, TOKEN).any(axis=(1, 3))
                t = torch.from_numpy(touched)
                lab[..., 0][t], lab[..., 1][t] = SHAPES.index(obj.shape), len(colours)
            for obj in ex.objects:  # each object lies inside one visual token
                r, c = obj.bbox[1] // TOKEN, obj.bbox[0] // TOKEN
                lab[r, c, 0], lab[r, c, 1] = SHAPES.index(obj.shape), list(colours).index(obj.colour)
            out.append(lab.view(-1, 4))
        return torch.cat(out)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy
        return sum(ce(head(tokens), labels[:, i]) for i, head in enumerate((self.shape, self.colour, self.row, self.col)))


def train(out: str | Path, *, steps: int = 3000, batch_size: int = 32, lr: float = 1e-3, warmup: int = 50,
          weight_decay: float = 0.01, vision_lr_mult: float = 0.5, freeze_vision_frac: float = 0.0,
          probe_weight: float = 0.5, eval_examples: int = 400, seed: int = TRAIN_SEED, threads: int = 2,
          log_every: int = 50, task: str = "default", init: str | Path | None = None) -> dict:
    """Train from scratch and save to `out`; returns the metrics written to ``metrics.json``.

    Schedule: AdamW, linear warmup then cosine decay. The vision tower trains at
    ``vision_lr_mult`` x the learning rate, optionally after ``freeze_vision_frac`` of the
    steps frozen. Without help it tends to collapse to an image-independent output before
    the decoder learns to use it; ``probe_weight`` > 0 adds the :class:`VisualProbe` loss
    (what and where each visual token is), which prevents that. Images start with 1-2
    objects (see ``CURRICULUM``). ``task="hard"`` trains on :mod:`hf_vattr.toy.hard_task`
    (``HARD_CURRICULUM``; the probe also learns a distractor class). ``task="video"`` trains on
    :mod:`hf_vattr.toy.video_task` from the checkpoint at `init` (default: the shipped image toy); it
    takes no probe (the tower already knows the objects; freeze it with ``freeze_vision_frac=1``).
    """
    from tqdm.auto import tqdm

    t_start = time.time()
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    if task not in TASK_NAMES:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {task!r}")
    hard, video = task == "hard", task == "video"
    if video and probe_weight > 0:
        raise ValueError("the video task trains without the probe (probe_weight=0): its tower starts trained")
    examples_of = make_hard_examples if hard else make_video_examples if video else make_examples
    probe_colours = tuple(HARD_COLOURS) if hard else tuple(COLOURS)
    processor = build_toy_processor(task=task)
    tokenizer = processor.tokenizer
    model = build_toy_model(tokenizer, seed=seed)
    if video:
        init = Path(init) if init is not None else toy_checkpoint_path()
        init_from_checkpoint(model, tokenizer, init)
    else:
        _init_for_grounding(model)
    n_params = sum(p.numel() for p in model.parameters())
    _fast_patch_embed(model)
    model.train()

    groups = []
    for is_vision in (False, True):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("model.visual.") == is_vision]
        mult = vision_lr_mult if is_vision else 1.0
        groups.append({"params": [p for n, p in named if p.ndim >= 2 and "embed" not in n],
                       "weight_decay": weight_decay, "mult": mult, "vision": is_vision})
        groups.append({"params": [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)],
                       "weight_decay": 0.0, "mult": mult, "vision": is_vision})
    visual_tokens: list[torch.Tensor] = []  # the tower's output of the current forward (for the probe)
    if probe_weight > 0:
        probe = VisualProbe(model.config.vision_config.out_hidden_size, (IMAGE_SIZE[0] // TOKEN, IMAGE_SIZE[1] // TOKEN),
                            len(probe_colours) + 1 + int(hard))
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0, "mult": 1.0, "vision": False})
        model.model.visual.register_forward_hook(lambda module, args, output: visual_tokens.append(output.pooler_output))
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    vision_params = [p for g in groups if g["vision"] for p in g["params"]]
    unfreeze_at = int(round(freeze_vision_frac * steps))
    for p in vision_params:
        p.requires_grad_(unfreeze_at == 0)

    val_examples = examples_of(128, seed=EVAL_SEED + 1)
    val_batch = collate(processor, val_examples)
    val_kinds = np.array([ex.kind for ex in val_examples])
    log = []
    name = "toy-qwen3-vl" + ("" if task == "default" else f"-{task}")
    bar = tqdm(range(steps), desc=f"train {name}", dynamic_ncols=True)
    ema = None
    probe_ema = None
    t_train = time.time()
    for step in bar:
        if step == unfreeze_at and step > 0:
            for p in vision_params:
                p.requires_grad_(True)
        examples = curriculum_examples(seed, step, steps, batch_size, task)
        batch = collate(processor, examples)
        for group in opt.param_groups:
            if group["vision"]:  # its own warmup after unfreezing
                ramp = min(1.0, (step - unfreeze_at + 1) / warmup) if step >= unfreeze_at else 0.0
                group["lr"] = _lr_at(step, steps, warmup, lr) * group["mult"] * ramp
            else:
                group["lr"] = _lr_at(step, steps, warmup, lr) * group["mult"]
        visual_tokens.clear()
        loss = model(**batch).loss
        if probe_weight > 0:
            probe_loss = probe.loss(visual_tokens[0], VisualProbe.labels(examples, probe_colours))
            (loss + probe_weight * probe_loss).backward()
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if probe_weight > 0:
            probe_ema = probe_loss.item() if probe_ema is None else 0.95 * probe_ema + 0.05 * probe_loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                logits = model(**{k: v for k, v in val_batch.items() if k != "labels"}).logits
            model.train()
            labels = val_batch["labels"][:, 1:]
            pred = logits[:, :-1].argmax(-1)
            mask = labels != -100
            tok_acc = float((pred[mask] == labels[mask]).float().mean())
            seq_ok = ((pred == labels) | ~mask).all(1).numpy()
            log.append({"step": step + 1, "loss": round(ema, 5),
                        "probe_loss": None if probe_ema is None else round(probe_ema, 5), "val_token_acc": round(tok_acc, 5),
                        "val_seq_acc": round(float(seq_ok.mean()), 5),
                        "val_seq_acc_by_kind": {k: round(float(seq_ok[val_kinds == k].mean()), 3)
                                                for k in sorted(set(val_kinds))},
                        "elapsed_s": round(time.time() - t_start, 1)})
            tqdm.write(json.dumps(log[-1]))
    train_s = time.time() - t_train

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)

    # Reload through the public API, exactly as users will, and evaluate that.
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    loaded = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    loaded_proc = AutoProcessor.from_pretrained(out)
    t_eval = time.time()
    held_out = examples_of(eval_examples, seed=EVAL_SEED)
    metrics = evaluate(loaded, loaded_proc, held_out)
    eval_s = time.time() - t_eval

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    result = {
        "held_out": {k: v for k, v in metrics.items() if k != "failures"},
        "task": task,
        "held_out_seed": EVAL_SEED,
        "targets": {"answer_accuracy": 0.95, "step_accuracy": 0.95},
        "meets_targets": metrics["answer_accuracy"] >= 0.95 and metrics["step_accuracy"] >= 0.95,
        "training": {"steps": steps, "batch_size": batch_size, "examples_seen": steps * batch_size, "lr": lr,
                     "warmup": warmup, "weight_decay": weight_decay, "vision_lr_mult": vision_lr_mult,
                     "freeze_vision_frac": freeze_vision_frac, "probe_weight": probe_weight,
                     "curriculum": HARD_CURRICULUM if hard else None if video else CURRICULUM, "seed": seed,
                     "init": repo_relative(init) if video else None,
                     "threads": threads,
                     "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
                     "total_seconds": round(time.time() - t_start, 1), "torch": torch.__version__,
                     "log": log},
        "model": {"parameters": n_params, "text_config": {k: v for k, v in TEXT_CONFIG.items()},
                  "vision_config": VISION_CONFIG, "vocab_size": len(tokenizer),
                  "visual_tokens_per_image": 36},
        "checkpoint_bytes": size,
        "failures": metrics["failures"],
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASK_NAMES, default="default",
                   help="task family: the default toy task, the hard one (hf_vattr.toy.hard_task) or the video one "
                        "(hf_vattr.toy.video_task, trained from --init)")
    p.add_argument("--init", default=None,
                   help="--task video: the image checkpoint to start from (default: the shipped image toy)")
    p.add_argument("--out", default=None, help="checkpoint folder (default: the package's, for --task)")
    p.add_argument("--steps", type=int, default=None, help=f"default: 3000 ({VIDEO_STEPS} for --task video)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--vision-lr-mult", type=float, default=0.5)
    p.add_argument("--freeze-vision-frac", type=float, default=None, help="default: 0 (1, always, for --task video)")
    p.add_argument("--probe-weight", type=float, default=None,
                   help="VisualProbe auxiliary loss weight (0 = off); default: 0.5 (0 for --task video)")
    p.add_argument("--eval-examples", type=int, default=400)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    video = args.task == "video"
    args.out = args.out or str(toy_checkpoint_path(args.task))
    if args.steps is None:
        args.steps = VIDEO_STEPS if video else 3000
    if args.freeze_vision_frac is None:
        args.freeze_vision_frac = 1.0 if video else 0.0
    if args.probe_weight is None:
        args.probe_weight = 0.0 if video else 0.5
    r = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
              vision_lr_mult=args.vision_lr_mult, freeze_vision_frac=args.freeze_vision_frac, probe_weight=args.probe_weight, eval_examples=args.eval_examples, seed=args.seed, threads=args.threads,
              task=args.task, init=args.init)
    h = r["held_out"]
    print(f"held-out ({h['n']}): answer accuracy {h['answer_accuracy']:.3f}, step accuracy {h['step_accuracy']:.3f}; "
          f"train {r['training']['train_seconds']:.0f}s, total {r['training']['total_seconds']:.0f}s; "
          f"checkpoint {r['checkpoint_bytes'] / 1e6:.2f} MB -> {args.out}")
    return 0 if r["meets_targets"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

