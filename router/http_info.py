"""The HTTP front's endpoints besides generation (mixin of ``HttpApi``).

``GET /v1/models`` and ``/v1/models/{model}`` (the served name and one ``NAME@k`` card per scale), ``POST /tokenize``,
``POST /detokenize``, ``GET /tokenizer_info`` (as vLLM serves them), ``POST /v1/requests/{id}/scale`` (a running
completion's scale switch), ``POST /reset_prefix_cache`` and ``GET /health``. Uses the ``HttpApi``'s ``router``,
``tok``, ``tcfg`` and ``_json``.
"""

from __future__ import annotations

from aiohttp import web

from colm.router.http_errors import ModelNotFound
from colm.router.openai_errors import BadField, parse
from colm.router.openai_schema import DetokenizeRequest, TokenizeRequest


class InfoMixin:
    """Models, tokenizer, scale switch, prefix-cache reset and health handlers."""

    async def reset_prefix_cache(self, request):
        """vLLM's ``POST /reset_prefix_cache``: every decode worker forgets its cached prefixes (benchmarks between
        passes; the API key applies). Answers {"workers": {worker: idle blocks freed, or its error}}."""
        return web.json_response({"workers": await self.router.reset_prefix_cache()})

    def _cards(self) -> list[dict]:
        """The model cards: the served name, then ``NAME@k`` for every scale k it serves."""
        cfg, name = self.router.model_cfg, self.router.cfg.served_model_name
        scales = self.router.served_scales()
        card = {"object": "model", "created": 0, "owned_by": "colm", "max_model_len": cfg.max_seq_len}
        data = [{"id": name, **card, "root": name, "parent": None, "scales": scales}]
        data += [{"id": f"{name}@{k}", **card, "root": name, "parent": name, "scale": k} for k in scales]
        return data

    async def models(self, request):
        return web.json_response({"object": "list", "data": self._cards()})

    async def model(self, request):
        """OpenAI's ``GET /v1/models/{model}`` (``client.models.retrieve``): a listed model's card; 404 others."""
        name = request.match_info["model"]
        card = next((c for c in self._cards() if c["id"] == name), None)
        if card is None:
            raise ModelNotFound(name)
        return web.json_response(card)

    async def tokenize(self, request):
        req = parse(TokenizeRequest, await self._json(request))
        ids = self.tcfg.encode(req.prompt, req.add_special_tokens is not False)
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.router.model_cfg.max_seq_len})

    async def detokenize(self, request):
        ids = parse(DetokenizeRequest, await self._json(request)).tokens
        vocab = self.router.model_cfg.vocab_size
        bad = next((i for i, t in enumerate(ids) if t >= vocab), None)
        if bad is not None:
            raise BadField(f"tokens[{bad}]={ids[bad]} is outside the vocabulary 0..{vocab - 1}", f"tokens[{bad}]")
        return web.json_response({"prompt": self.tok.decode(ids)})

    async def tokenizer_info(self, request):
        cfg = self.router.model_cfg
        # the special tokens by name, as vLLM's /tokenizer_info gives them: lm-eval's remote tokenizer reads
        # eos_token and finds its id through /tokenize
        return web.json_response({"tokenizer": self.tok.spec(), "tokenizer_class": type(self.tok).__name__,
                                  "vocab_size": cfg.vocab_size, "bos_token_id": self.tok.bos_id,
                                  "eos_token_id": self.tok.eos_id, "max_model_len": cfg.max_seq_len,
                                  "model_max_length": cfg.max_seq_len, **self.tcfg.special,
                                  "chat_template": self.tcfg.chat_template})

    async def set_scale(self, request):
        """Switch a running completion's scale: ``POST /v1/requests/{id}/scale {"scale": k}``, ``id`` as the
        response's ``id`` (``cmpl-...`` / ``chatcmpl-...``) or without its prefix. Same rules as gRPC's
        UpdateRequest; answers ``{"id", "scale"}``."""
        rid = request.match_info["request_id"]
        for prefix in ("chatcmpl-", "cmpl-"):
            rid = rid.removeprefix(prefix)
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadField(f"request body must be a JSON object like {{\"scale\": 1}}, got {type(body).__name__}", None)
        extra = sorted(set(body) - {"scale"})
        if extra:
            raise BadField(f"{extra[0]}: not a field of the scale switch (its body is {{\"scale\": k}})", extra[0])
        scale = body.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise ValueError(f"scale={scale!r}: give an integer in 1..{self.router.model_cfg.num_chains}")
        return web.json_response({"id": request.match_info["request_id"], "scale": await self.router.set_scale(rid, scale)})

    async def health(self, request):
        ok, reason = self.router.health()  # a healthy prefill AND decode worker, as gRPC's Health says
        body = {"status": "ok"} if ok else {"status": "unavailable", "reason": reason}
        return web.json_response(body, status=200 if ok else 503)
