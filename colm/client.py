"""Python client of a colm service's public gRPC API (``colm.v1.Colm``).

    from colm.client import Client
    with Client("127.0.0.1:50051") as c:
        r = c.complete("Hello", max_new_tokens=16, tpot_ms=20)      # dict: text, token_ids, scales, ...
        for piece in c.stream("Hello", scale=1): print(piece["text"], end="")

Errors surface as ``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

from typing import Iterator

import grpc

from colm.proto import load_proto


class Client:
    def __init__(self, addr: str, api_key: str | None = None, tls_ca: str | None = None, timeout_s: float = 300.0):
        self.pb2, pb2_grpc = load_proto("public")
        if tls_ca:
            with open(tls_ca, "rb") as f:
                self.channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(f.read()))
        else:
            self.channel = grpc.insecure_channel(addr)
        self.stub = pb2_grpc.ColmStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, prompt: str | list[int], max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, seed: int | None = None, scale: int | None = None, ttft_ms: float | None = None,
                tpot_ms: float | None = None, deadline_ms: float | None = None, reject: bool = False,
                stop: tuple[str, ...] = (), prompt_logprobs: bool = False, request_id: str = "",
                ignore_eos: bool = False, include_stop_str_in_output: bool = False, speculative: int = 0,
                cache_salt: str = "", presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None, min_tokens: int = 0,
                structured_output=None, top_logprobs: int = 0, min_p: float = 0.0, allowed_token_ids=()):
        """``max_new_tokens``: 0 is unset at the API level, i.e. the router's default
        (``router.default_max_new_tokens``), not zero tokens. ``structured_output``: a
        ``colm.structured.StructuredOutput`` (JSON schema, JSON object, regex, grammar or choice) or None."""
        pb2 = self.pb2
        sampling = pb2.Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=list(stop), ignore_eos=ignore_eos, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                                logit_bias=logit_bias or {}, min_tokens=min_tokens, top_logprobs=top_logprobs,
                                min_p=min_p, allowed_token_ids=list(allowed_token_ids))
        if seed is not None:
            sampling.seed = seed
        if structured_output is not None:
            from colm.proto.convert import structured_to_proto

            sampling.structured_output.CopyFrom(structured_to_proto(structured_output))
        budget = pb2.LatencyBudget(ttft_ms=ttft_ms or 0, tpot_ms=tpot_ms or 0, deadline_ms=deadline_ms or 0,
                                   on_miss=pb2.ON_MISS_REJECT if reject else pb2.ON_MISS_DEGRADE)
        req = pb2.GenerateRequest(request_id=request_id, sampling=sampling, budget=budget, scale=scale or 0,
                                  prompt_logprobs=1 if prompt_logprobs else 0,
                                  include_stop_str_in_output=include_stop_str_in_output, speculative=speculative,
                                  cache_salt=cache_salt)
        if isinstance(prompt, str):
            req.text = prompt.encode("utf-8")
        elif isinstance(prompt, bytes):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return req

    def complete(self, prompt, **kw) -> dict:
        r = self.stub.Complete(self.request(prompt, **kw), metadata=self.metadata, timeout=self.timeout_s)
        return {"request_id": r.request_id, "text": r.text, "token_ids": [t.id for t in r.tokens],
                "scales": [t.scale for t in r.tokens], "times_ms": [t.time_ms for t in r.tokens],
                "drafted": [t.drafted for t in r.tokens],
                "logprobs": [t.logprob for t in r.tokens],
                "top_logprobs": [[(x.id, x.logprob) for x in t.top_logprobs] for t in r.tokens],
                "finish_reason": r.finish_reason, "scale": r.decision.scale, "degraded": r.decision.degraded,
                "predicted_ttft_ms": r.decision.predicted_ttft_ms, "predicted_tpot_ms": r.decision.predicted_tpot_ms,
                "usage": {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                          "ttft_ms": r.usage.ttft_ms, "total_ms": r.usage.total_ms, "retries": r.usage.retries,
                          "draft_accepted_tokens": r.usage.draft_accepted_tokens},
                "prompt_logprobs": list(r.prompt_logprobs)}

    def stream(self, prompt, **kw) -> Iterator[dict]:
        """Yields {"kind": "decision"|"token"|"finish", ...} as the server sends them."""
        for m in self.stub.Generate(self.request(prompt, **kw), metadata=self.metadata, timeout=self.timeout_s):
            if m.HasField("decision"):
                yield {"kind": "decision", "scale": m.decision.scale, "degraded": m.decision.degraded,
                       "prompt_tokens": m.decision.prompt_tokens}
            for t in m.tokens:
                yield {"kind": "token", "id": t.id, "text": t.text, "scale": t.scale, "time_ms": t.time_ms,
                       "drafted": t.drafted, "logprob": t.logprob,
                       "top_logprobs": [(x.id, x.logprob) for x in t.top_logprobs]}
            if m.finish_reason:
                yield {"kind": "finish", "text": m.text, "finish_reason": m.finish_reason,
                       "usage": {"prompt_tokens": m.usage.prompt_tokens, "completion_tokens": m.usage.completion_tokens,
                                 "ttft_ms": m.usage.ttft_ms, "total_ms": m.usage.total_ms,
                                 "retries": m.usage.retries, "draft_accepted_tokens": m.usage.draft_accepted_tokens}}

    def tokenize(self, text: str) -> list[int]:
        return list(self.stub.Tokenize(self.pb2.TokenizeRequest(text=text.encode()), metadata=self.metadata,
                                       timeout=self.timeout_s).ids)

    def list_scales(self) -> list[dict]:
        r = self.stub.ListScales(self.pb2.ListScalesRequest(), metadata=self.metadata, timeout=self.timeout_s)
        return [{"scale": s.scale, "num_params": s.num_params, "dim": s.dim, "predicted_ttft_ms": s.predicted_ttft_ms,
                 "predicted_tpot_ms": s.predicted_tpot_ms, "measured_step_ms": s.measured_step_ms} for s in r.scales]

    def set_scale(self, request_id: str, scale: int) -> int:
        """Switch a running request (started with this ``request_id``) to ``scale``; returns the scale."""
        r = self.stub.UpdateRequest(self.pb2.UpdateRequestRequest(request_id=request_id, scale=scale),
                                    metadata=self.metadata, timeout=self.timeout_s)
        return r.scale

    def health(self) -> dict:
        r = self.stub.Health(self.pb2.HealthRequest(), metadata=self.metadata, timeout=self.timeout_s)
        return {"serving": r.serving, "reason": r.reason, "queued": r.queued, "running": r.running,
                "workers": [{"worker_id": w.worker_id, "role": w.role, "healthy": w.healthy, "state": w.state,
                             "detail": w.detail, "address": w.address, "inflight": w.inflight, "free_blocks": w.free_blocks,
                             "total_blocks": w.total_blocks} for w in r.workers]}
