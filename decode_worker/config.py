"""``DecodeConfig``: the decode worker's settings (frozen, validated)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_GAMMA = 16  # chain-1 self-speculative decoding: the most drafts per round a request may ask for


def check_speculative(value) -> int:
    """A request's ``speculative`` (drafts per round), or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GAMMA:
        raise ValueError(f"speculative={value!r}: must be an integer 0..{MAX_GAMMA} (drafts per round; 0 = off)")
    return value

MIXED_SCALE_MODES = ("widest", "group")
VERIFY_ATTENTION = ("gather", "paged")
KV_READY_WAITS = ("host", "sender")


@dataclass(frozen=True)
class DecodeConfig:
    block_size: int = 16
    num_blocks: int = 0                  # 0 = size the pool from free device memory (CUDA only)
    gpu_memory_fraction: float = 0.85    # of the memory free after loading weights, when num_blocks = 0
    max_batch_size: int = 64             # sequences per decode step
    mixed_scale_mode: str = "widest"     # "widest": one forward at the batch's widest scale, each head at its own
                                         # scale; "group": one forward per scale group (bench/decode.py compares)
    # speculative verify: "gather" gathers each row's context and runs one masked SDPA per layer; "paged" runs each of
    # the gamma + 1 queries as a decode row of its own through the paged decode kernel (one launch per layer, no
    # gather). Both give the same tokens (tests/test_verify_paged.py); bench/speculative.py times them side by side:
    # on an H200 the graphed paged verify took 0.98-1.06 ms at batch 1 (gamma 1-4) against 1.18-1.27 gathered
    verify_attention: str = "paged"
    # speculative requests step plainly (no drafts) while more than this many sequences run (0: no limit): a round
    # holds up the batch's plain rows for gamma draft steps and a verify, so rounds pay at small batches only (vLLM
    # disables speculation by batch size too). Greedy tokens are the same either way; sampled ones equally distributed
    speculative_max_batch: int = 0
    reservation_timeout_s: float = 600.0 # a reservation not finished by then is freed (DEADLINE_EXCEEDED)
    kv_timeout_s: float = 60.0           # StartGeneration waits this long for the KV to arrive
    max_reservations: int = 1024         # requests held at once (Reserve answers RESOURCE_EXHAUSTED beyond); the
                                         # gRPC server keeps two threads per reservation (DecodeServer)
    idle_wait_s: float = 0.005           # the step loop's wait when nothing runs
    cuda_graphs: bool = True             # replay the decode forward from CUDA graphs (CUDA only; eager elsewhere)
    warmup_context: int = 0              # > 0 (CUDA graphs): at start, capture the graphs of every batch size and
                                         # table width up to this many tokens per sequence, for every scale
    overlap_steps: bool | None = None    # batches of greedy and plainly sampled rows (mixed scales too, with
                                         # "widest"): launch step n+1 (tokens drawn and fed on the device) before
                                         # reading step n, so host work hides under the
                                         # GPU's. None: on where CUDA graphs run (H100: batch 1/8/64 steps
                                         # 4%/14%/20% shorter); on CPU nothing runs asynchronously, so a dropped
                                         # step is pure waste
    grant_wait_s: float = 2.0           # cuda_pool, nixl: WriteKV waits this long for a reservation not made yet (the
                                         # router sends Reserve and Prefill at once there), then NOT_FOUND
    external_write_grace_s: float = 2.0  # cuda_pool, nixl: blocks of a request that ended while its sender's stream was
                                         # open, and whose stream then broke, stay held this long (the sender's
                                         # queued device writes may still land) before they are reused
    kv_ready_wait: str = "host"          # cuda_pool, sender in another process on CUDA: who waits for its writes.
                                         # "sender": it sends KVEnd once they finished. "host": it sends KVEnd with
                                         # a CUDA IPC event as soon as they are queued, and the step loop polls
                                         # that event (kv_ready_poll_s) before admitting the request. (Never a
                                         # stream wait on the GPU: a sender killed before its writes ran leaves
                                         # such a wait pending for good; bench/ipc_event_exit.py)
    kv_ready_poll_s: float = 0.0001      # the step loop's wait while a request's KV is queued but not written yet
    score_graph_tokens: int = 0          # > 0 (CUDA): Score replays the full forward of prompts of up to this many
                                         # tokens from CUDA graphs (colm.graphed_forward; captured on first use,
                                         # their memory comes on top of the pool's). 0 = eager
    colocated_prefill: bool = False      # this engine computes its requests' chain-1 K/V itself (``prefill_kv``):
                                         # prompt chunks join the step loop's iterations (one process, one CUDA
                                         # context, no hand-off): the one-GPU deployment
    max_batched_tokens: int = 2048       # colocated_prefill: tokens per loop iteration, decode rows (1 each, gamma+1
                                         # per speculative row) plus prompt chunks; a longer prompt is split
    max_prefill_segments: int = 32       # colocated_prefill: prompts (or prompt chunks) packed into one iteration
    tpot_target_ms: float = 0.0          # colocated_prefill, > 0: while rows decode, the prompt tokens per iteration
                                         # adapt so that an iteration (every running row's time per output token)
                                         # takes about this long, up to max_batched_tokens (decode_worker.chunk_budget).
                                         # 0 = the fixed max_batched_tokens
    tpot_min_prompt_tokens: int = 512    # ... the least prompt tokens an iteration may still take (prompts progress
                                         # however slow the decode rows alone are)
    prefix_caching: bool = True          # colocated_prefill: a prompt's full blocks whose tokens an earlier prompt
                                         # began with reuse that prompt's K/V blocks (decode_worker.prefix_cache);
                                         # only the rest is prefilled
    prefill_scale: int = 1               # colocated_prefill: the sub-model that computes the prompt's K/V. 1 = chain 1
                                         # (CoLM-Air's K/V come from chain 1 alone); 0 = the full model: the same K/V
                                         # at the cost of a dense model's prefill (the load test's baseline)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size}: must be a positive power of two")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks={self.num_blocks}: must be >= 0 (0 = from free device memory)")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction={self.gpu_memory_fraction}: must be in (0, 1]")
        if self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size={self.max_batch_size}: must be > 0")
        if self.mixed_scale_mode not in MIXED_SCALE_MODES:
            raise ValueError(f"mixed_scale_mode={self.mixed_scale_mode!r}: allowed are {MIXED_SCALE_MODES}")
        if isinstance(self.speculative_max_batch, bool) or not isinstance(self.speculative_max_batch, int) \
                or self.speculative_max_batch < 0:
            raise ValueError(f"speculative_max_batch={self.speculative_max_batch!r}: must be an integer >= 0 "
                             "(0 = no limit)")
        if self.verify_attention not in VERIFY_ATTENTION:
            raise ValueError(f"verify_attention={self.verify_attention!r}: allowed are {VERIFY_ATTENTION}")
        for name in ("external_write_grace_s", "grant_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.kv_ready_wait not in KV_READY_WAITS:
            raise ValueError(f"kv_ready_wait={self.kv_ready_wait!r}: allowed are {KV_READY_WAITS}")
        for name in ("reservation_timeout_s", "kv_timeout_s", "idle_wait_s", "kv_ready_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.score_graph_tokens < 0:
            raise ValueError(f"score_graph_tokens={self.score_graph_tokens}: must be >= 0 (0 = eager)")
        if self.warmup_context < 0:
            raise ValueError(f"warmup_context={self.warmup_context}: must be >= 0 (0 = no warm-up)")
        if self.tpot_target_ms < 0 or self.tpot_min_prompt_tokens < 1:
            raise ValueError(f"tpot_target_ms={self.tpot_target_ms}, tpot_min_prompt_tokens="
                             f"{self.tpot_min_prompt_tokens}: need tpot_target_ms >= 0 (0 = the fixed budget) and "
                             "tpot_min_prompt_tokens >= 1")
        if self.max_batched_tokens < 1 or self.max_prefill_segments < 1:
            raise ValueError(f"max_batched_tokens={self.max_batched_tokens}, max_prefill_segments="
                             f"{self.max_prefill_segments}: both must be >= 1")
        if self.prefill_scale < 0:
            raise ValueError(f"prefill_scale={self.prefill_scale}: must be >= 0 (0 = the full model)")
        if self.max_reservations <= 0:
            raise ValueError(f"max_reservations={self.max_reservations}: must be > 0")
