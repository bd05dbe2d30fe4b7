"""Thinking formats: which tags a family's model writes, and who opens the thinking block.

A :class:`ThinkingFormat` is the one description of a family's output format that the streamer,
collection (and so training and evaluation, which read collected spans) and the app share.
:func:`detect_format` picks it from the processor (tokenizer vocabulary, chat template) and the
prompt, so the supported families need no configuration:

==================  =========================================  ===============================
format              generation prompt / who opens ``<think>``  tags
==================  =========================================  ===============================
qwen3_vl_thinking   prompt ends ``<think>\\n``                  ``<think>`` ``</think>`` (tokens)
glm4v_thinking      prompt ends ``<|assistant|>``; the model   + ``<answer>`` ``</answer>``,
                    writes ``<think>``                          ``<|begin_of_box|>`` ``<|end_of_box|>``
mimo_vl             the model writes ``<think>``               ``<think>`` ``</think>`` (tokens)
cosmos_reason1      the model writes ``<think>`` (asked for    ``<think>`` ``</think>`` ``<answer>``
                    in the system prompt)                       ``</answer>`` as plain text
think (default)     either (from the prompt)                   ``<think>`` ``</think>``
==================  =========================================  ===============================

Tags are recognised in the decoded *text*, whatever tokens they arrive in
(:class:`hf_vattr.reasoning.spans.ReasoningStepSplitter`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import AttributionError

__all__ = ["ThinkingFormat", "FORMATS", "DEFAULT_FORMAT", "QWEN3_VL_THINKING", "GLM4V_THINKING", "MIMO_VL",
           "COSMOS_REASON1", "COSMOS_SYSTEM_PROMPT", "THINKING", "ANSWER", "TAG", "FormatError", "detect_format",
           "resolve_format"]

#: Section names: a thinking step, the answer, and tokens that are only tag text.
THINKING, ANSWER, TAG = "thinking", "answer", "tag"

#: Cosmos-Reason1's system prompt (model card): the model writes the format only when asked.
COSMOS_SYSTEM_PROMPT = ("You are a helpful assistant. Answer the question in the following format: "
                        "<think>\nyour reasoning\n</think>\n\n<answer>\nyour answer\n</answer>.")


class FormatError(AttributionError, ValueError):
    """An unknown format name or an inconsistent format."""


@dataclass(frozen=True)
class ThinkingFormat:
    """A family's output format.

    Args:
        name: a label (recorded with collected data).
        think_open, think_close: the thinking block's tags.
        answer_open, answer_close: the answer block's tags, if the family writes them.
        box_open, box_close: markers around the final answer (GLM), if any; a boxed answer is its own span.
        opened_by: ``"prompt"`` (the chat template ends inside the block), ``"model"`` (the model writes
            the open tag: text before any tag counts as thinking), or ``"either"`` (decided by the prompt
            only: text before any tag is the answer unless the prompt opened the block).
        system_prompt: the system prompt the family needs to write this format (Cosmos-Reason1), or None.
    """

    name: str = "think"
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str | None = None
    answer_close: str | None = None
    box_open: str | None = None
    box_close: str | None = None
    opened_by: str = "either"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.opened_by not in ("prompt", "model", "either"):
            raise FormatError(f"ThinkingFormat.opened_by must be 'prompt', 'model' or 'either', got {self.opened_by!r}.")
        tags = [t for t in (self.think_open, self.think_close, self.answer_open, self.answer_close, self.box_open,
                            self.box_close) if t is not None]
        if not self.think_open or not self.think_close or any(not isinstance(t, str) or not t for t in tags):
            raise FormatError(f"ThinkingFormat {self.name!r}: every tag must be a non-empty string.")
        if len(set(tags)) != len(tags):
            raise FormatError(f"ThinkingFormat {self.name!r}: tags must differ, got {tags}.")

    def tags(self) -> tuple[str, ...]:
        """Every tag text of the format (think, answer, box), in that order."""
        return tuple(t for t in (self.think_open, self.think_close, self.answer_open, self.answer_close,
                                 self.box_open, self.box_close) if t is not None)

    def prompt_opens(self, prompt_text: str) -> bool:
        """Does the prompt end inside an open thinking block?"""
        return prompt_text.rfind(self.think_open) > prompt_text.rfind(self.think_close)

    def start_section(self, prompt_text: str) -> str:
        """Section of generated text before any tag."""
        return THINKING if self.prompt_opens(prompt_text) or self.opened_by == "model" else ANSWER

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ThinkingFormat":
        return cls(**data)


DEFAULT_FORMAT = ThinkingFormat()
QWEN3_VL_THINKING = ThinkingFormat("qwen3_vl_thinking", opened_by="prompt")
GLM4V_THINKING = ThinkingFormat("glm4v_thinking", answer_open="<answer>", answer_close="</answer>",
                                box_open="<|begin_of_box|>", box_close="<|end_of_box|>", opened_by="model")
MIMO_VL = ThinkingFormat("mimo_vl", opened_by="model")
COSMOS_REASON1 = ThinkingFormat("cosmos_reason1", answer_open="<answer>", answer_close="</answer>", opened_by="model",
                                system_prompt=COSMOS_SYSTEM_PROMPT)

#: Named formats, for ``format="glm4v_thinking"`` and for records.
FORMATS: dict[str, ThinkingFormat] = {f.name: f for f in (DEFAULT_FORMAT, QWEN3_VL_THINKING, GLM4V_THINKING, MIMO_VL,
                                                          COSMOS_REASON1)}


def resolve_format(fmt: "ThinkingFormat | str | dict | None") -> ThinkingFormat | None:
    """A :class:`ThinkingFormat` from itself, its name or its dict; None (detect) stays None."""
    if fmt is None or isinstance(fmt, ThinkingFormat):
        return fmt
    if isinstance(fmt, str):
        if fmt == "auto":
            return None
        if fmt not in FORMATS:
            raise FormatError(f"Unknown thinking format {fmt!r}; choose one of {sorted(FORMATS)} or pass a "
                              "ThinkingFormat.")
        return FORMATS[fmt]
    if isinstance(fmt, dict):
        try:
            return ThinkingFormat.from_dict(fmt)
        except TypeError as error:
            raise FormatError(f"Not a ThinkingFormat dict: {fmt!r} ({error}).") from error
    raise FormatError(f"format must be a ThinkingFormat, a name or None, got {type(fmt).__name__}.")


def _single_token(tokenizer: Any, text: str) -> bool:
    """Is ``text`` one token of the tokenizer (an added token, special or not)?"""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode: not a token
        return False
    return len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=False) == text


def _templates(processor: Any) -> str:
    out = []
    for owner in (processor, getattr(processor, "tokenizer", None)):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, dict):
            out += [t for t in template.values() if isinstance(t, str)]
        elif isinstance(template, str):
            out.append(template)
    return "\n".join(out)


def _template_opens_think(template: str) -> bool:
    """Does the chat template's generation prompt write ``<think>``?"""
    at = template.rfind("add_generation_prompt")
    return at >= 0 and "<think>" in template[at:at + 300]


