"""A request's logit adjustments: penalties, logit bias and a minimum length, applied before a token is picked.

Every generator applies them through ``LogitsAdjuster`` (the reference generator ``colm.generate``, the decode
engine, the router's in-process backend), on the host, to one row of float32 logits, in this order (vLLM's):

0. structured output (``colm.structured``): every token its grammar does not allow next gets -inf, and so does
   every token outside ``allowed_token_ids`` (vLLM) when it is given;
1. ``logit_bias``: each listed token's bias is added to its logit (OpenAI);
2. ``min_tokens``: while fewer tokens than that are out, EOS and the stop tokens get -inf;
3. ``repetition_penalty`` r (the CTRL / transformers rule): every token of the prompt or of the output so far
   has its logit divided by r where positive, multiplied by r where negative;
4. ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI): a token that appeared c times in the output so
   far loses f * c + p * (c > 0).

Temperature, top-k and top-p then act on the result (``colm.sampling``); a greedy request takes its argmax. The
log-prob reported per token stays the model's own (vLLM's default), not the adjusted distribution's.

The counts (and the grammar's place) grow by the tokens appended since the last call (O(new tokens), not
O(output), per step). A request resumed elsewhere after a failure carries its earlier output at the end of its
prompt: ``prior_output`` says how many of the prompt's last tokens are output, so they count as output here too
(and the grammar has read them).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from colm.sampling import SamplingParams
from colm.stopping import stop_token_set
from colm.structured import OutputMatcher, compile_output


def reads_prompt(params: SamplingParams, prior_output: int = 0) -> bool:
    """Whether the adjustments read the prompt: penalties do, and a grammar reads the earlier output a retried
    attempt's prompt ends with."""
    return params.penalizes or (params.structured is not None and prior_output > 0)


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """ValueError when ``logit_bias`` or ``allowed_token_ids`` names a token outside the vocabulary."""
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                      ("allowed_token_ids", params.allowed_token_ids)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary 0..{vocab_size - 1}")


class LogitsAdjuster:
    """The adjustments of one request's ``SamplingParams`` and the context they read (prompt, output so far)."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int] | np.ndarray = (),
                 stop_ids: Iterable[int] = (), prior_output: int = 0, grammar=None) -> None:
        """``grammar``: the request's compiled structured output (``colm.structured.compile_output``), if any."""
        check_token_ids(params, vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.bias: torch.Tensor | None = None  # [V] float32
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            ids, values = zip(*params.logit_bias)
            self.bias[torch.tensor(ids)] = torch.tensor(values, dtype=torch.float32)
        self.banned: torch.Tensor | None = None  # [V] bool: outside allowed_token_ids
        if params.allowed_token_ids:
            self.banned = torch.ones(vocab_size, dtype=torch.bool)
            self.banned[torch.tensor(params.allowed_token_ids)] = False
        self.stop_ids = torch.tensor(sorted(t for t in set(stop_ids) if 0 <= t < vocab_size), dtype=torch.int64)
        self.counts = torch.zeros(vocab_size)     # [V] float32: times each token appeared in the output
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # [V]: in the prompt or the output
        prompt = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64))
        if params.penalizes:
            self.seen[prompt] = True
            if prior_output:
                self._count(prompt[len(prompt) - prior_output:])
        self.matcher = None
        if params.structured is not None:
            if grammar is None:
                raise ValueError("structured_output: no compiled grammar given")
            self.matcher = OutputMatcher(grammar, vocab_size)
            for t in prompt[len(prompt) - prior_output:].tolist() if prior_output else ():
                self.matcher.accept(t)
        self._folded = 0  # tokens of the output counted so far

    def _count(self, tokens: torch.Tensor) -> None:
        self.counts.index_add_(0, tokens, torch.ones(len(tokens)))
        self.seen[tokens] = True

    def __call__(self, logits: torch.Tensor, out_tokens: Sequence[int]) -> torch.Tensor:
        """logits: [V] (any dtype, on the host) of the token after ``out_tokens`` (this generation's output so
        far) -> [V] float32, adjusted."""
        p = self.params
        if len(out_tokens) > self._folded:
            new = list(out_tokens[self._folded:])
            self._folded = len(out_tokens)  # first: a token the grammar refuses is not folded in twice on a retry
            if p.penalizes:
                self._count(torch.tensor(new, dtype=torch.int64))
            if self.matcher is not None:
                for t in new:
                    self.matcher.accept(t)
        x = logits.float().clone()
        if self.matcher is not None:
            self.matcher.mask(x)
        if self.banned is not None:
            x.masked_fill_(self.banned, float("-inf"))
        if self.bias is not None:
            x += self.bias
        if len(out_tokens) < p.min_tokens and len(self.stop_ids):
            x[self.stop_ids] = float("-inf")
        if p.repetition_penalty != 1:
            hit = x[self.seen]
            x[self.seen] = torch.where(hit > 0, hit / p.repetition_penalty, hit * p.repetition_penalty)
        if p.frequency_penalty:
            x -= p.frequency_penalty * self.counts
        if p.presence_penalty:
            x -= p.presence_penalty * (self.counts > 0).float()
        return x


def make_adjuster(params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int] | np.ndarray = (),
                  eos_id: int | None = None, prior_output: int = 0, tokenizer=None,
                  grammar=None) -> LogitsAdjuster | None:
    """The request's ``LogitsAdjuster``, or None when its parameters adjust nothing. The tokens ``min_tokens``
    masks are the ones that would stop it: its stop tokens, and EOS unless ``ignore_eos``. Structured output
    takes its compiled ``grammar``, or compiles it for ``tokenizer``."""
    if not params.adjusts_logits:
        return None
    if params.structured is not None and grammar is None:
        if tokenizer is None:
            raise ValueError("structured_output: this generator has no tokenizer to compile it for")
        grammar = compile_output(params.structured, tokenizer, vocab_size)
    return LogitsAdjuster(params, vocab_size, prompt_ids, stop_token_set(params, eos_id), prior_output, grammar)
