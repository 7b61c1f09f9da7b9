"""A parsed OpenAI request -> the router's spec of each of its sequences (mixin of ``HttpApi``).

``_model`` resolves the requested model name (``NAME`` or ``NAME@k``, which pins scale k; others are a 404);
``_spec`` turns one prompt of the request into ``SamplingParams``, a latency ``Budget`` and the scale, tokenizes it
(checking that it fits the context, or keeping its last ``truncate_prompt_tokens``) and has the router validate
it. Uses the ``HttpApi``'s ``router`` and ``tcfg`` (the tokenizer config).
"""

from __future__ import annotations

from colm.proto.convert import SEED_MAX
from colm.router.http_errors import ModelNotFound
from colm.router.openai_errors import BadField
from colm.router.policy import Budget
from colm.router.stop_trim import StopTrimmer
from colm.sampling import SamplingParams
from colm.tokenizer import check_fits


class SpecMixin:
    """Request -> sequence specs: the model name, the stop strings, the sampling parameters and budget."""

    def _model(self, req) -> tuple[str, int | None]:
        """(the model name to answer with, the scale it pins or None); ModelNotFound (404) for other names."""
        name = self.router.cfg.served_model_name
        if req.model is None or req.model == name:
            return name, None
        base, at, k = req.model.rpartition("@")
        if at and base == name and k.isdigit() and k == str(int(k)) and int(k) in self.router.served_scales():
            return req.model, int(k)
        raise ModelNotFound(req.model)

    def _stops(self, req) -> tuple[str, ...]:
        stop = req.stop or ()
        return (stop,) if isinstance(stop, str) else tuple(stop)

    def _spec(self, req, prompt, echo_logprobs: bool, max_new_tokens: int | None = None,
              stop_token_ids: tuple[int, ...] = (), choice: int = 0, request_id: str = ""):
        """The router's spec of one sequence of ``prompt``; ``choice`` j of n is seeded ``seed + j`` (wrapping).
        ``request_id``: the completion's id, which all its sequences share (a scale switch names them all)."""
        ext = req.extras()
        _, pinned = self._model(req)
        scale = ext.get("scale")
        if pinned is not None and scale is not None and scale != pinned:
            raise BadField(f"scale={scale} conflicts with model {req.model!r}, which serves scale {pinned}", "scale")
        if max_new_tokens is None:
            max_new_tokens = 16 if req.max_tokens is None else req.max_tokens
        seed = None if req.seed is None else (req.seed + choice) % (SEED_MAX + 1)
        params = SamplingParams(max_new_tokens=max_new_tokens,
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0),
                                seed=seed, stop_strings=self._stops(req),
                                stop_token_ids=tuple(dict.fromkeys((*stop_token_ids, *(req.stop_token_ids or ())))),
                                ignore_eos=bool(req.ignore_eos), top_logprobs=req.num_top_logprobs(),
                                **req.adjustments())
        budget = Budget(ttft_ms=ext.get("ttft_ms"), tpot_ms=ext.get("tpot_ms"), deadline_ms=ext.get("deadline_ms"),
                        on_miss=ext.get("on_miss", "degrade"))
        if isinstance(prompt, str):
            if not req.truncate_prompt_tokens:  # a truncated prompt is kept from its end: it is tokenized whole
                check_fits(self.tcfg.encode, prompt, self.router.model_cfg.max_seq_len)
            ids = self.tcfg.encode(prompt, req.add_special_tokens is not False)
        else:
            ids = prompt
        if req.truncate_prompt_tokens:
            ids = ids[-req.truncate_prompt_tokens:]
        return self.router.validate(ids, None, params, budget, pinned or scale, request_id,
                                    prompt_logprobs=echo_logprobs,
                                    speculative=ext.get("speculative") or 0, cache_salt=req.cache_salt or "")

    def _trimmer(self, req) -> StopTrimmer:
        return StopTrimmer(self._stops(req), bool(req.include_stop_str_in_output))
