"""Load test of a colm service over its public gRPC API.

Open loop: Poisson arrivals at each rate of a list (requests are sent on schedule whatever the
server does); closed loop: a fixed number of concurrent clients. Prompt and output lengths are
drawn uniformly from ranges; each request draws a latency budget from a weighted mix. For each
rate (and each scale within it) the report gives throughput, TTFT / TPOT / ITL / end-to-end
percentiles, goodput (requests per second that met the SLO) and errors by status; JSON and a PNG
(latency vs rate, scale mix vs rate) are written.

Each rate of the list is its own run with its own row and wall time, a rate given twice included. Before any
request is sent, ``run`` checks that the service answers a health check and that the output files can be written,
so an unreachable address or a bad path fails in a second instead of after the whole load.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from colm.proto import load_proto


@dataclass(frozen=True)
class LoadSpec:
    rates: tuple[float, ...] = (2.0, 4.0, 8.0)  # requests/s (open loop), one run each, in this order
    num_requests: int = 200  # in total, split evenly over the rates
    concurrency: int = 0  # > 0: closed loop with this many clients (rates ignored)
    prompt_len: tuple[int, int] = (8, 32)  # tokens, uniform inclusive
    output_len: tuple[int, int] = (4, 16)
    budgets: tuple[tuple[str, float], ...] = (("none", 1.0),)  # ("tpot:20", w), ("ttft:100", w), ("scale:1", w)
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    timeout_s: float = 60.0
    seed: int = 0
    vocab: int = 256  # prompt token ids are drawn from [0, vocab)
    # Sent first (closed loop, warmup_concurrency clients, same length/budget mix) and not measured: first
    # calls compile kernels, tune them per shape and capture CUDA graphs, which would land in the first rate.
    warmup_requests: int = 0
    warmup_concurrency: int = 8
    # the load split over this many client processes, each with its own connections, started together after their
    # warm-ups (one Python process parsing every streamed message caps the load it can make): a closed loop's
    # clients, or an open loop's arrivals (each process sends a Poisson stream at rate / processes)
    processes: int = 1
    rate_share: float = 1.0  # open loop: this process's arrivals are at rate * rate_share (set by the split)
    # connections per client process (each its own, not a shared subchannel): clients take them in turn; several
    # routers behind one port (router.replicas, SO_REUSEPORT) are spread over by connection
    connections: int = 1
    # closed loop: the clients start one after another, evenly over this many seconds, instead of all at once (a
    # first wave of `concurrency` prompts arriving together queues behind itself and weighs on the TTFT tail of a
    # short run). Counted in the wall time, so the throughput includes the ramp.
    ramp_s: float = 0.0
    # shared prefixes (a system prompt, few-shot examples): every prompt opens with one of ``num_prefixes`` fixed
    # prefixes of ``prefix_len`` tokens (drawn from ``seed``, picked uniformly per request), followed by its own
    # ``prompt_len`` tokens, as vLLM's and SGLang's shared-prefix benchmarks build them. 0 = no prefix
    prefix_len: int = 0
    num_prefixes: int = 1
    # sampled requests (0 = greedy): each request draws with its own seed from ``seed``, so a run is reproducible
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests={self.num_requests}: must be >= 1")
        if self.concurrency < 0:
            raise ValueError(f"concurrency={self.concurrency}: must be >= 0")
        if self.warmup_requests < 0 or self.warmup_concurrency < 1:
            raise ValueError(f"warmup_requests={self.warmup_requests}, warmup_concurrency={self.warmup_concurrency}: "
                             "need warmup_requests >= 0 and warmup_concurrency >= 1")
        if self.connections < 1:
            raise ValueError(f"connections={self.connections}: must be >= 1")
        if not math.isfinite(self.ramp_s) or self.ramp_s < 0 or (self.ramp_s and not self.concurrency):
            raise ValueError(f"ramp_s={self.ramp_s}: must be >= 0, and applies to a closed loop (concurrency > 0)")
        if self.processes < 1:
            raise ValueError(f"processes={self.processes}: must be >= 1")
        if self.concurrency and self.processes > min(self.concurrency, self.num_requests):
            raise ValueError(f"processes={self.processes}: more than the {self.concurrency} clients or "
                             f"{self.num_requests} requests to split over them")
        if not self.concurrency and self.processes > self.num_requests // max(1, len(self.rates)):
            raise ValueError(f"processes={self.processes}: more than the {self.num_requests // max(1, len(self.rates))} "
                             "requests of each rate to split over them")
        if not 0 < self.rate_share <= 1:
            raise ValueError(f"rate_share={self.rate_share}: must be in (0, 1]")
        if not self.concurrency and (not self.rates or not all(_positive(r) for r in self.rates)):
            raise ValueError(f"rates={self.rates}: need finite positive request rates in req/s (or concurrency > 0)")
        for name in ("timeout_s", "slo_ttft_ms", "slo_tpot_ms"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a finite number > 0")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError(f"prefix_len={self.prefix_len}, num_prefixes={self.num_prefixes}: need prefix_len >= 0 "
                             "and num_prefixes >= 1")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}={(lo, hi)}: need 1 <= low <= high")
        for kind, w in self.budgets:
            parse_budget(kind)
            if not _positive(w):
                raise ValueError(f"budgets: weight {w} of {kind!r} must be a finite number > 0")


def _positive(x) -> bool:
    """A finite number > 0 (NaN compares false with everything, so ``x <= 0`` lets it through)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def parse_budget(kind: str) -> dict:
    """'none' | 'ttft:MS' | 'tpot:MS' | 'deadline:MS' | 'scale:K', joined by '+' (e.g. 'ttft:200+tpot:20')."""
    out: dict = {}
    for part in kind.split("+"):
        if part == "none":
            continue
        name, _, val = part.partition(":")
        if name not in ("ttft", "tpot", "deadline", "scale") or not val:
            raise ValueError(f"budget {kind!r}: parts are none, ttft:MS, tpot:MS, deadline:MS, scale:K")
        out[name] = int(val) if name == "scale" else float(val)
    return out


