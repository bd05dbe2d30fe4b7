"""``hf-vattr app``: a Gradio web app that shows, while a VLM thinks, which image regions each step relies on.

    hf-vattr app                                   # the bundled toy, offline, a toy example preloaded
    hf-vattr app --model Qwen/Qwen3-VL-2B-Thinking --estimator org/qwen3-vl-2b-vattr --regions prefill

Two layers, so that the streaming loop can be tested and benchmarked without a browser:

* :class:`LiveApp` holds the loaded model, refuses bad input before any work (:meth:`LiveApp.check_inputs`)
  and turns one :class:`~hf_vattr.streaming.streamer.AttributionStreamer` run into a throttled series of
  :class:`Frame` objects (:meth:`LiveApp.stream`): at most ``updates_per_second`` pictures per second
  while tokens arrive, and one frame per finished step.
* :meth:`LiveApp.build` lays those frames out as a Gradio ``Blocks`` page.

Every picture, word and HTML fragment comes from :mod:`hf_vattr.viz` (``step_overlay``, ``describe_location``,
``span_evidence`` and its wording, ``trajectory_plot``, the page's templates), the same code path as the demo's
report. Nothing is loaded at import time: Gradio is imported by :meth:`LiveApp.build` only
(``pip install "hf_vattr[app]"``).
"""

from __future__ import annotations

import html
import math
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..errors import AttributionError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..streaming.events import AttributionTrace, SpanAttribution
    from ..regions import PromptRegions

__all__ = ["LiveApp", "Frame", "StepItem", "AppRequest", "InputError", "REGION_METHODS", "launch", "read_video"]

#: Region methods a user may type: "prefill" (free, from the vision tower's own output) and the
#: ``build_regions`` methods that need nothing but the image and the model.
REGION_METHODS = ("prefill", "vlm", "grid", "color", "slic", "dinov3", "dinov2", "auto")
#: A due live picture waits while more than this many decoded tokens are still unread by the app's loop
#: (it is drawn anyway once a whole period late): the loop catches up first, then draws the newest state.
BEHIND_TOKENS = 2
#: Most pixels an uploaded image may have (a 4096 x 4096 photo); larger ones are refused, not resized silently.
MAX_PIXELS = 4096 * 4096
#: zlib level of the page's PNGs: level 1 takes about 4 ms for the toy's overlay instead of 8, for 1.5x the bytes.
PNG_COMPRESS_LEVEL = 1
#: An uploaded video is sampled at this many frames per second (what Qwen-VL processors sample by default)...
VIDEO_FPS = 2.0
#: ... and at most this many frames are kept (8 frame groups of 2): a longer video is sampled evenly over its whole
#: length instead, so the prompt stays a few hundred visual tokens and the filmstrip one or two rows.
MAX_VIDEO_FRAMES = 16
#: A sampled frame's longer side is shrunk to this many pixels (the processor resizes again; this bounds memory).
VIDEO_MAX_SIDE = 448


class InputError(AttributionError, ValueError):
    """Bad input refused before any work; its message is shown on the page as it is."""


@dataclass
class AppRequest:
    """Checked inputs of one run: everything :meth:`LiveApp.stream` needs, nothing left to validate.

    The prompt holds the video (when given), then the image (when given), then the question."""

    image: "Image.Image | None"
    question: str
    estimator: Any | None
    regions: str
    max_new_tokens: int
    video: Any = None  # (T, H, W, 3) uint8 frames sampled by read_video
    video_metadata: dict | None = None  # their fps, total_num_frames and frames_indices, for the processor

    def media(self) -> list[Any]:
        """What the prompt shows, in prompt order (video first): the frames array and / or the image."""
        return [m for m in (self.video, self.image) if m is not None]


