"""Collection: file format and shapes, stored effects = recomputed effects, features = what the
streamer sees during generation, resume = uninterrupted run (byte for byte), and 2 processes under
``accelerate launch`` = 1 process."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_vattr.pipeline.ablation import leave_one_out_masks, span_effects
from hf_vattr.capture.attention import AttentionCapture
from hf_vattr.pipeline.collection import (
    CollectionConfig,
    ExampleRecord,
    collect,
    collect_example,
    dataset_fingerprint,
    example_path,
    load_collection,
    read_manifest,
    read_prompts,
)
from hf_vattr.layouts import text_dims, visual_layout
from hf_vattr.regions import prompt_regions
from hf_vattr.reasoning.spans import ClosedSpan, SpanSplitter
from hf_vattr.testing import example_image

FAMILY = "qwen2_5_vl"
HERE = Path(__file__).resolve().parent


class EveryN(SpanSplitter):
    """Fixed-length spans, so random tiny models still produce several spans per trace."""

    def __init__(self, n: int = 4) -> None:
        self.n = n
        self.reset("")

    def reset(self, prompt_text: str) -> None:
        self._start, self._text, self._next = 0, "", 0

    def push(self, index, piece):
        self._text += piece
        self._next = index + 1
        if self._next - self._start == self.n:
            return self._close()
        return []

    def _close(self):
        out = [ClosedSpan(self._start, self._next, self._text, "thinking")] if self._next > self._start else []
        self._start, self._text = self._next, ""
        return out

    def flush(self):
        return self._close()


def dataset(n: int = 4):
    return [(10 + i, [example_image(seed=i)], f"Where is shape {i}? Think step by step.") for i in range(n)]


def config(**kw) -> CollectionConfig:
    base = dict(num_subsets=6, max_new_tokens=10, k=4, batch_size=5, seed=7)
    base.update(kw)
    return CollectionConfig(**base)


def test_tags_collection_decodes_with_come_from_the_splitter_or_its_defaults():
    from hf_vattr.reasoning.formats import DEFAULT_FORMAT, GLM4V_THINKING
    from hf_vattr.reasoning.spans import ReasoningStepSplitter, tag_texts, think_tags

    assert think_tags(EveryN()) == ("<think>", "</think>")  # a splitter that names no tags
    assert tag_texts(EveryN(), GLM4V_THINKING) == ("<think>", "</think>", "<answer>", "</answer>",
                                                   "<|begin_of_box|>", "<|end_of_box|>")
    assert tag_texts(EveryN()) == ("<think>", "</think>")
    own = ReasoningStepSplitter(think_open="<reason>", think_close="</reason>")
    assert think_tags(own) == ("<reason>", "</reason>")
    assert tag_texts(own, DEFAULT_FORMAT) == ("<reason>", "</reason>")  # the splitter's format wins over the fallback


@pytest.mark.slow
def test_collect_writes_documented_files(tmp_path, get_tiny):
    model, proc = get_tiny(FAMILY)
    result = collect(model, proc, dataset(3), tmp_path, config(), splitter_factory=EveryN, progress=False)
    assert result == {"written": [10, 11, 12], "skipped": []}
    num_layers, num_heads = text_dims(model)
    manifest = read_manifest(tmp_path)
    assert manifest["examples"] == [10, 11, 12] and manifest["complete"]
    assert (manifest["num_layers"], manifest["num_heads"]) == (num_layers, num_heads)
    assert manifest["config"]["num_subsets"] == 6 and manifest["model"]["model_type"] == FAMILY
    records = load_collection(tmp_path)
    assert [r.example_id for r in records] == [10, 11, 12]
    for rec in records:
        assert example_path(tmp_path, rec.example_id).name == f"{rec.example_id:06d}.safetensors"
        s, k, m = rec.num_spans, rec.num_regions, 6
        assert s == 3  # 10 tokens in spans of 4
        assert rec.span_features.shape == (s, num_layers, num_heads, k) and rec.span_features.dtype == torch.float32
        assert rec.loo_effects.shape == (s, k)
        assert rec.subset_masks.shape == (m, k) and rec.subset_masks.dtype == torch.bool
        assert rec.subset_effects.shape == (s, m)
        assert rec.base_logprobs.shape == (s,) and (rec.base_logprobs < 0).all()
        assert rec.sequence.dtype == torch.int64 and rec.sequence.numel() == rec.prompt_len + 10
        assert [(sp["start"], sp["end"]) for sp in rec.spans] == [(0, 4), (4, 8), (8, 10)]
        assert isinstance(rec.text, str) and rec.prompt_regions().num_regions == k
        assert rec.span_features.sum(-1).min() >= 0
    # different examples get different random subsets (seeded by seed and example id)
    assert not torch.equal(records[0].subset_masks, records[1].subset_masks)


def test_stored_effects_equal_recomputed(tmp_path, get_tiny):
    model, proc = get_tiny(FAMILY)
    example_id, images, prompt = dataset(1)[0]
    cfg = config()
    rec = collect_example(model, proc, images, prompt, cfg, splitter=EveryN(), example_id=example_id)
    rec.save(tmp_path / "x.safetensors")
    rec = ExampleRecord.load(tmp_path / "x.safetensors")
    # rebuild the prompt inputs independently of the record
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=images, return_tensors="pt")
    assert torch.equal(inputs["input_ids"][0], rec.sequence[: rec.prompt_len])
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], images)
    regions = prompt_regions(layout, k=cfg.k)
    spans = [(s["start"], s["end"]) for s in rec.spans]
    loo = span_effects(model, inputs, rec.sequence[None], spans, leave_one_out_masks(regions.num_regions), regions,
                       batch_size=1, reuse_prefix="none")
    torch.testing.assert_close(rec.loo_effects, loo.T, atol=1e-5, rtol=0)
    sub = span_effects(model, inputs, rec.sequence[None], spans, rec.subset_masks, regions, batch_size=2)
    torch.testing.assert_close(rec.subset_effects, sub.T, atol=1e-5, rtol=0)
    assert rec.loo_effects.abs().max() > 1e-4  # the numbers are not trivially zero


def test_features_equal_what_generation_sees(get_tiny):
    """Stored per-token features (teacher-forced) equal the rows captured step by step inside generate."""
    from transformers.generation.streamers import BaseStreamer

    model, proc = get_tiny("qwen3_vl")
    images = [example_image(), example_image(100, 140, seed=5)]
    prompt = "Describe the shapes."
    rec = collect_example(model, proc, images, prompt, config(keep_token_features=True, num_subsets=2),
                          splitter=EveryN(), example_id=0)
    content = [{"type": "image"}] * 2 + [{"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=images, return_tensors="pt")
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], images)
    regions = prompt_regions(layout, k=4)

    class Rows(BaseStreamer):
        def __init__(self, cap):
            self.cap, self.rows, self.started = cap, [], False

        def put(self, value):
            if not self.started:  # the prompt arrives before any forward
                self.started = True
                return
            self.rows.append(self.cap.pop())

        def end(self):
            pass

    with AttentionCapture(model, layout.positions, regions.membership()) as cap:
        streamer = Rows(cap)
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=10, do_sample=False, streamer=streamer)
    assert torch.equal(seq[0], rec.sequence)
    live = torch.stack(streamer.rows)  # (G, L, H, K)
    assert rec.token_features.shape == live.shape
    torch.testing.assert_close(rec.token_features, live, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.span_features[1], live[4:8].mean(0), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("make_splitter", [None, lambda: EveryN(5)], ids=["default", "every5"])
def test_spans_match_the_streamer(make_splitter, get_tiny):
    """Collection decodes pieces and splits spans exactly as the streamer does."""
    from hf_vattr.streaming.streamer import AttributionStreamer

    model, proc = get_tiny("glm4v")
    images = [example_image()]
    prompt = "What colour is the circle? Think step by step."
    splitter = make_splitter() if make_splitter else None
    rec = collect_example(model, proc, images, prompt, config(max_new_tokens=24, num_subsets=1), splitter=splitter,
                          example_id=0)
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=images, return_tensors="pt")
    streamer = AttributionStreamer(model, proc, inputs=inputs, images=images, print_text=False, grid_k=4,
                                   splitter=make_splitter() if make_splitter else None)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=24, do_sample=False, streamer=streamer)
    list(streamer)
    got = [(s["start"], s["end"], s["text"], s["section"]) for s in rec.spans]
    want = [(*s.token_range, s.text, s.section) for s in streamer.trace.spans]
    assert got == want and len(got) >= 1
    assert rec.text == streamer.trace.text


def test_image_paths_are_opened(tmp_path, get_tiny):
    model, proc = get_tiny(FAMILY)
    example_id, images, prompt = dataset(1)[0]
    images[0].save(tmp_path / "img.png")
    a = collect_example(model, proc, images, prompt, config(num_subsets=2), splitter=EveryN(), example_id=1)
    b = collect_example(model, proc, [str(tmp_path / "img.png")], prompt, config(num_subsets=2), splitter=EveryN(),
                        example_id=1)
    assert a.metadata() == b.metadata()
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "examples").glob("*.safetensors"))}


@pytest.mark.slow
def test_resume_after_interruption_is_byte_identical(tmp_path, get_tiny):
    model, proc = get_tiny(FAMILY)
    data = dataset(4)
    full, broken = tmp_path / "full", tmp_path / "broken"
    collect(model, proc, data, full, config(), splitter_factory=EveryN, progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_two(example_id, path):
        if example_id == 11:
            raise Interrupt

    with pytest.raises(Interrupt):
        collect(model, proc, data, broken, config(), splitter_factory=EveryN, callback=stop_after_two, progress=False)
    assert sorted(_files(broken)) == ["000010.safetensors", "000011.safetensors"]
    assert not read_manifest(broken)["complete"]
    result = collect(model, proc, data, broken, config(), splitter_factory=EveryN, progress=False)
    assert result == {"written": [12, 13], "skipped": [10, 11]}
    a, b = _files(full), _files(broken)
    assert list(a) == list(b) and len(a) == 4
    for name in a:
        assert a[name] == b[name], f"{name} differs after resume"
    assert read_manifest(broken)["complete"]
    assert not list((broken / "examples").glob(".*"))  # no temporary files left behind


def test_resume_refuses_different_settings(tmp_path, get_tiny):
    model, proc = get_tiny(FAMILY)
    collect(model, proc, dataset(1), tmp_path, config(), splitter_factory=EveryN, progress=False)
    # batch size is a runtime setting: resuming with another one is allowed
    assert collect(model, proc, dataset(1), tmp_path, config(batch_size=1), progress=False)["skipped"] == [10]
    with pytest.raises(ValueError, match="num_subsets"):
        collect(model, proc, dataset(2), tmp_path, config(num_subsets=3), splitter_factory=EveryN, progress=False)


def test_files_get_the_usual_permissions(tmp_path, get_tiny):
    """Collection files are for sharing: mode 0666 minus the umask, not mkstemp's 0600."""
    model, proc = get_tiny(FAMILY)
    old = os.umask(0o022)
    try:
        collect(model, proc, dataset(1), tmp_path, config(num_subsets=2), splitter_factory=EveryN, progress=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "collection.json", example_path(tmp_path, 10)):
        assert path.stat().st_mode & 0o777 == 0o644, path


