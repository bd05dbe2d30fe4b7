"""End-to-end streaming on tiny models of every family, checked against eager attention."""

import asyncio
import threading
import time

import pytest
import torch
from transformers import TextStreamer
from transformers import LogitsProcessor, LogitsProcessorList

from hf_vattr import AttributionStreamer, LinearEstimator, SpanAttribution, TokenAttribution
from hf_vattr.capture import capture_active
from hf_vattr.layouts import extend_inputs
from hf_vattr.streaming.streamer import AttributionTimeout, GenerationError, StreamerInputError, armed_on
from hf_vattr.testing import example_image, example_inputs

NEW_TOKENS = 12


def _random_estimator(model, seed=0):
    text = model.config.get_text_config()
    est = LinearEstimator(text.num_hidden_layers, text.num_attention_heads, model_type=model.config.model_type)
    with torch.no_grad():
        est.weight.copy_(torch.randn(est.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return est


def _eager_token_features(get_tiny, family, inputs, sequence, streamer):
    """Reference features: eager attention weights of each predicting row, pooled to regions."""
    eager, _ = get_tiny(family, attn_implementation="eager")
    with torch.no_grad():
        out = eager(**extend_inputs(inputs, sequence), output_attentions=True, use_cache=False)
    att = torch.stack(out.attentions)[:, 0]  # (L, H, T, T)
    prompt_len = inputs["input_ids"].shape[1]
    rows = att[:, :, prompt_len - 1 : sequence.shape[1] - 1]  # rows predicting each generated token
    pooled = rows[..., streamer.layout.positions] @ streamer.regions.membership()  # (L, H, T, K)
    return pooled.permute(2, 0, 1, 3)  # (T, L, H, K)


def test_streams_every_token_with_scores_matching_eager(tiny, family, get_tiny):
    model, proc = tiny
    images = [example_image(), example_image(100, 140, seed=2)]
    inputs = example_inputs(proc, images)
    reference = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    estimator = _random_estimator(model)
    streamer = AttributionStreamer(model, proc, inputs=inputs, estimator=estimator, images=images,
                                   print_text=False, keep_features=True, timeout=60)
    thread = threading.Thread(target=model.generate,
                              kwargs=dict(**inputs, streamer=streamer, max_new_tokens=NEW_TOKENS, do_sample=False))
    thread.start()
    events = list(streamer)
    thread.join()
    tokens = [e for e in events if isinstance(e, TokenAttribution)]
    spans = [e for e in events if isinstance(e, SpanAttribution)]
    generated = reference[0, inputs["input_ids"].shape[1]:].tolist()
    # identical greedy tokens with the streamer attached, one event per token
    assert [t.token_id for t in tokens] == generated
    K = streamer.regions.num_regions
    assert all(t.region_scores.shape == (K,) for t in tokens)
    # scores are the estimator applied to the model's real attention (eager reference)
    ref_feats = _eager_token_features(get_tiny, family, inputs, reference, streamer)
    got_feats = torch.stack([t.features for t in tokens])
    torch.testing.assert_close(got_feats, ref_feats, atol=1e-5, rtol=0)
    with torch.no_grad():
        ref_scores = estimator(ref_feats)
    torch.testing.assert_close(torch.stack([t.region_scores for t in tokens]), ref_scores, atol=1e-4, rtol=1e-4)
    # spans: ordered, disjoint, and their scores are the mean of their tokens' scores
    last_end = 0
    for span in spans:
        start, end = span.token_range
        assert last_end <= start < end <= len(tokens)
        expected = torch.stack([t.region_scores for t in tokens[start:end]]).mean(0)
        torch.testing.assert_close(span.region_scores, expected)
        last_end = end
    assert streamer.trace.tokens == tokens
    assert not capture_active()
    assert not model._forward_hooks


def test_works_without_consumer_and_restores(tiny):
    """generate() finishes with nobody reading: the decode loop never waits for the consumer."""
    model, proc = tiny
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, inputs=inputs, print_text=False)
    out = model.generate(**inputs, streamer=streamer, max_new_tokens=6, do_sample=False)
    assert len(streamer.trace.tokens) == out.shape[1] - inputs["input_ids"].shape[1]
    assert len(list(streamer)) >= len(streamer.trace.tokens)
    assert not capture_active()


def test_is_a_text_streamer_that_prints_what_text_streamer_prints(capsys, get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    model.generate(**inputs, streamer=TextStreamer(proc.tokenizer, skip_prompt=True), max_new_tokens=8,
                   do_sample=False)
    expected = capsys.readouterr().out
    streamer = AttributionStreamer(model, proc, print_text=True)
    assert isinstance(streamer, TextStreamer)
    model.generate(**inputs, streamer=streamer, max_new_tokens=8, do_sample=False)
    assert capsys.readouterr().out == expected
    assert expected.strip()


class _Recorder:
    """Overrides on_finalized_text as TextStreamer users do."""

    def on_finalized_text(self, text, stream_end=False):
        self.received.append((text, stream_end))


class RecordingTextStreamer(_Recorder, TextStreamer):
    pass


class RecordingAttributionStreamer(_Recorder, AttributionStreamer):
    pass


@pytest.mark.parametrize("decode_kwargs", [{}, {"skip_special_tokens": True}], ids=["default", "skip-special"])
def test_subclass_overriding_on_finalized_text_gets_text_streamers_text(decode_kwargs, get_tiny):
    """Same calls, same pieces, same stream_end as a plain TextStreamer(skip_prompt=True), printing off."""
    model, proc = get_tiny("glm4v")
    inputs = example_inputs(proc)
    plain = RecordingTextStreamer(proc.tokenizer, skip_prompt=True, **decode_kwargs)
    plain.received = []
    model.generate(**inputs, streamer=plain, max_new_tokens=12, do_sample=False)
    ours = RecordingAttributionStreamer(model, proc, **decode_kwargs)
    ours.received = []
    events = list(ours.generate(**inputs, max_new_tokens=12, do_sample=False))
    assert ours.received == plain.received
    assert ours.received[-1][1] is True and "".join(text for text, _ in ours.received).strip()
    assert sum(isinstance(e, TokenAttribution) for e in events) == 12


class _Boom(Exception):
    pass


def _break_layer(model, after_calls):
    mlp = model.model.language_model.layers[1].mlp
    original = mlp.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise _Boom("injected failure")
        return original(*args, **kwargs)

    mlp.forward = forward
    return lambda: delattr(mlp, "forward")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the generate thread raises on purpose
def test_exception_in_generation_reaches_consumer_and_restores(get_tiny):
    model, proc = get_tiny("glm4v")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, inputs=inputs, print_text=False, timeout=30)
    undo = _break_layer(model, after_calls=3)
    try:
        streamer.generate(**inputs, max_new_tokens=10)
        with pytest.raises(GenerationError) as err:
            for _ in streamer:
                pass
        streamer.join()
    finally:
        undo()
    assert isinstance(err.value.__cause__, _Boom)
    assert not capture_active()
    assert not model._forward_hooks
    # a fresh streamer on the same model works again
    again = AttributionStreamer(model, proc, inputs=inputs, print_text=False)
    model.generate(**inputs, streamer=again, max_new_tokens=3, do_sample=False)
    assert len(again.trace.tokens) == 3


class _RaiseAt(LogitsProcessor):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls >= self.step:
            raise _Boom("outside the forward")
        return scores


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the generate thread raises on purpose
def test_exception_outside_forward_is_not_a_hang(get_tiny):
    model, proc = get_tiny("qwen2_5_vl")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, inputs=inputs, print_text=False, timeout=30)
    thread = threading.Thread(target=model.generate, kwargs=dict(
        **inputs, streamer=streamer, max_new_tokens=10, logits_processor=LogitsProcessorList([_RaiseAt(3)])))
    thread.start()
    start = time.monotonic()
    with pytest.raises(GenerationError, match="outside the forward") as err:
        for _ in streamer:
            pass
    assert isinstance(err.value.__cause__, _Boom)
    assert time.monotonic() - start < 10
    thread.join()
    assert not capture_active()


