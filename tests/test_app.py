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


def write_video(path: Path, frames: int = 30, fps: int = 10, codec: str = "libvpx") -> list:
    """A red square crossing a grey background, encoded with PyAV; returns the frames as written."""
    import av
    import numpy as np

    written = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(frames):
            img = np.full((120, 160, 3), 128, np.uint8)
            x = round(i * 120 / (frames - 1))
            img[40:80, x:x + 40] = (220, 50, 40)
            written.append(img)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return written


def decoded_frames(path: Path) -> list:
    """Every frame of a video file, decoded by PyAV directly (the reference for the app's sampling)."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_read_video_samples_frames_at_two_per_second_and_caps_their_number(tmp_path: Path) -> None:
    import numpy as np

    from hf_vattr.commands.app import MAX_VIDEO_FRAMES, VIDEO_FPS, read_video

    path = tmp_path / "clip.webm"
    write_video(path, frames=30, fps=10)  # 3 s at 10 frames/s
    every = decoded_frames(path)
    frames, metadata = read_video(path)
    assert VIDEO_FPS == 2.0 and metadata == {"fps": 10.0, "total_num_frames": 30,
                                             "frames_indices": [0, 5, 10, 15, 20, 25]}  # t = 0, 0.5, ..., 2.5 s
    assert frames.dtype == np.uint8 and np.array_equal(frames, np.stack([every[i] for i in range(0, 30, 5)]))
    # capped: 3 frames over the whole video (at 0, 1 and 2 s), not the first 1.5 s
    frames, metadata = read_video(path, max_frames=3)
    assert metadata["frames_indices"] == [0, 10, 20] and len(frames) == 3 <= MAX_VIDEO_FRAMES
    # a large frame is shrunk to the longer side's limit, keeping its shape
    frames, _ = read_video(path, max_side=80)
    assert frames.shape[1:] == (60, 80, 3)


def test_a_video_that_cannot_be_decoded_is_refused_with_its_name(toy, tmp_path: Path) -> None:
    model, processor, estimator, example = toy
    app = LiveApp(model, processor, estimator, regions="vlm")
    garbage = tmp_path / "holiday.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 100)
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    for path in (garbage, empty):
        with pytest.raises(InputError, match=f"Could not read the video {path.name}"):
            app.check_inputs(None, "Where?", video=str(path))
    with pytest.raises(InputError, match="No image or video"):
        app.check_inputs(None, "Where?", video="")


def test_stream_a_video_with_its_timeline(toy, tmp_path: Path) -> None:
    import re

    from hf_vattr.commands.app import Frame, _Live, _timeline_html

    model, processor, estimator, example = toy
    path = tmp_path / "clip.webm"
    write_video(path, frames=30, fps=10)
    clock = SimulatedClock()
    app = LiveApp(model, processor, estimator, regions="grid", clock=clock, sleep=clock.sleep)
    request = app.check_inputs(None, "Where does the red object go?", max_new_tokens=24, video=str(path))
    assert request.image is None and request.video.shape == (6, 120, 160, 3)
    live = _Live()
    frames = list(app.stream(request, live))
    final, trace = frames[-1], live.trace
    assert final.done and final.steps and trace.regions.maps[0].image.num_frame_groups == 3
    for frame in [f for f in frames if f.overlay is not None]:
        assert [(g.group, g.start, g.end) for g in frame.timeline] == [(0, 0.0, 1.0), (1, 1.0, 2.0), (2, 2.0, 3.0)]
        assert all(re.match(r"\d+\.\d-\d+\.\d s, ", words) for _, words, _ in frame.top)  # top regions say when
    # the last step's bars: per frame group, the positive scores of the grid cells in that group's tokens
    scores = trace.spans[-1].region_scores.clamp(min=0)
    item = trace.regions.maps[0].image
    group_of_region = {int(r): t // item.tokens_per_group for t, r in enumerate(trace.regions.maps[0].assignment)}
    expected = [float(sum(scores[r] for r, g in group_of_region.items() if g == group)) for group in range(3)]
    assert [g.score for g in final.timeline] == pytest.approx(expected, rel=1e-5)
    html = _timeline_html(final)
    assert html.count("class='vattr-bar'") == 3 and "0.0-1.0 s" in html and "2.0-3.0 s" in html
    heights = [float(h) for h in re.findall(r"height:([0-9.]+)%", html)]
    assert heights == pytest.approx([100 * v / max(expected) for v in expected], abs=0.06)
    # an image-only run has no timeline
    assert _timeline_html(Frame(text="", steps=[], tokens=0)) == ""
