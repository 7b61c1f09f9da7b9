"""Incremental detokenization and stop-string matching for streamed tokens.

Decoding the whole output again for every new token (to find the new text, or a stop string) costs
O(n) per token, O(n²) per request: for a 2K-token output that is ~2M token decodes in the router's
event loop. ``IncrementalDetokenizer`` decodes a short window per token instead. It keeps two offsets
into the token list: ``prefix``, where the window starts (``CONTEXT_TOKENS`` before ``read``), and
``read``, where the text already given out ends. It decodes ``ids[prefix:read]`` and ``ids[prefix:]``
and gives out the difference. Both decodes start at the same token, so a tokenizer's start-of-text
handling (e.g. SentencePiece dropping the first piece's leading space) cancels out.

A window whose text ends in U+FFFD (an incomplete UTF-8 character, e.g. byte-fallback pieces) holds
those back until a later token completes them; then the window moves on. The router used to hold back
only the last U+FFFD, so a character split over three byte pieces streamed as U+FFFD and the text went
wrong from there on. ``finish()`` gives out what is still held back, from one full decode.

Stop strings are searched only in the text that could hold a new match: the new text plus the
``max(len(stop)) - 1`` characters before it. The tests check, for byte-level, SentencePiece and HF
byte-level BPE tokenizers, that the text given out equals ``decode(ids)`` (less trailing U+FFFDs) and
that a stop string is found at the same token as a full-text search finds it.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"
# Settled tokens a window starts with: a window whose first real piece is the new token (e.g. after a
# control token, which decodes to nothing) would lose that piece's leading space in SentencePiece.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of a growing token list, token by token, in O(window) per token.

    At every token ``text`` is the full decode of the tokens so far less its trailing U+FFFDs (bytes of a
    character not all arrived yet; with byte-fallback pieces each gives one), so it only ever grows."""

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""  # everything given out so far
        self._prefix = 0  # the window's first token
        self._read = 0  # tokens whose text is settled (given out, in full)
        self._extra = 0  # characters given out beyond the settled tokens' text (a token with an incomplete tail)
        self._stops = tuple(stop_strings)
        self._stop_tail = max((len(s) for s in self._stops), default=1) - 1

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it adds to ``text`` (may be "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        incomplete = now.endswith(REPLACEMENT)
        visible = now.rstrip(REPLACEMENT) if incomplete else now  # byte pieces may give one U+FFFD each
        delta = visible[len(before) + self._extra:]
        if incomplete:
            self._extra += len(delta)
        else:  # every character complete: the window moves on, keeping a few settled tokens before it
            self._read, self._extra = len(self.ids), 0
            self._prefix = max(0, self._read - CONTEXT_TOKENS)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text still held back (an incomplete character at the end), from one full decode."""
        full = self._decode(self.ids)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        self._prefix = self._read = len(self.ids)
        self._extra = 0
        return rest

    def stop_hit(self, delta: str) -> bool:
        """Whether a stop string occurs in ``text`` ending with ``delta`` (just added) and did not before."""
        if not self._stops or not delta:
            return False
        region = self.text[-(len(delta) + self._stop_tail):]
        return any(s in region for s in self._stops)