def _prompts(folder: Path, name: str, rows: list) -> Path:
    example_image(seed=0).save(folder / "img.png")
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resume_refuses_another_dataset(tmp_path, get_tiny):
    """The same settings with another prompts file (or toy seed) must not mix two datasets in one folder."""
    model, proc = get_tiny(FAMILY)
    a = _prompts(tmp_path, "a.jsonl", [{"id": 10, "image": "img.png", "prompt": "Where is the shape?"}])
    out = tmp_path / "gt"
    collect(model, proc, dataset(1), out, config(num_subsets=2), dataset={"kind": "jsonl", "path": str(a)},
            splitter_factory=EveryN, progress=False)
    assert read_manifest(out)["dataset_fingerprint"]
    moved = tmp_path / "moved"
    moved.mkdir()
    same = _prompts(moved, "a.jsonl", [{"id": 10, "image": "img.png", "prompt": "Where is the shape?"}])
    result = collect(model, proc, dataset(1), out, config(num_subsets=2), dataset={"kind": "jsonl", "path": str(same)},
                     progress=False)  # same content elsewhere: resumes
    assert result["skipped"] == [10]
    b = _prompts(tmp_path, "b.jsonl", [{"id": 10, "image": "img.png", "prompt": "What colour is it?"}])
    manifest = (out / "collection.json").read_text()
    with pytest.raises(ValueError, match="different dataset.*new folder"):
        collect(model, proc, dataset(1), out, config(num_subsets=2), dataset={"kind": "jsonl", "path": str(b)},
                progress=False)
    assert (out / "collection.json").read_text() == manifest  # nothing overwritten
    toy = {"kind": "toy", "n": 4, "seed": 0}
    assert dataset_fingerprint(toy) != dataset_fingerprint(dict(toy, seed=1))
    assert dataset_fingerprint(toy) != dataset_fingerprint(dict(toy, n=8))