def test_consumer_timeout_is_distinguishable_from_end(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, inputs=inputs, print_text=False, timeout=0.3)
    gate = threading.Event()
    handle = model.register_forward_pre_hook(lambda *a: None if gate.wait(10) else None)
    try:
        streamer.generate(**inputs, max_new_tokens=4, do_sample=False)
        with pytest.raises(AttributionTimeout):
            next(streamer)
    finally:
        gate.set()
        handle.remove()
    streamer.join()
    events = list(streamer)  # generation resumed: everything arrives, then a normal end
    assert sum(isinstance(e, TokenAttribution) for e in events) == 4


def test_async_iteration(get_tiny):
    model, proc = get_tiny("qwen3_vl_moe")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, inputs=inputs, print_text=False, timeout=60)

    async def consume():
        streamer.generate(**inputs, max_new_tokens=5, do_sample=False)
        return [event async for event in streamer]

    events = asyncio.run(consume())
    assert sum(isinstance(e, TokenAttribution) for e in events) == 5


def test_prompt_without_image_is_refused(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = proc(text=["just text"], return_tensors="pt")
    with pytest.raises(ValueError, match="no image"):
        AttributionStreamer(model, proc, inputs=inputs)


def test_mismatched_estimator_is_refused(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    wrong = LinearEstimator(num_layers=28, num_heads=16, model_type="qwen3_vl")
    with pytest.raises(ValueError, match="num_layers|28"):
        AttributionStreamer(model, proc, inputs=inputs, estimator=wrong)
    other_family = LinearEstimator(num_layers=2, num_heads=4, model_type="glm4v")
    with pytest.raises(ValueError, match="glm4v"):
        AttributionStreamer(model, proc, inputs=inputs, estimator=other_family)


def test_beam_search_is_refused_and_nothing_stays_patched(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, inputs=inputs, print_text=False)
    with pytest.raises(ValueError, match="beam"):
        model.generate(**inputs, streamer=streamer, num_beams=2, max_new_tokens=3)
    assert not capture_active()
    assert not model._forward_hooks


def test_semantic_regions_by_method_name(get_tiny):
    """The streamer takes any region method; here the VLM's own vision features + Ward."""
    model, proc = get_tiny("qwen2_5_vl")
    images = [example_image(), example_image(100, 140, seed=2)]
    inputs = example_inputs(proc, images)
    streamer = AttributionStreamer(model, proc, inputs=inputs, images=images, regions="vlm", print_text=False)
    assert [m.method for m in streamer.regions.maps] == ["vlm", "vlm"]
    model.generate(**inputs, streamer=streamer, max_new_tokens=3, do_sample=False)
    assert streamer.trace.token_scores().shape == (3, streamer.regions.num_regions)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "glm4v"])
