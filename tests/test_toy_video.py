"""The toy video task: clips of coloured shapes that move, appear or disappear, with per-step evidence."""

import re

import numpy as np
import pytest
import torch

from hf_vattr.toy import IMAGE_SIZE, toy_checkpoint_path
from hf_vattr.toy.task import COLOURS
from hf_vattr.toy.video_task import (FRAMES_PER_GROUP, VIDEO_FRAMES, VIDEO_KINDS, VideoExample, check_answer,
                                     make_video_example, make_video_examples, region_on_evidence,
                                     video_evidence_for_step, video_prompt_messages, video_step_object,
                                     video_task_vocabulary)

ROWS = {"top": 0, "middle": 1, "bottom": 2}
COLS = {"left": 0, "center": 1, "right": 2}


@pytest.fixture(scope="module")
def examples() -> list[VideoExample]:
    return make_video_examples(120, seed=5)


def _cell_named(position: str) -> tuple[int, int]:
    """(row, col) of a position name, read independently of the module ("center" is the middle cell)."""
    if position == "center":
        return 1, 1
    row, col = position.split()
    return ROWS[row], COLS[col]


def _cell_of_colour(frame: np.ndarray, colour: str) -> tuple[int, int] | None:
    """Where pixels of `colour` are in a frame (None: not there), from the pixels alone.

    Objects are painted with their palette colour jittered by at most 18 per channel, on a grey background.
    """
    near = (np.abs(frame.astype(int) - np.array(COLOURS[colour])) <= 18).all(-1)
    if near.sum() < 50:  # an object covers hundreds of pixels
        return None
    ys, xs = np.nonzero(near)
    cell = 192 // 3
    assert ys.max() // cell == ys.min() // cell and xs.max() // cell == xs.min() // cell, "one object per colour"
    return int(ys.mean()) // cell, int(xs.mean()) // cell


def _parse_step(step: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"At the (start|end) the (\w+) object is at the (.+)\.", step)
    assert m, step
    return m.group(1), m.group(2), m.group(3)


# --------------------------------------------------------------------------- generator


def test_video_examples_are_deterministic_from_seed():
    a, b = make_video_examples(6, seed=7), make_video_examples(6, seed=7)
    for x, y in zip(a, b):
        assert (x.question, x.thinking_steps, x.answer, x.step_groups) == (y.question, y.thinking_steps, y.answer,
                                                                          y.step_groups)
        assert np.array_equal(x.frame_array(), y.frame_array())
        z = make_video_example(x.seed)
        assert z.trace == x.trace and np.array_equal(z.frame_array(), x.frame_array())
    assert [x.trace for x in a] != [x.trace for x in make_video_examples(6, seed=8)]


def test_clips_are_well_formed(examples):
    assert {e.kind for e in examples} == set(VIDEO_KINDS)
    assert {len(e.frames) for e in examples} == set(VIDEO_FRAMES)
    behaviours = set()
    for e in examples:
        frames = e.frame_array()
        assert frames.shape == (len(e.frames), *IMAGE_SIZE, 3) and len(e.frames) % 2 == 0
        for g in range(e.num_groups):  # the tower fuses two frames: both frames of a group are one picture
            assert np.array_equal(frames[2 * g], frames[2 * g + 1])
        assert len({o.colour for o in e.objects}) == len(e.objects)
        assert len(e.thinking_steps) == len(e.step_objects) == len(e.step_groups) == len(e.step_evidence_masks)
        assert e.video_metadata == {"fps": 2.0, "total_num_frames": len(e.frames),
                                    "frames_indices": list(range(len(e.frames)))}
        for o in e.objects:
            seen = [_cell_of_colour(frames[2 * g], o.colour) for g in range(e.num_groups)]
            assert seen == o.cells  # its track is what the frames show
            present = [c is not None for c in seen]
            if all(present):
                behaviours.add("move" if len(set(seen)) > 1 else "static")
            else:
                behaviours.add("appear" if not present[0] else "disappear")
    assert behaviours == {"move", "static", "appear", "disappear"}