def read_video(path: str | Path, *, fps: float = VIDEO_FPS, max_frames: int = MAX_VIDEO_FRAMES,
               max_side: int = VIDEO_MAX_SIDE) -> tuple[Any, dict]:
    """Decode a video file with PyAV and sample its frames: ``((T, H, W, 3) uint8 frames, video_metadata)``.

    Frames are taken at ``fps`` from the start; a video longer than ``max_frames / fps`` seconds (its length read
    from the container) is sampled at ``max_frames`` evenly spaced times over its whole length instead. Each
    frame is the first decoded at or after its time, shrunk so its longer side is at most ``max_side``. The
    metadata is what a processor takes with pre-decoded frames (``do_sample_frames=False``): the stream's fps,
    its frame count and the indices of the kept frames, so the frame groups are timed as in the file. A file
    PyAV cannot decode, or one without a video stream or frames, raises :class:`InputError`.
    """
    import numpy as np
    from PIL import Image

    try:
        import av
    except ImportError:
        raise InputError("Videos need PyAV to decode them: pip install av (or \"hf_vattr[app]\").") from None
    name = Path(str(path)).name
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"Could not read the video {name}: the file has no video stream.")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 24.0  # the processors' default
            duration = (float(stream.duration * stream.time_base) if stream.duration else
                        container.duration / av.time_base if container.duration else None)
            if duration is not None and duration * fps > max_frames:
                targets = np.arange(max_frames) * (duration / max_frames)
            else:
                count = max_frames if duration is None else max(1, min(max_frames, math.ceil(duration * fps)))
                targets = np.arange(count) / fps
            frames, indices, index = [], [], -1
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else index / rate
                if t + 0.5 / rate < targets[len(frames)]:
                    continue
                picture = frame.to_image()  # RGB
                if max(picture.size) > max_side:
                    scale = max_side / max(picture.size)
                    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                             Image.BOX)
                frames.append(np.asarray(picture.convert("RGB")))
                indices.append(index)
                while len(frames) < len(targets) and targets[len(frames)] <= t + 0.5 / rate:
                    targets = np.delete(targets, len(frames))  # a slow video: one frame stands for several times
                if len(frames) == len(targets):
                    break
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - av.FFmpegError (InvalidDataError, ...), OSError: all a bad upload
        raise InputError(f"Could not read the video {name}: it is not a video file this app can decode "
                         f"({type(err).__name__}).") from None
    if not frames:
        raise InputError(f"Could not read the video {name}: no frame could be decoded.")
    total = max(index + 1, round(duration * rate) if duration else 0)
    metadata = {"fps": rate, "total_num_frames": int(total), "frames_indices": indices}
    return np.stack(frames), metadata


@dataclass
class StepItem:
    """One finished reasoning step as the page lists it."""

    index: int
    section: str
    text: str
    evidence: str  # "grounded" | "weak" | "indirect" | "inherited" (viz.span_evidence)

    @classmethod
    def of(cls, span: "SpanAttribution", trace: Any) -> "StepItem":
        """The item of a finished span, its evidence judged against ``trace``'s steps."""
        from ..viz import span_evidence

        return cls(span.index, span.section, span.text, span_evidence(span, trace))

    @property
    def label(self) -> str:
        """The item's text on the page: number, text and, unless grounded, why its heatmap is not evidence."""
        from ..viz import evidence_wording

        head = "Answer" if self.section == "answer" else f"Step {self.index + 1}"
        return f"{head}: {self.text.strip()}{evidence_wording(self.evidence).aside}"


@dataclass
class Frame:
    """One update of the page. ``overlay`` / ``trajectory`` are ``None`` when unchanged since the last frame."""

    text: str
    steps: list[StepItem]
    tokens: int
    overlay: "Image.Image | None" = None
    overlay_kind: str = "live"  # "live" (the step being written), "step" (a finished step), "pinned"
    overlay_step: int | None = None  # span index the overlay shows (for "live": the step being written)
    overlay_title: str = ""  # the finished step's label, for the caption
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (region id, words, score)
    timeline: list = field(default_factory=list)  # the overlay's viz.GroupScore per frame group of a video
    trajectory: "Image.Image | None" = None
    concentration: list[float] = field(default_factory=list)
    steps_changed: bool = False
    done: bool = False
    elapsed: float = 0.0
    calibrated: bool = True  # False: no estimator; scores are uncalibrated raw value-norm attention


class _Live:
    """What one browser session's last run left for the step-pinning handler (its trace, images, pin)."""

    def __init__(self) -> None:
        self.trace: AttributionTrace | None = None
        self.images: list[Any] = []
        self.pinned: int | None = None
        self.lock = threading.Lock()


def step_picture(trace: "AttributionTrace", images: Sequence[Any], scores: Any, *, evidence: str = "grounded",
                 caption: str | None = None, top: int = 3) -> "Image.Image":
    """One step's (or the running step's) overlay through :func:`hf_vattr.viz.step_overlay`.

    Weak and indirect steps are drawn muted, so they are not painted as strongly as grounded ones.
    """
    from .. import viz

    return viz.step_overlay(trace.regions, images, scores, top=top, caption=caption, evidence=evidence,
                            units=viz.score_units(trace))


def top_regions(regions: "PromptRegions", scores: Any, k: int = 3) -> list[tuple[int, str, float]]:
    """The ``k`` highest-scoring regions with a positive score (viz.top_positive_regions) as
    (region id, location in words, score)."""
    import torch

    from .. import viz

    s = torch.as_tensor(scores, dtype=torch.float32)
    return [(r, viz.describe_location(regions, r), float(s[r])) for r in viz.top_positive_regions(s, k)]


