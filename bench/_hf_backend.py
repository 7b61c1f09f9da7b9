"""An independent serving engine behind colm's router: transformers' continuous batching over a dense Llama.

The serving benchmarks compare colm's engines with a baseline run in the same harness (the same load generator,
router, gRPC front, SLO scoring and GPU sampler). ``HFContinuousBackend`` is that harness's ``Backend`` over
``transformers``' ``ContinuousBatchingManager`` (paged K/V, chunked prefill mixed into decode batches, CUDA graphs
and asynchronous batching where the library enables them): an engine colm did not write, present on any machine
with transformers (the GPU image has it; vLLM and SGLang wheels are far over what a lent machine can be sent).

It serves what the manager serves per request: greedy decoding of a token prompt, up to ``max_new_tokens``,
ending at the end-of-sequence id or any of ``stop_token_ids`` (``ignore_eos`` drops the end-of-sequence id); the
router applies stop strings as it does for colm's engines. A request asking for anything else (sampling,
penalties, a logit bias, log-probabilities, structured output, drafts) is refused with the field named. One
worker, ``hf-0``, a decode worker that prefills its own prompts; it has one scale, so a scale switch is refused.
The engine lives in the router's process (the manager is a thread), as ``transformers serve`` runs it, so one
router process serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from colm.router.backend import EngineRequest, EngineToken, RequestFailed, WorkerFailed, WorkerInfo
from colm.router.policy import WorkerReport
from colm.sampling import SamplingParams

WORKER_ID = "hf-0"


def llama_config(cfg):
    """The ``transformers.LlamaConfig`` of a colm ``ModelConfig``'s full-scale shape (every chain's heads as one
    dense model; its RoPE scaling, norm epsilon and tied head as colm has them)."""
    from transformers import LlamaConfig

    rope = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.kind, "factor": rs.factor}
        if rs.kind == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position)
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                       rope_theta=cfg.rope_theta, rope_scaling=rope, rms_norm_eps=cfg.norm_eps,
                       tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")


def dense_llama(cfg, device, dtype, seed: int = 0):
    """A ``transformers.LlamaForCausalLM`` of ``cfg``'s full-scale shape (``llama_config``), random weights drawn
    like colm's random checkpoints (normal, std 0.02, seeded): the dense model the CoLM one is compared with."""
    import torch
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval()


def unsupported(params: SamplingParams, speculative: int) -> str:
    """Why the manager cannot serve these parameters exactly ("" when it can)."""
    p = params
    served = (("temperature", p.temperature, 0, "0 (greedy)"), ("top_k", p.top_k, 0, "0"), ("top_p", p.top_p, 1.0, "1"),
              ("min_p", p.min_p, 0, "0"), ("presence_penalty", p.presence_penalty, 0, "0"),
              ("frequency_penalty", p.frequency_penalty, 0, "0"), ("repetition_penalty", p.repetition_penalty, 1.0, "1"),
              ("logit_bias", p.logit_bias, (), "empty"), ("min_tokens", p.min_tokens, 0, "0"),
              ("structured", p.structured, None, "none"), ("top_logprobs", p.top_logprobs, 0, "0"),
              ("allowed_token_ids", p.allowed_token_ids, (), "empty"), ("speculative", speculative, 0, "0"))
    for name, value, only, allowed in served:
        if value != only:
            return f"{name}={value!r}: the transformers baseline serves greedy requests only ({name} must be {allowed})"
    return ""


class HFContinuousBackend:
    """The router's ``Backend`` over one ``ContinuousBatchingManager`` of ``model`` (a transformers causal LM)."""

    def __init__(self, model, cb_config=None, warmup: bool = True) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model = model
        self.cb_config = cb_config if cb_config is not None else ContinuousBatchingConfig()
        # greedy for every request; the end-of-sequence id is given per request (-1: none)
        self.gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=16)
        self.warmup = warmup
        self.manager = None

    async def start(self) -> None:
        def begin():
            m = self.model.init_continuous_batching(generation_config=self.gen_config,
                                                    continuous_batching_config=self.cb_config)
            if self.warmup:
                m.warmup()  # CUDA graphs of the varlen and decode paths, where the library uses them
            m.start()
            return m

        self.manager = await asyncio.get_running_loop().run_in_executor(None, begin)

    async def close(self) -> None:
        m, self.manager = self.manager, None
        if m is not None:
            await asyncio.get_running_loop().run_in_executor(None, lambda: m.stop(block=True, timeout=60))

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(WORKER_ID, "decode")]

    def _check_alive(self) -> None:
        if self.manager is None or not self.manager.is_running():
            raise WorkerFailed(WORKER_ID, "the continuous-batching thread is not running")

    async def poll(self, worker_id: str) -> WorkerReport:
        self._check_alive()
        sched = getattr(self.manager.batch_processor, "scheduler", None)
        running = len(getattr(sched, "active_requests", ()))
        waiting = len(getattr(sched, "waiting_requests", ())) + self.manager.input_queue.qsize()
        # the manager admits what its cache holds and queues the rest itself: the router is told there is room
        return WorkerReport(WORKER_ID, "decode", num_running=running, num_waiting=waiting, free_blocks=1 << 30,
                            total_blocks=1 << 30, prefills=True)

    async def generate(self, req: EngineRequest, prefill_id: str, decode_id: str) -> AsyncIterator[EngineToken]:
        why = unsupported(req.params, req.speculative)
        if why:
            raise ValueError(why)
        self._check_alive()
        p = req.params
        if p.max_new_tokens == 0:
            return
        eos = [] if p.ignore_eos or req.eos_id is None else [req.eos_id]
        stops = eos + [t for t in p.stop_token_ids if t not in eos]
        queue: asyncio.Queue = asyncio.Queue()
        m = self.manager
        m.register_result_handler(req.request_id, queue.put_nowait)  # before the request: no output is missed
        m.add_request(list(req.prompt_ids), request_id=req.request_id, max_new_tokens=p.max_new_tokens,
                      streaming=True, eos_token_id=stops or -1)
        sent = 0
        finished = False
        try:
            while True:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=max(req.timeout_s, 1e-3))
                except asyncio.TimeoutError:
                    raise RequestFailed(decode_id, f"no output within {req.timeout_s:.1f} s") from None
                if out.error is not None:
                    raise RequestFailed(decode_id, str(out.error))
                toks = out.generated_tokens
                for t in toks[sent:]:  # the manager delivers the whole output so far each time
                    yield EngineToken(int(t), req.scale)
                sent = max(sent, len(toks))
                if out.is_finished():
                    finished = True
                    return
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    m.cancel_request(req.request_id)
                with contextlib.suppress(Exception), m.output_router._lock:
                    m.output_router.result_handlers.pop(req.request_id, None)

    async def set_scale(self, decode_id: str, request_id: str, scale: int) -> None:
        raise ValueError(f"scale={scale}: the dense baseline has one scale")

    async def abort(self, decode_id: str, request_id: str) -> None:
        if self.manager is not None:
            self.manager.cancel_request(request_id)

    async def reset_prefix_cache(self, decode_id: str) -> int:
        return 0

    async def prompt_logprobs(self, decode_id: str, prompt_ids: list[int], scale: int):
        raise ValueError("prompt_logprobs: the transformers baseline does not score prompts")
