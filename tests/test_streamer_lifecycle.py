"""The streamer's lifecycle: every failure of generate reaches the consumer, nothing hangs, nothing leaks.

Each test consumes through the public API under a deadline, so a hang fails the test instead of stalling CI.
"""

import threading

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from hf_vattr import AttributionStreamer, TokenAttribution
from hf_vattr.capture import CaptureError, capture_active
from hf_vattr.streaming.streamer import GenerationError, StreamerInputError, StreamerStateError, armed_on
from hf_vattr.testing import example_image, example_inputs

DEADLINE = 20.0  # seconds; a hang fails here (failures arrive within a second in practice)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class Boom(Exception):
    pass


@pytest.fixture
def assert_restored(get_tiny, consume):
    """``assert_restored(model)``: a new streamer streams on the same model right away; then nothing stays
    patched or hooked."""
    def check(model):
        _, proc = get_tiny(model.config.model_type)
        inputs = example_inputs(proc)
        fresh = AttributionStreamer(model, proc, inputs=inputs)
        events, error = consume(fresh.generate(**inputs, max_new_tokens=2, do_sample=False))
        assert error is None and sum(isinstance(e, TokenAttribution) for e in events) == 2
        fresh.join()
        assert_nothing_installed(model)
    return check


def assert_nothing_installed(model):
    """What a streamer installs is gone: the attention switch, the vision hook, the generate wrapper."""
    assert not capture_active(model)
    assert not model._forward_hooks
    assert not model.model.visual._forward_hooks
    assert not armed_on(model) and "generate" not in vars(model)


def generate_in_thread(model, **kwargs):
    thread = threading.Thread(target=model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def setup(get_tiny):
    """``setup(family="qwen3_vl", **streamer_kwargs) -> (model, processor, inputs, streamer)`` on the shared model."""
    def build(family="qwen3_vl", **streamer_kwargs):
        model, proc = get_tiny(family)
        inputs = example_inputs(proc)
        return model, proc, inputs, AttributionStreamer(model, proc, inputs=inputs, **streamer_kwargs)
    return build


@pytest.mark.parametrize("safe_way", [True, False], ids=["streamer.generate", "own-thread"])
@pytest.mark.parametrize("mistake, cause, match", [
    (dict(num_beams=2), ValueError, "beam"),
    (dict(max_new_token=3), ValueError, "max_new_token"),
    (dict(num_return_sequences=2, do_sample=False), ValueError, "num_return_sequences"),
])
def test_argument_mistakes_reach_the_consumer(safe_way, mistake, cause, match, consume, assert_restored, setup):
    model, _, inputs, streamer = setup()
    kwargs = dict(**inputs, max_new_tokens=3, **mistake)
    if safe_way:
        streamer.generate(**kwargs)
    else:
        generate_in_thread(model, streamer=streamer, **kwargs)
    events, error = consume(streamer)
    assert isinstance(error, GenerationError) and isinstance(error.__cause__, cause)
    assert match in str(error.__cause__)
    assert_restored(model)


def test_failure_in_the_vision_tower_reaches_the_consumer(consume, assert_restored, setup):
    model, _, inputs, streamer = setup("glm4v")
    visual = model.model.visual
    handle = visual.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(Boom("vision tower OOM")))
    try:
        generate_in_thread(model, **inputs, streamer=streamer, max_new_tokens=3)
        _, error = consume(streamer)
    finally:
        handle.remove()
    assert isinstance(error, GenerationError) and isinstance(error.__cause__, Boom)
    assert_restored(model)


def test_busy_model_is_a_clear_error_not_a_hang(consume, assert_restored, setup):
    model, proc, inputs, first = setup("qwen2_5_vl")
    gate = threading.Event()
    handle = model.register_forward_pre_hook(lambda *a: None if gate.wait(DEADLINE) else None)
    try:
        first.generate(**inputs, max_new_tokens=2, do_sample=False)
        while first.capture is None or not first.capture.active:
            threading.Event().wait(0.01)
        second = AttributionStreamer(model, proc, inputs=inputs)
        _, error = consume(second.generate(**inputs, max_new_tokens=2))
    finally:
        gate.set()
        handle.remove()
    assert isinstance(error, GenerationError) and isinstance(error.__cause__, CaptureError)
    assert "already has an active attribution capture" in str(error.__cause__)
    events, error = consume(first)
    assert error is None and sum(isinstance(e, TokenAttribution) for e in events) == 2
    assert_restored(model)


def test_prefill_region_mismatch_reaches_the_consumer(get_tiny, consume, assert_restored):
    model, proc = get_tiny("qwen3_vl")
    small = example_inputs(proc, [example_image(120, 120)])
    large = example_inputs(proc, [example_image(200, 260)])
    streamer = AttributionStreamer(model, proc, inputs=small, regions="prefill")
    generate_in_thread(model, **large, streamer=streamer, max_new_tokens=3)
    _, error = consume(streamer)
    assert isinstance(error, GenerationError) and isinstance(error.__cause__, (ValueError, CaptureError))
    assert_restored(model)