def detect_format(processor: Any, prompt_text: str | None = None) -> ThinkingFormat:
    """The family's :class:`ThinkingFormat`, from the tokenizer vocabulary, the chat template and the prompt.

    * ``<|begin_of_box|>`` or ``<answer>`` one token, with a ``<think>`` token: GLM-4.1V/4.5V-Thinking.
    * ``<think>`` one token: Qwen3-VL-Thinking when the prompt (or, without a prompt, the chat template's
      generation prompt) opens the block, else MiMo-VL (the model opens it).
    * ``<think>`` not a token, and the prompt asks for ``<answer>`` tags: Cosmos-Reason1's format.
    * otherwise the default format (``<think>`` / ``</think>`` recognised, opened by whoever does).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    think_token = _single_token(tokenizer, "<think>") and _single_token(tokenizer, "</think>")
    if think_token and (_single_token(tokenizer, "<|begin_of_box|>") or _single_token(tokenizer, "<answer>")):
        return GLM4V_THINKING
    if think_token:
        if prompt_text is not None:
            opens = DEFAULT_FORMAT.prompt_opens(prompt_text)
        else:
            opens = _template_opens_think(_templates(processor))
        return QWEN3_VL_THINKING if opens else MIMO_VL
    if prompt_text is not None and re.search(r"<answer>", prompt_text) and "<think>" in prompt_text:
        return COSMOS_REASON1
    return DEFAULT_FORMAT