def test_missing_prompts_file_leaves_nothing_behind(tmp_path, get_tiny):
    model, proc = get_tiny(FAMILY)
    out = tmp_path / "gt"
    with pytest.raises(FileNotFoundError, match="prompts file .*missing.jsonl not found"):
        collect(model, proc, dataset(1), out, config(), dataset={"kind": "jsonl", "path": str(tmp_path / "missing.jsonl")},
                progress=False)
    assert not out.exists()


@pytest.mark.parametrize("row, message", [
    ([{"image": "img.png", "prompt": "hi"}], "expected a JSON object, got a list"),
    ({"image": "img.png", "prompt": ["hi"]}, "'prompt' must be a string"),
    ({"image": 3, "prompt": "hi"}, "'image' must be a file name"),
    ({"images": ["img.png", None], "prompt": "hi"}, "'images' must be a non-empty list of file names"),
    ({"id": "seven", "image": "img.png", "prompt": "hi"}, "'id' must be a non-negative integer"),
    ({"image": "img.png", "messages": "hi"}, "'messages' must be a non-empty list of chat messages"),
    ({"image": "img.png", "prompt": "hi", "answer": {"x": 1}}, "'answer' must be a string or a number"),
])
def test_bad_prompt_rows_name_the_line_and_field(tmp_path, row, message):
    path = _prompts(tmp_path, "p.jsonl", [{"image": "img.png", "prompt": "a good first row"}, row])
    with pytest.raises(ValueError, match=rf"p\.jsonl:2: {re.escape(message)}"):
        read_prompts(path)
    good = _prompts(tmp_path, "ok.jsonl", [{"image": "img.png", "prompt": "q", "answer": 3},
                                           {"id": 5, "images": ["img.png"], "messages": [{"role": "user"}]}])
    assert [(r.example_id, r.prompt, r.answer) for r in read_prompts(good)] == [
        (0, "q", 3), (5, [{"role": "user"}], None)]