@dataclass
class Result:
    rate: float
    budget: str
    status: str = "OK"
    scale: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_ms: float = 0.0
    decision_ms: float = 0.0  # the router's first message (its admission and scale decision) arrived
    e2e_ms: float = 0.0
    itl_ms: list = field(default_factory=list)
    retries: int = 0
    sent_s: float = 0.0  # when it was sent, seconds on the sender's perf_counter
    run: int = 0  # index of its rate in spec.rates (a rate given twice is two runs); a closed loop's one run is 0

    @property
    def tpot_ms(self) -> float:
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@functools.lru_cache(maxsize=8)
def shared_prefixes(seed: int, prefix_len: int, num_prefixes: int, vocab: int) -> tuple[tuple[int, ...], ...]:
    """The load's shared prefixes: the same in every client process of one seed."""
    rng = random.Random(f"colm-loadtest-prefixes-{seed}")
    return tuple(tuple(rng.randrange(vocab) for _ in range(prefix_len)) for _ in range(num_prefixes))


async def one_request(stub, pb2, spec: LoadSpec, rng: random.Random, rate: float, metadata, run: int = 0) -> Result:
    kind = rng.choices([b for b, _ in spec.budgets], weights=[w for _, w in spec.budgets])[0]
    b = parse_budget(kind)
    plen = rng.randint(*spec.prompt_len)
    olen = rng.randint(*spec.output_len)
    ids = [rng.randrange(spec.vocab) for _ in range(plen)]
    if spec.prefix_len:
        ids = list(shared_prefixes(spec.seed, spec.prefix_len, spec.num_prefixes, spec.vocab)[
            rng.randrange(spec.num_prefixes)]) + ids
        plen = len(ids)
    req = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=ids),
                              sampling=pb2.Sampling(max_new_tokens=olen, ignore_eos=True, temperature=spec.temperature,
                                                    top_p=spec.top_p, seed=rng.randrange(2**31)),
                              budget=pb2.LatencyBudget(ttft_ms=b.get("ttft", 0), tpot_ms=b.get("tpot", 0),
                                                       deadline_ms=b.get("deadline", 0)),
                              scale=b.get("scale", 0))
    t0 = time.perf_counter()
    res = Result(rate, kind, run=run, prompt_tokens=plen, sent_s=t0)
    last = None
    try:
        async for m in stub.Generate(req, metadata=metadata, timeout=spec.timeout_s):
            if m.HasField("decision"):
                res.scale = m.decision.scale
                res.decision_ms = (time.perf_counter() - t0) * 1e3
            for _ in m.tokens:
                now = (time.perf_counter() - t0) * 1e3
                if last is None:
                    res.ttft_ms = now
                else:
                    res.itl_ms.append(now - last)
                last = now
                res.output_tokens += 1
            if m.finish_reason:
                res.retries = m.usage.retries
    except grpc.aio.AioRpcError as e:
        res.status = e.code().name
    res.e2e_ms = (time.perf_counter() - t0) * 1e3
    return res


