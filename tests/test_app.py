"""hf_vattr.commands.app without a browser: nothing loaded at import, bad input refused, the loop throttled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hf_vattr.commands.app import REGION_METHODS, InputError, LiveApp


def test_import_loads_neither_gradio_nor_a_model() -> None:
    code = ("import sys, hf_vattr, hf_vattr.commands.app; "
            "bad = [m for m in ('gradio', 'transformers', 'torch') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def toy():
    from hf_vattr.commands.demo import HELD_OUT_SEED
    from hf_vattr.toy import toy_estimator_path
    from hf_vattr.estimator import LinearEstimator
    from hf_vattr.toy import load_toy_model, make_examples

    model, processor = load_toy_model()
    estimator = LinearEstimator.from_pretrained(str(toy_estimator_path()))
    return model, processor, estimator, make_examples(1, seed=HELD_OUT_SEED)[0]


def test_bad_input_is_refused_before_any_work(toy, tmp_path: Path) -> None:
    from hf_vattr.estimator import LinearEstimator

    model, processor, estimator, example = toy
    app = LiveApp(model, processor, estimator, regions="vlm")
    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    other = tmp_path / "other"
    LinearEstimator(28, 16, model_type="qwen2_5_vl").save_pretrained(other)
    cases = {
        "No image": dict(image=None, question="q"),
        "Could not read the image photo.png": dict(image=str(corrupt), question="q"),
        "No question": dict(image=example.image, question="  "),
        "Unknown region method 'superpixels'": dict(image=example.image, question="q", regions="superpixels"),
        "trained for another model": dict(image=example.image, question="q", estimator_ref=str(other)),
        "Could not load the estimator": dict(image=example.image, question="q", estimator_ref=str(tmp_path / "none")),
    }
    for expected, kwargs in cases.items():
        with pytest.raises(InputError, match=expected):
            app.check_inputs(**kwargs)
    ok = app.check_inputs(example.image, example.question)  # still usable, defaults kept
    assert ok.estimator is estimator and ok.regions == "vlm" and ok.regions in REGION_METHODS


class SimulatedClock:
    """Time that moves only when the app reads it (a fixed step per read) or sleeps: the throttle's decisions
    can be checked without depending on how fast this machine is."""

    def __init__(self, step: float = 0.01) -> None:
        self.now, self.step, self.slept = 0.0, step, []

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_stream_is_throttled_and_ends_with_generate_text(toy) -> None:
    model, processor, estimator, example = toy
    inputs = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": example.image},
                                      {"type": "text", "text": example.question}]}],
        add_generation_prompt=True, tokenize=False)], images=[example.image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=96, do_sample=False)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    rate, clock = 5.0, SimulatedClock()
    app = LiveApp(model, processor, estimator, regions="vlm", updates_per_second=rate, clock=clock, sleep=clock.sleep)
    frames = list(app.stream(app.check_inputs(example.image, example.question, max_new_tokens=96)))
    assert frames[-1].done and frames[-1].text == expected
    step_frames = [f for f in frames if f.steps_changed and not f.done]
    assert [len(f.steps) for f in step_frames] == list(range(1, len(frames[-1].steps) + 1))  # one frame per step
    shown = [f for f in frames if not f.done]
    # each step is seen before the next: the list only grows, and the text only extends
    assert [len(f.steps) for f in shown] == sorted(len(f.steps) for f in shown)
    assert all(b.text.startswith(a.text) and b.tokens >= a.tokens for a, b in zip(shown, shown[1:]))
    # never more than `rate` pictures a (simulated) second: the loop waits out a step frame's share of a second
    gaps = [b.elapsed - a.elapsed for a, b in zip(shown, shown[1:])]
    assert all(g >= 1 / rate - 1e-9 for g in gaps), gaps
    assert clock.slept and all(0 < s <= 1 / rate for s in clock.slept)
    assert len(frames) < frames[-1].tokens  # tokens were coalesced, not one frame each
    assert all(f.overlay is not None for f in shown)  # nothing pinned: every frame shows a picture
    assert [s.evidence for s in frames[-1].steps][-1] == "inherited"  # the answer span, scored through the steps
