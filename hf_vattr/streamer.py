"""`AttributionStreamer`: live visual attribution out of ``model.generate``.

A drop-in ``TextStreamer``: pass it as ``generate(streamer=...)`` and iterate
over it (sync or async) in another thread to get, as the model thinks,

* one :class:`TokenAttribution` per generated token: the token, its text and a
  score per image region (the estimator's prediction of how much the log-prob
  of that token would drop if the region were ablated), and
* one :class:`SpanAttribution` per finished reasoning step: the step's text,
  its token range and its region scores (the mean of its tokens' scores; the
  estimator is linear, so this equals scoring the step's mean features).

Producer-consumer: inside the decode loop ``put`` only takes the captured
features, scores them on the model's device and enqueues a reference; a
worker thread decodes text, prints, splits spans and moves scores to the host.
The decode loop never waits for the consumer.

Failure handling: if ``generate`` raises, the capture is restored and the
consumer's next ``next()`` raises :class:`GenerationError` with the original
exception as its cause; a consumer ``timeout`` raises
:class:`AttributionTimeout` (a ``TimeoutError``), never a silent end.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from transformers import TextStreamer
from transformers.utils import logging

from .capture import AttentionCapture
from .layouts import VisualLayout, visual_layout
from .regions import PromptRegions, RegionMap, prompt_regions
from .spans import ReasoningStepSplitter, SpanSplitter

logger = logging.get_logger(__name__)

__all__ = [
    "AttributionStreamer",
    "TokenAttribution",
    "SpanAttribution",
    "AttributionTrace",
    "GenerationError",
    "AttributionTimeout",
]


class GenerationError(RuntimeError):
    """``generate`` failed while the streamer was attached; the original error is the ``__cause__``."""


class AttributionTimeout(TimeoutError):
    """No event arrived within the consumer timeout (generation may still be running)."""


@dataclass
class TokenAttribution:
    """One generated token and its region scores."""

    index: int  # position among generated tokens
    token_id: int
    text: str  # decoded piece ("" for special tokens such as end-of-turn)
    region_scores: torch.Tensor  # (K,) float32 on CPU
    section: str  # "thinking" or "answer"
    features: torch.Tensor | None = None  # (L, H, K) when keep_features=True

    @property
    def token(self) -> str:
        return self.text

    def __iter__(self):  # allows `token, scores = event`
        yield self.text
        yield self.region_scores


@dataclass
class SpanAttribution:
    """One finished reasoning step (or answer span) and its region scores."""

    index: int  # span number
    text: str
    token_range: tuple[int, int]  # [start, end) among generated tokens
    region_scores: torch.Tensor  # (K,) float32 on CPU: mean of the tokens' scores
    section: str

    def top_regions(self, k: int = 3) -> list[int]:
        return torch.argsort(self.region_scores, descending=True, stable=True)[:k].tolist()

    def __iter__(self):
        yield self.text
        yield self.region_scores


@dataclass
class AttributionTrace:
    """Everything a streamer produced: tokens, spans and the regions they refer to."""

    regions: PromptRegions | None  # None until generation starts with regions="prefill"
    tokens: list[TokenAttribution] = field(default_factory=list)
    spans: list[SpanAttribution] = field(default_factory=list)
    prompt_text: str = ""

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def token_scores(self) -> torch.Tensor:
        """(T, K) token-by-region score matrix."""
        if not self.tokens:
            return torch.zeros(0, self.regions.num_regions if self.regions is not None else 0)
        return torch.stack([t.region_scores for t in self.tokens])

    def span_scores(self) -> torch.Tensor:
        """(S, K) span-by-region score matrix (a reasoning trajectory)."""
        if not self.spans:
            return torch.zeros(0, self.regions.num_regions if self.regions is not None else 0)
        return torch.stack([s.region_scores for s in self.spans])


_END = object()


class _Failure:
    def __init__(self, error: BaseException | None, message: str) -> None:
        self.error, self.message = error, message


class AttributionStreamer(TextStreamer):
    """Streams ``(token, region_scores)`` and per-step attributions out of ``model.generate``.

    Args:
        model: the VLM (``*ForConditionalGeneration``) that will generate.
        processor: its processor (or tokenizer): used to decode tokens.
        estimator: a :class:`~hf_vattr.estimator.LinearEstimator` for this model. ``None`` scores with raw
            attention (mean over layers and heads), which is *not* causal; a warning says so.
        inputs: the processor outputs passed to ``generate`` (``input_ids``, ``image_grid_thw``).
        images: the original images (or their ``(height, width)``), to map regions onto original pixels.
        regions: region maps (a :class:`PromptRegions`, a list of :class:`RegionMap` per image, or one map),
            or a method name for :func:`hf_vattr.regions.build_regions` (``"auto"``, ``"vlm"``, ``"dinov3"``, ...);
            default: a regular grid of ``grid_k`` regions per image. ``"prefill"``: the same regions as
            ``"vlm"`` (the VLM's own vision features + Ward), built from the vision tower's output of
            ``generate``'s own prefill, so they cost no extra vision pass; ``streamer.regions`` is then
            set once generation has started (before the first event).
        splitter: span splitter; default :class:`ReasoningStepSplitter`.
        print_text: print the text as it is generated, like ``TextStreamer``.
        timeout: seconds a consumer waits for the next event before :class:`AttributionTimeout`.
        keep_features: attach the (L, H, K) features to each token event (for analysis and training).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        inputs: Any,
        estimator: Any | None = None,
        images: Sequence[Any] | None = None,
        regions: PromptRegions | Sequence[RegionMap] | RegionMap | str | None = None,
        grid_k: int = 16,
        splitter: SpanSplitter | None = None,
        print_text: bool = True,
        skip_prompt: bool = True,
        timeout: float | None = None,
        keep_features: bool = False,
        **decode_kwargs: Any,
    ) -> None:
        tokenizer = getattr(processor, "tokenizer", processor)
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        input_ids = inputs["input_ids"] if not isinstance(inputs, torch.Tensor) else inputs
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(
                f"AttributionStreamer follows one sequence, but inputs hold a batch of {input_ids.shape[0]}. "
                "Generate one example at a time (batch size > 1 is not supported yet)."
            )
        grid = None if isinstance(inputs, torch.Tensor) else inputs.get("image_grid_thw")
        self.layout: VisualLayout = visual_layout(model, input_ids, grid, images)
        # regions="prefill": a recorder for the vision tower output of generate's own prefill (hooked below).
        from_prefill = isinstance(regions, str) and regions == "prefill"
        prefill_recorder = self._prefill_recorder(model, inputs) if from_prefill else None
        if prefill_recorder is not None:
            self.regions: PromptRegions | None = None
        else:
            self.regions = self._resolve_regions(regions, grid_k, model, inputs, images)
        if estimator is not None:
            estimator.check_compatible(model)
            pooling = getattr(estimator, "pooling", "sum")
            # A private copy on the model's device: scoring then never copies weights per token.
            estimator = copy.deepcopy(estimator).to(next(model.parameters()).device).eval()
        else:
            logger.warning(
                "AttributionStreamer without an estimator scores regions by raw attention (mean over layers and "
                "heads), which is not causal. Load one with LinearEstimator.from_pretrained(...)."
            )
            pooling = "sum"
        self.model = model
        self.estimator = estimator
        membership = None if self.regions is None else self.regions.membership()
        self.capture = AttentionCapture(model, self.layout.positions, membership, pooling=pooling)
        self.splitter = splitter or ReasoningStepSplitter()
        self.print_text = print_text
        self.timeout = timeout
        self.keep_features = keep_features
        self.trace = AttributionTrace(self.regions)
        self._work: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._producer: threading.Thread | None = None
        self._hook = None
        self._vision_recorder: Any = None
        self._weights: torch.Tensor | None = None
        self._started = False
        self._finished = False
        self._failure: _Failure | None = None
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._tag_texts = {getattr(self.splitter, "think_open", "<think>"), getattr(self.splitter, "think_close", "</think>")}
        if prefill_recorder is not None:
            # Hooked now, not at the first put(): generate encodes the images before it calls put().
            # One-shot (removed after the prompt's tower call), removed by end()/failures, and by the
            # garbage collector if the streamer is dropped unused.
            this = weakref.ref(self)  # the hook must not keep the streamer alive

            def on_record(features: list[torch.Tensor]) -> None:
                streamer = this()
                if streamer is not None:
                    streamer._regions_from_vision_output(features)

            prefill_recorder.on_record = on_record
            prefill_recorder.__enter__()
            self._vision_recorder = prefill_recorder
            weakref.finalize(self, prefill_recorder.__exit__, None, None, None)

    # ------------------------------------------------------------------ setup helpers
    def _resolve_regions(self, regions: Any, grid_k: int, model: Any, inputs: Any, images: Any) -> PromptRegions:
        if regions is None:
            return prompt_regions(self.layout, k=grid_k)
        if isinstance(regions, str):  # a method name: build them now, e.g. "vlm", "dinov3", "auto"
            from .regions import build_regions

            return build_regions(self.layout, method=regions, images=images, model=model, inputs=inputs)
        if isinstance(regions, PromptRegions):
            maps = regions.maps
        elif isinstance(regions, RegionMap):
            maps = [regions]
        else:
            maps = list(regions)
        for i, (m, im) in enumerate(zip(maps, self.layout.images)):
            if m.image.num_tokens != im.num_tokens:
                raise ValueError(
                    f"Region map {i} covers {m.image.num_tokens} visual tokens but image {i} of the prompt has "
                    f"{im.num_tokens}. Build the region maps from this prompt's layout."
                )
        return PromptRegions(self.layout, list(maps))

    @staticmethod
    def _prefill_recorder(model: Any, inputs: Any) -> Any:
        """The (not yet hooked) recorder for ``regions="prefill"``; refuses up front when the prefill
        cannot provide the features (no pixel_values, or a model without a vision tower: TypeError)."""
        from .regions import VisionFeatureRecorder

        if isinstance(inputs, torch.Tensor) or inputs.get("pixel_values") is None:
            raise ValueError('regions="prefill" needs inputs with pixel_values (images in the prompt); '
                             'pass region maps or another method such as regions="grid".')
        return VisionFeatureRecorder(model)

    def _regions_from_vision_output(self, features: list[torch.Tensor]) -> None:
        """Runs inside the prefill's vision-tower hook: cluster, then hand the membership to the capture."""
        from .regions import build_regions

        if self._vision_recorder is not None:
            self._vision_recorder.__exit__(None, None, None)  # one-shot
            self._vision_recorder = None
        got, want = [int(f.shape[0]) for f in features], [im.num_tokens for im in self.layout.images]
        if got != want:
            raise ValueError(
                f'AttributionStreamer(regions="prefill") saw a vision-tower call for images with {got} visual tokens, '
                f"but its prompt has {want}. Create the streamer right before generate(...) with the same inputs."
            )
        regions = build_regions(self.layout, method="features", features=features)
        for rmap in regions.maps:
            rmap.info["features"] = "vision tower output recorded during generate's prefill"
        self.capture.set_membership(regions.membership())
        self.regions = regions
        self.trace.regions = regions

    # ------------------------------------------------------------------ producer side (generate's thread)
    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            self._fail(None, "batch size > 1 / beam search / num_return_sequences > 1 is not supported yet")
            raise ValueError(
                "AttributionStreamer supports a single sequence (batch size 1, greedy or sampling, "
                "num_beams=1, num_return_sequences=1)."
            )
        if not self._started:
            self._start(value)
            return
        if self._finished:
            return
        try:
            features = self.capture.pop()
        except Exception as err:
            self._fail(err, "attention capture failed")
            raise
        scores = self._score(features)
        self._work.put((value.reshape(-1).tolist(), scores, features if self.keep_features else None))

    def _start(self, prompt_ids: torch.Tensor) -> None:
        self._started = True
        self._producer = threading.current_thread()
        prompt_text = self.tokenizer.decode(prompt_ids.reshape(-1).tolist(), skip_special_tokens=False)
        self.trace.prompt_text = prompt_text
        self.splitter.reset(prompt_text)
        self.capture.start()
        # Runs after every forward of the model, also when the forward raises: restores the
        # capture and hands the exception to the consumer instead of leaving it waiting forever.
        self._hook = self.model.register_forward_hook(self._after_forward, always_call=True)
        self._worker = threading.Thread(target=self._work_loop, name="hf_vattr-attribution", daemon=True)
        self._worker.start()

    def _after_forward(self, module, args, output) -> None:
        if output is not None:
            return  # a forward that returns nothing can only mean it raised (torch passes None then)
        error = sys.exc_info()[1]
        if error is not None:
            self._fail(error, f"generate raised {type(error).__name__}: {error}")

    def _score(self, features: torch.Tensor) -> torch.Tensor:
        if self.estimator is None:
            return features.mean(dim=(0, 1))
        return self.estimator(features)

    def end(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._restore()
        self._work.put(_END)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()  # generation is over: let the text and spans catch up before generate returns

    def _restore(self) -> None:
        self.capture.stop()
        if self._vision_recorder is not None:
            self._vision_recorder.__exit__(None, None, None)
            self._vision_recorder = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _fail(self, error: BaseException | None, message: str) -> None:
        if self._failure is None:
            self._failure = _Failure(error, message)
        self._finished = True
        self._restore()
        self._work.put(self._failure)

    # ------------------------------------------------------------------ worker thread
    def _piece(self, ids: list[int], token_id: int) -> str:
        """Display text of the newest token, decoding incrementally like TextStreamer.

        Special tokens (end of turn, vision markers) show as "" except the think tags,
        which the span splitter needs to see. ``ids`` accumulates the displayed tokens.
        """
        if token_id in self._special_ids:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if raw not in self._tag_texts:
                return ""
        ids.append(token_id)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        piece = text[self._decoded_len:]
        if piece.endswith("\ufffd"):  # incomplete multi-byte character: wait for the next token
            return ""
        self._decoded_len = len(text)
        return piece

    def _work_loop(self) -> None:
        ids: list[int] = []
        self._decoded_len = 0
        try:
            while True:
                item = self._work.get()
                if item is _END:
                    self._emit_spans(self.splitter.flush())
                    if self.print_text:
                        self.on_finalized_text("", stream_end=True)
                    self._events.put(_END)
                    return
                if isinstance(item, _Failure):
                    self._events.put(item)
                    return
                token_ids, scores, features = item
                for token_id in token_ids:
                    index = len(self.trace.tokens)
                    piece = self._piece(ids, token_id)
                    closed = self.splitter.push(index, piece)
                    event = TokenAttribution(
                        index=index,
                        token_id=token_id,
                        text=piece,
                        region_scores=scores.detach().float().cpu(),
                        section=self.splitter.section(),
                        features=None if features is None else features.detach().cpu(),
                    )
                    self.trace.tokens.append(event)
                    self._events.put(event)
                    if self.print_text and piece:
                        self.on_finalized_text(piece)
                    self._emit_spans(closed)
        except BaseException as err:  # never leave the consumer waiting
            self._events.put(_Failure(err, f"attribution worker failed: {err}"))

    def _emit_spans(self, closed) -> None:
        for span in closed:
            scores = torch.stack([t.region_scores for t in self.trace.tokens[span.start:span.end]]).mean(0)
            event = SpanAttribution(len(self.trace.spans), span.text, (span.start, span.end), scores, span.section)
            self.trace.spans.append(event)
            self._events.put(event)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.print_text:
            print(text, flush=True, end="" if not stream_end else None)

    # ------------------------------------------------------------------ consumer side
    def _next_event(self) -> TokenAttribution | SpanAttribution:
        waited = 0.0
        poll = 0.1
        while True:
            try:
                item = self._events.get(timeout=poll)
                break
            except queue.Empty:
                waited += poll
                producer = self._producer
                if producer is not None and not producer.is_alive() and not self._finished:
                    # generate's thread died without end() or a failing forward: an error outside the forward.
                    self._fail(None, "the thread running generate() ended without finishing the stream "
                                     "(it raised outside a forward pass; see its traceback)")
                if self.timeout is not None and waited >= self.timeout:
                    raise AttributionTimeout(
                        f"No attribution event within {self.timeout} s. Generation may still be running; "
                        "raise the streamer's timeout or check the generating thread."
                    ) from None
        if item is _END:
            self._events.put(_END)  # later calls keep ending
            raise StopIteration
        if isinstance(item, _Failure):
            self._events.put(item)
            raise GenerationError(item.message) from item.error
        return item

    def __iter__(self) -> Iterator[TokenAttribution | SpanAttribution]:
        return self

    def __next__(self) -> TokenAttribution | SpanAttribution:
        return self._next_event()

    def __aiter__(self) -> "AttributionStreamer":
        return self

    async def __anext__(self) -> TokenAttribution | SpanAttribution:
        # StopIteration cannot cross a Future boundary, so the executor returns a sentinel instead.
        event = await asyncio.get_running_loop().run_in_executor(None, self._next_or_end)
        if event is _END:
            raise StopAsyncIteration
        return event

    def _next_or_end(self) -> Any:
        try:
            return self._next_event()
        except StopIteration:
            return _END

    def generate_in_thread(self, **generate_kwargs: Any) -> threading.Thread:
        """Start ``model.generate(**generate_kwargs, streamer=self)`` in a daemon thread and return it."""
        thread = threading.Thread(
            target=self.model.generate, kwargs=dict(generate_kwargs, streamer=self), daemon=True,
            name="hf_vattr-generate",
        )
        thread.start()
        return thread
