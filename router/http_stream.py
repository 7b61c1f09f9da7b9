"""Streamed responses of the HTTP front as server-sent events (mixin of ``HttpApi``).

A request's path: its handler (``router/http_generate.py``) builds a chunk function (``_completion_chunks`` or
``_chat_chunks``: one choice's event -> a chunk object, or None to skip it) and calls ``_stream``, which starts
the router's generators; ``_stream_events`` waits for every choice's decision (admission and scale: their errors
are still plain HTTP errors), then sends the head chunks, one write per batch of events (``_merged`` interleaves
the choices as they come), the usage chunk when asked for, and ``[DONE]``. A failure mid-stream, or the shutdown's
cut, ends the stream with an error event; a client gone mid-stream closes the choices' generators. Uses the
``HttpApi``'s ``router``, ``drain``, ``tok`` and ``_piece``, and ``BodyMixin``'s log-prob entries and usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid

from aiohttp import web

from colm.router.coalesce import coalesced
from colm.router.grpc_server import status_for
from colm.router.http_errors import HTTP_STATUS, _error_body

log = logging.getLogger("colm.router")

# request key: set once the request's event stream has started (aiohttp < 3.13 has no RequestKey: a plain name)
STREAMING = web.RequestKey("colm_streaming", bool) if hasattr(web, "RequestKey") else "colm_streaming"


class StreamMixin:
    """The chunk functions of streamed completions and chat, and the event stream that sends them."""

    def _completion_chunks(self, ids: dict, want_lp: bool, speculative: bool, include_usage: bool, num_choices: int):
        """The chunk function of a streamed completion: a choice's text (and, per token, its scale, id, log-probs
        and accepted-draft flag)."""
        offsets = [0] * num_choices  # text_offset of each choice's next token
        extra = {"usage": None} if include_usage else {}  # OpenAI: every chunk but the last has a null usage

        def chunk(index, text, finish=None, ev=None):
            c = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
            if ev is not None:
                c.update({"scale": ev.scale, "token_id": ev.token_id})
                if speculative:
                    c["drafted"] = ev.drafted
                if want_lp:
                    piece = self._piece(ev.token_id)
                    c["logprobs"] = {"tokens": [piece], "token_logprobs": [ev.logprob],
                                     "top_logprobs": [self._top_dict(ev.token_id, ev.logprob, ev.top_logprobs)],
                                     "text_offset": [offsets[index]]}
                    offsets[index] += len(piece)
            return {**ids, "choices": [c], **extra}

        return chunk

    def _chat_chunks(self, head: dict, specs, forced, want_lp: bool, speculative: bool, include_usage: bool):
        """The chunk function of a streamed chat completion: a choice's delta (``role=True``: its first, the role);
        with a forced tool call (``forced``), the text streams as the call's arguments."""
        extra = {"usage": None} if include_usage else {}

        call_ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in specs] if forced is not None else []
        # each choice's log-prob entries of tokens whose text is not out yet (held back by a stop string, or a
        # part of a UTF-8 character): they go out with the next chunk of that choice, the finish chunk at the
        # latest, so that a stream carries every token's entry, as the unstreamed response does
        pending: list[list[dict]] = [[] for _ in specs]
        drafted: list[list[bool]] = [[] for _ in specs]  # speculative: the same tokens' accepted-draft flags

        def chunk(index, text, finish=None, ev=None, role=False):
            if ev is not None and want_lp:
                pending[index].append(self._chat_logprob(ev.token_id, ev.logprob, ev.top_logprobs))
            if ev is not None and speculative:
                drafted[index].append(ev.drafted)
            if not text and finish is None and not role:
                return None
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            if forced is not None:  # a named function: its arguments stream as the call's (OpenAI's deltas)
                call = {"index": 0, "id": call_ids[index], "type": "function",
                        "function": {"name": forced.name, "arguments": ""}} if role else \
                    {"index": 0, "function": {"arguments": text}}
                delta = {"role": "assistant", "content": None, "tool_calls": [call]} if role else \
                    ({"tool_calls": [call]} if text else {})
            c = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            if ev is not None:
                c["scale"] = ev.scale
            if pending[index] and not role:
                c["logprobs"], pending[index] = {"content": pending[index]}, []
            if drafted[index] and not role:
                c["drafted"], drafted[index] = drafted[index], []
            return {**head, "choices": [c], **extra}

        return chunk

    async def _stream(self, request, specs, chunk, head: list, trims: list, include_usage: bool, ids: dict,
                      prompt_of: list[int]):
        """Server-sent events of the choices ``specs``: ``head``, then ``chunk(index, text, finish, event)`` per token
        and at each choice's finish (None skips it), the choices' events as they come, then the usage when asked
        for, then [DONE]. ``ids`` are the id / object / created / model of the usage chunk; ``prompt_of[i]``: the
        prompt of choice i (its tokens count once in the usage)."""
        gens = [self.router.generate(s) for s in specs]
        try:
            return await self._stream_events(request, gens, chunk, head, trims, include_usage, ids, prompt_of,
                                             any(s.speculative for s in specs))
        except ConnectionResetError:  # the client went away mid-stream: nobody is left to answer
            return web.Response(status=499)
        finally:
            for gen in gens:  # a client gone mid-stream must not leave its requests decoding
                await gen.aclose()

    @staticmethod
    async def _merged(gens):
        """(choice index, batch of events) from every generator as they come; one's failure ends the stream with
        its error."""
        if len(gens) == 1:
            async with contextlib.aclosing(coalesced(gens[0])) as batches:
                async for batch in batches:
                    yield 0, batch
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, gen):
            try:
                async with contextlib.aclosing(coalesced(gen)) as batches:
                    async for batch in batches:
                        await queue.put((index, batch))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((index, e))
            await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        try:
            left = len(tasks)
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_events(self, request, gens, chunk, head, trims, include_usage: bool, ids: dict, prompt_of,
                             speculative: bool = False):
        for gen in gens:  # the decisions: admission and the scale decision happen here: errors become plain HTTP errors
            await anext(gen)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        request[STREAMING] = True
        await resp.prepare(request)

        async def send(*objs) -> None:
            body = "".join(f"data: {json.dumps(obj)}\n\n" for obj in objs if obj is not None)
            if body:
                await resp.write(body.encode())

        await send(*head)
        usages = [None] * len(gens)
        try:
            # one write per batch of events (several when the client or this process falls behind), a chunk per token
            async with contextlib.aclosing(self._merged(gens)) as batches:
                async for index, batch in batches:
                    out, trim = [], trims[index]
                    for ev in batch:
                        if ev.kind == "token":
                            out.append(chunk(index, trim.add(ev.text), None, ev))
                        elif ev.kind == "finish":
                            usages[index] = ev.usage
                            out.append(chunk(index, trim.add(ev.text) + trim.flush(), ev.finish_reason))
                    await send(*out)
        except ConnectionResetError:
            raise
        except asyncio.CancelledError:
            why = self.drain.cut_error()
            if why is None:
                raise
            await send(_error_body(why, "unavailable", 503))
        except Exception as e:
            code, msg, _ = status_for(e)
            if code.name == "INTERNAL":
                log.error("HTTP stream failed", exc_info=e)
            await send(_error_body(msg, code.name.lower(), HTTP_STATUS[code.name]))
        if include_usage and all(u is not None for u in usages):
            await send({**ids, "choices": [], "usage": self._usage(usages, prompt_of, speculative)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
