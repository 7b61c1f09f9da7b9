"""A request's stop rules, in one class: stop token or EOS, then stop string, then length.

``StopChecker.add(token)`` takes each generated token and says whether it ends the request ("stop",
"length", or "" to go on); with a ``decode`` function it also detokenizes incrementally
(``colm.detokenize``), gives out the text each token adds (``delta``), and matches stop strings in it.

Every generator asks this one class: the reference generator (``colm.generate``), the router
(``colm.router.core``), the decode engine (``colm.decode_worker.request.stop_reason``) and the router's
in-process full-model backend. Two of them check the same request, on purpose:

* the decode engine checks stop tokens, EOS and length, so a finished sequence leaves the batch and frees
  its KV blocks at once;
* the router checks all rules again, and is the only one that checks stop strings (it sends the engine
  ``stop_strings=()``): a stop string is text, and the router holds the request's whole text, also across a
  failover, where a retried attempt's engine sees only the tokens of that attempt. The router's count of
  tokens spans the attempts, so its length rule is the request's.
"""

from __future__ import annotations

from typing import Callable

from colm.detokenize import IncrementalDetokenizer
from colm.sampling import SamplingParams


def stop_token_set(params: SamplingParams, eos_id: int | None) -> frozenset[int]:
    """The tokens that end a request's output: its stop tokens, and EOS unless ``ignore_eos``."""
    eos = () if params.ignore_eos or eos_id is None or eos_id < 0 else (eos_id,)
    return frozenset(params.stop_token_ids) | frozenset(eos)


class StopChecker:
    """The stop rules of one request's output, token by token."""

    def __init__(self, params: SamplingParams, eos_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self.stop_ids = stop_token_set(params, eos_id)
        self.max_new_tokens = params.max_new_tokens
        self.min_tokens = params.min_tokens  # before this many tokens no stop token or stop string ends the output
        # without a decode function there is no text: stop strings cannot be matched (the router matches them)
        self.detok = IncrementalDetokenizer(decode, params.stop_strings) if decode is not None else None
        self.num_tokens = 0
        self.delta = ""  # the text the last token added ("" without a decode function)

    def add(self, token: int) -> str:
        """Take the next generated token: "stop" (a stop token, EOS, or a stop string now in the text),
        "length" (max_new_tokens reached), or "" (go on)."""
        self.num_tokens += 1
        self.delta = self.detok.add(token) if self.detok is not None else ""
        if self.num_tokens < self.min_tokens:
            return ""
        if token in self.stop_ids:
            return "stop"
        if self.detok is not None and self.detok.stop_hit(self.delta):
            return "stop"
        if self.num_tokens >= self.max_new_tokens:
            return "length"
        return ""

    def finish(self) -> str:
        """The text still held back at the end (an incomplete character), once the request is over."""
        return self.detok.finish() if self.detok is not None else ""