class RaiseAt(LogitsProcessor):
    def __init__(self, step, error=Boom):
        self.step, self.calls, self.error = step, 0, error

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls >= self.step:
            raise self.error("outside the forward")
        return scores


class StopBoom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] > self.at:
            raise Boom("in a stopping criterion")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("where", ["logits_processor", "stopping_criteria"])
def test_failure_outside_a_forward_in_the_callers_thread(where, consume, assert_restored, setup):
    """generate runs in the caller's thread and raises between forwards: the consumer (another thread)
    gets the original exception, and everything is restored without anyone consuming."""
    model, _, inputs, streamer = setup("qwen3_vl_moe")
    if where == "logits_processor":
        extra = dict(logits_processor=LogitsProcessorList([RaiseAt(3)]))
    else:
        criterion = StopBoom()
        criterion.at = inputs["input_ids"].shape[1] + 2
        extra = dict(stopping_criteria=StoppingCriteriaList([criterion]))
    box = {}
    consumer = threading.Thread(target=lambda: box.update(result=consume(streamer)), daemon=True)
    consumer.start()
    with pytest.raises(Boom) as raised:
        model.generate(**inputs, streamer=streamer, max_new_tokens=10, do_sample=False, **extra)
    consumer.join(DEADLINE)
    events, error = box["result"]
    assert isinstance(error, GenerationError) and error.__cause__ is raised.value
    assert_restored(model)


def test_keyboard_interrupt_in_the_callers_thread_leaves_nothing_behind(consume, assert_restored, setup):
    model, _, inputs, streamer = setup("glm4v_moe")
    with pytest.raises(KeyboardInterrupt):
        model.generate(**inputs, streamer=streamer, max_new_tokens=10,
                       logits_processor=LogitsProcessorList([RaiseAt(2, KeyboardInterrupt)]))
    assert_restored(model)  # immediately: the next capture reclaims the dead one
    _, error = consume(streamer)
    assert isinstance(error, GenerationError)


def test_failure_in_a_forward_keeps_its_cause_even_with_a_consumer_timeout(consume, assert_restored, setup):
    model, _, inputs, streamer = setup("glm4v", timeout=0.5)
    mlp = model.model.language_model.layers[1].mlp
    calls = {"n": 0}

    def explode(*args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Boom("in a forward")

    handle = mlp.register_forward_pre_hook(explode)
    try:
        _, error = consume(streamer.generate(**inputs, max_new_tokens=10))
    finally:
        handle.remove()
    assert isinstance(error, GenerationError) and isinstance(error.__cause__, Boom)
    assert_restored(model)


def test_reusing_a_finished_streamer_is_a_clear_error(consume, assert_restored, setup):
    model, _, inputs, streamer = setup()
    events, error = consume(streamer.generate(**inputs, max_new_tokens=2))
    assert error is None
    with pytest.raises(StreamerStateError, match="new streamer"):
        streamer.generate(**inputs, max_new_tokens=2)
    with pytest.raises(StreamerStateError, match="new streamer"):
        model.generate(**inputs, streamer=streamer, max_new_tokens=2)
    _, error = consume(streamer)
    assert isinstance(error, GenerationError) and isinstance(error.__cause__, StreamerStateError)
    assert_restored(model)


def test_a_streamer_nobody_generates_with_does_not_hang(consume, setup):
    model, _, _, streamer = setup(start_timeout=0.5)
    _, error = consume(streamer)
    assert isinstance(error, GenerationError) and "No generate() call" in str(error)


def test_two_prefill_streamers_built_early_do_not_cross(get_tiny, consume, assert_restored):
    model, proc = get_tiny("qwen3_vl")
    images_a, images_b = [example_image(seed=1)], [example_image(seed=7)]
    inputs_a, inputs_b = example_inputs(proc, images_a), example_inputs(proc, images_b)
    a = AttributionStreamer(model, proc, inputs=inputs_a, regions="prefill")
    b = AttributionStreamer(model, proc, inputs=inputs_b, regions="prefill")
    for streamer, inputs in ((a, inputs_a), (b, inputs_b)):
        events, error = consume(streamer.generate(**inputs, max_new_tokens=2, do_sample=False))
        assert error is None
    for streamer, inputs, images in ((a, inputs_a, images_a), (b, inputs_b, images_b)):
        reference = AttributionStreamer(model, proc, inputs=inputs, images=images, regions="vlm")
        assert torch.equal(streamer.regions.membership(), reference.regions.membership())
        reference.close()
    assert not torch.equal(a.regions.membership(), b.regions.membership())
    assert_restored(model)


def test_close_after_break_frees_the_model(assert_restored, setup):
    model, _, inputs, streamer = setup("qwen2_5_vl")
    with streamer:
        for event in streamer.generate(**inputs, max_new_tokens=30, do_sample=False):
            break
    assert_restored(model)
