"""The embedded toy: a tiny Qwen3-VL thinking model trained on a synthetic grounded task.

    from hf_vattr.toy import load_toy_model, make_examples, prompt_messages, check_answer

    model, processor = load_toy_model()
    ex = make_examples(1, seed=123)[0]
    prompt = processor.apply_chat_template(prompt_messages(ex), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[ex.image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=64)
    text = processor.decode(out[0, inputs["input_ids"].shape[1]:])
    check_answer(ex, text)  # (answer_correct, steps_correct_fraction)

The checkpoint ships inside the package (``toy/assets/toy-qwen3-vl``) and is a
plain Hub-style folder: ``Qwen3VLForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained`` load it like any model. It is reproduced from a source
checkout by ``python scripts/toy/train_toy.py`` (the script is not part of the wheel).
Nothing is loaded at import time.

A harder family (more objects, salient distractors, multi-object steps) lives in
:mod:`hf_vattr.toy.hard_task`, with its own model::

    from hf_vattr.toy.hard_task import evidence_for_step, make_hard_examples

    model, processor = load_toy_model(task="hard")  # toy/assets/toy-qwen3-vl-hard
    ex = make_hard_examples(1, seed=123)[0]          # then as above

A video family (short clips whose objects move, appear or disappear; each step names one object
at the start or the end) lives in :mod:`hf_vattr.toy.video_task`, with its own model::

    from hf_vattr.toy import make_video_examples, video_prompt_messages

    model, processor = load_toy_model(task="video")  # toy/assets/toy-qwen3-vl-video
    ex = make_video_examples(1, seed=123)[0]
    prompt = processor.apply_chat_template(video_prompt_messages(ex), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], videos=[ex.frames], video_metadata=[ex.video_metadata],
                       do_sample_frames=False, return_tensors="pt")
"""

from __future__ import annotations

from pathlib import Path

from .task import (
    COLOURS,
    COUNT_WORDS,
    GRID,
    IMAGE_SIZE,
    KINDS,
    SHAPES,
    ToyExample,
    ToyObject,
    check_answer,
    evidence_for_step,
    example_seed,
    make_example,
    make_examples,
    parse_trace,
    position_name,
    prompt_messages,
    region_on_evidence,
    step_object,
    task_vocabulary,
)
from .video_task import (
    VIDEO_FRAMES,
    VIDEO_KINDS,
    VideoExample,
    VideoObject,
    make_video_example,
    make_video_examples,
    video_evidence_for_step,
    video_prompt_messages,
    video_step_object,
)

__all__ = [
    "TASKS",
    "toy_checkpoint_path",
    "toy_estimator_path",
    "toy_regions",
    "load_toy_model",
    "COLOURS",
    "COUNT_WORDS",
    "GRID",
    "IMAGE_SIZE",
    "KINDS",
    "SHAPES",
    "ToyExample",
    "ToyObject",
    "check_answer",
    "evidence_for_step",
    "example_seed",
    "make_example",
    "make_examples",
    "parse_trace",
    "position_name",
    "prompt_messages",
    "region_on_evidence",
    "step_object",
    "task_vocabulary",
    "VIDEO_FRAMES",
    "VIDEO_KINDS",
    "VideoExample",
    "VideoObject",
    "make_video_example",
    "make_video_examples",
    "video_evidence_for_step",
    "video_prompt_messages",
    "video_step_object",
]

#: Seed of the held-out evaluation stream (training uses a different seed).
EVAL_SEED = 1_000_001


#: Task family -> folder name of its shipped checkpoint under ``toy/assets``.
TASKS = {"default": "toy-qwen3-vl", "hard": "toy-qwen3-vl-hard", "video": "toy-qwen3-vl-video"}


def toy_checkpoint_path(task: str = "default") -> Path:
    """Folder of the shipped checkpoint of `task` ("default", "hard" or "video"): config, safetensors, processor."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    return Path(__file__).resolve().parent / "assets" / TASKS[task]


def load_toy_model(attn_implementation: str = "sdpa", *, path: str | Path | None = None, task: str = "default"):
    """(model, processor) of the shipped toy thinking VLM, via the public ``from_pretrained`` API.

    `task` picks the checkpoint ("default", "hard" for :mod:`hf_vattr.toy.hard_task`, "video" for
    :mod:`hf_vattr.toy.video_task`); `path`
    overrides it. The model is in eval mode, float32, on CPU; its generation config decodes
    greedily and stops at ``<|im_end|>``.
    """
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    folder = Path(path) if path is not None else toy_checkpoint_path(task)
    if not (folder / "config.json").exists():
        flag = f" --task {task}" if task != "default" and path is None else ""
        raise FileNotFoundError(
            f"No toy checkpoint at {folder}. Reinstall hf_vattr, or rebuild it from a source checkout "
            f"with `python scripts/toy/train_toy.py{flag} --out {folder}`."
        )
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, attn_implementation=attn_implementation)
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def toy_estimator_path(task: str = "default") -> Path:
    """Folder of the estimator trained for the toy model of `task` by hf_vattr's own pipeline.

    ``scripts/toy/faithfulness.py --task TASK`` writes it; the folder may be absent where no estimator
    has been trained for a task yet.
    """
    suffix = "" if task == "default" else f"-{task}"
    return toy_checkpoint_path(task).parent / f"toy-estimator{suffix}"


def toy_regions(model, inputs, images, estimator=None):
    """Region maps for a toy prompt, built the way the shipped estimator was trained."""
    from ..layouts import visual_layout
    from ..regions import build_regions

    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], images)
    method = "grid"
    k = 16
    if estimator is not None:
        method = estimator.region_method or "grid"
        policy = estimator.k_policy or {}
        k = policy.get("k", k)
    return build_regions(layout, method=method, k=k, images=images, model=model, inputs=inputs)
