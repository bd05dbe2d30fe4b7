"""What the streamer installs is scoped to its model and its own generate call, and gone when that call ends.

Also: the same attribution with every cache implementation, inputs taken from generate's own kwargs
(so ``pipeline(...)`` streams), and leaving the loop early stops generation (also at interpreter exit).
"""

import subprocess
import sys
import threading

import pytest
import torch
from transformers import LogitsProcessorList

from hf_vattr import AttributionStreamer, GenerationError, TokenAttribution
from hf_vattr.capture import capture_active
from hf_vattr.streaming.streamer import armed_on
from hf_vattr.testing import example_image, example_inputs

from test_streamer import _eager_token_features, _random_estimator
from test_streamer_lifecycle import Boom, RaiseAt

NEW_TOKENS = 8
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def assert_nothing_installed(model):
    assert not capture_active(model), "the text attention is still switched"
    assert not model._forward_hooks and not model.model.visual._forward_hooks, "a hook stayed on the model"
    assert not armed_on(model) and "generate" not in vars(model), "model.generate is still wrapped"


def failure_already_queued(streamer) -> bool:
    """The consumer's next read returns the failure at once: it is queued, not on its way."""
    queued = list(streamer._events.queue)
    return bool(queued) and type(queued[-1]).__name__ == "_Failure"


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_logits_processor_error_in_the_callers_thread_is_cleaned_up_before_except_runs(error, get_tiny, consume):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc)
    try:
        model.generate(**inputs, streamer=streamer, max_new_tokens=10, do_sample=False,
                       logits_processor=LogitsProcessorList([RaiseAt(3, error)]))
    except error as raised:
        assert_nothing_installed(model)  # right here, no waiting
        assert failure_already_queued(streamer)
        cause = raised
    events, failure = consume(streamer)
    assert isinstance(failure, GenerationError) and failure.__cause__ is cause
    assert sum(isinstance(e, TokenAttribution) for e in events) == 2


def test_vision_tower_error_in_the_callers_thread_is_cleaned_up_before_except_runs(get_tiny, consume):
    model, proc = get_tiny("glm4v")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, regions="prefill", start_timeout=30)
    handle = model.model.visual.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(Boom("vision OOM")))
    try:
        model.generate(**inputs, streamer=streamer, max_new_tokens=3)
    except Boom as raised:
        handle.remove()
        assert_nothing_installed(model)
        assert failure_already_queued(streamer)
        cause = raised
    _, failure = consume(streamer)
    assert isinstance(failure, GenerationError) and failure.__cause__ is cause


