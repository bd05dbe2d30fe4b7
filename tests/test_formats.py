"""Each thinking family's real output format: streamed, collected and evaluated spans agree, every token's
section is right (tiny models of the real architectures, forced by a logits processor to write the format)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import LogitsProcessorList

from hf_vattr import AttributionStreamer, SpanAttribution
from hf_vattr.pipeline.baselines import RandomScores
from hf_vattr.errors import AttributionError
from hf_vattr.pipeline.collection import CollectionConfig, collect_example
from hf_vattr.pipeline.evaluation import evaluate, span_groups
from hf_vattr.reasoning.formats import (COSMOS_REASON1, FORMATS, GLM4V_THINKING, MIMO_VL, QWEN3_VL_THINKING, FormatError,
                              ThinkingFormat, detect_format)
from hf_vattr.testing import ForcedTokens, example_image, forced_ids, thinking_inputs, tiny_thinking_vlm

# What each family writes after its generation prompt, in its real format.
WRITES = {
    "qwen3_vl_thinking": ("The circle is red. It is on the left.\nSo the answer is red.\n</think>\n\nThe answer is red.",
                          [("The circle is red.", "thinking"), ("It is on the left.", "thinking"),
                           ("So the answer is red.", "thinking"), ("The answer is red.", "answer")]),
    "glm4v_thinking": ("\n<think>\nThe circle is red. It is on the left.\n</think><answer>The colour is "
                       "<|begin_of_box|>red<|end_of_box|></answer>",
                       [("The circle is red.", "thinking"), ("It is on the left.", "thinking"),
                        ("The colour is", "answer"), ("red", "answer")]),
    "mimo_vl": ("<think>\nThe circle is red. It is on the left.\n</think>\nred",
                [("The circle is red.", "thinking"), ("It is on the left.", "thinking"), ("red", "answer")]),
    "cosmos_reason1": ("<think>\nThe circle is red. It is on the left. The answer is red.</think>\n\n<answer>\nred\n"
                       "</answer>",
                       [("The circle is red.", "thinking"), ("It is on the left.", "thinking"),
                        ("The answer is red.", "thinking"), ("red", "answer")]),
}
FORMAT_OF = {"qwen3_vl_thinking": QWEN3_VL_THINKING, "glm4v_thinking": GLM4V_THINKING, "mimo_vl": MIMO_VL,
             "cosmos_reason1": COSMOS_REASON1}

_cache: dict = {}


def _family(name):
    if name not in _cache:
        _cache[name] = tiny_thinking_vlm(name)
    return _cache[name]


def expected_sections(text: str, pieces: list[str], fmt: ThinkingFormat, start: str) -> list[str]:
    """An independent oracle over the whole text: each character's section, then each token's."""
    tags = sorted(fmt.tags(), key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(t) for t in tags))
    is_tag = [False] * len(text)
    section_at = [start] * (len(text) + 1)
    current, last = start, 0
    for m in pattern.finditer(text):
        for p in range(last, m.start()):
            section_at[p] = current
        for p in range(m.start(), m.end()):
            is_tag[p], section_at[p] = True, current
        tag = m.group()
        current = ("thinking" if tag == fmt.think_open else "answer"
                   if tag in (fmt.think_close, fmt.answer_open, fmt.answer_close) else current)
        last = m.end()
    for p in range(last, len(text) + 1):
        section_at[p] = current
    out, pos = [], 0
    for piece in pieces:
        chars = range(pos, pos + len(piece))
        content = [p for p in chars if not is_tag[p] and not text[p].isspace()]
        if content:
            out.append(section_at[content[0]])
        elif any(is_tag[p] for p in chars):
            out.append("tag")
        else:
            out.append(section_at[pos + len(piece)])
        pos += len(piece)
    return out


def _stream(model, processor, inputs, ids, max_new_tokens=96, **kwargs):
    prompt_len = inputs["input_ids"].shape[-1]
    forced = LogitsProcessorList([ForcedTokens(ids, model.generation_config.eos_token_id, prompt_len)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamer = AttributionStreamer(model, processor, grid_k=4, **kwargs)
        events = list(streamer.generate(**inputs, max_new_tokens=max_new_tokens, logits_processor=forced))
    return streamer, events


def _check_trace(trace, fmt, text, start):
    tokens = trace.tokens
    pieces = [t.text for t in tokens]
    assert "".join(pieces).startswith(text)
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert [t.section for t in tokens] == expected_sections("".join(pieces), pieces, fmt, start)
    for span in trace.spans:
        assert not any(tag in span.text for tag in fmt.tags()), span.text
        a, b = span.token_range
        assert all(tokens[i].section not in ("tag",) for i in (a, b - 1))
        assert all(t.section != "tag" for t in tokens[a:b]), (span.text, [t.text for t in tokens[a:b]])
        assert {t.section for t in tokens[a:b] if t.text.strip()} == {span.section}


@pytest.mark.parametrize("name", list(WRITES))
def test_family_format_streamed_collected_evaluated(name):
    model, processor = _family(name)
    inputs, prompt = thinking_inputs(name, processor)
    fmt = FORMAT_OF[name]
    assert detect_format(processor, prompt) == fmt  # no configuration
    text, want = WRITES[name]
    tok = processor.tokenizer
    ids = forced_ids(tok, [text])
    streamer, events = _stream(model, processor, inputs, ids)
    assert streamer.format == fmt
    trace = streamer.trace
    assert [(s.text, s.section) for s in trace.spans] == want
    assert [e for e in events if isinstance(e, SpanAttribution)] == trace.spans
    start = "thinking" if fmt.opened_by == "model" or fmt.prompt_opens(prompt) else "answer"
    _check_trace(trace, fmt, text, start)
    if name == "cosmos_reason1":  # plain-text tags, in several pieces, one sharing a piece with a sentence end
        pieces = [t.text for t in trace.tokens]
        assert "<think>" not in pieces and any(p.startswith(".") and p.endswith("<") or p == ".</" for p in pieces)
    else:
        assert fmt.think_close in [t.text for t in trace.tokens]

    # collection: the same spans, detected from the same processor and prompt
    prompt_len = inputs["input_ids"].shape[-1]
    forced = LogitsProcessorList([ForcedTokens(ids, model.generation_config.eos_token_id, prompt_len)])
    config = CollectionConfig(max_new_tokens=96, num_subsets=2, k=4, generate_kwargs={"logits_processor": forced})
    record = collect_example(model, processor, [example_image()], prompt, config)
    assert [(sp["start"], sp["end"], sp["text"], sp["section"]) for sp in record.spans] == \
        [(*s.token_range, s.text, s.section) for s in trace.spans]
    assert record.extra["format"] == fmt.name and record.text == trace.text

    # evaluation reads the collected spans and sections as they are
    assert list(span_groups([record])["section"]) == [s.section for s in trace.spans]
    report = evaluate([RandomScores()], [record], topk="table", progress=False, auc_points=0)
    row = next(iter(report.rows.values()))
    assert row["num_spans"] == len(want)
    assert row["num_spans_thinking"] == sum(s == "thinking" for _, s in want)
    assert row["num_spans_answer"] == sum(s == "answer" for _, s in want)


@pytest.mark.parametrize("name", ["qwen3_vl_thinking", "glm4v_thinking", "cosmos_reason1"])
def test_generation_cut_off_inside_the_think_block(name):
    model, processor = _family(name)
    inputs, prompt = thinking_inputs(name, processor)
    text = WRITES[name][0]
    ids = forced_ids(processor.tokenizer, [text])
    cut = len(forced_ids(processor.tokenizer, [text[:text.index("It is")]])) + 1
    streamer, _ = _stream(model, processor, inputs, ids, max_new_tokens=cut)
    trace = streamer.trace
    assert len(trace.tokens) == cut
    assert [s.section for s in trace.spans] == ["thinking", "thinking"]
    assert {t.section for t in trace.tokens} <= {"thinking", "tag"}


def test_close_without_open_and_repeated_tags():
    name = "mimo_vl"  # the model opens the block: text before any tag is thinking
    model, processor = _family(name)
    inputs, prompt = thinking_inputs(name, processor)
    text = "The circle is red.\n</think>\n<think>\n<think>\nIt is on the left.\n</think>\n</think>\nred"
    streamer, _ = _stream(model, processor, inputs, forced_ids(processor.tokenizer, [text]))
    trace = streamer.trace
    assert [(s.text, s.section) for s in trace.spans] == [
        ("The circle is red.", "thinking"), ("It is on the left.", "thinking"), ("red", "answer")]
    _check_trace(trace, MIMO_VL, text, "thinking")


def test_format_set_explicitly_and_by_name():
    name = "glm4v_thinking"
    model, processor = _family(name)
    inputs, prompt = thinking_inputs(name, processor)
    text = WRITES[name][0]
    ids = forced_ids(processor.tokenizer, [text])
    streamer, _ = _stream(model, processor, inputs, ids, format="glm4v_thinking")
    assert streamer.format is GLM4V_THINKING
    assert [(s.text, s.section) for s in streamer.trace.spans] == WRITES[name][1]
    # without the answer and box tags, their text stays in the answer (GLM-4.5V writes no answer tags)
    plain = ThinkingFormat("think_only", opened_by="model")
    streamer, _ = _stream(model, processor, inputs, ids, format=plain)
    assert streamer.trace.spans[-1].text.startswith("<answer>")
    assert CollectionConfig(format="cosmos_reason1").format is COSMOS_REASON1
    assert CollectionConfig(format="cosmos_reason1").to_dict()["format"] == "cosmos_reason1"
    assert CollectionConfig.from_dict({"format": "mimo_vl"}).format is MIMO_VL
    with pytest.raises(ValueError) as info:
        CollectionConfig(format="nope")
    assert isinstance(info.value, AttributionError)
    with pytest.raises(FormatError):
        ThinkingFormat(think_open="")
    assert set(FORMATS) >= {"think", "qwen3_vl_thinking", "glm4v_thinking", "mimo_vl", "cosmos_reason1"}


def test_cosmos_without_its_system_prompt_is_a_plain_model():
    model, processor = _family("cosmos_reason1")
    content = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    assert detect_format(processor, prompt) == FORMATS["think"]
