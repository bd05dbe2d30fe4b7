"""The embedded toy: task generator, trace checking, and the shipped trained model."""

import json

import numpy as np
import pytest
import torch

from hf_vattr import toy
from hf_vattr.toy import (
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    KINDS,
    check_answer,
    evidence_for_step,
    make_example,
    make_examples,
    parse_trace,
    prompt_messages,
    step_object,
)

# --------------------------------------------------------------------------- generator


def test_generator_is_deterministic_from_seed():
    a, b = make_examples(6, seed=7), make_examples(6, seed=7)
    for x, y in zip(a, b):
        assert x.question == y.question and x.thinking_steps == y.thinking_steps and x.answer == y.answer
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert all(np.array_equal(m, n) for m, n in zip(x.step_evidence_masks, y.step_evidence_masks))
        # each example is rebuilt from its own seed
        z = make_example(x.seed)
        assert z.question == x.question and np.array_equal(np.asarray(z.image), np.asarray(x.image))
    c = make_examples(6, seed=8)
    assert [x.question for x in a] != [x.question for x in c] or not all(
        np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c))


def test_examples_are_well_formed_and_kinds_balanced():
    exs = make_examples(400, seed=3)
    assert {e.kind for e in exs} == set(KINDS)
    for e in exs:
        assert e.image.size == (IMAGE_SIZE[1], IMAGE_SIZE[0]) and e.image.mode == "RGB"
        assert 3 <= len(e.objects) <= 4 and len({o.colour for o in e.objects}) == len(e.objects)
        assert len({(o.row, o.col) for o in e.objects}) == len(e.objects)
        assert len(e.thinking_steps) == len(e.step_evidence_masks) == len(e.step_objects) >= 1
        assert e.trace == "<think>\n" + "\n".join(e.thinking_steps) + "\n</think>\n" + e.answer
        for step, i in zip(e.thinking_steps, e.step_objects):
            assert sum(step.count(c) for c in COLOURS) == 1 and e.objects[i].colour in step  # one object per step
            assert step_object(e, step) == i
    answers = [e.answer for e in exs if e.kind == "shape"]
    assert set(answers) == set(SHAPES)
    yes = np.mean([e.answer == "yes" for e in exs if e.kind in ("left", "above")])
    assert 0.35 < yes < 0.65


def test_evidence_masks_match_object_pixels():
    for e in make_examples(40, seed=11):
        pixels = np.asarray(e.image)
        union = np.zeros(IMAGE_SIZE, dtype=bool)
        for o in e.objects:
            assert o.mask.shape == IMAGE_SIZE and o.mask.dtype == bool and o.mask.sum() > 100
            assert (pixels[o.mask] == np.array(o.rgb, dtype=np.uint8)).all()  # painted with its colour
            x0, y0, x1, y1 = o.bbox
            assert o.mask[y0:y1, x0:x1].sum() == o.mask.sum()  # the box holds the whole mask
            assert not (union & o.mask).any()
            union |= o.mask
        background = pixels[~union]
        assert (background == background[0]).all()  # nothing else is drawn
        for mask, box, i in zip(e.step_evidence_masks, e.step_evidence_boxes, e.step_objects):
            assert np.array_equal(mask, e.objects[i].mask) and box == e.objects[i].bbox


def test_answers_depend_on_the_image_not_the_question():
    # Same question text, different answers across images: the text alone cannot answer.
    exs = [e for e in make_examples(600, seed=5) if e.kind == "shape"]
    by_q = {}
    for e in exs:
        by_q.setdefault(e.question, set()).add(e.answer)
    assert all(len(a) >= 3 for a in by_q.values())


# --------------------------------------------------------------------------- scoring


def test_check_answer_on_hand_written_traces():
    e = next(x for x in make_examples(50, seed=2) if x.kind == "shape")
    o = e.objects[e.step_objects[0]]
    colour, shape, pos = o.colour, e.answer, o.position
    good = f"The {colour} object is at the {pos}.\nThe {colour} object is a {shape}.\n</think>\n{shape}<|im_end|>"
    assert check_answer(e, good) == (True, 1.0)
    assert check_answer(e, "<think>\n" + good) == (True, 1.0)
    wrong_shape = next(s for s in SHAPES if s != shape)
    bad_step = f"The {colour} object is at the {pos}.\nThe {colour} object is a {wrong_shape}.\n</think>\n{shape}"
    assert check_answer(e, bad_step) == (True, 0.5)
    wrong = f"The {colour} object is at the {pos}.\nThe {colour} object is a {wrong_shape}.\n</think>\n{wrong_shape}"
    assert check_answer(e, wrong) == (False, 0.5)
    extra = good.replace("</think>", f"The {colour} object is a {shape}.\n</think>")
    assert check_answer(e, extra) == (True, pytest.approx(2 / 3))
    unfinished = f"The {colour} object is at the {pos}."
    assert check_answer(e, unfinished) == (False, 0.5)
    assert parse_trace(unfinished) == ([unfinished], None)
    assert check_answer(e, "") == (False, 0.0)


