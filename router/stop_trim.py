"""Stop strings cut from a response's text, as OpenAI and vLLM return it.

The router core stops at the token completing a stop string and gives out that token's whole text
(its stop checks run on the incrementally decoded text, ``colm.stopping``). The public APIs leave the
stop string and what follows it out of the text (``include_stop_str_in_output`` keeps the stop string,
vLLM's extra). While streaming, ``StopTrimmer`` holds back the last ``len(longest stop) - 1``
characters until they cannot start a stop string. Used by the HTTP API and the gRPC API alike.
"""

from __future__ import annotations


class StopTrimmer:
    """The text of one response with its stop string cut off (see the module docstring)."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool) -> None:
        self.stops, self.include = stops, include_stop
        self.longest = max((len(x) for x in stops), default=0)
        self.hold = 0 if include_stop else max(0, self.longest - 1)
        self.text, self.sent, self.done = "", 0, False

    def add(self, delta: str) -> str:
        """Append the router's text; returns what may be given out now."""
        if not self.stops:  # nothing to cut: the text goes out as it comes, nothing is kept
            return delta
        if self.done or not delta:
            return ""
        self.text += delta
        start = max(0, self.sent - self.longest + 1)
        hits = [(i, len(x)) for x in self.stops if (i := self.text.find(x, start)) >= 0]
        if hits:
            i, n = min(hits)
            self.done = True
            return self._give(i + n if self.include else i)
        return self._give(len(self.text) - self.hold)

    def flush(self) -> str:
        """The end of the response: everything not cut off."""
        return "" if self.done else self._give(len(self.text))

    def _give(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out