@pytest.mark.parametrize("other", ["generate", "forward"])
def test_another_threads_calls_on_the_same_model_are_not_recorded(other, get_tiny):
    """A plain generate (or forward) of the same model in another thread, mid-stream: the streamer's
    scores equal a solo run's exactly, and the other call's output equals its own solo run."""
    model, proc = get_tiny("qwen2_5_vl")
    inputs = example_inputs(proc)
    other_inputs = example_inputs(proc, [example_image(100, 140, seed=3)])
    estimator = _random_estimator(model)

    def stream(gate=None):
        streamer = AttributionStreamer(model, proc, estimator=estimator)
        calls = []

        def hold(*args):  # the streamer's generate thread waits at the gate after its third forward
            if threading.current_thread().name == "hf_vattr-generate":
                calls.append(1)
                if len(calls) == 3:
                    reached.set()
                    gate.wait(20)

        hook = None if gate is None else model.register_forward_hook(hold)  # after its forward, before its put
        try:
            events = list(streamer.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False))
        finally:
            if hook is not None:
                hook.remove()
        return torch.stack([e.region_scores for e in events if isinstance(e, TokenAttribution)])

    def run_other():
        with torch.no_grad():
            if other == "generate":
                return model.generate(**other_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            return model(**other_inputs).logits

    solo, other_solo = stream(), run_other()
    box = {}
    gate, reached = threading.Event(), threading.Event()
    runner = threading.Thread(target=lambda: box.update(scores=stream(gate)))
    runner.start()
    assert reached.wait(30) and capture_active(model)  # mid-stream, the capture on
    box["other"] = run_other()  # while the streamer's generate waits inside the model
    gate.set()
    runner.join(30)
    assert torch.equal(box["scores"], solo)
    assert torch.equal(box["other"], other_solo)
    assert_nothing_installed(model)


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v", "qwen2_5_vl"])
def test_static_cache_gives_the_same_attribution_as_the_dynamic_cache_and_eager(family, get_tiny):
    model, proc = get_tiny(family)
    inputs = example_inputs(proc)
    estimator = _random_estimator(model)
    runs = {}
    for cache in ("dynamic", "static"):
        streamer = AttributionStreamer(model, proc, estimator=estimator, keep_features=True)
        events = list(streamer.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                        cache_implementation=cache))
        tokens = [e for e in events if isinstance(e, TokenAttribution)]
        runs[cache] = (torch.stack([t.features for t in tokens]), torch.stack([t.region_scores for t in tokens]),
                       streamer.join(), streamer)
        assert_nothing_installed(model)
    (f_dyn, s_dyn, out_dyn, streamer), (f_static, s_static, out_static, _) = runs["dynamic"], runs["static"]
    assert torch.equal(out_dyn, out_static)
    reference = _eager_token_features(get_tiny, family, inputs, out_dyn, streamer)  # the prefill row included
    torch.testing.assert_close(f_static, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(f_dyn, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_static, s_dyn, atol=1e-5, rtol=1e-5)


def test_inputs_are_taken_from_generate_and_a_pipeline_streams(get_tiny, consume, monkeypatch):
    from transformers import pipeline

    model, proc = get_tiny("qwen3_vl")
    image = example_image()
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is shown?"}]}]
    by_hand = AttributionStreamer(model, proc, images=[image])
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[prompt], images=[image], return_tensors="pt")
    expected = [e for e in by_hand.generate(**inputs, max_new_tokens=4, do_sample=False)
                if isinstance(e, TokenAttribution)]

    monkeypatch.setattr(proc.tokenizer, "padding_side", proc.tokenizer.padding_side)  # the pipeline sets "left"
    pipe = pipeline("image-text-to-text", model=model, processor=proc)
    streamer = AttributionStreamer(model, proc, images=[image])
    box = {}
    runner = threading.Thread(target=lambda: box.update(out=pipe(
        text=messages, generate_kwargs={"streamer": streamer, "max_new_tokens": 4, "do_sample": False})))
    runner.start()
    events, error = consume(streamer)
    runner.join(30)
    assert error is None and "out" in box
    tokens = [e for e in events if isinstance(e, TokenAttribution)]
    assert [t.token_id for t in tokens] == [t.token_id for t in expected]
    assert torch.equal(torch.stack([t.region_scores for t in tokens]),
                       torch.stack([t.region_scores for t in expected]))
    assert streamer.layout.positions.tolist() == by_hand.layout.positions.tolist()
    assert_nothing_installed(model)


def test_close_and_break_stop_generation_at_the_next_token(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc)
    for event in streamer.generate(**inputs, max_new_tokens=200, min_new_tokens=200, do_sample=False):
        break  # the generator is closed here: close() stops generate and joins it
    assert not streamer._thread.is_alive()
    output = streamer.join()
    assert output.shape[1] - inputs["input_ids"].shape[1] < 200  # stopped early
    assert_nothing_installed(model)


_SCRIPT = """
from hf_vattr import AttributionStreamer
from hf_vattr.testing import example_inputs, tiny_vlm
model, proc = tiny_vlm("qwen3_vl")
inputs = example_inputs(proc)
streamer = AttributionStreamer(model, proc)
events = streamer.generate(**inputs, max_new_tokens=2000, min_new_tokens=2000, do_sample=False)
{leave}
print("END OF SCRIPT", flush=True)
"""


_LEAVES = {"break": "for e in events:\n    break", "loop-left-open": "next(events)",
           "streamer-iterated": "it = iter(streamer); next(it)"}


@pytest.fixture(scope="module")
def leaving_scripts(tmp_path_factory):
    """One interpreter per way of leaving the loop, all started at once: each spends most of its time importing
    torch and transformers on one core."""
    folder = tmp_path_factory.mktemp("leave")
    runs = {}
    for name, leave in _LEAVES.items():
        script = folder / f"{name}.py"
        script.write_text(_SCRIPT.format(leave=leave))
        runs[name] = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
        run.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("leave", list(_LEAVES))
def test_script_that_leaves_the_loop_and_ends_exits_cleanly(leave, leaving_scripts):
    stdout, stderr = leaving_scripts[leave].communicate(timeout=120)
    assert leaving_scripts[leave].returncode == 0, stderr[-2000:]
    assert "END OF SCRIPT" in stdout