async def run_load(addr: str, spec: LoadSpec, api_key: str | None = None, progress: bool = True,
                   start_barrier=None) -> tuple[list[Result], dict[int, float]]:
    """Returns every request's result and each run's wall time (first send to last answer), keyed by the run's
    index in ``spec.rates`` (a closed loop's one run: 0). ``start_barrier`` (a multiprocessing Barrier): waited on
    after the warm-up, before the measured load (an open loop: before each rate)."""
    pb2, pb2_grpc = load_proto("public")
    md = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    rng = random.Random(spec.seed)
    results: list[Result] = []
    wall: dict[int, float] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.num_requests, desc="loadtest", unit="req")
    opts = [("grpc.use_local_subchannel_pool", 1)] if spec.connections > 1 else []
    async with contextlib.AsyncExitStack() as stack:
        stubs = [pb2_grpc.ColmStub(await stack.enter_async_context(grpc.aio.insecure_channel(addr, options=opts)))
                 for _ in range(spec.connections)]
        if spec.warmup_requests:
            # its own RNG, so the measured requests are the same with or without a warm-up
            warm_rng = random.Random(spec.seed + 1)
            todo_warm = iter(range(spec.warmup_requests))

            async def warm_client(stub):
                for _ in todo_warm:
                    await one_request(stub, pb2, spec, random.Random(warm_rng.random()), 0.0, md)

            await asyncio.gather(*(warm_client(stubs[i % len(stubs)])
                                   for i in range(min(spec.warmup_concurrency, spec.warmup_requests))))
        async def together() -> None:
            if start_barrier is not None:
                await asyncio.get_running_loop().run_in_executor(None, start_barrier.wait)

        async def tracked(rate, run, stub):
            r = await one_request(stub, pb2, spec, random.Random(rng.random()), rate, md, run)
            results.append(r)
            if bar:
                bar.update(1)

        if spec.concurrency:
            todo = iter(range(spec.num_requests))

            async def client(stub, delay_s: float):
                await asyncio.sleep(delay_s)  # the ramp: client i starts at i / concurrency of it
                for _ in todo:
                    await tracked(0.0, 0, stub)

            await together()
            t0 = time.perf_counter()
            await asyncio.gather(*(client(stubs[i % len(stubs)], spec.ramp_s * i / spec.concurrency)
                                   for i in range(spec.concurrency)))
            wall[0] = time.perf_counter() - t0
        else:
            per_rate = [spec.num_requests // len(spec.rates)] * len(spec.rates)
            per_rate[-1] += spec.num_requests - sum(per_rate)
            for run, (rate, n) in enumerate(zip(spec.rates, per_rate)):
                tasks = []
                await together()
                t0 = time.perf_counter()
                for k in range(n):
                    tasks.append(asyncio.create_task(tracked(rate, run, stubs[k % len(stubs)])))
                    await asyncio.sleep(rng.expovariate(rate * spec.rate_share))  # Poisson arrivals (this share)
                await asyncio.gather(*tasks)
                wall[run] = time.perf_counter() - t0
    if bar:
        bar.close()
    return results, wall


def _pct(xs, qs=(50, 90, 99)) -> dict:
    if not xs:
        return {f"p{q}": None for q in qs}
    a = np.asarray(xs, dtype=float)
    return {f"p{q}": float(np.percentile(a, q)) for q in qs}


def summarize(results: list[Result], spec: LoadSpec, wall_s: dict[int, float] | None = None) -> dict:
    """One row per run (``wall_s``: each run's wall time by its index, as ``run_load`` returns them), in rate order,
    and the total over all of them."""
    def block(rs: list[Result], seconds: float | None) -> dict:
        ok = [r for r in rs if r.status == "OK"]
        good = [r for r in ok if r.ttft_ms <= spec.slo_ttft_ms and r.tpot_ms <= spec.slo_tpot_ms]
        errors: dict[str, int] = {}
        for r in rs:
            if r.status != "OK":
                errors[r.status] = errors.get(r.status, 0) + 1
        span = seconds or max((r.e2e_ms for r in rs), default=1.0) / 1e3
        return {"num_requests": len(rs), "num_ok": len(ok), "num_good": len(good), "errors": errors,
                "throughput_rps": len(ok) / span, "output_tokens_per_s": sum(r.output_tokens for r in ok) / span,
                "goodput_rps": len(good) / span, "slo_attainment": len(good) / len(rs) if rs else 0.0,
                "ttft_ms": _pct([r.ttft_ms for r in ok]),
                "decision_ms": _pct([r.decision_ms for r in ok if r.decision_ms > 0]),  # sent -> admitted, as seen here
                "tpot_ms": _pct([r.tpot_ms for r in ok if r.output_tokens > 1]),
                "itl_ms": _pct([x for r in ok for x in r.itl_ms]), "e2e_ms": _pct([r.e2e_ms for r in ok]),
                "retries": sum(r.retries for r in rs)}

    runs = sorted({(r.rate, r.run) for r in results})
    out = {"spec": asdict(spec), "rates": []}
    for rate, run in runs:
        rs = [r for r in results if r.run == run]
        seconds = (wall_s or {}).get(run)
        entry = {"rate": rate, "run": run, **block(rs, seconds)}
        scales = sorted({r.scale for r in rs if r.status == "OK"})
        entry["by_scale"] = {str(k): block([r for r in rs if r.scale == k and r.status == "OK"], seconds)
                             for k in scales}
        entry["scale_mix"] = {str(k): sum(1 for r in rs if r.scale == k and r.status == "OK") / max(1, len(rs))
                              for k in scales}
        out["rates"].append(entry)
    out["total"] = block(results, sum((wall_s or {}).values()) or None)
    # every request, so goodput can be recomputed later at another SLO; sent_s (the sender's perf_counter, the host's
    # CLOCK_MONOTONIC on Linux) places the measured load in time, e.g. for a GPU sampler's window (``load_window``)
    out["requests"] = {"fields": ["rate", "budget", "status", "scale", "prompt_tokens", "output_tokens", "ttft_ms",
                                  "tpot_ms", "e2e_ms", "retries", "run", "sent_s"],
                       "rows": [[r.rate, r.budget, r.status, r.scale, r.prompt_tokens, r.output_tokens,
                                 round(r.ttft_ms, 3), round(r.tpot_ms, 3), round(r.e2e_ms, 3), r.retries, r.run,
                                 round(r.sent_s, 6)]
                                for r in results]}
    return out


def load_window(summary: dict) -> tuple[float, float] | None:
    """(first send, last answer) of the measured requests of ``summary`` (warm-up excluded), in seconds of the
    senders' perf_counter; None for a summary without send times (older files) or without requests."""
    req = summary.get("requests") or {}
    col = {k: i for i, k in enumerate(req.get("fields", []))}
    rows = req.get("rows") or []
    if "sent_s" not in col or not rows:
        return None
    return (min(r[col["sent_s"]] for r in rows), max(r[col["sent_s"]] + r[col["e2e_ms"]] / 1e3 for r in rows))


def plot(summary: dict, path: str, title: str = "colm load test", baseline: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for s, label, style in ((summary, "colm", "-"), (baseline, "baseline", "--")):
        if not s:
            continue
        rates = [e["rate"] for e in s["rates"]]
        for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
            for q in ("p50", "p99"):
                ax1.plot(rates, [e[key][q] or float("nan") for e in s["rates"]], style, marker="o",
                         label=f"{label} {name} {q}")
        ax3.plot(rates, [e["goodput_rps"] for e in s["rates"]], style, marker="o", label=f"{label} goodput")
        ax3.plot(rates, [e["throughput_rps"] for e in s["rates"]], style, marker="x", alpha=0.5,
                 label=f"{label} throughput")
    ax1.set(xlabel="request rate (req/s)", ylabel="ms", title="latency vs rate", yscale="log")
    ax1.legend(fontsize=7)
    rates = [e["rate"] for e in summary["rates"]]
    # one bar per run: a rate given twice gets two, told apart by their run number
    labels = [f"{e['rate']:g}" + (f" (run {e.get('run', 0) + 1})" if rates.count(e["rate"]) > 1 else "")
              for e in summary["rates"]]
    scales = sorted({k for e in summary["rates"] for k in e["scale_mix"]}, key=int)
    bottom = np.zeros(len(rates))
    for k in scales:
        frac = np.array([e["scale_mix"].get(k, 0.0) for e in summary["rates"]])
        ax2.bar(labels, frac, bottom=bottom, label=f"scale {k}")
        bottom += frac
    ax2.set(xlabel="request rate (req/s)", ylabel="fraction of requests", title="scale mix vs rate")
    if scales:  # none when no request succeeded
        ax2.legend(fontsize=7)
    ax3.set(xlabel="request rate (req/s)", ylabel="req/s", title="goodput under SLO")
    ax3.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = [f"{'rate':>6} {'ok':>4} {'good':>4} {'rps':>7} {'goodput':>8} {'ttft p50':>9} {'ttft p99':>9} "
             f"{'tpot p50':>9} {'tpot p99':>9} {'e2e p99':>9}  scale mix / errors"]
    f = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9}"  # noqa: E731
    for e in summary["rates"]:
        mix = " ".join(f"{k}:{v:.2f}" for k, v in e["scale_mix"].items())
        lines.append(f"{e['rate']:6.1f} {e['num_ok']:4d} {e['num_good']:4d} {e['throughput_rps']:7.2f} "
                     f"{e['goodput_rps']:8.2f} {f(e['ttft_ms']['p50'])} {f(e['ttft_ms']['p99'])} "
                     f"{f(e['tpot_ms']['p50'])} {f(e['tpot_ms']['p99'])} {f(e['e2e_ms']['p99'])}  {mix} {e['errors'] or ''}")
    return "\n".join(lines)


def check_writable(path: str) -> None:
    """ValueError unless a file can be written at ``path`` (its missing parent directories are created)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"output {path}: is a directory")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output {path}: cannot create its directory ({e.strerror or e})") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"output {path}: not writable")


def check_reachable(addr: str, api_key: str | None = None, timeout_s: float = 10.0,
                    spec: "LoadSpec | None" = None) -> None:
    """ValueError unless the service at ``addr`` answers a health check (with ``api_key``) within ``timeout_s``, and
    (with ``spec``) its model's context holds the longest request of the load (prefix + prompt + output tokens):
    otherwise every request of the load would fail the same way."""
    pb2, pb2_grpc = load_proto("public")
    md = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    with grpc.insecure_channel(addr) as channel:
        stub = pb2_grpc.ColmStub(channel)
        try:
            stub.Health(pb2.HealthRequest(), metadata=md, timeout=timeout_s)
            context = stub.Tokenize(pb2.TokenizeRequest(text=b""), metadata=md, timeout=timeout_s).max_seq_len
        except grpc.RpcError as e:
            raise ValueError(f"addr={addr}: the service does not answer a health check ({e.code().name}: "
                             f"{e.details()}); no load was sent") from None
    if spec is not None and context:
        longest = spec.prefix_len + spec.prompt_len[1] + spec.output_len[1]
        if longest > context:
            raise ValueError(f"prefix_len ({spec.prefix_len}) + prompt_len's upper bound ({spec.prompt_len[1]}) + "
                             f"output_len's upper bound ({spec.output_len[1]}) = {longest} tokens exceeds the served "
                             f"model's context of {context} tokens; no load was sent")


def run(addr: str, spec: LoadSpec, out_json: str | None = None, out_png: str | None = None,
        api_key: str | None = None, progress: bool = True, meta: dict | None = None) -> dict:
    """Check the outputs and the service (``check_writable``, ``check_reachable``), run the load, write the JSON and
    PNG; returns the summary (``summarize``, plus the whole run's wall time)."""
    for out in (out_json, out_png):
        if out:
            check_writable(out)
    check_reachable(addr, api_key, min(spec.timeout_s, 10.0), spec)
    t0 = time.perf_counter()
    if spec.processes > 1:
        results, wall = run_load_processes(addr, spec, api_key)
    else:
        results, wall = asyncio.run(run_load(addr, spec, api_key, progress))
    summary = summarize(results, spec, wall)
    summary["wall_s"] = time.perf_counter() - t0
    summary["meta"] = meta or {}
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(summary, fh, indent=2)
    if out_png:
        plot(summary, out_png)
    return summary


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _client_process(addr: str, spec: LoadSpec, api_key, barrier, queue, index: int) -> None:
    try:
        results, wall = asyncio.run(run_load(addr, spec, api_key, progress=False, start_barrier=barrier))
        queue.put((index, [asdict(r) for r in results], wall, None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        barrier.abort()
        queue.put((index, [], {}, f"{type(e).__name__}: {e}"))


def run_load_processes(addr: str, spec: LoadSpec, api_key: str | None = None) -> tuple[list[Result], dict]:
    """``spec``'s load split over ``spec.processes`` client processes (spawned): requests and warm-up requests
    divided among them, and a closed loop's clients or an open loop's arrival rate; each its own seed and
    connections. They start the measured load (each rate of an open loop) together, at a barrier; a rate's wall time
    is the slowest process's (keyed by run, as ``run_load``'s)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n = spec.processes
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    parts = [replace(spec, processes=1, concurrency=c, num_requests=r, warmup_requests=w, seed=spec.seed * 1000 + i,
                     rate_share=1.0 / n)
             for i, (c, r, w) in enumerate(zip(_split(spec.concurrency, n), _split(spec.num_requests, n),
                                               _split(spec.warmup_requests, n)))]
    procs = [ctx.Process(target=_client_process, args=(addr, p, api_key, barrier, queue, i), daemon=True)
             for i, p in enumerate(parts)]
    for p in procs:
        p.start()
    got = [queue.get() for _ in procs]
    for p in procs:
        p.join(30)
    errors = [e for _, _, _, e in got if e]
    if errors:
        raise RuntimeError(f"load test client processes failed: {errors}")
    results = [Result(**d) for _, rs, _, _ in sorted(got, key=lambda g: g[0]) for d in rs]
    return results, {run: max(w[run] for _, _, w, _ in got) for run in got[0][2]}