def test_evidence_for_generated_steps():
    e = make_examples(1, seed=4)[0]
    o = e.objects[0]
    assert np.array_equal(evidence_for_step(e, f"The {o.colour} object is at the {o.position}."), o.mask)
    assert evidence_for_step(e, "No object named here.") is None


def test_prompt_messages_render_one_image_and_the_question():
    e = make_examples(1, seed=1)[0]
    msgs = prompt_messages(e)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    parts = msgs[0]["content"]
    assert [p["type"] for p in parts] == ["image", "text"] and parts[0]["image"] is e.image
    assert parts[1]["text"] == e.question


# --------------------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def toy_model():
    if not (toy.toy_checkpoint_path() / "model.safetensors").exists():
        pytest.fail("the shipped toy checkpoint is missing: run python scripts/toy/train_toy.py")
    return toy.load_toy_model()


def test_shipped_checkpoint_is_small_and_hub_shaped():
    folder = toy.toy_checkpoint_path()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "processor_config.json", "chat_template.jinja", "metrics.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10e6
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["held_out"]["n"] >= 200
    assert metrics["held_out"]["answer_accuracy"] >= 0.95 and metrics["held_out"]["step_accuracy"] >= 0.95


def test_shipped_model_loads_via_public_api(toy_model):
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    model, processor = toy_model
    assert isinstance(model, Qwen3VLForConditionalGeneration) and isinstance(processor, Qwen3VLProcessor)
    assert not model.training
    tok = processor.tokenizer
    text = "The red object is at the top left.\nThe red object is a circle.\n</think>\ncircle"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text  # </think> is a normal (non-special) token
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert model.generation_config.do_sample is False
    prompt = processor.apply_chat_template(prompt_messages(make_example(0)), add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")


def _generate(model, processor, examples) -> list[str]:
    """Greedy traces of the toy model for ``examples``, in one left-padded batch."""
    prompts = [processor.apply_chat_template(prompt_messages(e), add_generation_prompt=True, tokenize=False)
               for e in examples]
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left"  # questions differ in length
    try:
        inputs = processor(text=prompts, images=[e.image for e in examples], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_shipped_model_answers_held_out_questions(toy_model):
    model, processor = toy_model
    exs = make_examples(40, seed=toy.EVAL_SEED, start=5000)  # held out: never seen in training
    texts = _generate(model, processor, exs)
    answers, steps = zip(*(check_answer(e, text) for e, text in zip(exs, texts)))
    # The project's target, on 40 examples the training script never scored (metrics.json: 100% on
    # 200 held-out, and 2000 more were 100% too; see docs/toy.md).
    assert np.mean(answers) >= 0.95, (np.mean(answers), np.mean(steps))
    assert np.mean(steps) >= 0.95, (np.mean(answers), np.mean(steps))


@pytest.mark.slow
def test_model_looks_at_the_image(toy_model):
    """Same question, different image -> the model's answer follows the image."""
    model, processor = toy_model
    exs = [e for e in make_examples(300, seed=toy.EVAL_SEED, start=6000) if e.kind == "shape"]
    q = exs[0].question
    same_q = [e for e in exs if e.question == q][:6]
    got = [parse_trace(text)[1] for text in _generate(model, processor, same_q)]
    assert len({e.answer for e in same_q}) > 1
    assert sum(g == e.answer for g, e in zip(got, same_q)) >= len(same_q) - 1


def test_visual_probe_labels_put_each_object_on_the_token_that_holds_its_pixels():
    from hf_vattr.toy.task import SHAPES, TOKEN
    from train_toy import VisualProbe  # scripts/toy (see conftest.py)

    exs = make_examples(6, seed=11)
    labels = VisualProbe.labels(exs).view(len(exs), IMAGE_SIZE[0] // TOKEN, IMAGE_SIZE[1] // TOKEN, 4)
    for e, lab in zip(exs, labels):
        assert int((lab[..., 0] != len(SHAPES)).sum()) == len(e.objects)  # one object token per object
        for o in e.objects:
            ys, xs = np.nonzero(o.mask)
            r, c = int(ys[0]) // TOKEN, int(xs[0]) // TOKEN
            assert (ys // TOKEN == r).all() and (xs // TOKEN == c).all()  # the object lies in that one token
            assert SHAPES[int(lab[r, c, 0])] == o.shape and list(COLOURS)[int(lab[r, c, 1])] == o.colour
            assert (int(lab[r, c, 2]), int(lab[r, c, 3])) == (r, c)
