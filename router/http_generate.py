"""The generating endpoints of the HTTP front (mixin of ``HttpApi``): ``POST /v1/completions`` and
``POST /v1/chat/completions``.

Each parses its body (``colm.router.openai_schema``), checks what only the whole request can say (the batch size;
a chat's rendered prompt), builds one spec per choice (``_spec``: ``router/http_spec.py``) and answers as server-sent
events (``router/http_stream.py``) or one JSON body (``router/http_bodies.py``). Chat renders ``messages`` with the
checkpoint's chat template (the ``HttpApi``'s ``tcfg``) and stops at the template's end of turn too.
"""

from __future__ import annotations

import time
import uuid

from colm.router.http_bodies import _off_loop
from colm.router.openai_chat import ChatCompletionRequest
from colm.router.openai_completion import CompletionRequest
from colm.router.openai_errors import BadField, parse
from colm.tokenizer import check_fits


class GenerateMixin:
    """The completion and chat completion handlers."""

    async def completions(self, request):
        req = parse(CompletionRequest, await self._json(request))
        prompts = req.prompt  # a list of prompts, each a string or a list of token ids
        echo = bool(req.echo)
        want_lp = req.logprobs is not None and req.logprobs is not False
        model, _ = self._model(req)
        n = req.n or 1
        cap = self.router.cfg.max_running + self.router.cfg.max_queued
        if len(prompts) * n > cap:  # before any prompt is tokenized: a huge batch must not hold the event loop
            raise BadField(f"prompt: {len(prompts)} prompts x n={n} = {len(prompts) * n} completions in one request; "
                           f"at most {cap} (router.max_running + router.max_queued) can be admitted at once", "prompt")
        # choice i * n + j: the j-th sequence of prompt i (OpenAI's and vLLM's order)
        await self.router.precompile(req.structured())  # off the event loop; _spec then finds it compiled
        rid = uuid.uuid4().hex
        specs = [self._spec(req, p, echo and want_lp, choice=j, request_id=rid) for p in prompts for j in range(n)]
        prompt_of = [i for i in range(len(prompts)) for _ in range(n)]
        created = int(time.time())
        cid = f"cmpl-{rid}"
        ids = {"id": cid, "object": "text_completion", "created": created, "model": model}
        speculative = any(s.speculative for s in specs)  # tokens say whether they were accepted drafts
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunk = self._completion_chunks(ids, want_lp, speculative, include_usage, len(specs))
            head = [chunk(i, self.tok.decode(s.prompt_ids)) for i, s in enumerate(specs)] if echo else []
            return await self._stream(request, specs, chunk, head, [self._trimmer(req) for _ in specs],
                                      include_usage, ids, prompt_of)
        runs = await self._gather(self._run(spec, self._trimmer(req)) for spec in specs)
        return await _off_loop(lambda: self._completion_body(specs, runs, ids, echo, want_lp, prompt_of, speculative))

    async def chat_completions(self, request):
        req = parse(ChatCompletionRequest, await self._json(request))
        model, _ = self._model(req)
        forced = req.forced_tool()
        if forced is not None and forced.name is None and req.stream:
            raise BadField('stream: tool_choice "required" is returned whole (its calls are known once the array '
                           "ends); set stream to false, or name the function", "stream")
        text = self.tcfg.render(req.messages, add_generation_prompt=req.add_generation_prompt is not False,
                                tools=req.tools)
        if not req.truncate_prompt_tokens:
            try:
                check_fits(self.tcfg.encode, text, self.router.model_cfg.max_seq_len, "messages")
            except ValueError as e:
                raise BadField(str(e), "messages") from None
        ids = self.tcfg.encode(text, bool(req.add_special_tokens))
        if not ids:
            raise BadField("messages: the chat template rendered an empty prompt", "messages")
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is None:  # OpenAI's default: up to the end of the context
            max_new = max(0, self.router.model_cfg.max_seq_len - len(ids))
        eos = self.tcfg.token_id("eos_token")  # the template's end of turn, which may not be the tokenizer's EOS
        await self.router.precompile(req.structured())
        rid = uuid.uuid4().hex
        specs = [self._spec(req, ids, False, max_new, () if eos is None or req.ignore_eos else (eos,), choice=j,
                            request_id=rid) for j in range(req.n or 1)]
        created, cid = int(time.time()), f"chatcmpl-{rid}"
        head = {"id": cid, "object": "chat.completion", "created": created, "model": model}
        want_lp = bool(req.logprobs)
        speculative = any(s.speculative for s in specs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            head["object"] = "chat.completion.chunk"
            chunk = self._chat_chunks(head, specs, forced, want_lp, speculative, include_usage)
            return await self._stream(request, specs, chunk, [chunk(j, "", role=True) for j in range(len(specs))],
                                      [self._trimmer(req) for _ in specs], include_usage, head, [0] * len(specs))
        runs = await self._gather(self._run(spec, self._trimmer(req)) for spec in specs)
        return await _off_loop(lambda: self._chat_body(runs, head, want_lp, forced, speculative))
