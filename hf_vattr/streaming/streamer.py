"""`AttributionStreamer`: live visual attribution out of ``model.generate``.

A transformers ``TextStreamer``: pass it to ``generate`` (or call :meth:`AttributionStreamer.generate`)
and iterate over it, sync or async, to get as the model thinks

* one :class:`TokenAttribution` per generated token: its text and a score per image region (the
  estimator's prediction of how much the token's log-prob would drop if the region were ablated), and
* one :class:`SpanAttribution` per finished reasoning step, scored by the mean of its tokens' scores
  (the estimator is linear, so this equals scoring the step's mean features).

As a ``TextStreamer`` it also calls :meth:`on_finalized_text` with exactly the text a plain
``TextStreamer(tokenizer, skip_prompt=True)`` would get (printing only with ``print_text=True``), so
subclasses that override it, as users do with ``TextStreamer``, get the text.

How it is scoped: building a streamer *arms* it on its model, which wraps that model's own
``generate`` (an instance attribute, removed with the last armed streamer). The wrapper recognises its
streamer in the ``streamer=`` kwarg, takes the prompt from generate's own kwargs, switches the model's
text attention to the capturing implementation registered through ``AttentionInterface.register``,
and runs the original ``generate`` in ``try/finally``: every exit, whatever the reason or thread,
is seen with the exception in hand, reported to the consumer as :class:`GenerationError` (the original
exception is its ``__cause__``), and everything is undone before control returns to generate's caller.
Other calls of the same model, in other threads or without this streamer, pass through untouched.

Producer-consumer: inside the decode loop ``put`` only takes the captured features, scores them
on the model's device and enqueues a reference; a worker thread decodes text, splits spans and
moves scores to the host, so the decode loop never waits for the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import queue
import threading
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.utils import logging

from ..errors import AttributionError
from ..estimator import INHERITING_SECTIONS
from .events import AttributionTrace, SpanAttribution, TokenAttribution
from ..layouts import VisualLayout
from ..regions import PromptRegions, RegionMap
from .session import AttributionSession, StreamerInputError
from ..reasoning.formats import ThinkingFormat, detect_format, resolve_format
from ..reasoning.spans import ReasoningStepSplitter, SpanSplitter, tag_texts
from ..reasoning.text import TokenTextDecoder

logger = logging.get_logger(__name__)

__all__ = [
    "AttributionStreamer",
    "TokenAttribution",
    "SpanAttribution",
    "AttributionTrace",
    "GenerationError",
    "AttributionTimeout",
    "StreamerStateError",
    "StreamerInputError",
]

_END = object()
_POLL_INTERVAL = 0.01  # seconds the worker sleeps when it has nothing to do (events lag tokens by at most this)
_INPUT_KEYS = ("input_ids", "attention_mask", "image_grid_thw", "pixel_values", "video_grid_thw", "pixel_values_videos",
               "second_per_grid_ts")


class GenerationError(AttributionError, RuntimeError):
    """``generate`` failed while the streamer was attached; the original error is the ``__cause__``."""


class AttributionTimeout(AttributionError, TimeoutError):
    """No event arrived within the consumer timeout while generation was still running."""


class StreamerStateError(AttributionError, RuntimeError):
    """The streamer was used out of order: reused for a second ``generate``, or passed to another model's."""


class _Failure:
    def __init__(self, error: BaseException | None, message: str) -> None:
        self.error, self.message = error, message


# ----------------------------------------------------------------------------- the scoped generate wrapper


