"""The pipeline on video prompts: ablation ground truth, collection, training and evaluation.

References are independent of the code under test: the knocked-out positions are read off ``input_ids``
(the video's placeholder tokens, group by group), the pixel rows of a region are found by painting its
boxes into the raw frames and diffing the processor's ``pixel_values_videos``, and the attention
knock-out is checked against the eager model with a hand-written ablating attention.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_vattr.layouts import extend_inputs, visual_layout
from hf_vattr.pipeline.ablation import AblationEngine, leave_one_out_masks, pixel_patch_rows, random_subset_masks
from hf_vattr.regions import build_regions, prompt_regions
from hf_vattr.testing import example_video, example_video_inputs, video_metadata

from test_ablation import TOLERANCE, _reference, _span_sums

VIDEO_FAMILIES = ["qwen3_vl", "qwen2_5_vl", "glm4v"]
_EXAMPLES: dict = {}


def _layout(model, inputs, videos):
    return visual_layout(model, inputs["input_ids"], inputs.get("image_grid_thw"), None,
                         video_grid_thw=inputs["video_grid_thw"], videos=videos,
                         video_metadata=[video_metadata(v) for v in videos],
                         second_per_grid_ts=inputs.get("second_per_grid_ts"))


def _no_visual_tokens(model) -> list[int]:
    """Token ids a tiny random model must not generate: a generated placeholder would be read as a visual token."""
    return [int(getattr(model.config, name)) for name in ("image_token_id", "video_token_id")
            if getattr(model.config, name, None) is not None]


def _video_example(get_tiny, family: str):
    """(model, inputs, videos, sequence, regions, spans): one 6-frame clip (3 groups), Ward regions across groups."""
    if family not in _EXAMPLES:
        model, proc = get_tiny(family)
        videos = [example_video(6, 64, 96, seed=2)]
        inputs = example_video_inputs(proc, videos)
        layout = _layout(model, inputs, videos)
        features = torch.randn(layout.images[0].num_tokens, 4, generator=torch.Generator().manual_seed(0))
        regions = build_regions(layout, "features", k=4, features=[features])
        with torch.no_grad():
            sequence = model.generate(**inputs, max_new_tokens=9, do_sample=False,
                                      suppress_tokens=_no_visual_tokens(model))
        g = sequence.shape[1] - inputs["input_ids"].shape[1]
        _EXAMPLES[family] = (model, inputs, videos, sequence, regions, [(0, 3), (3, g), (1, 6)])
    return _EXAMPLES[family]


def _video_token_positions(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The video's placeholder positions read off ``input_ids`` (a video-only prompt: GLM writes its video
    with the image token), in prompt order, which is the tower's order."""
    token = model.config.image_token_id if model.config.model_type.startswith("glm") else model.config.video_token_id
    return (input_ids[0] == token).nonzero().flatten()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_regions_span_frame_groups(family, get_tiny):
    """The fixture is what the other tests need: some region covers tokens of more than one frame group."""
    _, _, _, _, regions, _ = _video_example(get_tiny, family)
    item = regions.layout.images[0]
    groups = [{item.token_frame_group(int(k)) for k in mask.nonzero().flatten()} for mask in regions.token_masks()]
    assert item.num_frame_groups == 3 and max(len(g) for g in groups) > 1


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_knocked_out_positions_are_the_regions_video_tokens(family, get_tiny):
    model, inputs, _, sequence, regions, _ = _video_example(get_tiny, family)
    engine = AblationEngine(model, inputs, sequence, regions)
    placeholders = _video_token_positions(model, inputs["input_ids"])
    masks = torch.cat([leave_one_out_masks(regions.num_regions), random_subset_masks(regions.num_regions, 3)])
    ablated = engine.key_ablation(masks).cpu()
    token_masks = regions.token_masks()
    for m, mask in enumerate(masks):
        expected = placeholders[token_masks[mask].any(0)]
        assert ablated[m].nonzero().flatten().tolist() == expected.tolist()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_attention_ablation_matches_reference(family, monkeypatch, get_tiny):
    model, inputs, _, sequence, regions, spans = _video_example(get_tiny, family)
    masks = torch.cat([torch.zeros(1, regions.num_regions, dtype=torch.bool), leave_one_out_masks(regions.num_regions),
                       random_subset_masks(regions.num_regions, 2, generator=torch.Generator().manual_seed(3))])
    engine = AblationEngine(model, inputs, sequence, regions)
    got = engine.span_logprobs(spans, masks, batch_size=3)
    expected = _reference(get_tiny, family, inputs, sequence, regions, spans, masks, monkeypatch)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert (got[masks.any(1)] - got[0]).abs().amax(1).min() > 1e-5  # every ablation moves something
    for reuse in ("prompt", "none"):
        torch.testing.assert_close(engine.span_logprobs(spans, masks, reuse_prefix=reuse), got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,video_first", [("qwen3_vl", True), ("qwen2_5_vl", False)])
def test_ablation_of_a_prompt_with_an_image_and_a_video(family, video_first, monkeypatch, get_tiny):
    """Each kind's embeddings skip that kind's tokens before the restart point: knock-out and pixel ablation
    of regions in either item, restarting inside the second item, match full forwards."""
    from hf_vattr.testing import example_image

    model, proc = get_tiny(family)
    videos, images = [example_video(4, 64, 96, seed=6)], [example_image(64, 96, seed=7)]
    inputs = example_video_inputs(proc, videos, images=images, video_first=video_first)
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], images,
                           video_grid_thw=inputs["video_grid_thw"], videos=videos,
                           video_metadata=[video_metadata(v) for v in videos])
    assert [item.kind for item in layout.images] == (["video", "image"] if video_first else ["image", "video"])
    regions = prompt_regions(layout, k=2)
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=_no_visual_tokens(model))
    spans = [(0, 3), (2, 6)]
    k = regions.num_regions
    masks = torch.cat([torch.zeros(1, k, dtype=torch.bool), leave_one_out_masks(k),
                       random_subset_masks(k, 2, generator=torch.Generator().manual_seed(8))])
    engine = AblationEngine(model, inputs, sequence, regions)
    expected = _reference(get_tiny, family, inputs, sequence, regions, spans, masks, monkeypatch)
    torch.testing.assert_close(engine.span_logprobs(spans, masks, batch_size=2), expected, atol=TOLERANCE, rtol=0)
    pixel = engine.span_logprobs(spans, masks[-1:].logical_or(torch.ones(1, k, dtype=torch.bool)), method="pixel")
    filled = {}
    for name in ("pixel_values", "pixel_values_videos"):
        pv = inputs[name]
        means = pv.reshape(pv.shape[0], 3, -1).mean(dim=(0, 2))
        filled[name] = means[None, :, None].expand(pv.shape[0], 3, pv.shape[1] // 3).reshape(pv.shape)
    with torch.no_grad():
        logits = model(**dict(extend_inputs(inputs, sequence), **filled), use_cache=False).logits[0]
    torch.testing.assert_close(pixel[0], _span_sums(logits, sequence, inputs["input_ids"].shape[1], spans),
                               atol=TOLERANCE, rtol=0)


def _unpadded_frames(get_tiny, family: str, groups: int, rows: int, cols: int) -> tuple[int, list[np.ndarray]]:
    """Black frames the processor takes as they are (sides multiples of one token, no resize)."""
    model, _ = get_tiny(family)
    vision = model.config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return unit, [np.zeros((rows * unit, cols * unit, 3), dtype=np.uint8) for _ in range(2 * groups)]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_pixel_patch_rows_of_a_video_against_painted_frames(family, get_tiny):
    """Paint a region's boxes in the frames of its frame groups: exactly its tokens' rows of
    ``pixel_values_videos`` change, in every family's video processor."""
    model, proc = get_tiny(family)
    groups, rows, cols = 3, 2, 3
    unit, frames = _unpadded_frames(get_tiny, family, groups, rows, cols)
    plain = example_video_inputs(proc, [frames])
    merge = model.config.vision_config.spatial_merge_size
    assert plain["video_grid_thw"].tolist() == [[groups, rows * merge, cols * merge]]
    layout = _layout(model, plain, [frames])
    token_rows = pixel_patch_rows(layout.videos, plain["video_grid_thw"], merge)[0]  # (tokens, merge**2)
    generator = torch.Generator().manual_seed(1)
    for tokens in ([0], [rows * cols + 4], [1, rows * cols + 1, 2 * rows * cols + 5], list(range(rows * cols * groups))):
        painted = [f.copy() for f in frames]
        for k in tokens:
            group, (r, c) = k // (rows * cols), divmod(k % (rows * cols), cols)
            colour = torch.randint(1, 256, (3,), generator=generator).numpy().astype(np.uint8)
            for f in (2 * group, 2 * group + 1):
                painted[f][r * unit:(r + 1) * unit, c * unit:(c + 1) * unit] = colour
        changed = (example_video_inputs(proc, [painted])["pixel_values_videos"] != plain["pixel_values_videos"]).any(-1)
        assert changed.nonzero().flatten().tolist() == sorted(token_rows[tokens].flatten().tolist())


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_pixel_ablation(family, get_tiny):
    """Pixel ablation of a video's region equals a plain forward whose region rows (found by painting its
    boxes into the frames) hold the video's per-channel mean."""
    model, proc = get_tiny(family)
    groups, rows, cols = 2, 2, 3
    _, frames = _unpadded_frames(get_tiny, family, groups, rows, cols)
    frames = [np.asarray(f) for f in example_video(2 * groups, frames[0].shape[0], frames[0].shape[1], seed=4)]
    inputs = example_video_inputs(proc, [frames])
    layout = _layout(model, inputs, [frames])
    features = torch.randn(layout.videos[0].num_tokens, 4, generator=torch.Generator().manual_seed(5))
    regions = build_regions(layout, "features", k=3, features=[features])
    with torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=_no_visual_tokens(model))
    spans = [(0, 2), (2, 6)]
    masks = torch.cat([torch.zeros(1, 3, dtype=torch.bool), leave_one_out_masks(3), torch.ones(1, 3, dtype=torch.bool)])
    engine = AblationEngine(model, inputs, sequence, regions)
    got = engine.span_logprobs(spans, masks, method="pixel", batch_size=2)
    blur = engine.span_logprobs(spans, masks, method="pixel", pixel_fill="blur", batch_size=5)
    assert torch.equal(got[0], engine.base_logprobs(spans)) and torch.equal(blur[0], got[0])
    assert ((got[1:] - got[0]).abs().amax(1) > 1e-5).all() and (blur[1:] - got[1:]).abs().max() > 1e-5
    pv = inputs["pixel_values_videos"]
    mean = pv.reshape(pv.shape[0], 3, -1).mean(dim=(0, 2))
    unit = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    token_masks = regions.token_masks()
    for m, mask in enumerate(masks[1:], start=1):
        painted = [f.copy() for f in frames]
        for k in token_masks[mask].any(0).nonzero().flatten().tolist():
            group, (r, c) = k // (rows * cols), divmod(k % (rows * cols), cols)
            for f in (2 * group, 2 * group + 1):
                painted[f][r * unit:(r + 1) * unit, c * unit:(c + 1) * unit] = 255 - painted[f][r * unit:(r + 1) * unit, c * unit:(c + 1) * unit]
        region_rows = (example_video_inputs(proc, [painted])["pixel_values_videos"] != pv).any(-1)
        filled = pv.clone().reshape(pv.shape[0], 3, -1)
        filled[region_rows] = mean[None, :, None].expand(int(region_rows.sum()), -1, filled.shape[-1])
        full = dict(extend_inputs(inputs, sequence), pixel_values_videos=filled.reshape(pv.shape))
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits[0]
        expected = _span_sums(logits, sequence, inputs["input_ids"].shape[1], spans)
        torch.testing.assert_close(got[m], expected, atol=TOLERANCE, rtol=0)