def test_every_step_names_an_object_that_is_there_at_that_time(examples):
    for e in examples:
        frames = e.frame_array()
        for step, obj, groups, mask, box in zip(e.thinking_steps, e.step_objects, e.step_groups,
                                                e.step_evidence_masks, e.step_evidence_boxes):
            time, colour, position = _parse_step(step)
            group = 0 if time == "start" else len(e.frames) // 2 - 1
            assert groups == (group,) and e.objects[obj].colour == colour
            # the named object is at the named cell in both frames of that group, from the pixels alone
            for f in (2 * group, 2 * group + 1):
                assert _cell_of_colour(frames[f], colour) == _cell_named(position)
            # evidence: exactly that object's pixels, in that group only
            assert mask.shape == (e.num_groups, *IMAGE_SIZE) and mask[group].any()
            assert not np.delete(mask, group, axis=0).any()
            near = (np.abs(frames[2 * group].astype(int) - np.array(COLOURS[colour])) <= 18).all(-1)
            assert np.array_equal(mask[group], near)
            ys, xs = np.nonzero(mask[group])
            assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # a generated step with the same text gets the same evidence
            assert video_step_object(e, step) == (obj, group)
            assert np.array_equal(video_evidence_for_step(e, step), mask)
    assert video_step_object(examples[0], "The red object is at the top left.") is None


def test_the_answer_follows_from_the_clip(examples):
    for e in examples:
        frames = e.frame_array()
        if e.kind == "move":
            colour = re.fullmatch(r"Where did the (\w+) object move\?", e.question).group(1)
            (r0, c0), (r1, c1) = _cell_of_colour(frames[0], colour), _cell_of_colour(frames[-1], colour)
            words = [w for w, d in (("up", r1 < r0), ("down", r1 > r0)) if d] + \
                    [w for w, d in (("left", c1 < c0), ("right", c1 > c0)) if d]
            assert words and e.answer == " and ".join(words)
        else:
            a, b = re.fullmatch(r"Which appeared first, the (\w+) object or the (\w+) object\?", e.question).groups()
            first_seen = {c: next(i for i in range(len(frames)) if _cell_of_colour(frames[i], c) is not None)
                          for c in (a, b)}
            assert first_seen[a] != first_seen[b]
            assert e.answer == min((a, b), key=first_seen.get)
            assert _cell_of_colour(frames[-1], a) is not None and _cell_of_colour(frames[-1], b) is not None
        assert check_answer(e, e.completion) == (True, 1.0)


def test_no_answer_can_be_read_off_the_question():
    train, test = make_video_examples(600, seed=11), make_video_examples(300, seed=12)
    table: dict[str, dict[str, int]] = {}
    for e in train:
        counts = table.setdefault(e.question, {})
        counts[e.answer] = counts.get(e.answer, 0) + 1
    guess = {q: max(c, key=c.get) for q, c in table.items()}
    for kind, chance in (("move", 1 / 8), ("order", 1 / 2)):
        rows = [e for e in test if e.kind == kind]
        accuracy = np.mean([guess.get(e.question) == e.answer for e in rows])
        assert accuracy < chance + 0.15, (kind, accuracy)
    assert np.mean([e.answer == e.question.split()[4] for e in test if e.kind == "order"]) == pytest.approx(0.5,
                                                                                                        abs=0.1)


def test_vocabulary_covers_every_text(examples):
    vocabulary = set(video_task_vocabulary())
    for e in examples:
        assert e.question in vocabulary and e.answer in vocabulary
        assert set(e.thinking_steps) <= vocabulary


# --------------------------------------------------------------------------- the toy model's processor


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(toy_checkpoint_path())


def _inputs(processor, e: VideoExample):
    prompt = processor.apply_chat_template(video_prompt_messages(e), add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], videos=[e.frames], video_metadata=[e.video_metadata], do_sample_frames=False,
                     return_tensors="pt")


def test_the_toy_processor_takes_the_clips(processor):
    for n in VIDEO_FRAMES:
        e = make_video_example(3, n_frames=n)
        inputs = _inputs(processor, e)
        groups = n // FRAMES_PER_GROUP
        assert inputs["video_grid_thw"].tolist() == [[groups, 12, 12]]  # 192 px frames, 16 px patches, no resize
        video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        assert int((inputs["input_ids"] == video_id).sum()) == groups * 36
        text = processor.tokenizer.decode(inputs["input_ids"][0])
        # one timestamp per frame group: the mean time of its two frames at 2 fps
        assert re.findall(r"<([\d.]+) seconds>", text) == [f"{g + 0.25:.1f}" for g in range(groups)]