def test_regions_accept_an_int_as_k_and_list_the_accepted_forms_otherwise(get_tiny):
    import numpy as np

    from hf_vattr import StreamerInputError, build_regions

    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    as_int = AttributionStreamer(model, proc, inputs=inputs, regions=4)
    as_grid = AttributionStreamer(model, proc, inputs=inputs, regions="grid", grid_k=4)
    assert torch.equal(as_int.regions.membership(), as_grid.regions.membership())
    several = build_regions(as_int.layout, method="grid", k=[4, 8])
    for wrong in (several, np.zeros((4, 4), dtype=int), 0):
        with pytest.raises(StreamerInputError, match="regions="):
            AttributionStreamer(model, proc, inputs=inputs, regions=wrong)


def test_a_batch_given_too_few_images_names_each_rows_count(get_tiny, monkeypatch):
    from hf_vattr import StreamerInputError

    model, proc = get_tiny("qwen3_vl")
    images = [example_image(), example_image(seed=4)]
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                                        add_generation_prompt=True, tokenize=False) for t in ("a?", "b?")]
    monkeypatch.setattr(proc.tokenizer, "padding_side", "left")  # the shared processor
    inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True)
    with pytest.raises(StreamerInputError, match=r"Got 1 image\(s\) for a batch of 2 rows holding row 0: 1 image\(s\), row 1: 1 image\(s\)"):
        AttributionStreamer(model, proc, inputs=inputs, images=images[:1])


def test_a_finalizer_running_inside_arm_neither_deadlocks_nor_leaves_the_streamer_unarmed(monkeypatch, get_tiny):
    """Garbage collection can run a dropped streamer's finalizer (which disarms) at any allocation, also while
    a new streamer is being armed on the same thread: that must neither deadlock nor lose the new wrapper."""
    import weakref

    import hf_vattr.streaming.streamer as streamer_module

    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    add = weakref.WeakSet.add
    fired = []

    def add_after_a_finalizer(self, item):
        if isinstance(item, AttributionStreamer) and not fired:  # the wrapper's own set, inside _arm
            fired.append(True)
            streamer_module._disarm(weakref.ref(model))  # as a collected streamer's finalizer would, right here
        return add(self, item)

    monkeypatch.setattr(weakref.WeakSet, "add", add_after_a_finalizer)
    box = {}
    builder = threading.Thread(target=lambda: box.update(streamer=AttributionStreamer(model, proc)), daemon=True)
    builder.start()
    builder.join(20)
    assert not builder.is_alive(), "arming deadlocked"
    monkeypatch.undo()
    assert fired and armed_on(model)
    events = list(box["streamer"].generate(**inputs, max_new_tokens=2, do_sample=False))
    assert sum(isinstance(e, TokenAttribution) for e in events) == 2
    assert_nothing_installed(model)


def test_a_streamer_passed_to_another_generate_is_refused_there_and_its_own_stream_goes_on(get_tiny, consume):
    from hf_vattr import StreamerStateError

    model, proc = get_tiny("qwen2_5_vl")
    other, other_proc = get_tiny("glm4v")
    inputs, other_inputs = example_inputs(proc), example_inputs(other_proc)
    estimator = _random_estimator(model)
    solo = [e.region_scores for e in AttributionStreamer(model, proc, estimator=estimator).generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False) if isinstance(e, TokenAttribution)]

    streamer = AttributionStreamer(model, proc, estimator=estimator)
    gate, reached, calls = threading.Event(), threading.Event(), []

    def hold(*args):
        if threading.current_thread().name == "hf_vattr-generate":
            calls.append(1)
            if len(calls) == 3:
                reached.set()
                gate.wait(20)

    hook = model.register_forward_hook(hold)
    try:
        events = streamer.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert reached.wait(30)
        with pytest.raises(StreamerStateError, match="not armed for"):
            other.generate(**other_inputs, streamer=streamer, max_new_tokens=2)  # mid-stream, another model
        gate.set()
        scores = [e.region_scores for e in events if isinstance(e, TokenAttribution)]
    finally:
        gate.set()
        hook.remove()
    assert torch.equal(torch.stack(scores), torch.stack(solo))
    assert_nothing_installed(model)

    unused = AttributionStreamer(model, proc, start_timeout=30)  # before its stream: the consumer learns too
    with pytest.raises(StreamerStateError, match="not armed for"):
        other.generate(**other_inputs, streamer=unused, max_new_tokens=2)
    _, failure = consume(unused)
    assert isinstance(failure, GenerationError) and isinstance(failure.__cause__, StreamerStateError)
    unused.close()
    assert_nothing_installed(model)
