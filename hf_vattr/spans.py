"""Splitting a generated trace into reasoning steps (spans), token by token.

A span is the unit a user reads attribution for: one reasoning step of the
thinking block (a line, or a sentence within a long line), and the answer
after the thinking block as its own span(s). Splitting is incremental because
the streamer must close a step the moment its last token arrives.

Subclass :class:`SpanSplitter` (or pass options to
:class:`ReasoningStepSplitter`) to change the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SpanSplitter", "ReasoningStepSplitter", "ClosedSpan"]

_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*$")


@dataclass
class ClosedSpan:
    """A finished span: tokens ``[start, end)`` of the generated sequence."""

    start: int
    end: int
    text: str
    section: str  # "thinking" or "answer"


class SpanSplitter:
    """Interface: feed decoded pieces one token at a time, get spans as they close."""

    def reset(self, prompt_text: str) -> None:
        """Start a new trace; ``prompt_text`` tells whether generation starts inside a thinking block."""

    def push(self, index: int, piece: str) -> list[ClosedSpan]:
        """Feed token ``index`` (0-based among generated tokens) with its decoded text."""
        raise NotImplementedError

    def flush(self) -> list[ClosedSpan]:
        """Close whatever is open at the end of generation."""
        raise NotImplementedError

    def section(self) -> str:
        """Section of the most recently pushed token."""
        return "answer"


class ReasoningStepSplitter(SpanSplitter):
    """Default splitter: one span per line (and per sentence) inside the thinking block; answer spans after it.

    The think tags themselves belong to no span. Whitespace-only spans are
    dropped. If the prompt already opened a thinking block (Qwen3-VL-Thinking
    and GLM-4.1V-Thinking templates end with ``<think>``), generation starts in
    the thinking section.
    """

    def __init__(
        self,
        think_open: str = "<think>",
        think_close: str = "</think>",
        split_lines: bool = True,
        split_sentences: bool = True,
        split_answer_lines: bool = True,
    ) -> None:
        self.think_open = think_open
        self.think_close = think_close
        self.split_lines = split_lines
        self.split_sentences = split_sentences
        self.split_answer_lines = split_answer_lines
        self.reset("")

    def reset(self, prompt_text: str) -> None:
        opened = prompt_text.rfind(self.think_open)
        self._section = "thinking" if opened > prompt_text.rfind(self.think_close) else "answer"
        self._seen_thinking = self._section == "thinking"
        self._start: int | None = None
        self._text = ""
        self._last_section = self._section
        self._next = 0

    def section(self) -> str:
        return self._last_section

    def _close(self, end: int) -> list[ClosedSpan]:
        out = []
        if self._start is not None and self._text.strip():
            out.append(ClosedSpan(self._start, end, self._text.strip(), self._section))
        self._start, self._text = None, ""
        return out

    def push(self, index: int, piece: str) -> list[ClosedSpan]:
        closed: list[ClosedSpan] = []
        self._next = index + 1
        if self.think_open in piece:
            closed += self._close(index)
            self._section = "thinking"
            self._seen_thinking = True
            self._last_section = "thinking"
            return closed
        if self.think_close in piece:
            closed += self._close(index)
            self._last_section = self._section
            self._section = "answer"
            return closed
        self._last_section = self._section
        splitting_lines = self.split_lines if self._section == "thinking" else self.split_answer_lines
        # A sentence ends when the text so far ends with punctuation and this piece starts with whitespace.
        if (self.split_sentences and self._section == "thinking" and self._start is not None
                and piece[:1].isspace() and _SENTENCE_END.search(self._text.rstrip("\n"))
                and not self._text.endswith("\n")):
            closed += self._close(index)
        if self._start is None:
            if not piece.strip():
                return closed  # leading whitespace belongs to no span
            self._start = index
        self._text += piece
        if splitting_lines and "\n" in piece:
            closed += self._close(index + 1)
        return closed

    def flush(self) -> list[ClosedSpan]:
        return self._close(self._next)
