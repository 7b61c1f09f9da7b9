"""Checking a client's request before it takes an admission slot: ``Router.validate`` turns the prompt (text or
token ids), sampling parameters, budget and options into a ``RequestSpec`` or raises ValueError naming the bad
field (INVALID_ARGUMENT at the fronts); ``Router.precompile`` compiles a structured-output spec off the event loop
first, so that ``validate`` finds it cached.

A mixin of ``Router`` (``router/core.py``): it reads the router's ``cfg``, ``model_cfg`` and ``tokenizer`` and its
``check_served_scale`` (``router/scale_control.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from colm.decode_worker.config import check_speculative
from colm.decode_worker.prefix_cache import MAX_CACHE_SALT
from colm.logits_adjust import check_token_ids
from colm.router.policy import Budget
from colm.router.request import RequestSpec
from colm.sampling import SamplingParams
from colm.structured import compile_output
from colm.tokenizer import encode_prompt_within


class RequestValidation:
    async def precompile(self, so) -> None:
        """Compile a request's structured output (a ``colm.structured.StructuredOutput`` or None) in a worker thread,
        so that ``validate``'s compile, on the event loop, finds it cached; a spec that does not compile is left to
        ``validate`` to refuse."""
        if so is None:
            return
        with contextlib.suppress(ValueError):
            await asyncio.get_running_loop().run_in_executor(None, compile_output, so, self.tokenizer,
                                                             self.model_cfg.vocab_size)

    def validate(self, prompt_ids: list[int] | None, text: bytes | str | None, params: SamplingParams | dict,
                 budget: Budget | None = None, scale: int | None = None, request_id: str = "",
                 prompt_logprobs: bool = False, speculative: int = 0, cache_salt: str = "") -> RequestSpec:
        """Build a RequestSpec or raise ValueError with a message naming the bad field."""
        cfg = self.model_cfg
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if text is not None and prompt_ids:
            raise ValueError("give the prompt as text or as token ids, not both")
        if text is not None:
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"prompt text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            prompt_ids = encode_prompt_within(self.tokenizer, text, cfg.max_seq_len)
        prompt_ids = list(prompt_ids or [])
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary 0..{cfg.vocab_size - 1}")
        check_token_ids(params, cfg.vocab_size)
        if params.structured is not None:  # a schema, regex or grammar that does not compile is the client's error
            compile_output(params.structured, self.tokenizer, cfg.vocab_size)
        if len(prompt_ids) + params.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the context of {cfg.max_seq_len} tokens")
        if scale is not None:
            self.check_served_scale(scale)
        if check_speculative(speculative) and not cfg.kv_sharing:
            raise ValueError(f"speculative={speculative}: chain-1 drafts need a CoLM-Air model (shared KV)")
        if not isinstance(cache_salt, str) or len(cache_salt) > MAX_CACHE_SALT:
            raise ValueError(f"cache_salt: must be a string of at most {MAX_CACHE_SALT} characters")
        budget = budget or Budget()
        now = time.monotonic()
        deadline_s = budget.deadline_ms / 1000 if budget.deadline_ms else self.cfg.default_deadline_s
        return RequestSpec(request_id or uuid.uuid4().hex, prompt_ids, params, budget, scale, prompt_logprobs,
                           speculative, arrival=now, deadline=now + deadline_s, cache_salt=cache_salt)
