"""Batches and num_return_sequences stream, each sequence equal to its own batch-1 run."""

import pytest
import torch

from hf_vattr import AttributionStreamer, LinearEstimator, SpanAttribution, TokenAttribution
from hf_vattr.capture import capture_active
from hf_vattr.streaming.streamer import GenerationError
from hf_vattr.testing import example_image

NEW = 6


def _estimator(model):
    text = model.config.get_text_config()
    est = LinearEstimator(text.num_hidden_layers, text.num_attention_heads, model_type=model.config.model_type)
    with torch.no_grad():
        est.weight.copy_(torch.randn(est.weight.shape, generator=torch.Generator().manual_seed(3)))
    return est


def _prompt(proc, question):
    return proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                    add_generation_prompt=True, tokenize=False)


def _events(consume, streamer, deadline=60):
    events, error = consume(streamer, deadline)
    if error is not None:
        raise error
    return events


def _by_sequence(events, n):
    tokens = [[e for e in events if isinstance(e, TokenAttribution) and e.sequence == s] for s in range(n)]
    spans = [[e for e in events if isinstance(e, SpanAttribution) and e.sequence == s] for s in range(n)]
    return tokens, spans


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_left_padded_batch_equals_batch_one_runs(family, get_tiny, consume, monkeypatch):
    model, proc = get_tiny(family)
    monkeypatch.setattr(proc.tokenizer, "padding_side", "left")  # the shared processor
    images = [example_image(150, 210, seed=1), example_image(120, 100, seed=2)]
    questions = ["What colour is the circle?", "Where?"]
    batch = proc(text=[_prompt(proc, q) for q in questions], images=images, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the test needs real left padding"
    estimator = _estimator(model)
    streamer = AttributionStreamer(model, proc, inputs=batch, estimator=estimator, images=images, grid_k=4,
                                   keep_features=True)
    events = _events(consume, streamer.generate(**batch, max_new_tokens=NEW, do_sample=False))
    output = streamer.join()
    tokens, spans = _by_sequence(events, 2)
    prompt_len = batch["input_ids"].shape[1]
    for s, (question, image) in enumerate(zip(questions, images)):
        single = proc(text=[_prompt(proc, question)], images=[image], return_tensors="pt")
        alone = AttributionStreamer(model, proc, inputs=single, estimator=estimator, images=[image], grid_k=4,
                                    keep_features=True)
        alone_events = _events(consume, alone.generate(**single, max_new_tokens=NEW, do_sample=False))
        alone_tokens, alone_spans = _by_sequence(alone_events, 1)
        assert [t.token_id for t in tokens[s]] == [t.token_id for t in alone_tokens[0]]
        assert [t.token_id for t in tokens[s]] == output[s, prompt_len:prompt_len + len(tokens[s])].tolist()
        assert [t.text for t in tokens[s]] == [t.text for t in alone_tokens[0]]
        torch.testing.assert_close(torch.stack([t.features for t in tokens[s]]),
                                   torch.stack([t.features for t in alone_tokens[0]]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.stack([t.region_scores for t in tokens[s]]),
                                   torch.stack([t.region_scores for t in alone_tokens[0]]), atol=1e-4, rtol=1e-4)
        assert [(sp.text, sp.token_range) for sp in spans[s]] == [(sp.text, sp.token_range) for sp in alone_spans[0]]
        assert streamer.traces[s].regions.num_regions == alone.regions.num_regions
    assert not capture_active()


def test_num_return_sequences_streams_every_sequence(get_tiny, consume):
    model, proc = get_tiny("qwen2_5_vl")
    single = proc(text=[_prompt(proc, "Describe it.")], images=[example_image()], return_tensors="pt")
    torch.manual_seed(0)
    streamer = AttributionStreamer(model, proc, inputs=single)
    events = _events(consume, streamer.generate(**single, max_new_tokens=NEW, do_sample=True, num_return_sequences=3))
    output = streamer.join()
    tokens, _ = _by_sequence(events, 3)
    prompt_len = single["input_ids"].shape[1]
    for s in range(3):
        assert [t.token_id for t in tokens[s]] == output[s, prompt_len:prompt_len + len(tokens[s])].tolist()
        assert len(tokens[s]) >= 1 and all(torch.isfinite(t.region_scores).all() for t in tokens[s])
    assert len(streamer.traces) == 3


def test_beam_search_stays_refused_with_a_clear_error(get_tiny, consume):
    model, proc = get_tiny("qwen3_vl")
    single = proc(text=[_prompt(proc, "Describe it.")], images=[example_image()], return_tensors="pt")
    streamer = AttributionStreamer(model, proc, inputs=single)
    with pytest.raises(GenerationError, match="beam") as err:
        _events(consume, streamer.generate(**single, max_new_tokens=NEW, num_beams=2))
    assert isinstance(err.value.__cause__, ValueError)


def test_prefill_regions_per_row_of_a_batch(get_tiny, consume, monkeypatch):
    """regions="prefill" in a batch: each row's regions equal a batch-1 prefill run of that row."""
    model, proc = get_tiny("qwen3_vl")
    monkeypatch.setattr(proc.tokenizer, "padding_side", "left")  # the shared processor
    images = [example_image(150, 210, seed=1), example_image(120, 100, seed=2)]
    questions = ["What colour is the circle?", "Where?"]
    batch = proc(text=[_prompt(proc, q) for q in questions], images=images, return_tensors="pt", padding=True)
    streamer = AttributionStreamer(model, proc, inputs=batch, images=images, regions="prefill")
    events = _events(consume, streamer.generate(**batch, max_new_tokens=3, do_sample=False))
    tokens, _ = _by_sequence(events, 2)
    for s, (question, image) in enumerate(zip(questions, images)):
        single = proc(text=[_prompt(proc, question)], images=[image], return_tensors="pt")
        alone = AttributionStreamer(model, proc, inputs=single, images=[image], regions="prefill")
        _events(consume, alone.generate(**single, max_new_tokens=3, do_sample=False))
        assert torch.equal(streamer.traces[s].regions.membership(), alone.regions.membership())
        assert all(t.region_scores.shape == (alone.regions.num_regions,) for t in tokens[s])
    assert not capture_active()