SCRIPT = """
import os
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_collection import EveryN, config, dataset
from hf_vattr.pipeline.collection import collect
from hf_vattr.testing import tiny_vlm

model, proc = tiny_vlm({family!r})
result = collect(model, proc, dataset(4), sys.argv[1], config(), splitter_factory=EveryN, progress=False)
from accelerate import PartialState
state = PartialState()
# one os.write per line: with PYTHONUNBUFFERED each print argument is its own write, and the two
# processes' pieces interleaved on the shared pipe ("RESULTRESULT 0 ..."); a small write is atomic
os.write(1, f"RESULT {{state.process_index}} {{state.num_processes}} {{sorted(result['written'])}}\\n".encode())
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, get_tiny):
    script = tmp_path / "collect_script.py"
    script.write_text(SCRIPT.format(tests=str(HERE), family=FAMILY))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(script), str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert lines == ["RESULT 0 2 [10, 12]", "RESULT 1 2 [11, 13]"], proc.stdout + proc.stderr[-2000:]

    one = tmp_path / "one"
    model, processor = get_tiny(FAMILY)
    collect(model, processor, dataset(4), one, config(), splitter_factory=EveryN, progress=False)
    assert read_manifest(two) == read_manifest(one)
    a, b = load_collection(one), load_collection(two)
    assert [r.example_id for r in a] == [r.example_id for r in b] == [10, 11, 12, 13]
    for x, y in zip(a, b):
        assert x.metadata() == y.metadata()
        for name, tensor in x.tensors().items():
            other = y.tensors()[name]
            if tensor.dtype in (torch.bool, torch.int64):
                assert torch.equal(tensor, other), name
            else:  # other thread count in the worker processes: float32 noise only
                torch.testing.assert_close(tensor, other, atol=1e-5, rtol=0, msg=name)