class _AttributedGenerate:
    """``model.generate`` while streamers are armed on the model: the one route into a streamer's generate.

    An instance attribute of that model only; calls without an armed streamer of this model go straight
    to the original. Removed (the original restored exactly) when the last armed streamer is done.
    """

    def __init__(self, model: Any) -> None:
        self.had_own_generate = "generate" in vars(model)  # the user may have set model.generate themselves
        self.original = model.generate
        self.streamers: "weakref.WeakSet[AttributionStreamer]" = weakref.WeakSet()
        functools.update_wrapper(self, self.original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        streamer = kwargs.get("streamer")
        if streamer is None or streamer not in self.streamers:
            return self.original(*args, **kwargs)
        return streamer._run_generate(self.original, args, kwargs)


# Reentrant: a collected streamer's finalizer (``_disarm``) can run inside ``_arm`` on this very thread, since
# garbage collection may start at any allocation; a plain lock deadlocked there.
_ARM_LOCK = threading.RLock()


def _arm(model: Any, streamer: "AttributionStreamer") -> None:
    with _ARM_LOCK:
        while True:
            wrapper = vars(model).get("generate")
            if not isinstance(wrapper, _AttributedGenerate):
                wrapper = _AttributedGenerate(model)
                vars(model)["generate"] = wrapper  # the instance dict itself: no nn.Module.__setattr__ machinery
            wrapper.streamers.add(streamer)
            if vars(model).get("generate") is wrapper:  # a finalizer run in between may have removed it: again
                return


def _disarm(model_ref: "weakref.ref", streamer: "AttributionStreamer | None" = None) -> None:
    """Forget ``streamer`` (None: one that was collected); restore ``model.generate`` once none is left."""
    with _ARM_LOCK:
        model = model_ref()
        wrapper = None if model is None else vars(model).get("generate")
        if not isinstance(wrapper, _AttributedGenerate):
            return
        if streamer is not None:
            wrapper.streamers.discard(streamer)
        if next(iter(wrapper.streamers), None) is None and vars(model).get("generate") is wrapper:
            # (live streamers only: a dying one may still be counted; and a nested run may have removed it)
            if wrapper.had_own_generate:
                vars(model)["generate"] = wrapper.original
            else:
                del vars(model)["generate"]


def armed_on(model: Any) -> bool:
    """Whether ``model.generate`` is currently wrapped for an armed streamer (for tests and debugging)."""
    return isinstance(vars(model).get("generate"), _AttributedGenerate)


class _StopWhenClosed(StoppingCriteria):
    """Ends generate at the next token once the streamer is closed (``break``, ``close()``, interpreter exit)."""

    def __init__(self, closed: threading.Event) -> None:
        self.closed = closed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.closed.is_set(), dtype=torch.bool, device=input_ids.device)


def _stop_generate_thread(closed: threading.Event, thread: threading.Thread) -> None:
    """At interpreter exit (or collection): stop the streamer's own generate thread and wait for it."""
    closed.set()
    if thread is not threading.current_thread():
        thread.join()


def _prompt_inputs(args: tuple, kwargs: dict) -> dict:
    """The processor outputs a generate call was given (``generate(input_ids, ...)`` or ``generate(**inputs)``)."""
    inputs = {key: kwargs[key] for key in _INPUT_KEYS if kwargs.get(key) is not None}
    first = args[0] if args else kwargs.get("inputs")
    if "input_ids" not in inputs and isinstance(first, torch.Tensor):
        inputs["input_ids"] = first
    if "input_ids" not in inputs:
        raise StreamerInputError("An AttributionStreamer needs the prompt's input_ids in generate(...) (processor "
                                 "outputs, e.g. model.generate(**inputs, streamer=streamer)); inputs_embeds alone "
                                 "do not say where the image tokens are.")
    return inputs


def _same_prompt(built: Any, given: dict) -> bool:
    """Whether generate's inputs are the ones the streamer was built with (token ids, image and video grids)."""
    for key in ("input_ids", "image_grid_thw", "video_grid_thw"):
        a = built if (key == "input_ids" and isinstance(built, torch.Tensor)) else (
            None if isinstance(built, torch.Tensor) else built.get(key))
        b = given.get(key)
        if (a is None) != (b is None):
            return False
        if a is not None:
            a, b = torch.as_tensor(a), torch.as_tensor(b)
            a, b = (a if a.dim() > 1 else a[None]), (b if b.dim() > 1 else b[None])
            if a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
                return False
    return True


# ----------------------------------------------------------------------------- the streamer