def test_prefill_regions_equal_vlm_regions_without_an_extra_vision_pass(family, get_tiny):
    """regions="prefill" clusters the vision tower output of generate's own prefill: the same regions
    and scores as regions="vlm" (which runs the tower once more up front), and one tower call in all."""
    model, proc = get_tiny(family)
    images = [example_image(), example_image(100, 140, seed=2)]
    inputs = example_inputs(proc, images)
    visual = model.model.visual
    calls = []
    handle = visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        ref = AttributionStreamer(model, proc, inputs=inputs, images=images, regions="vlm", print_text=False)
        assert len(calls) == 1  # "vlm" ran the tower to build its regions
        model.generate(**inputs, streamer=ref, max_new_tokens=4, do_sample=False)
        calls.clear()
        streamer = AttributionStreamer(model, proc, inputs=inputs, images=images, regions="prefill",
                                       print_text=False)
        assert streamer.regions is None and not calls
        model.generate(**inputs, streamer=streamer, max_new_tokens=4, do_sample=False)
        assert len(calls) == 1  # only generate's own prefill
    finally:
        handle.remove()
    assert streamer.regions is not None and streamer.trace.regions is streamer.regions
    assert [m.num_regions for m in streamer.regions.maps] == [m.num_regions for m in ref.regions.maps]
    torch.testing.assert_close(streamer.regions.membership(), ref.regions.membership())
    torch.testing.assert_close(streamer.trace.token_scores(), ref.trace.token_scores())
    assert not visual._forward_hooks and not capture_active()


def test_an_unused_streamer_hooks_nothing_and_its_wrapper_goes_with_it(get_tiny):
    import gc

    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    streamer = AttributionStreamer(model, proc, inputs=inputs, regions="prefill", print_text=False)
    assert not model.model.visual._forward_hooks and not capture_active(model)  # hooked only inside generate
    assert armed_on(model) and "generate" in vars(model)
    del streamer
    gc.collect()
    assert not armed_on(model) and "generate" not in vars(model)


def test_forwards_outside_the_streamers_generate_pass_through_and_other_inputs_are_refused(get_tiny, consume):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc, [example_image()])
    other = example_inputs(proc, [example_image(100, 140, seed=2)])
    streamer = AttributionStreamer(model, proc, inputs=inputs, regions="prefill", print_text=False)
    with torch.no_grad():
        expected = model(**other).logits
        assert torch.equal(model(**other).logits, expected)  # not ours: untouched, recorded nowhere
    assert not model.model.visual._forward_hooks and streamer.regions is None
    events, error = consume(streamer.generate(**other, max_new_tokens=2))  # not the inputs it was built for
    assert isinstance(error, GenerationError) and isinstance(error.__cause__, StreamerInputError)
    assert "other inputs" in str(error.__cause__)
    assert not events and not armed_on(model) and not capture_active(model)


def test_prefill_regions_are_refused_without_pixel_values(get_tiny):
    model, proc = get_tiny("qwen3_vl")
    inputs = example_inputs(proc)
    no_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}  # e.g. a caller that embeds images itself
    with pytest.raises(ValueError, match="pixel_values"):
        AttributionStreamer(model, proc, inputs=no_pixels, regions="prefill", print_text=False)


def test_two_models_stream_concurrently_without_mixing(get_tiny):
    from hf_vattr.testing import build_model

    _, proc = get_tiny("qwen3_vl")
    models = [build_model("qwen3_vl", proc.tokenizer, seed=s) for s in (11, 12)]
    inputs = example_inputs(proc)

    def stream(model):
        streamer = AttributionStreamer(model, proc, inputs=inputs, print_text=False, timeout=60)
        streamer.generate(**inputs, max_new_tokens=8, do_sample=False)
        events = list(streamer)
        streamer.join()
        return torch.stack([e.region_scores for e in events if isinstance(e, TokenAttribution)])

    alone = [stream(m) for m in models]
    results = [None, None]

    def run(i):
        results[i] = stream(models[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.allclose(alone[0], alone[1])
    for i in range(2):
        torch.testing.assert_close(results[i], alone[i], atol=1e-6, rtol=0)
    assert not capture_active()