def test_pointing_needs_the_right_object_in_the_right_frame_group(processor):
    from hf_vattr.layouts import visual_layout
    from hf_vattr.regions import build_regions

    config = __import__("transformers").AutoConfig.from_pretrained(toy_checkpoint_path())
    e = next(x for x in make_video_examples(40, seed=2)
             if x.kind == "move" and len(x.frames) == 8)
    inputs = _inputs(processor, e)
    layout = visual_layout(config, inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"], videos=[e.frames],
                           video_metadata=[e.video_metadata])
    regions = build_regions(layout, method="grid", k=36)  # one region per token per frame group
    region_map = regions.maps[0]
    for step, mask, (group,), obj in zip(e.thinking_steps, e.step_evidence_masks, e.step_groups, e.step_objects):
        y0, x0 = np.argwhere(mask[group])[0]
        hits = [r for r in range(regions.num_regions) if region_on_evidence(regions, r, mask)]
        assert len(hits) >= 1
        for r in hits:
            assert region_map.region_groups(r) == [group]
            assert region_map.pixel_labels(group)[mask[group]].tolist().count(r) > 0
        # the same cell in another frame group is not the evidence, unless the object is there too
        token = int(region_map.pixel_labels(group)[y0, x0])
        for other in range(e.num_groups):
            if other == group:
                continue
            other_region = int(region_map.pixel_labels(other)[y0, x0])
            assert other_region != token
            assert not region_on_evidence(regions, other_region, mask)


# --------------------------------------------------------------------------- training script (scripts/toy)


@pytest.mark.slow
def test_the_video_model_starts_from_the_image_toy():
    from safetensors.torch import load_file
    from train_toy import build_toy_model, build_toy_processor, init_from_checkpoint  # scripts/toy (conftest.py)
    from transformers import AutoTokenizer

    processor = build_toy_processor(task="video")
    model = build_toy_model(processor.tokenizer)
    init_from_checkpoint(model, processor.tokenizer, toy_checkpoint_path())
    image_state = load_file(str(toy_checkpoint_path() / "model.safetensors"))
    state = model.state_dict()
    embed = "model.language_model.embed_tokens.weight"
    for name, value in image_state.items():
        if name != embed:
            assert torch.equal(state[name], value), name
    old = AutoTokenizer.from_pretrained(toy_checkpoint_path()).get_vocab()
    new = processor.tokenizer.get_vocab()
    shared = [t for t in new if t in old]
    assert {"Ġred", "Ġobject", "Ġtop", "Ġleft", "<think>", "<|video_pad|>"} <= set(shared)
    for token in shared:
        assert torch.equal(state[embed][new[token]], image_state[embed][old[token]]), token
    assert len(new) > len(old)  # the video sentences' words are tokens of their own
    assert processor.tokenizer.tokenize("At the start the red object is at the top left.") == [
        "At", "Ġthe", "Ġstart", "Ġthe", "Ġred", "Ġobject", "Ġis", "Ġat", "Ġthe", "Ġtop", "Ġleft", "."]