class LiveApp:
    """The web app's model side: input checks, the throttled streaming loop, and the Gradio page.

    Args:
        model, processor: a loaded supported VLM and its processor.
        estimator: the default :class:`~hf_vattr.estimator.LinearEstimator` (``None``: raw attention).
        estimator_ref: how the user refers to ``estimator`` in the page's estimator field (path or Hub id).
        regions: the default region method (one of :data:`REGION_METHODS`).
        examples: ``(image, question)`` pairs offered as clickable examples; the first is preloaded.
        max_new_tokens: default generation budget.
        updates_per_second: most pictures rendered per second while tokens arrive (each finished step
            always gets its own frame); the decode loop never waits for the page.
        clock, sleep: the time the throttle reads and how it waits (tests pass a simulated clock).
    """

    def __init__(self, model: Any, processor: Any, estimator: Any | None = None, *, estimator_ref: str = "",
                 regions: str = "prefill", examples: Sequence[tuple[Any, str]] = (), max_new_tokens: int = 512,
                 updates_per_second: float = 4.0, title: str = "hf_vattr: live visual attribution",
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> None:
        if regions not in REGION_METHODS:
            raise InputError(_unknown_regions(regions))
        if estimator is not None:
            estimator.check_compatible(model)
        if updates_per_second <= 0:
            raise ValueError(f"updates_per_second must be positive, got {updates_per_second}.")
        self.model, self.processor = model, processor
        self.estimator, self.estimator_ref = estimator, estimator_ref
        self.regions = regions
        self.examples = list(examples)
        self.max_new_tokens = int(max_new_tokens)
        self.updates_per_second = float(updates_per_second)
        self.title = title
        self.clock, self.sleep = clock, sleep
        self._estimators: dict[str, Any] = {estimator_ref: estimator} if estimator_ref else {}
        self._sessions: OrderedDict[str, _Live] = OrderedDict()
        self._example_dir: tempfile.TemporaryDirectory | None = None

    # ------------------------------------------------------------------ input checks

    def _load_estimator(self, ref: str) -> Any | None:
        """The estimator the page names, loaded once per name and checked against the model."""
        from ..estimator import EstimatorMismatchError, LinearEstimator

        ref = (ref or "").strip()
        if not ref:
            return None
        if ref not in self._estimators:
            try:
                estimator = LinearEstimator.from_pretrained(ref)
            except Exception as err:  # a missing folder, an offline Hub id, a broken file: all user input
                raise InputError(f"Could not load the estimator {ref!r}: {type(err).__name__}: {err}") from None
            self._estimators[ref] = estimator
        estimator = self._estimators[ref]
        try:
            estimator.check_compatible(self.model)
        except EstimatorMismatchError as err:
            raise InputError(f"The estimator {ref!r} was trained for another model. {err}") from None
        return estimator

    def check_inputs(self, image: Any, question: str | None, estimator_ref: str | None = None,
                     regions: str | None = None, max_new_tokens: Any = None, video: Any = None) -> AppRequest:
        """Refuse bad input before anything runs: raise :class:`InputError` with a message for the page.

        ``image`` is a path (what the page uploads) or a PIL image; ``video`` a video file's path (decoded and
        sampled by :func:`read_video`); one of them, or both, must be given. ``estimator_ref`` is a folder or Hub
        id (``None``: the default estimator; ``""``: none, raw attention).
        """
        if _missing(image) and _missing(video):
            raise InputError("No image or video: pick an example, or upload an image or a video first.")
        pil = None if _missing(image) else _read_image(image)
        question = (question or "").strip()
        if not question:
            raise InputError("No question: type what the model should answer about the image or video.")
        method = (regions or self.regions).strip()
        if method not in REGION_METHODS:
            raise InputError(_unknown_regions(method))
        estimator = self.estimator if estimator_ref is None else self._load_estimator(estimator_ref)
        try:
            budget = int(max_new_tokens) if max_new_tokens not in (None, "") else self.max_new_tokens
        except (TypeError, ValueError):
            raise InputError(f"Max new tokens must be a whole number, got {max_new_tokens!r}.") from None
        if not 1 <= budget <= 32768:
            raise InputError(f"Max new tokens must be between 1 and 32768, got {budget}.")
        frames, metadata = (None, None) if _missing(video) else self._read_video(video)
        return AppRequest(image=pil, question=question, estimator=estimator, regions=method, max_new_tokens=budget,
                          video=frames, video_metadata=metadata)

    def _read_video(self, video: Any) -> tuple[Any, dict]:
        """The video's sampled frames and metadata, once the model is known to take videos in its prompts."""
        token = getattr(self.processor, "video_token", None)
        if token is None or token not in self._prompt({"type": "video"}, "?"):
            raise InputError("This model's processor or chat template takes no videos; upload an image instead.")
        return read_video(video)

    # ------------------------------------------------------------------ the streaming loop

    def _prompt(self, *parts: Any) -> str:
        """The chat prompt of one user turn with ``parts`` (content dicts; a string is the question)."""
        content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _inputs(self, request: AppRequest) -> Any:
        if request.video is None:
            prompt = self._prompt({"type": "image", "image": request.image}, request.question)
            inputs = self.processor(text=[prompt], images=[request.image], return_tensors="pt")
            return inputs.to(self.model.device)
        image = [] if request.image is None else [{"type": "image", "image": request.image}]
        prompt = self._prompt({"type": "video"}, *image, request.question)
        inputs = self.processor(text=[prompt], images=None if request.image is None else [request.image],
                                videos=[request.video], video_metadata=[request.video_metadata],
                                do_sample_frames=False, return_tensors="pt")
        return inputs.to(self.model.device)

    def _regions(self, request: AppRequest, inputs: Any) -> Any:
        """The streamer's ``regions=``: "prefill" as is; a method the estimator was trained with gets its K."""
        if request.regions == "prefill":
            return "prefill"
        from ..layouts import visual_layout
        from ..regions import build_regions

        est = request.estimator
        k = None
        if est is not None and request.regions == (getattr(est, "region_method", None) or ""):
            k = (getattr(est, "k_policy", None) or {}).get("k")
        if request.regions == "grid" and k is None:
            k = 16
        if request.video is None:
            layout = visual_layout(self.model, inputs["input_ids"], inputs["image_grid_thw"], [request.image])
            return build_regions(layout, method=request.regions, k=k, images=[request.image], model=self.model,
                                 inputs=inputs)
        images = None if request.image is None else [request.image]
        layout = visual_layout(self.model, inputs["input_ids"], inputs.get("image_grid_thw"), images,
                               video_grid_thw=inputs["video_grid_thw"], videos=[request.video],
                               video_metadata=[request.video_metadata])
        return build_regions(layout, method=request.regions, k=k, images=request.media(), model=self.model,
                             inputs=inputs)

    def stream(self, request: AppRequest, live: _Live | None = None, **generate_kwargs: Any) -> Iterator[Frame]:
        """Run ``generate`` with an :class:`AttributionStreamer` and yield page frames, throttled.

        While tokens arrive, a picture of the step being written (the mean of its tokens' scores so far)
        is rendered at most ``updates_per_second`` times a second (the first at the first token), and only
        once this loop has caught up with decoding (a due picture waits while more than
        :data:`BEHIND_TOKENS` decoded tokens are unread, unless it is a whole period late); every finished
        step gets its own frame, shown for at least ``1 / updates_per_second`` s (its trajectory plot is
        skipped while later steps already wait; the last frame always has it). Per token this loop only
        appends the token's text and scores and reads the clock. Region maps known before decoding
        (every method but "prefill") have their pictures' fixed parts prepared before ``generate`` starts
        (:meth:`hf_vattr.viz.OverlayRenderer.prepare`). Generation runs in the streamer's own thread and
        never waits for this loop. Failures raise :class:`~hf_vattr.streaming.streamer.GenerationError`.
        """
        from .. import viz
        from ..streaming.streamer import AttributionStreamer, SpanAttribution, TokenAttribution

        live = live or _Live()
        start = self.clock()
        inputs = self._inputs(request)
        images = request.media()  # per visual item, in prompt order: the video's frames, the image
        regions = self._regions(request, inputs)
        video = {} if request.video is None else dict(videos=[request.video], video_metadata=[request.video_metadata])
        streamer = AttributionStreamer(self.model, self.processor, inputs=inputs, estimator=request.estimator,
                                       images=None if request.image is None else [request.image], regions=regions,
                                       **video)
        if not isinstance(regions, str):  # known before decoding: prepare the pictures' fixed parts now
            viz.overlay_renderer(regions, images).prepare()
        with live.lock:
            live.trace, live.images, live.pinned = None, images, None
        run = _Run(self, streamer, live, images, start)
        with streamer:
            for event in streamer.generate(**inputs, **{"max_new_tokens": request.max_new_tokens, **generate_kwargs}):
                if isinstance(event, TokenAttribution):
                    frame = run.token(event)
                    if frame is not None:
                        yield frame
                elif isinstance(event, SpanAttribution):
                    yield run.step(event)
        yield run.final()

    @staticmethod
    def _finished_picture(frame: Frame, trace: "AttributionTrace", images: list[Any], item: StepItem,
                          span: "SpanAttribution", kind: str = "step") -> None:
        """Put a finished step's picture, caption, top regions and (a video's) timeline on ``frame``."""
        from ..viz import frame_group_scores

        head = "answer" if item.section == "answer" else f"step {item.index + 1}"
        # the same picture whether shown live or pinned: the page's caption says which
        frame.overlay = step_picture(trace, images, span.region_scores, evidence=item.evidence, caption=head)
        frame.overlay_kind, frame.overlay_step, frame.overlay_title = kind, item.index, item.label
        frame.top = top_regions(trace.regions, span.region_scores)
        frame.timeline = frame_group_scores(trace.regions, span.region_scores)

    def pin(self, live: _Live, index: int | None) -> Frame | None:
        """The frame of step ``index`` pinned (``None``: follow the live step again); ``None`` if no such step."""
        with live.lock:
            live.pinned = index
            trace = live.trace
        if index is None or trace is None:
            return None
        spans = [s for s in trace.spans if s.index == index]
        if not spans:
            return None
        span = spans[0]
        item = StepItem.of(span, trace)
        frame = Frame(text=trace.text, steps=[], tokens=len(trace.tokens), calibrated=trace.calibrated)
        self._finished_picture(frame, trace, live.images, item, span, kind="pinned")
        return frame

    def session(self, key: str) -> _Live:
        """The per-browser-session state (the 64 most recent sessions are kept)."""
        live = self._sessions.pop(key, None) or _Live()
        self._sessions[key] = live
        while len(self._sessions) > 64:
            self._sessions.popitem(last=False)
        return live

    # ------------------------------------------------------------------ the page

    def _example_files(self) -> list[list[str]]:
        """Examples as PNG files (Gradio's examples take paths), written once to a temporary folder."""
        if not self.examples:
            return []
        from PIL import Image

        if self._example_dir is None:
            self._example_dir = tempfile.TemporaryDirectory(prefix="hf_vattr_app_")
        rows = []
        for i, (image, question) in enumerate(self.examples):
            path = Path(self._example_dir.name) / f"example_{i}.png"
            if not path.exists():
                (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB").save(path)
            rows.append([str(path), question])
        return rows

    def build(self) -> Any:
        """The Gradio ``Blocks`` page (imports Gradio)."""
        import gradio as gr

        examples = self._example_files()
        with gr.Blocks(title=self.title) as demo:
            page = self._layout(gr, examples)
            self._connect(gr, page)
        return demo

    def _layout(self, gr: Any, examples: list[list[str]]) -> SimpleNamespace:
        """The page's components, inputs on the left, pictures on the right (inside an open ``gr.Blocks``)."""
        gr.Markdown(f"## {html.escape(self.title)}\nPick an example or upload an image, a video or both, ask a "
                    "question and press **Run**. The reasoning streams in; each finished step becomes an item you can click to "
                    "pin its heatmap. Colours are the estimator's prediction of how much each region's removal "
                    "would lower the step's log-probability (with no estimator: uncalibrated raw value-norm "
                    "attention, a ranking rather than a prediction, labelled so on the page).")
        page = SimpleNamespace()
        with gr.Row():
            with gr.Column(scale=2):
                page.image = _unchecked_image(gr, type="filepath", label="Image", sources=["upload"],
                                              value=examples[0][0] if examples else None, elem_id="vattr-image",
                                              height=220)
                page.video = _unchecked_video(gr, label=f"Video (optional: sampled at {VIDEO_FPS:g} frames/s, at "
                                                        f"most {MAX_VIDEO_FRAMES} frames)",
                                              sources=["upload"], elem_id="vattr-video", height=180)
                page.question = gr.Textbox(label="Question", value=examples[0][1] if examples else "",
                                           elem_id="vattr-question")
                with gr.Accordion("Options", open=False, elem_id="vattr-options"):
                    page.estimator = gr.Textbox(label="Estimator (folder or Hub id; empty: uncalibrated raw attention)",
                                                value=self.estimator_ref, elem_id="vattr-estimator")
                    page.regions = gr.Textbox(label=f"Regions ({', '.join(REGION_METHODS)})", value=self.regions,
                                              elem_id="vattr-regions")
                    page.budget = gr.Number(label="Max new tokens", value=self.max_new_tokens, precision=0,
                                            elem_id="vattr-max-tokens")
                page.run = gr.Button("Run", variant="primary", elem_id="vattr-run")
                page.message = gr.HTML(_message("Ready."), elem_id="vattr-message")
                page.text = gr.Textbox(label="Reasoning (streaming)", lines=5, max_lines=14, interactive=False,
                                       elem_id="vattr-text")
                page.steps = gr.Radio(choices=[], label="Finished steps: click one to pin its heatmap",
                                      elem_id="vattr-steps")
            with gr.Column(scale=3):
                page.overlay = gr.HTML(_overlay_html(None), elem_id="vattr-overlay")
                page.where = gr.HTML("", elem_id="vattr-top")
                page.timeline = gr.HTML("", elem_id="vattr-timeline")
                page.follow = gr.Button("Follow the live step", size="sm", elem_id="vattr-follow")
                page.trajectory = gr.Image(label="Trajectory: region-effect path and concentration over steps",
                                           type="pil", format="png", interactive=False, elem_id="vattr-trajectory",
                                           height=240)
                page.trajectory_note = gr.HTML("", elem_id="vattr-concentration")
        if examples:
            gr.Examples(examples, inputs=[page.image, page.question], label="Toy examples (click one to load it)")
        return page

    def _connect(self, gr: Any, page: SimpleNamespace) -> None:
        """The handlers: Run streams frames into the page, a click on a step pins it, Follow unpins."""
        outputs = [page.message, page.text, page.steps, page.overlay, page.where, page.timeline, page.trajectory,
                   page.trajectory_note]

        def on_run(image_path: Any, question_text: str, estimator_ref: str, region_method: str,
                   max_tokens: Any, video_path: Any, request: gr.Request) -> Iterator[tuple]:
            from ..streaming.streamer import GenerationError

            skip = gr.skip()
            try:
                checked = self.check_inputs(image_path, question_text, estimator_ref, region_method, max_tokens,
                                            video=video_path)
            except InputError as err:
                yield (_message(str(err), error=True), *([skip] * (len(outputs) - 1)))
                return
            live = self.session(request.session_hash if request is not None else "default")
            yield (_message("Running..."), "", gr.update(choices=[], value=None), _overlay_html(None), "", "", None,
                   "")
            try:
                for frame in self.stream(checked, live):
                    yield self._frame_outputs(gr, frame, live)
            except GenerationError as err:
                yield (_message(f"Generation failed: {err}", error=True), *([skip] * (len(outputs) - 1)))

        def on_pin(value: Any, request: gr.Request) -> tuple:
            live = self.session(request.session_hash if request is not None else "default")
            frame = self.pin(live, None if value in (None, "") else int(value))
            if frame is None:
                return gr.skip(), gr.skip(), gr.skip()
            return _overlay_html(frame), _top_html(frame), _timeline_html(frame)

        def on_follow(request: gr.Request) -> tuple:
            live = self.session(request.session_hash if request is not None else "default")
            self.pin(live, None)
            return gr.update(value=None), _message("Following the live step.")

        for handler in (on_run, on_pin, on_follow):  # Gradio finds gr.Request by its (resolved) annotation
            handler.__annotations__["request"] = gr.Request
        page.run.click(on_run, [page.image, page.question, page.estimator, page.regions, page.budget, page.video],
                       outputs, concurrency_limit=1, concurrency_id="generate", show_progress="minimal")
        page.steps.input(on_pin, [page.steps], [page.overlay, page.where, page.timeline])
        page.follow.click(on_follow, None, [page.steps, page.message])

    def _frame_outputs(self, gr: Any, frame: Frame, live: _Live) -> tuple:
        """One frame as the page's outputs; unchanged parts are skipped so a click is not overwritten."""
        skip = gr.skip()
        frame.calibrated = getattr(live.trace, "calibrated", True)
        status = (f"Done: {frame.tokens} tokens, {len(frame.steps)} steps in {frame.elapsed:.1f} s."
                  if frame.done else f"Thinking... {frame.tokens} tokens, {len(frame.steps)} finished step(s).")
        if not frame.calibrated:
            from ..viz import UNCALIBRATED_NOTE

            status += f" Scores are {UNCALIBRATED_NOTE}."
        steps = skip
        if frame.steps_changed:
            pinned = live.pinned
            steps = gr.update(choices=[(s.label, str(s.index)) for s in frame.steps],
                              value=None if pinned is None else str(pinned))
        overlay = _overlay_html(frame) if frame.overlay is not None else skip
        where = _top_html(frame) if frame.overlay is not None else skip
        timeline = _timeline_html(frame) if frame.overlay is not None else skip
        trajectory = frame.trajectory if frame.trajectory is not None else skip
        note = _concentration_html(frame.concentration) if frame.trajectory is not None else skip
        return _message(status), frame.text, steps, overlay, where, timeline, trajectory, note

    def launch(self, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> Any:
        """Build and serve the page (blocks unless ``prevent_thread_lock=True``)."""
        demo = self.build()
        return demo.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, css=_CSS,
                                                              ssr_mode=False, **kwargs)


class _TraceView:
    """A trace with the spans this loop has seen so far: evidence and trajectory match the frame shown."""

    def __init__(self, trace: "AttributionTrace", spans: Sequence["SpanAttribution"]) -> None:
        self.regions, self.images, self.sequence = trace.regions, trace.images, trace.sequence
        self.spans = list(spans)
        self.tokens = trace.tokens


class _Run:
    """One run of :meth:`LiveApp.stream`: what was decoded so far, as the page shows it, and when the last frame
    was shown. Each event becomes at most one frame."""

    def __init__(self, app: LiveApp, streamer: Any, live: _Live, images: list[Any], start: float) -> None:
        self.app, self.streamer, self.live, self.images, self.start = app, streamer, live, images, start
        self.gap = 1.0 / app.updates_per_second
        self.last = -float("inf")  # when the last frame was shown: the first token gets a picture at once
        self.pieces: list[str] = []  # the text, joined only when a frame is due
        self.n_tokens = 0
        self.running: list[Any] = []  # scores of the tokens of the step being written
        self.steps: list[StepItem] = []
        self.seen: list[SpanAttribution] = []  # finished steps, in order (the trace may still be appending)
        self.trace: AttributionTrace | None = None

    def _follow_trace(self) -> "AttributionTrace":
        """The streamer's trace (built when generation starts), published to the session for pinning."""
        if self.trace is None or self.live.trace is not self.trace:
            self.trace = self.streamer.trace
            with self.live.lock:
                self.live.trace = self.trace
        return self.trace

    def _frame(self, now: float, **fields: Any) -> Frame:
        return Frame(text="".join(self.pieces), steps=list(self.steps), tokens=self.n_tokens,
                     elapsed=now - self.start, **fields)

    def token(self, event: Any) -> Frame | None:
        """A live frame of the step being written, if one is due; per token only three appends and a clock read."""
        from .. import viz

        self.pieces.append(event.text)
        self.running.append(event.region_scores)
        self.n_tokens += 1
        now = self.app.clock()
        if now - self.last < self.gap:
            return None
        trace = self._follow_trace()
        if trace.regions is None:
            return None
        if len(trace.tokens) - self.n_tokens > BEHIND_TOKENS and now - self.last < 2 * self.gap:
            return None  # decoding is ahead of this loop: catch up first, draw the newest state
        self.last = now
        frame = self._frame(now)
        if self.live.pinned is None:
            scores = viz.mean_scores(self.running)
            number = len(self.steps)
            frame.overlay = step_picture(trace, self.images, scores, caption=f"step {number + 1}, writing")
            frame.overlay_step, frame.top = number, top_regions(trace.regions, scores)
            frame.timeline = viz.frame_group_scores(trace.regions, scores)
        return frame

    def step(self, span: "SpanAttribution") -> Frame:
        """The frame of a finished step, after the previous frame had its share of a second (decoding goes on)."""
        from .. import viz

        trace = self._follow_trace()
        self.running = []
        self.seen.append(span)
        view = _TraceView(trace, self.seen)
        self.steps = [StepItem.of(s, view) for s in self.seen]
        wait = self.gap - (self.app.clock() - self.last)
        if wait > 0:
            self.app.sleep(wait)
        self.last = self.app.clock()
        frame = self._frame(self.last, steps_changed=True)
        if len(trace.spans) <= len(self.seen):  # no later step waiting: redraw the trajectory too
            frame.trajectory, frame.concentration = viz.trajectory_plot(view), viz.step_concentrations(view.spans)
        if self.live.pinned is None:
            LiveApp._finished_picture(frame, trace, self.images, self.steps[-1], span)
        return frame

    def final(self) -> Frame:
        """The last frame: every step judged against the whole trace, the trajectory, the last step's picture."""
        from .. import viz

        trace = self.streamer.trace
        with self.live.lock:
            self.live.trace = trace
        self.steps = [StepItem.of(s, trace) for s in trace.spans]
        final = self._frame(self.app.clock(), steps_changed=True, done=True)
        if trace.spans:
            final.trajectory = viz.trajectory_plot(trace)
            final.concentration = viz.step_concentrations(trace.spans)
            if self.live.pinned is None:
                LiveApp._finished_picture(final, trace, self.images, final.steps[-1], trace.spans[-1])
        return final


def _missing(upload: Any) -> bool:
    return upload is None or (isinstance(upload, str) and not upload.strip())


def _read_image(image: Any) -> "Image.Image":
    """An uploaded image (a path, decoded in full now so a truncated file fails here) or a PIL image, as RGB."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        name = Path(str(image)).name
        try:
            with Image.open(image) as opened:
                opened.load()  # decode every byte now: a truncated file fails here, not mid-run
                if opened.width * opened.height > MAX_PIXELS:
                    raise InputError(f"The image {name} is {opened.width}x{opened.height}; the app accepts at most "
                                     f"{MAX_PIXELS} pixels.")
                pil = opened.convert("RGB")
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise InputError(f"Could not read the image {name}: it is not a valid image file "
                             f"({type(err).__name__}).") from None
    if min(pil.size) < 1:
        raise InputError("The image is empty.")
    return pil


def _unknown_regions(method: str) -> str:
    return f"Unknown region method {method!r}; choose one of: {', '.join(REGION_METHODS)}."


def _unchecked_image(gr: Any, **kwargs: Any) -> Any:
    """``gr.Image`` that passes the uploaded file's path through unopened, so that :meth:`LiveApp.check_inputs`
    (not Gradio's preprocessing) judges a corrupt upload and says so on the page.

    The instance's ``preprocess`` is replaced rather than subclassing: a ``gr.Image`` subclass makes Gradio
    write a ``.pyi`` stub next to this module, inside the installed package.
    """
    image = gr.Image(**kwargs)

    def preprocess(payload: Any) -> str | None:
        return None if payload is None else payload.path

    image.preprocess = preprocess
    return image


def _unchecked_video(gr: Any, **kwargs: Any) -> Any:
    """``gr.Video`` that passes the uploaded file's path through untouched (no ffmpeg conversion, no check), so that
    :func:`read_video` decodes it and a corrupt upload is named on the page (as :func:`_unchecked_image`)."""
    video = gr.Video(**kwargs)

    def preprocess(payload: Any) -> str | None:
        if payload is None:
            return None
        data = getattr(payload, "video", payload)  # Gradio 5 wraps the file in VideoData, 6 passes FileData
        return getattr(data, "path", None)

    video.preprocess = preprocess
    return video


_CSS = """
#vattr-message .vattr-error { background: #fdecea; color: #8a1c12; border: 1px solid #f3b5ab; padding: 8px 10px;
  border-radius: 6px; }
#vattr-message .vattr-status { color: #555; padding: 4px 2px; }
#vattr-overlay .vattr-cap { font-size: 0.9em; color: #444; margin-bottom: 4px; }
#vattr-overlay img { max-width: 100%; max-height: 330px; height: auto; }
#vattr-overlay .vattr-empty { color: #888; padding: 60px 10px; text-align: center; border: 1px dashed #ccc; }
#vattr-top ol { margin: 4px 0 0 0; } #vattr-top .sw { display: inline-block; width: 10px; height: 10px;
  border: 1px solid #333; margin-right: 4px; vertical-align: middle; }
#vattr-steps label { font-family: ui-monospace, monospace; }
#vattr-timeline .vattr-bars { display: flex; align-items: flex-end; gap: 4px; height: 90px; margin-top: 6px;
  border-bottom: 1px solid #999; }
#vattr-timeline .vattr-bar { flex: 1; background: #c2410c; min-height: 1px; }
#vattr-timeline .vattr-times { display: flex; gap: 4px; font-size: 0.75em; color: #555; }
#vattr-timeline .vattr-times span { flex: 1; text-align: center; }
"""


def _fragments() -> Any:
    """The page's HTML fragments (macros of ``hf_vattr/viz/templates/app.html``; autoescaped)."""
    from ..viz.templating import macros

    return macros("app.html")


def _message(text: str, *, error: bool = False) -> str:
    return str(_fragments().message(text, error))


def _overlay_caption(frame: Frame) -> str:
    if frame.overlay_kind == "live":
        caption = f"Step {frame.overlay_step + 1 if frame.overlay_step is not None else ''} being written " \
                  f"({frame.tokens} tokens so far)"
    elif frame.overlay_kind == "pinned":
        caption = f"Pinned: {frame.overlay_title} (press 'Follow the live step' to unpin)"
    else:
        caption = f"Just finished: {frame.overlay_title}"
    return caption + ("" if frame.calibrated else " (uncalibrated)")


def _overlay_html(frame: Frame | None) -> str:
    """The overlay panel; ``data-*`` attributes say which step and what kind of picture it is."""
    from ..viz import png_data_uri

    if frame is None or frame.overlay is None:
        return str(_fragments().no_overlay())
    step = "" if frame.overlay_step is None else str(frame.overlay_step)
    picture = png_data_uri(frame.overlay, compress_level=PNG_COMPRESS_LEVEL)
    return str(_fragments().overlay(frame.overlay_kind, step, _overlay_caption(frame), picture))


def _top_html(frame: Frame) -> str:
    """The top regions in words, each with the colour of its outline on the picture."""
    from ..viz import rank_colour_hex

    items = [(rank_colour_hex(i), words, rid, f"{score:.3g}") for i, (rid, words, score) in enumerate(frame.top)]
    return str(_fragments().top_regions(items, "nats" if frame.calibrated else "uncalibrated"))


def _timeline_html(frame: Frame) -> str:
    """Which moments of the video the shown step relies on: a bar per frame group, its height the group's share
    of the step's positive scores (:func:`hf_vattr.viz.frame_group_scores`); nothing for an image-only prompt."""
    from ..viz import format_score, format_seconds

    top = max((g.score for g in frame.timeline), default=0.0)
    unit = "nats" if frame.calibrated else "uncalibrated"
    bars = [(g.group, format_seconds((g.start, g.end)), format_score(g.score),
             f"{100 * g.score / top:.1f}" if top > 0 else "0") for g in frame.timeline]
    return str(_fragments().timeline(bars, unit))


def _concentration_html(values: Sequence[float]) -> str:
    shown = ", ".join("n/a" if v != v else f"{v:.2f}" for v in values)
    return str(_fragments().concentration(shown))


def launch(model: Any, processor: Any, estimator: Any | None = None, *, host: str = "127.0.0.1",
           port: int | None = None, **options: Any) -> Any:
    """Build a :class:`LiveApp` and serve it (what ``hf-vattr app`` calls)."""
    app_options = {k: options.pop(k) for k in ("estimator_ref", "regions", "examples", "max_new_tokens",
                                                 "updates_per_second", "title") if k in options}
    return LiveApp(model, processor, estimator, **app_options).launch(host, port, **options)
