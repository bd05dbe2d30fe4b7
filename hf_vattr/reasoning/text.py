"""Display text of generated tokens, decoded incrementally: one place for the streamer and collection.

Why one place: a span's token range is defined on these pieces, so the streamer (live) and
collection (offline, for training) must cut text identically.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["TokenTextDecoder", "decode_pieces"]


class TokenTextDecoder:
    """Turns token ids into display pieces, one call per token, like transformers' ``TextStreamer``.

    Special tokens (end of turn, vision markers) show as ``""`` except ``keep`` (the think tags,
    which the span splitter needs). A token ending in an incomplete multi-byte character shows
    ``""`` and its text arrives with the next one. The decode window restarts after each newline,
    so the cost per token stays bounded on long traces.
    """

    def __init__(self, tokenizer: Any, keep: Iterable[str] = ("<think>", "</think>")) -> None:
        self.tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._keep = set(keep)
        self._special_text: dict[int, str] = {}
        self._window: list[int] = []
        self._printed = 0

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._special:
            text = self._special_text.get(token_id)
            if text is None:
                text = self._special_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if text not in self._keep:
                return ""
        self._window.append(token_id)
        text = self.tokenizer.decode(self._window, skip_special_tokens=False)
        piece = text[self._printed:]
        if piece.endswith("\ufffd"):  # incomplete multi-byte character: wait for the next token
            return ""
        if text.endswith("\n"):
            self._window, self._printed = [], 0
        else:
            self._printed = len(text)
        return piece


def decode_pieces(tokenizer: Any, token_ids: Sequence[int], tag_texts: Iterable[str] = ("<think>", "</think>")
                  ) -> list[str]:
    """Display text of each generated token, exactly as the streamer shows it."""
    decoder = TokenTextDecoder(tokenizer, tag_texts)
    return [decoder.push(t) for t in token_ids]