class AttributionStreamer(TextStreamer):
    """Streams ``(token, region_scores)`` and per-step attributions out of ``model.generate``.

    Args:
        model: the VLM (``*ForConditionalGeneration``) that will generate.
        processor: its processor (or tokenizer): used to decode tokens.
        inputs: optional; the processor outputs that ``generate`` will receive. Without them the streamer
            takes the prompt from the kwargs of the ``generate`` call it is passed to (so it works inside
            ``pipeline(...)``); with them, layouts and regions are built now (errors surface here) and a
            ``generate`` on other inputs is refused.
        estimator: a :class:`~hf_vattr.estimator.LinearEstimator` for this model. ``None`` scores with raw
            attention (mean over layers and heads), which is *not* causal; a warning says so.
        images: the original images (or their ``(height, width)``), to map regions onto original pixels;
            for batches one list per row, or one flat list in batch order.
        videos: the prompt's videos as the processor took them, in prompt order: per video a list of frames
            (PIL images or arrays), a ``(T, H, W, C)`` array, a path (decoded as transformers decodes videos), or
            its frames' ``(height, width)``; a single video may be passed alone. Batches as ``images``. Each
            video's tokens are grouped by frame group (``temporal_patch_size`` frames each) with their seconds.
        video_metadata: per video, the metadata the processor was given (``fps``, and ``total_num_frames`` /
            ``frames_indices`` where it sampled frames; ``processor(..., return_metadata=True)`` returns it): it
            times the frame groups as the processor did and picks the sampled frames out of ``videos``. Without
            it, Qwen2.5-VL's ``second_per_grid_ts`` (in ``inputs``) times them, else the processors' 24 fps default.
        regions: region maps (a :class:`PromptRegions`, a list of :class:`RegionMap` per image, or one map),
            or a method name for :func:`hf_vattr.regions.build_regions` (``"auto"``, ``"vlm"``, ``"dinov3"``, ...);
            default: a regular grid of ``grid_k`` regions per image (per frame group of a video). ``"prefill"``:
            the same regions as ``"vlm"``, built from the vision tower's output of ``generate``'s own prefill
            (no extra vision pass); ``streamer.regions`` is then set once generation has started. Batches: a
            method name, or one region spec per row.
        splitter: span splitter; default :class:`ReasoningStepSplitter` (one copy per sequence).
        format: the model family's :class:`~hf_vattr.reasoning.formats.ThinkingFormat` (or its name); default: detected
            from the processor and the prompt (:func:`~hf_vattr.reasoning.formats.detect_format`). ``streamer.format``
            is the one used.
        skip_prompt: as for ``TextStreamer``: leave the prompt out of :meth:`on_finalized_text` (default True).
        print_text: print the text as it is generated, like ``TextStreamer`` (sequence 0). Off by default:
            a streamer is meant to be iterated, and printing besides would double every line.
        timeout: seconds a consumer waits for the next event while generation runs, before
            :class:`AttributionTimeout`; ``None`` waits as long as generation runs.
        start_timeout: seconds a consumer waits for a ``generate`` call to start using this streamer,
            before :class:`GenerationError` (a loop over a streamer nobody generates with never hangs).
        keep_features: attach the (L, H, K) features to each token event (for analysis and training).
        **decode_kwargs: passed to the tokenizer's ``decode``, as for ``TextStreamer``.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        inputs: Any = None,
        estimator: Any | None = None,
        images: Sequence[Any] | None = None,
        videos: Any = None,
        video_metadata: Any = None,
        regions: PromptRegions | Sequence[RegionMap] | RegionMap | str | None = None,
        grid_k: int = 16,
        splitter: SpanSplitter | None = None,
        format: ThinkingFormat | str | None = None,  # noqa: A002 - the public name
        skip_prompt: bool = True,
        print_text: bool = False,
        timeout: float | None = None,
        start_timeout: float = 60.0,
        keep_features: bool = False,
        **decode_kwargs: Any,
    ) -> None:
        super().__init__(getattr(processor, "tokenizer", processor), skip_prompt=skip_prompt, **decode_kwargs)
        self.model = model
        if estimator is not None:
            estimator.check_compatible(model)  # now, not at generate time
        self._session_options = dict(estimator=estimator, images=images, videos=videos, video_metadata=video_metadata,
                                     regions=regions, grid_k=grid_k)
        self._built_inputs = inputs
        self.session: AttributionSession | None = None
        if inputs is not None:
            self.session = AttributionSession(model, inputs, **self._session_options)
        self._splitter = splitter or ReasoningStepSplitter()
        self.format: ThinkingFormat | None = resolve_format(format)
        self.print_text = print_text
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.keep_features = keep_features
        self.traces: list[AttributionTrace] = [] if self.session is None else self._row_traces()
        # A plain deque polled by the worker: appending wakes no thread, so the decode loop never hands the GIL
        # to the worker in the middle of a step (a Queue's notify did, costing ~2 ms a token on a busy CPU).
        self._work: collections.deque = collections.deque()
        self._wake = threading.Event()  # set only for the end of the stream, so the last events are not late
        self._events: queue.Queue = queue.Queue()
        self._state = "new"  # new -> running -> done | failed | closed
        self._opened = False  # the prompt arrived and the capture runs
        self._lock = threading.Lock()
        self._failure: _Failure | None = None
        self._reuse_error: StreamerStateError | None = None
        self._worker: threading.Thread | None = None
        self._thread: threading.Thread | None = None  # the generate thread started by :meth:`generate`
        self._generate_thread_id: int | None = None
        self._closed = threading.Event()  # read by the stopping criterion: generate ends at the next token
        self._exited = threading.Event()  # the generate call that used this streamer has returned or raised
        self._output: Any = None
        self._eos_ids = self._eos_token_ids(model)
        _arm(model, self)
        weakref.finalize(self, _disarm, weakref.ref(model))  # a streamer dropped unused leaves no wrapper behind

    # ------------------------------------------------------------------ views
    @property
    def trace(self) -> AttributionTrace:
        """The trace of sequence 0 (``traces`` holds one per sequence)."""
        return self.traces[0] if self.traces else self._not_started("trace")

    @property
    def estimator(self) -> Any:
        """The estimator scoring this stream (the session's copy on the model's device once prepared)."""
        return self._session_options["estimator"] if self.session is None else self.session.estimator

    @property
    def layout(self) -> VisualLayout:
        return self.layouts[0]

    @property
    def layouts(self) -> list[VisualLayout]:
        return self._not_started("layouts") if self.session is None else self.session.layouts

    @property
    def regions(self) -> PromptRegions | None:
        """Sequence 0's regions; ``None`` until known (``regions="prefill"``, or no ``inputs=`` before generate)."""
        return None if self.session is None else self.session.regions[0]

    @property
    def capture(self) -> Any:
        return None if self.session is None else self.session.capture

    def _not_started(self, what: str) -> Any:
        raise StreamerStateError(f"streamer.{what} is known once generate(...) has received the prompt (or pass "
                                 "inputs= to the constructor).")

    def _row_traces(self) -> list[AttributionTrace]:
        assert self.session is not None
        return [AttributionTrace(r, sequence=i, images=self.session.images[i], calibrated=self.session.calibrated)
                for i, r in enumerate(self.session.regions)]

    @staticmethod
    def _eos_token_ids(model: Any) -> set[int]:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    # ------------------------------------------------------------------ running generate
    def generate(self, **generate_kwargs: Any) -> Iterator[TokenAttribution | SpanAttribution]:
        """Run ``model.generate(**generate_kwargs, streamer=self)`` in a thread this streamer owns; returns the events.

        Iterate over the result. Leaving the loop early (``break``) stops generation at the next token and
        waits for it; any exception of the call, from argument checks to the last token, reaches the loop as
        :class:`GenerationError`. After the loop, :meth:`join` returns generate's output.
        """
        if "streamer" in generate_kwargs:
            raise TypeError("streamer.generate(...) passes itself as the streamer; drop the streamer= argument.")
        if self._state != "new" or self._thread is not None:
            raise StreamerStateError("This AttributionStreamer already served a generate() call; create a new "
                                     "streamer for each call.")
        if generate_kwargs.get("eos_token_id") is not None:
            value = generate_kwargs["eos_token_id"]
            self._eos_ids = {int(e) for e in (value if isinstance(value, (list, tuple)) else [value])}

        def run() -> None:
            try:
                self.model.generate(**generate_kwargs, streamer=self)
            except BaseException as error:  # noqa: BLE001 - reported to the consumer (a no-op if already)
                self._fail(error, f"generate raised {type(error).__name__}: {error}")

        self._thread = threading.Thread(target=run, daemon=True, name="hf_vattr-generate")
        # Interpreter exit with the loop left open: stop at the next token and join, instead of tearing down
        # a thread that is still inside the model (which aborts the process).
        weakref.finalize(self, _stop_generate_thread, self._closed, self._thread)
        self._thread.start()
        return self._events_then_close()

    def _events_then_close(self) -> Iterator[TokenAttribution | SpanAttribution]:
        try:
            yield from self
        finally:  # also on break (the generator is closed) and on an error in the loop
            self.close()

    def join(self, timeout: float | None = None) -> Any:
        """Wait for the generate call that used this streamer to finish; returns its output (None if it failed)."""
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._state != "new":
            self._exited.wait(timeout)
        return self._output

    def _run_generate(self, generate: Callable, args: tuple, kwargs: dict) -> Any:
        """The armed ``model.generate``: scope everything to this call, and undo it before returning or raising."""
        with self._lock:
            if self._state == "running":
                raise StreamerStateError("This AttributionStreamer is already streaming another generate() call; "
                                         "create a new streamer for each call.")
            if self._state != "new":
                return generate(*args, **kwargs)  # put() refuses the prompt with the usual reuse error
            self._state = "running"
            self._generate_thread_id = threading.get_ident()
        try:
            inputs = _prompt_inputs(args, kwargs)
            if self.session is None:
                self.session = AttributionSession(self.model, inputs, **self._session_options)
                self.traces = self._row_traces()
            elif not _same_prompt(self._built_inputs, inputs):
                raise StreamerInputError(
                    "generate(...) received other inputs than the AttributionStreamer was built with (input_ids, "
                    "image_grid_thw or video_grid_thw differ). Build the streamer without inputs= (it takes them from generate), or "
                    "with the very inputs you pass to generate.")
            self.session.attach()
            stop = _StopWhenClosed(self._closed)
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), stop])
            output = generate(*args, **kwargs)
        except BaseException as error:
            self._fail(error, f"generate raised {type(error).__name__}: {error}")
            raise
        else:
            if not self._opened:
                self._fail(None, "generate() returned without streaming any token")
            else:
                self.end()  # a no-op when generate ended the stream itself, as transformers does
            self._output = output
            return output
        finally:
            self._release()
            worker = self._worker
            if worker is not None and worker is not threading.current_thread():
                worker.join()  # the failure (or end) is with the consumer before generate's caller goes on
            self._exited.set()

    def _start_by_hand(self) -> None:
        """For benchmarks that run their own decode loop (``put`` per step): what the generate wrapper does first.

        Needs ``inputs=`` at construction; pair with :meth:`_finish_by_hand`.
        """
        with self._lock:
            self._state = "running"
            self._generate_thread_id = threading.get_ident()
        self.session.attach()  # type: ignore[union-attr]

    def _finish_by_hand(self) -> None:
        self.end()
        self._release()

    def close(self) -> None:
        """Stop attributing now: end the stream, stop a generation using this streamer at its next token, wait for it.

        Called on leaving a ``with`` block and when the loop over :meth:`generate` ends (also by ``break``).
        """
        with self._lock:
            state = self._state
            if state in ("new", "running"):
                self._state = "closed"
        self._closed.set()
        if self._generate_thread_id is None:  # no generate ran through the wrapper: nothing else will disarm it
            self._release()
        if state in ("new", "running"):
            self._end_stream(_END)
        if state == "new" or threading.get_ident() in (self._generate_thread_id, getattr(self._worker, "ident", None)):
            return
        if self._thread is not None:
            self._thread.join()  # it stops at its next token (the stopping criterion)
        elif self._generate_thread_id is not None:
            self._exited.wait()  # the caller's own generate: it stops at its next token too

    def __enter__(self) -> "AttributionStreamer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ producer side (generate's thread)
    def put(self, value: torch.Tensor) -> None:
        if self._state == "running" and threading.get_ident() == self._generate_thread_id:
            if not self._opened:
                self._open(value)
                return
            try:
                features, scores = self.session.scores()  # type: ignore[union-attr]
            except BaseException as error:
                self._fail(error, f"attention capture failed: {error}")
                raise
            self._work.append((value.reshape(-1).tolist(), scores, features if self.keep_features else None))
        elif self._state in ("new", "running"):
            # Another generate than the armed one: refused there. Before the stream starts this is the only call
            # the consumer could be waiting for, so it learns too; a running stream goes on untouched.
            error = StreamerStateError(
                "This AttributionStreamer was passed to a generate() it was not armed for: use the model it was "
                "built with (model.generate(..., streamer=streamer) or streamer.generate(...)), one call at a time.")
            if self._state == "new":
                self._fail(error, str(error))
            raise error
        elif value.dim() == 2:  # a prompt once done, failed or closed: a second generate() with this streamer
            self._reuse_error = StreamerStateError(
                f"This AttributionStreamer already served a generate() call or was closed ({self._state}); create "
                "a new streamer for each call.")
            self._events.put(_Failure(self._reuse_error, str(self._reuse_error)))
            raise self._reuse_error
        # closed: tokens after close() are dropped; the stopping criterion ends generate at this step

    def _open(self, prompt_ids: torch.Tensor) -> None:
        """First put (the prompt): start capturing, start the worker."""
        prompt_ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
        session = self.session
        assert session is not None
        try:
            session.open(prompt_ids.shape[0])
        except BaseException as error:
            self._fail(error, f"attribution could not start: {error}")
            raise
        rows = session.row_of_sequence
        self.traces = [AttributionTrace(session.regions[r], sequence=s, images=session.images[r],
                                        calibrated=session.calibrated) for s, r in enumerate(rows)]
        texts = [self.tokenizer.decode(prompt_ids[s].tolist(), skip_special_tokens=False) for s in range(len(rows))]
        if self.format is None:
            self.format = detect_format(self.tokenizer, texts[0])
        if getattr(self._splitter, "auto_format", False):
            self._splitter.set_format(self.format)  # type: ignore[attr-defined]
        self._decoders = [TokenTextDecoder(self.tokenizer, self._tag_texts()) for _ in rows]
        self._splitters = [self._splitter if s == 0 else copy.deepcopy(self._splitter) for s in range(len(rows))]
        self._held: list[collections.deque] = [collections.deque() for _ in rows]  # tokens whose section waits
        self._ended = [False] * len(rows)
        for s, splitter in enumerate(self._splitters):
            self.traces[s].prompt_text = texts[s]
            splitter.reset(texts[s])
        # Only when someone receives it (print_text, or a subclass overriding on_finalized_text): TextStreamer
        # re-decodes the line so far at every token, work the worker need not share the GIL with otherwise.
        self._delivers_text = self.print_text or type(self).on_finalized_text is not AttributionStreamer.on_finalized_text
        if self._delivers_text:
            TextStreamer.put(self, prompt_ids[0])  # skip_prompt: only marks it; else the prompt text, as TextStreamer
        self._opened = True
        worker = threading.Thread(target=self._work_loop, name="hf_vattr-attribution", daemon=True)
        worker.start()
        self._worker = worker

    def _tag_texts(self) -> tuple[str, ...]:
        """Tag texts the decoder keeps even when they are special tokens: the format's and the splitter's."""
        return tag_texts(self._splitter, self.format)

    def end(self) -> None:
        with self._lock:
            if self._state != "running" or not self._opened:
                return
            self._state = "done"
        self._end_stream(_END)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()  # generation is over: let text and spans catch up before generate returns

    def _fail(self, error: BaseException | None, message: str) -> None:
        """Record the first failure, stop generation, and wake the consumer (release is generate's ``finally``)."""
        with self._lock:
            if self._state in ("failed", "done", "closed"):
                return
            self._state = "failed"
            self._failure = _Failure(error, message)
        self._closed.set()
        self._end_stream(self._failure)

    def _release(self) -> None:
        """Undo everything this stream switched or hooked, and disarm the model's generate wrapper."""
        if self.session is not None:
            self.session.close()
        _disarm(weakref.ref(self.model), self)

    def _end_stream(self, item: Any) -> None:
        """Queue the stream's last item (end or failure): through the worker once it runs, so that events
        already decoded come first and it wakes at once; straight to the consumer before that."""
        if self._worker is not None:
            self._work.append(item)
            self._wake.set()
        else:
            self._events.put(item)

    # ------------------------------------------------------------------ worker thread
    def _work_loop(self) -> None:
        try:
            while True:
                if not self._work:
                    self._wake.wait(_POLL_INTERVAL)
                    continue
                item = self._work.popleft()
                if item is _END:
                    for s in range(len(self._splitters)):
                        closed = self._splitters[s].flush()
                        if self._held[s]:
                            self._emit_tokens(s, self._splitters[s].pop_sections())
                        self._emit_spans(s, closed)
                    if self._delivers_text:
                        TextStreamer.end(self)
                    self._events.put(_END)
                    return
                if isinstance(item, _Failure):
                    self._events.put(item)
                    return
                self._handle_step(*item)
        except BaseException as error:  # never leave the consumer waiting; generate stops at its next token
            with self._lock:
                if self._state in ("new", "running"):
                    self._state = "failed"
            self._closed.set()
            self._events.put(_Failure(error, f"attribution worker failed: {error}"))

    def _handle_step(self, token_ids: list[int], scores: torch.Tensor, features: torch.Tensor | None) -> None:
        scores = scores.detach().float().cpu()
        for s, token_id in enumerate(token_ids):
            if self._ended[s]:
                continue  # a finished sequence of a batch: generate pads it, a batch-1 run would have stopped
            trace = self.traces[s]
            if trace.regions is None:
                trace.regions = self.session.regions[self.session.row_of_sequence[s]]  # type: ignore[union-attr]
            k = trace.regions.num_regions
            index = len(trace.tokens) + len(self._held[s])
            piece = self._decoders[s].push(token_id)
            closed = self._splitters[s].push(index, piece)
            # a token's section can wait for the next pieces (a tag split over tokens): its event waits with it
            self._held[s].append((index, token_id, piece, scores[s, :k].clone(),
                                  None if features is None else features[s, ..., :k].detach().cpu()))
            self._emit_tokens(s, self._splitters[s].pop_sections())
            if s == 0 and self._delivers_text:
                TextStreamer.put(self, torch.tensor([token_id]))  # calls on_finalized_text as TextStreamer does
            self._emit_spans(s, closed)
            if token_id in self._eos_ids and len(token_ids) > 1:
                self._ended[s] = True

    def _emit_tokens(self, s: int, sections: Sequence[str]) -> None:
        """Token events of sequence ``s``'s held tokens whose sections the splitter has settled, in order."""
        trace = self.traces[s]
        for section in sections:
            if not self._held[s]:
                break
            index, token_id, piece, scores, features = self._held[s].popleft()
            event = TokenAttribution(index=index, token_id=token_id, text=piece,
                                     region_scores=self._with_inherited(trace, section, scores), section=section,
                                     features=features, sequence=s, calibrated=trace.calibrated)
            trace.tokens.append(event)
            self._events.put(event)

    def _inherits(self, trace: AttributionTrace, section: str) -> bool:
        """Do this section's scores include the thinking steps' (an answer after steps, an inheriting estimator)?"""
        estimator = self.estimator
        return (estimator is not None and bool(estimator.inherit_weight) and section in INHERITING_SECTIONS
                and any(span.section not in INHERITING_SECTIONS for span in trace.spans))

    def _with_inherited(self, trace: AttributionTrace, section: str, scores: torch.Tensor) -> torch.Tensor:
        """An answer token's scores plus what it inherits from the thinking steps (``LinearEstimator.inherited``)."""
        if not self._inherits(trace, section):
            return scores
        steps = [span.region_scores for span in trace.spans if span.section not in INHERITING_SECTIONS]
        return self.estimator.with_inherited(scores, torch.stack(steps).to(scores))

    def _emit_spans(self, sequence: int, closed: Sequence[Any]) -> None:
        trace = self.traces[sequence]
        for span in closed:
            scores = torch.stack([t.region_scores for t in trace.tokens[span.start:span.end]]).mean(0)
            event = SpanAttribution(len(trace.spans), span.text, (span.start, span.end), scores, span.section,
                                    sequence=sequence, inherited=self._inherits(trace, span.section),
                                    calibrated=trace.calibrated)
            trace.spans.append(event)
            self._events.put(event)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Receives the text exactly as ``TextStreamer`` would (sequence 0); prints it when ``print_text`` is on.

        Override it to send the text elsewhere, as with ``TextStreamer``; it runs in the streamer's worker thread.
        """
        if self.print_text:
            super().on_finalized_text(text, stream_end=stream_end)

    # ------------------------------------------------------------------ consumer side
    def _next_event(self) -> TokenAttribution | SpanAttribution:
        while True:
            if self._reuse_error is not None:
                raise GenerationError(str(self._reuse_error)) from self._reuse_error
            waiting_for_start = self._state == "new"
            try:
                item = self._events.get(timeout=self.start_timeout if waiting_for_start else self.timeout)
                break
            except queue.Empty:
                if waiting_for_start and self._state == "new":
                    raise GenerationError(
                        f"No generate() call used this streamer within {self.start_timeout:g} s. Start one with "
                        "streamer.generate(**inputs) or model.generate(**inputs, streamer=streamer) in another "
                        "thread before iterating (or raise start_timeout)."
                    ) from None
                if not waiting_for_start and self._state == "running":
                    raise AttributionTimeout(
                        f"No attribution event within {self.timeout} s while generate() is still running; "
                        "raise the streamer's timeout."
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