# ----------------------------------------------------------------------------- collection, training, evaluation


def _write_mp4(path, frames: list[np.ndarray], fps: int) -> None:
    """An MPEG-4 file of ``frames`` (PyAV, the decoder transformers' load_video uses)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames[0].shape[0], frames[0].shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _video_prompts(tmp_path) -> Path:
    """Three short clips: an mp4 sampled at 2 fps (8 frames at 4 fps -> 4 frames), and two frame lists."""
    clips = [[np.asarray(f) for f in example_video(n, 64, 96, seed=seed)] for n, seed in ((8, 0), (4, 1), (6, 2))]
    _write_mp4(tmp_path / "clip0.mp4", clips[0], fps=4)
    rows = [{"id": 0, "video": "clip0.mp4", "fps": 2, "prompt": "Where does the square go?"}]
    for eid, clip in ((1, clips[1]), (2, clips[2])):
        names = []
        for f, frame in enumerate(clip):
            names.append(f"clip{eid}_{f}.png")
            Image.fromarray(frame).save(tmp_path / names[-1])
        rows.append({"id": eid, "video": names, "fps": 1, "prompt": "What moves in the video?"})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_collect_train_evaluate_on_video_prompts(family, tmp_path, get_tiny):
    from hf_vattr.estimator import LinearEstimator
    from hf_vattr.pipeline.baselines import (EstimatorMethod, GradientXInput, IntegratedGradients, LeaveOneOut,
                                             RawAttention, RandomScores)
    from hf_vattr.pipeline.collection import CollectionConfig, _build_inputs, collect, load_collection
    from hf_vattr.pipeline.datasets import DatasetSpec
    from hf_vattr.pipeline.evaluation import evaluate
    from hf_vattr.pipeline.training import TrainingConfig, fit_estimator

    model, processor = get_tiny(family)
    spec = DatasetSpec("jsonl", path=str(_video_prompts(tmp_path)))
    config = CollectionConfig(num_subsets=6, max_new_tokens=10, k=2,
                              generate_kwargs={"suppress_tokens": _no_visual_tokens(model)})
    out = tmp_path / "gt"
    collect(model, processor, spec.items(), out, config, dataset=spec.to_dict(), progress=False)
    records = load_collection(out)
    assert [r.example_id for r in records] == [0, 1, 2] and all(r.num_spans for r in records)
    # what the records say about each clip: the frames the model saw, and their times
    videos = [r.extra["videos"][0] for r in records]
    assert [v["num_frames"] for v in videos] == [4, 4, 6]
    assert videos[0]["frames_indices"] == [0, 2, 4, 6] and videos[0]["fps"] == 4.0 and videos[1]["fps"] == 1.0
    for record, frames in zip(records, (4, 4, 6)):
        item = record.prompt_regions().layout.images[0]
        assert item.is_video and item.num_frame_groups == frames // 2
        assert record.num_regions == 2 * item.num_frame_groups  # grid: k cells per frame group
    # the stored ground truth is what the engine measures on the rebuilt prompt
    images, prompt = spec.get(1)
    inputs = _build_inputs(processor, images, prompt)
    assert torch.equal(inputs["input_ids"][0], records[1].sequence[: records[1].prompt_len])

    L, H = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    estimator, report = fit_estimator(records, config=TrainingConfig(epochs=20, val_fraction=0.0))
    assert estimator.weight.shape == (L, H) and torch.isfinite(estimator.weight).all()

    def inputs_fn(record):
        images, prompt = spec.get(record.example_id)
        return _build_inputs(processor, images, prompt)

    methods = [EstimatorMethod(estimator), RawAttention(), LeaveOneOut(), GradientXInput(),
               IntegratedGradients(steps=3), RandomScores()]
    result = evaluate(methods, records, model, processor, inputs_fn=inputs_fn, ks=(1, 2), progress=False,
                      auc_points=2)
    assert "measured" in result.info["topk_source"]
    assert result.rows["leave_one_out"]["r2"] == pytest.approx(1.0, abs=1e-4)  # LOO re-measured on the rebuilt prompt
    for name, row in result.rows.items():
        for metric in ("lds", "top1_drop", "top2_drop", "deletion_auc", "insertion_auc", "r2", "pearson"):
            assert row.get(metric) is not None and np.isfinite(row[metric]), (name, metric, row.get(metric))


# ----------------------------------------------------------------------------- bad input


def _frames_on_disk(tmp_path, sizes) -> list[str]:
    names = []
    for f, (h, w) in enumerate(sizes):
        names.append(f"f{f}.png")
        Image.fromarray(np.full((h, w, 3), 40 * f, dtype=np.uint8)).save(tmp_path / names[-1])
    return names


@pytest.mark.parametrize("case,words", [
    ("missing file", ["prompts.jsonl:1:", "nope.mp4", "not found"]),
    ("corrupt file", ["prompts.jsonl:1:", "broken.mp4", "cannot be read"]),
    ("one frame", ["prompts.jsonl:1:", "1 frame(s)", "at least 2"]),
    ("frames of two sizes", ["prompts.jsonl:1:", "different sizes"]),
    ("missing frame", ["prompts.jsonl:1:", "gone.png", "not found"]),
    ("bad fps", ["prompts.jsonl:1:", "'fps'", "positive"]),
    ("fps without video", ["prompts.jsonl:1:", "'fps' goes with 'video'"]),
    ("video of a number", ["prompts.jsonl:1:", "'video' must be"]),
])
def test_collect_refuses_a_bad_video_row_before_the_model_loads(tmp_path, capsys, case, words, monkeypatch):
    import hf_vattr.commands.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(cli, "_load_model", refuse)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "pic.png")
    row = {"missing file": lambda: {"video": "nope.mp4"},
           "corrupt file": lambda: {"video": "broken.mp4"},
           "one frame": lambda: {"video": _frames_on_disk(tmp_path, [(64, 64)])},
           "frames of two sizes": lambda: {"video": _frames_on_disk(tmp_path, [(64, 64), (64, 96)])},
           "missing frame": lambda: {"video": _frames_on_disk(tmp_path, [(64, 64)] * 2) + ["gone.png"]},
           "bad fps": lambda: {"video": _frames_on_disk(tmp_path, [(64, 64)] * 2), "fps": -1},
           "fps without video": lambda: {"image": "pic.png", "fps": 2},
           "video of a number": lambda: {"video": 3}}[case]()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(dict(row, prompt="What happens?")) + "\n")
    out = tmp_path / "out"
    assert cli.main(["collect", "--model", "unused", "--prompts", str(prompts), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hf-vattr collect: error:") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_collect_says_which_video_the_processor_refused(tmp_path, tiny_model_dir, capsys):
    """Frames the processor cannot resize (a 300:1 strip) pass the row checks; its refusal is one line naming
    the video, and no example is written."""
    from hf_vattr.commands.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"video": _frames_on_disk(tmp_path, [(2, 600)] * 2), "prompt": "What?"}) + "\n")
    out = tmp_path / "out"
    assert main(["collect", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
                 "--quiet", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err  # the weights' loading bar, then the error
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("hf-vattr collect: error: the processor cannot take the video")
    assert "f0.png" in last and "aspect ratio" in last, err
    assert not list((out / "examples").glob("*.safetensors"))


def test_a_datasets_video_column_of_files_and_frame_lists(tmp_path, get_tiny):
    """``--dataset`` with a video column: a row's cell is a video file or a list of frame files; both collect,
    and the prompts rebuild from the spec as collected."""
    from hf_vattr.pipeline.collection import CollectionConfig, _build_inputs, collect, load_collection
    from hf_vattr.pipeline.datasets import DatasetError, hf_dataset_spec

    folder = tmp_path / "data"
    folder.mkdir()
    clip = [np.asarray(f) for f in example_video(4, 64, 96, seed=5)]
    _write_mp4(folder / "clip.mp4", clip, fps=2)
    frames = _frames_on_disk(folder, [(64, 96)] * 4)
    rows = [{"clip": "clip.mp4", "question": "What moves?"}, {"clip": frames, "question": "What changes?"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="--video-column nope"):
        hf_dataset_spec(str(folder), "train", None, "question", video_column="nope")
    spec = hf_dataset_spec(str(folder), "train", None, "question", video_column="clip", fps=2.0)
    model, processor = get_tiny("qwen3_vl")
    config = CollectionConfig(num_subsets=2, max_new_tokens=4, k=2,
                              generate_kwargs={"suppress_tokens": _no_visual_tokens(model)})
    collect(model, processor, spec.items(), tmp_path / "gt", config, dataset=spec.to_dict(), progress=False)
    records = load_collection(tmp_path / "gt")
    assert [r.extra["videos"][0]["num_frames"] for r in records] == [4, 4]
    assert records[0].extra["videos"][0]["source"].endswith("clip.mp4")
    for record in records:
        images, prompt = spec.get(record.example_id)
        ids = _build_inputs(processor, images, prompt)["input_ids"][0]
        assert torch.equal(ids, record.sequence[: record.prompt_len])
        assert (ids == model.config.video_token_id).sum() == record.prompt_regions().layout.images[0].num_tokens
