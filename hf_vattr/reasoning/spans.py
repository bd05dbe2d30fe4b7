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
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .formats import ANSWER, DEFAULT_FORMAT, TAG, THINKING, ThinkingFormat, resolve_format

__all__ = ["SpanSplitter", "ReasoningStepSplitter", "ClosedSpan", "splitter_format", "think_tags", "tag_texts"]

_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*$")
# CJK sentence ends need no following space: the next piece starts a new sentence.
_CJK_SENTENCE_END = re.compile(r"[\u3002\uff01\uff1f\uff1b][\u201d\u2019\u300d\u300f\uff09\"')\]]*$")
_CJK_CLOSERS = "\u201d\u2019\u300d\u300f\uff09\"')]"


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

    def pop_sections(self) -> list[str]:
        """Sections of the tokens settled since the last call, in token order; called after each push (and
        after flush while tokens wait). A splitter that settles every token at once returns ``[section()]``."""
        return [self.section()]


@dataclass(eq=False)
class _Token:
    index: int
    parts: list = field(default_factory=list)  # ("text", str) | ("tag_start", tag) | ("tag_in",) | ("tag_end", tag)


def think_tags(splitter: Any) -> tuple[str, str]:
    """The ``(open, close)`` thinking tags a splitter cuts at; the default format's for a splitter that names none.

    Any :class:`SpanSplitter` may be passed, also one that knows nothing of tags: collection and the
    streamer read the tags through this one accessor.
    """
    return (getattr(splitter, "think_open", DEFAULT_FORMAT.think_open),
            getattr(splitter, "think_close", DEFAULT_FORMAT.think_close))


def splitter_format(splitter: Any, fallback: ThinkingFormat | None = None) -> ThinkingFormat | None:
    """The :class:`ThinkingFormat` a splitter cuts by, else ``fallback`` (a splitter need not have one)."""
    return getattr(splitter, "format", None) or fallback


def tag_texts(splitter: Any, fallback: ThinkingFormat | None = None) -> tuple[str, ...]:
    """Every tag text a trace is cut at: the splitter's format's tags (else ``fallback``'s), then its think tags.

    Decoding keeps these texts even when they are special tokens, so the splitter sees them.
    """
    fmt = splitter_format(splitter, fallback)
    return tuple(dict.fromkeys((*(fmt.tags() if fmt is not None else ()), *think_tags(splitter))))


