"""Non-streamed responses of the HTTP front (mixin of ``HttpApi``): each choice run to its end, then the JSON body.

``_gather`` runs a request's choices at once (one failing cancels the others), ``_run`` collects one sequence's
tokens, text (stop strings cut), log-probs, finish reason and usage; ``_completion_body`` and ``_chat_body`` build the
response JSON from those, off the event loop (``_off_loop``). The log-prob entries (``_top_dict``, ``_chat_logprob``)
and the usage totals (``_usage``) are shared with the streamed chunks (``router/http_stream.py``). Uses the
``HttpApi``'s ``router``, ``tok``, ``_raw_bytes`` and ``_piece``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web


async def _off_loop(build) -> web.Response:
    """A JSON response whose body ``build()`` makes (bytes) on a thread: a completion of 16 choices of 1,000 tokens
    with 20 top log-probs each is 8.7 MB, whose building and serialising held the event loop (health included)
    for half a second."""
    body = await asyncio.get_running_loop().run_in_executor(None, build)
    return web.Response(body=body, content_type="application/json")


class BodyMixin:
    """Non-streamed choices and bodies, and the log-prob entries and usage both response kinds share."""

    async def _gather(self, jobs):
        """Run the coroutines ``jobs`` at once (the choices of a request); one failing cancels the others and its
        error is the request's."""
        tasks = [asyncio.ensure_future(j) for j in jobs]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _run(self, spec, trim):
        """One sequence to its end: (token ids, text pieces, logprobs, finish reason, scale, prompt logprobs, usage,
        top logprobs per token)."""
        toks, text, lps, finish, scale, plp, usage, tops = [], [], [], "length", 0, None, None, []
        async with contextlib.aclosing(self.router.generate(spec)) as gen:
            async for ev in gen:
                if ev.kind == "decision":
                    scale = ev.decision.scale
                elif ev.kind == "prompt_logprobs":
                    plp = ev.prompt_logprobs
                elif ev.kind == "token":
                    toks.append(ev.token_id)
                    text.append(trim.add(ev.text))
                    lps.append(ev.logprob)
                    tops.append(ev.top_logprobs)
                else:
                    text.append(trim.add(ev.text) + trim.flush())
                    finish, usage = ev.finish_reason, ev.usage
        return toks, text, lps, finish, scale, plp, usage, tops

    @staticmethod
    def _usage(usages: list, prompt_of: list[int], speculative: bool = False) -> dict:
        """Totals over the choices: each prompt's tokens once (its n choices share it), every choice's output;
        ``speculative`` (the request asked for drafts): the output tokens that were accepted chain-1 drafts too."""
        seen, prompt, completion, drafted = set(), 0, 0, 0
        for u, p in zip(usages, prompt_of):
            if u is None:
                continue
            if p not in seen:
                seen.add(p)
                prompt += u["prompt_tokens"]
            completion += u["completion_tokens"]
            drafted += u.get("draft_accepted_tokens", 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if speculative:
            usage["draft_accepted_tokens"] = drafted
        return usage

    def _completion_body(self, specs, runs, ids, echo: bool, want_lp: bool, prompt_of, speculative: bool) -> bytes:
        """The JSON of a non-streamed completion: every choice, its log-probs, the usage."""
        choices = []
        for i, (spec, (toks, text, lps, finish, scale, plp, _, top)) in enumerate(zip(specs, runs)):
            out_text = "".join(text)
            prompt_text = self.tok.decode(spec.prompt_ids) if echo else ""
            choice = {"index": i, "text": prompt_text + out_text, "finish_reason": finish, "scale": scale,
                      "logprobs": None}
            if want_lp:
                all_ids = (spec.prompt_ids if echo else []) + toks
                token_lps = ([None] + [r[0] for r in plp[1:]] if echo else []) + lps
                # top id -1: the worker did not name the most likely token; report the token itself
                tops = ([None] + [{self._piece(r[1] if r[1] >= 0 else t): r[2]}
                                  for r, t in zip(plp[1:], spec.prompt_ids[1:])] if echo else [])
                tops += [self._top_dict(t, lp, alts) for t, lp, alts in zip(toks, lps, top)]
                offsets, pos = [], 0
                for t in all_ids:
                    offsets.append(pos)
                    pos += len(self._piece(t))
                choice["logprobs"] = {"tokens": [self._piece(t) for t in all_ids], "token_logprobs": token_lps,
                                      "top_logprobs": tops, "text_offset": offsets}
            choices.append(choice)
        usage = self._usage([r[6] for r in runs], prompt_of, speculative)
        return json.dumps({**ids, "choices": choices, "usage": usage}).encode()

    def _chat_body(self, runs, head, want_lp: bool, forced, speculative: bool) -> bytes:
        """The JSON of a non-streamed chat completion: every choice (tool calls parsed), its log-probs, the usage."""
        choices = [{"index": j, "message": {"role": "assistant", "content": "".join(text)},
                    "logprobs": {"content": [self._chat_logprob(t, lp, alts) for t, lp, alts in zip(toks, lps, top)]}
                    if want_lp else None, "finish_reason": finish, "scale": scale}
                   for j, (toks, text, lps, finish, scale, _, _, top) in enumerate(runs)]
        for c in choices if forced is not None else ():
            calls = forced.calls(c["message"]["content"]) if c["finish_reason"] == "stop" else None
            if calls:  # a finished call: OpenAI's form (a truncated one stays text, finish_reason "length")
                c["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                c["finish_reason"] = "stop" if forced.name is not None else "tool_calls"
        return json.dumps({**head, "choices": choices, "usage": self._usage([r[6] for r in runs], [0] * len(runs),
                                                                            speculative)}).encode()

    def _chat_logprob(self, token_id: int, logprob: float, alts=()) -> dict:
        return {**self._chat_token(token_id), "logprob": logprob,
                "top_logprobs": [{**self._chat_token(t), "logprob": lp} for t, lp in alts]}

    def _chat_token(self, token_id: int) -> dict:
        """A chat log-prob's ``token`` and ``bytes``: OpenAI's ``bytes`` are the token's own, which joined make the
        text, so a token holding part of a UTF-8 character has that part (its ``token`` text shows U+FFFD).
        Tokenizers that cannot say a token's bytes (no ``decode_bytes``) give its text's UTF-8."""
        piece = self._piece(token_id)
        raw = self._raw_bytes([token_id]) if self._raw_bytes is not None else piece.encode("utf-8")
        return {"token": piece, "bytes": list(raw)}

    def _top_dict(self, token_id: int, logprob: float, alts) -> dict:
        """A completion token's ``top_logprobs`` entry: the most likely tokens' text -> log-prob, and the token itself
        (as vLLM adds it when it is not among them)."""
        top = {self._piece(t): lp for t, lp in alts}
        top.setdefault(self._piece(token_id), logprob)
        return top