@pytest.mark.slow
def test_train_toy_video_end_to_end(tmp_path):
    import json

    from safetensors.torch import load_file
    from train_toy import main  # scripts/toy (conftest.py)
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    out = tmp_path / "toy-video"
    code = main(["--task", "video", "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-examples", "2",
                 "--threads", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == (0 if metrics["meets_targets"] else 1)
    assert metrics["task"] == "video" and metrics["held_out"]["n"] == 2
    assert metrics["training"]["init"] == "hf_vattr/toy/assets/toy-qwen3-vl"  # relative to the repository
    assert metrics["training"]["probe_weight"] == 0 and metrics["training"]["freeze_vision_frac"] == 1
    # the tower stayed the image toy's: frozen the whole run
    trained = load_file(str(out / "model.safetensors"))
    image = load_file(str(toy_checkpoint_path() / "model.safetensors"))
    tower = [k for k in image if k.startswith("model.visual.")]
    assert tower and all(torch.equal(trained[k], image[k]) for k in tower)
    # a Hub-shaped folder whose processor shows the tower a frame group as the image processor shows an image
    model = Qwen3VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    e = make_video_example(4, n_frames=6)
    inputs = _inputs(processor, e)
    assert inputs["video_grid_thw"].tolist() == [[3, 12, 12]]
    picture = processor.image_processor(images=[e.frames[0]], return_tensors="pt")["pixel_values"]
    assert torch.allclose(inputs["pixel_values_videos"][:len(picture)], picture, atol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=4)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


# --------------------------------------------------------------------------- the shipped model


def test_shipped_video_model_answers_held_out_clips():
    import json

    from hf_vattr import toy

    folder = toy.toy_checkpoint_path("video")
    if not (folder / "model.safetensors").exists():
        pytest.fail("the shipped video toy checkpoint is missing: run python scripts/toy/train_toy.py --task video")
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10e6
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["task"] == "video" and metrics["held_out"]["n"] >= 200
    assert metrics["held_out"]["answer_accuracy"] >= 0.95 and metrics["held_out"]["step_accuracy"] >= 0.95
    model, processor = toy.load_toy_model(task="video")
    exs = make_video_examples(12, seed=toy.EVAL_SEED, start=5000)  # never scored in training
    assert {len(e.frames) for e in exs} == set(VIDEO_FRAMES)
    prompts = [processor.apply_chat_template(video_prompt_messages(e), add_generation_prompt=True, tokenize=False)
               for e in exs]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, videos=[e.frames for e in exs], video_metadata=[e.video_metadata for e in exs],
                       do_sample_frames=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = [check_answer(e, t) for e, t in zip(exs, texts)]
    assert sum(a for a, _ in scores) >= len(exs) - 1, list(zip([e.completion for e in exs], texts))
    assert sum(s for _, s in scores) >= len(exs) - 1


def test_shipped_video_estimator_points_at_the_step_object_in_its_frame_group():
    """The estimator `scripts/toy/faithfulness.py --task video` ships: streamed on held-out clips, each step's
    top region holds the pixels of the object the task says the step is about, in the step's frame group."""
    from hf_vattr import LinearEstimator, toy
    from hf_vattr.streaming.streamer import AttributionStreamer, SpanAttribution

    folder = toy.toy_estimator_path("video")
    if not (folder / "config.json").exists():
        pytest.fail("the shipped video estimator is missing: run python scripts/toy/faithfulness.py --task video")
    estimator = LinearEstimator.from_pretrained(str(folder))
    model, processor = toy.load_toy_model(task="video")
    estimator.check_compatible(model)
    assert estimator.region_method == "grid"
    k = estimator.k_policy["k"]
    hits = []
    for ex in make_video_examples(4, seed=toy.EVAL_SEED, start=6000):  # clips no run has trained or tested on
        prompt = processor.apply_chat_template(video_prompt_messages(ex), add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], videos=[ex.frames], video_metadata=[ex.video_metadata],
                           do_sample_frames=False, return_tensors="pt")
        streamer = AttributionStreamer(model, processor, inputs=inputs, estimator=estimator, videos=[ex.frames],
                                       video_metadata=[ex.video_metadata], regions="grid", grid_k=k)
        steps = [e for e in streamer.generate(**inputs, max_new_tokens=64, do_sample=False)
                 if isinstance(e, SpanAttribution) and e.section == "thinking"]
        streamer.join()
        assert [s.text.strip() for s in steps] == ex.thinking_steps and all(s.calibrated for s in steps)
        video = streamer.regions.maps[0]
        for i, span in enumerate(steps):
            item, local = streamer.regions.region_owner(int(torch.argmax(span.region_scores)))
            evidence = ex.step_evidence_masks[i]  # (groups, H, W): the object's pixels in the step's group only
            hits.append(item == 0 and any(bool((video.pixel_labels(g)[evidence[g]] == local).any())
                                          for g in range(evidence.shape[0]) if evidence[g].any()))
    assert len(hits) == 8 and all(hits), hits