class ReasoningStepSplitter(SpanSplitter):
    """Default splitter: one span per line (and per sentence) inside the thinking block; answer spans after it.

    Tags (the :class:`~hf_vattr.reasoning.formats.ThinkingFormat`'s think, answer and box tags) are found in the
    text, whatever tokens they arrive in: one special token, or plain text in several pieces (``<th``,
    ``ink``, ``>``), also sharing a piece with text (``.</th``). Tag text belongs to no span; a token
    that holds only tag text (and whitespace) is in section ``"tag"``; a box marker ends a span (the
    boxed answer is its own span). Whitespace-only spans are dropped. Sentences end at ``.!?;:``
    followed by whitespace, and at ``\u3002\uff01\uff1f\uff1b``. A token whose text may still be the start of a
    tag waits (its section comes from :meth:`pop_sections` once known), so spans never hold tag text.

    Without ``format`` (and without ``think_open``/``think_close``) the format is the default one,
    and the streamer and collection replace it with the one detected from the processor and prompt
    (``auto_format``). If the prompt already opened a thinking block (Qwen3-VL-Thinking templates end
    with ``<think>``), generation starts in the thinking section.
    """

    def __init__(
        self,
        think_open: str | None = None,
        think_close: str | None = None,
        split_lines: bool = True,
        split_sentences: bool = True,
        split_answer_lines: bool = True,
        format: ThinkingFormat | str | None = None,  # noqa: A002 - the public name
    ) -> None:
        fmt = resolve_format(format)
        self.auto_format = fmt is None and think_open is None and think_close is None
        if fmt is None:
            fmt = ThinkingFormat(think_open=think_open or DEFAULT_FORMAT.think_open,
                                 think_close=think_close or DEFAULT_FORMAT.think_close)
        self.format = fmt
        self.split_lines = split_lines
        self.split_sentences = split_sentences
        self.split_answer_lines = split_answer_lines
        self.reset("")

    @property
    def think_open(self) -> str:
        return self.format.think_open

    @property
    def think_close(self) -> str:
        return self.format.think_close

    def set_format(self, fmt: ThinkingFormat) -> None:
        """Use ``fmt`` from the next :meth:`reset` on (the streamer and collection pass the detected one)."""
        self.format = fmt
        self.auto_format = False

    def reset(self, prompt_text: str) -> None:
        fmt = self.format
        self._tags = fmt.tags()
        self._first_chars = {t[0] for t in self._tags}
        self._section = fmt.start_section(prompt_text)
        self._start: int | None = None
        self._text = ""
        self._last_section = self._section
        self._next = 0
        self._fed: int | None = None  # last token whose text went into the open span
        self._carry = ""  # text not yet known to be tag or not
        self._owners: list[_Token] = []  # the token of each carried character
        self._waiting: deque[_Token] = deque()  # pushed tokens not yet processed, in order
        self._settled: list[str] = []

    def section(self) -> str:
        return self._last_section

    def pop_sections(self) -> list[str]:
        out, self._settled = self._settled, []
        return out

    def _close(self, end: int) -> list[ClosedSpan]:
        out = []
        if self._start is not None and self._text.strip():
            out.append(ClosedSpan(self._start, end, self._text.strip(), self._section))
        self._start, self._text, self._fed = None, "", None
        return out

    # ---------------------------------------------------------------- tags in the text
    def _scan(self, final: bool) -> None:
        """Classify carried characters as text or tag, up to a possible tag start (all of them if ``final``)."""
        carry, p, text_from = self._carry, 0, 0
        while p < len(carry):
            if carry[p] in self._first_chars:
                tag = next((t for t in self._tags if carry.startswith(t, p)), None)
                if tag is not None:
                    self._emit_text(text_from, p)
                    owners = self._owners[p:p + len(tag)]
                    owners[0].parts.append(("tag_start", tag))
                    for tok in dict.fromkeys(owners[1:]):
                        if tok is not owners[0]:
                            tok.parts.append(("tag_in",))
                    owners[-1].parts.append(("tag_end", tag))
                    p = text_from = p + len(tag)
                    continue
                if not final and any(t.startswith(carry[p:]) for t in self._tags):
                    break  # may still become a tag: wait for the next piece
            p += 1
        self._emit_text(text_from, p)
        self._carry, self._owners = carry[p:], self._owners[p:]

    def _emit_text(self, a: int, b: int) -> None:
        i = a
        while i < b:
            tok = self._owners[i]
            j = i
            while j < b and self._owners[j] is tok:
                j += 1
            tok.parts.append(("text", self._carry[i:j]))
            i = j

    def _process_ready(self) -> list[ClosedSpan]:
        closed: list[ClosedSpan] = []
        holding = self._owners[0] if self._owners else None
        while self._waiting and self._waiting[0] is not holding:
            closed += self._process(self._waiting.popleft())
        return closed

    def _process(self, tok: _Token) -> list[ClosedSpan]:
        closed: list[ClosedSpan] = []
        content_section = None
        has_tag = False
        for part in tok.parts:
            kind = part[0]
            if kind == "text":
                if content_section is None and part[1].strip():
                    content_section = self._section
                closed += self._feed(tok.index, part[1])
                continue
            has_tag = True
            if kind == "tag_start":
                closed += self._close(tok.index + 1 if self._fed == tok.index else tok.index)
            elif kind == "tag_end":
                self._enter(part[1])
        self._last_section = content_section or (TAG if has_tag else self._section)
        self._settled.append(self._last_section)
        return closed

    def _enter(self, tag: str) -> None:
        fmt = self.format
        if tag == fmt.think_open:
            self._section = THINKING
        elif tag in (fmt.think_close, fmt.answer_open, fmt.answer_close):
            self._section = ANSWER
        # box markers change no section (they end a span: done at the tag's start)

    # ---------------------------------------------------------------- lines and sentences
    def _feed(self, index: int, piece: str) -> list[ClosedSpan]:
        closed: list[ClosedSpan] = []
        splitting_lines = self.split_lines if self._section == THINKING else self.split_answer_lines
        if (self.split_sentences and self._section == THINKING and self._start is not None
                and not self._text.endswith("\n") and piece
                and ((piece[:1].isspace() and _SENTENCE_END.search(self._text.rstrip("\n")))
                     or (piece[0] not in _CJK_CLOSERS and _CJK_SENTENCE_END.search(self._text)))):
            closed += self._close(index)
        if self._start is None:
            if not piece.strip():
                return closed  # leading whitespace belongs to no span
            self._start = index
        self._text += piece
        if piece.strip():
            self._fed = index
        if splitting_lines and "\n" in piece:
            closed += self._close(index + 1)
        return closed

    def push(self, index: int, piece: str) -> list[ClosedSpan]:
        self._next = index + 1
        tok = _Token(index)
        self._waiting.append(tok)
        if piece:
            self._carry += piece
            self._owners += [tok] * len(piece)
            self._scan(final=False)
        return self._process_ready()

    def flush(self) -> list[ClosedSpan]:
        self._scan(final=True)
        closed = self._process_ready()
        return closed + self._close(self._next)
