"""Prefix caching in the colocated engine: a prompt's full blocks that an earlier prompt computed are taken over
instead of prefilled. The digests name whole prefixes; the pool's reference counts keep shared blocks until the
last holder lets them go and evict idle ones tail first; served tokens equal ``colm.generate`` at every scale (a
mid-stream switch and speculative rows included) whether a prompt hits, half hits or misses; salts separate
namespaces; nothing leaks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from colm import checkpoint
from colm.client import Client
from colm.decode_worker.block_pool import BlockPool
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.prefix_cache import MAX_CACHE_SALT, block_hashes
from colm.errors import CapacityError
from colm.generate import generate
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.engine_backend import EngineBackend
from colm.router.placement import WorkerRegistry
from colm.router.policy import WorkerReport
from colm.router.prefix_affinity import PrefixAffinity
from colm.tokenizer import ByteTokenizer
from colm.sampling import SamplingParams
from _engine_helpers import assert_pool_free, prompts, save_tiny_air
from router_helpers import BackgroundRouter, post_json

BS = 4  # block size of the engine tests


# ---------------------------------------------------------------- digests
def test_digests_name_whole_prefixes():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, 37)
    b = a.copy()
    b[21] += 1  # differs in block 5 (tokens 20..23)
    da, db = block_hashes(a, 4), block_hashes(b, 4)
    assert len(da) == 9  # full blocks only: 37 // 4
    assert da[:5] == db[:5] and all(x != y for x, y in zip(da[5:], db[5:]))  # equal up to the change, unequal after
    assert len(set(da)) == 9
    # the same block after different prefixes has another digest (a digest names everything before it too)
    c = np.concatenate([a[4:8], a[4:8]])
    dc = block_hashes(c, 4)
    assert dc[0] != dc[1]
    assert block_hashes(a, 4, "tenant-a")[:5] != da[:5] and block_hashes(a, 4, "tenant-a") == block_hashes(a, 4, "tenant-a")
    assert block_hashes(a[:3], 4) == [] and block_hashes(list(a), 4) == da  # lists hash like arrays
    assert block_hashes(a, 8) == [block_hashes(a, 4)[i] for i in range(1, 9, 2)]  # one running digest over the tokens


# ---------------------------------------------------------------- the pool's reference counts and eviction
def _pool(n: int = 8) -> BlockPool:
    return BlockPool(preset("tiny-air"), n, 2, "cpu", torch.float32)


def test_shared_blocks_live_until_the_last_holder_and_idle_ones_count_as_free():
    pool = _pool(8)
    d = [bytes([i]) * 16 for i in range(3)]
    a = pool.allocate(4)
    assert pool.register(a[:3], d) == 3 and pool.num_cached == 3
    assert pool.register(a[:1], d[:1]) == 0  # cached already
    b = pool.match(d[:2] + [b"x" * 16])  # the longest cached prefix: 2 blocks, held by both now
    assert b == a[:2]
    pool.free(a)
    assert pool.num_free == 8 - 2  # a's blocks 2 and 3 are free (2 idle, cached); 0 and 1 are still b's
    pool.free(b)
    assert pool.num_free == 8 and pool.num_cached == 3
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(b)  # double free
    with pytest.raises(ValueError, match="twice"):
        pool.free([a[0], a[0]])
    again = pool.match(d)  # idle blocks are found again and held
    assert again == a[:3] and pool.num_free == 5
    pool.free(again)


def test_allocation_evicts_idle_blocks_tail_first_and_forgets_them():
    pool = _pool(6)
    d = [bytes([i]) * 16 for i in range(4)]
    a = pool.allocate(4)
    pool.register(a, d)
    pool.free(a)  # 2 plain free + 4 idle
    b = pool.allocate(4)  # the 2 plain ones, then the deepest idle blocks: a[3], then a[2]
    assert set(b) == set(range(6)) - set(a) | {a[3], a[2]}
    assert pool.match(d) == a[:2] and pool.num_cached == 2  # the root of the prefix survived
    with pytest.raises(CapacityError):
        pool.allocate(1)
    pool.free(b)
    pool.free(a[:2])
    assert pool.clear_cache() == 2 and pool.num_cached == 0 and pool.num_free == 6 and pool.match(d) == []
    assert sorted(pool.allocate(6)) == list(range(6))


# ---------------------------------------------------------------- the colocated engine
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_prefix")
    return path, save_tiny_air(path)


def _engine(path, **config) -> DecodeEngine:
    cfg = {"num_blocks": 120, "block_size": BS, "colocated_prefill": True, "max_batched_tokens": 16, **config}
    return DecodeEngine.from_checkpoint(path, DecodeConfig(**cfg))


def _submit(de, rid, prompt, params, scale, at_reserve=True, salt="", **kw):
    de.reserve(rid, len(prompt), params.max_new_tokens, prefill_tokens=prompt[:-1] if at_reserve else None,
               cache_salt=salt)
    de.prefill_kv(rid, prompt[:-1], cache_salt=salt)
    return de.start_generation(rid, prompt[-1], params, scale=scale, **kw)


def _router(path, engines: dict, **cfg):
    """(router, its background server) over the colocated ``engines`` in this process (gRPC and HTTP ports)."""
    router = Router(RouterConfig(**{"grpc_port": 0, "http_port": 0, "poll_interval_s": 0.05, **cfg}),
                    checkpoint.load_config(path), ByteTokenizer(), EngineBackend({}, engines))
    return router, BackgroundRouter(router)


def _prefilled(de) -> int:
    return sum(p for _, p in de.iterations)


def _cached_part(n_prompt: int, shared: int) -> int:
    """Tokens of a prompt of ``n_prompt`` found cached when its first ``shared`` tokens were computed before."""
    return min(shared, n_prompt - 1) // BS * BS


@pytest.mark.parametrize("at_reserve", [True, False])
def test_a_shared_prefix_is_prefilled_once_and_tokens_equal_the_reference(setup, at_reserve):
    """Prompts opening with one 27-token preamble: the first computes it; each later one prefills only what follows
    the preamble's full blocks (24 tokens); at both scales the tokens equal the reference. ``at_reserve``: the tokens
    come with the reservation (the router's path), else only with ``prefill_kv`` (cached blocks replace reserved
    ones)."""
    path, full = setup
    de = _engine(path).start()
    try:
        pre = prompts([27], seed=1)[0]
        tails = prompts([1, 5, 9, 14], seed=2)
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        for i, tail in enumerate(tails):
            p = pre + tail
            before = _prefilled(de)
            st = _submit(de, f"p{i}", p, params, 1 + i % 2, at_reserve=at_reserve)
            assert [e.token_id for e in st] == generate(full, p, params, scale=1 + i % 2).token_ids
            hit = 0 if i == 0 else _cached_part(len(p), len(pre))
            assert _prefilled(de) - before == len(p) - 1 - hit
        s = de.stats()
        assert s.num_prefix_hit_tokens == 3 * 24
        assert s.num_prefix_query_tokens == sum(len(pre) + len(t) - 1 for t in tails)
        assert s.num_cached_blocks >= 6
    finally:
        de.stop()
    assert_pool_free(de)


def test_a_prompt_wholly_cached_runs_no_prefill(setup):
    """The same prompt again (its tokens but the last fill whole blocks, and not): the whole-block one is ready at
    once, no chunk runs for it; the other prefills its partial block only."""
    path, full = setup
    de = _engine(path).start()
    try:
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        for n in (BS * 4 + 1, BS * 4 + 3):
            p = prompts([n], seed=n)[0]
            want = generate(full, p, params, scale=2).token_ids
            assert [e.token_id for e in _submit(de, f"a{n}", p, params, 2)] == want
            before, chunks = _prefilled(de), de.stats().num_prefill_chunks
            assert [e.token_id for e in _submit(de, f"b{n}", p, params, 2)] == want
            assert _prefilled(de) - before == (n - 1) % BS
            if (n - 1) % BS == 0:
                assert de.stats().num_prefill_chunks == chunks
    finally:
        de.stop()
    assert_pool_free(de)


def test_running_requests_share_blocks_and_an_abort_leaves_the_others_whole(setup):
    """Three requests with one preamble at once, at different scales: the later two hold the first one's blocks
    (the same block ids) while it runs; aborting the first mid-generation leaves the others' tokens exact; a
    mid-stream switch and a speculative row on the shared blocks give the reference tokens."""
    path, full = setup
    de = _engine(path, max_batched_tokens=64).start()
    try:
        pre = prompts([33], seed=3)[0]
        p0, p1, p2 = (pre + t for t in prompts([3, 6, 2], seed=4))
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        s0 = _submit(de, "r0", p0, params, 2)
        first = next(iter(s0))  # r0's prefix is computed and cached
        assert first.index == 0
        s1 = _submit(de, "r1", p1, params, 2)
        s2 = _submit(de, "r2", p2, params, 2, speculative=3)
        shared = 32 // BS
        assert de._requests["r1"].blocks[:shared] == de._requests["r0"].blocks[:shared]
        assert de._requests["r2"].blocks[:shared] == de._requests["r0"].blocks[:shared]
        assert de.abort("r0")
        got = []
        for ev in s1:
            got.append(ev)
            if len(got) == 4:
                de.set_scale("r1", 1)
        served = [e.scale for e in got]
        assert [e.token_id for e in got] == generate(full, p1, params, scale_schedule=lambda i: served[i]).token_ids
        assert [e.token_id for e in s2] == generate(full, p2, params, scale=2).token_ids
        with pytest.raises(Exception, match="aborted"):
            list(s0)
        assert de.stats().num_prefix_hit_tokens == 2 * 32
    finally:
        de.stop()
    assert_pool_free(de)


def test_a_small_pool_evicts_idle_prefixes_and_stays_exact(setup):
    """A pool of 40 blocks and prompts that each need 10: cached prefixes fill what requests leave and are evicted
    as new prompts need blocks; every request's tokens stay exact, the first prompt again is served (cached or not),
    and the pool is whole at the end."""
    path, full = setup
    de = _engine(path, num_blocks=40, max_batched_tokens=64).start()
    try:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        ps = prompts([33] * 8, seed=5)
        for i, p in enumerate(ps + ps[:1]):
            st = _submit(de, f"e{i}", p, params, 1 + i % 2)
            assert [e.token_id for e in st] == generate(full, p, params, scale=1 + i % 2).token_ids
        s = de.stats()
        assert s.num_cached_blocks <= 40 and s.num_free_blocks == 40
        assert s.num_cached_blocks >= 8  # the last prompts' blocks stayed cached
    finally:
        de.stop()
    assert_pool_free(de)


def test_salts_and_the_switch_keep_prompts_apart(setup):
    """The same prompt with another salt, or on an engine with prefix caching off, computes its K/V again."""
    path, full = setup
    p = prompts([30], seed=6)[0]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    want = generate(full, p, params, scale=2).token_ids
    de = _engine(path).start()
    try:
        for rid, salt in (("s0", "alice"), ("s1", "bob"), ("s2", "alice")):
            assert [e.token_id for e in _submit(de, rid, p, params, 2, salt=salt)] == want
        assert de.stats().num_prefix_hit_tokens == 28  # only alice's second request
        with pytest.raises(ValueError, match="cache_salt"):
            de.reserve("bad", len(p), 3, prefill_tokens=p[:-1], cache_salt="x" * (MAX_CACHE_SALT + 1))
        assert "bad" not in de._requests
    finally:
        de.stop()
    assert_pool_free(de)
    off = _engine(path, prefix_caching=False).start()
    try:
        for rid in ("o0", "o1"):
            assert [e.token_id for e in _submit(off, rid, p, params, 2)] == want
        s = off.stats()
        assert s.num_prefix_hit_tokens == 0 and s.num_prefix_query_tokens == 0 and s.num_cached_blocks == 0
    finally:
        off.stop()
    assert_pool_free(off)


def test_prefill_tokens_that_differ_from_the_reservations_are_refused(setup):
    """``prefill_kv`` with other tokens than ``reserve`` was given fails that request with a message saying so and
    gives its blocks (the cached ones it held too) back; a failed reservation holds nothing."""
    path, _ = setup
    de = _engine(path).start()
    try:
        p = prompts([21], seed=7)[0]
        params = SamplingParams(max_new_tokens=2, ignore_eos=True)
        list(_submit(de, "ok", p, params, 1))
        de.reserve("x", len(p), 2, prefill_tokens=p[:-1])
        assert de._requests["x"].cached_blocks == 20 // BS
        other = list(p[:-1])
        other[-1] = (other[-1] + 1) % 256
        with pytest.raises(ValueError, match="differ from those given at reserve"):
            de.prefill_kv("x", other)
        assert "x" not in de._requests
        with pytest.raises(ValueError, match="prompt tokens to prefill"):
            de.reserve("y", len(p), 2, prefill_tokens=p)  # the whole prompt instead of all but its last token
        assert "y" not in de._requests
    finally:
        de.stop()
    assert_pool_free(de)
    assert de.pool.num_cached == 20 // BS


def test_a_full_pool_refuses_a_reservation_without_keeping_its_hits(setup):
    """A reservation whose cached blocks were found but whose other blocks do not fit is refused (RESOURCE_EXHAUSTED
    at the service) and lets the cached ones go again."""
    path, _ = setup
    de = _engine(path, num_blocks=12)
    p = prompts([17], seed=9)[0]
    de.reserve("a", len(p), 2, prefill_tokens=p[:-1])
    de.prefill_kv("a", p[:-1])
    while not de._requests["a"].kv_done:
        de.step()
    de.abort("a")  # its 4 full blocks stay cached, idle
    assert de.pool.num_cached == 4 and de.pool.num_free == 12
    hog = de.pool.allocate(6)
    with pytest.raises(CapacityError):
        de.reserve("b", len(p), 40, prefill_tokens=p[:-1])  # 4 cached + 10 more, 2 left beside the idle 4
    assert "b" not in de._requests and de.pool.num_free == 6 and de.pool.num_cached == 4
    de.pool.free(hog)
    de.stop()
    assert_pool_free(de)


def test_blocks_stay_held_while_any_request_reads_them(setup):
    """Driven step by step: two requests take over a running request's prefix blocks; once that one is aborted the
    free count is exactly the blocks nobody holds, and every one of those taken and overwritten with garbage leaves
    the other two requests' tokens exact (a shared block freed early would be among them)."""
    path, full = setup
    de = _engine(path, num_blocks=48, max_batched_tokens=64)  # not started: the test runs the loop's steps
    pre = prompts([33], seed=10)[0]
    p0, p1, p2 = (pre + t for t in prompts([3, 6, 2], seed=11))
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    s0 = _submit(de, "r0", p0, params, 2)
    while not de._requests["r0"].out_tokens:
        de.step()
    s1 = _submit(de, "r1", p1, params, 2)
    s2 = _submit(de, "r2", p2, params, 1, speculative=2)
    de.step()
    r1, r2 = de._requests["r1"], de._requests["r2"]
    assert r1.blocks[:8] == r2.blocks[:8] == de._requests["r0"].blocks[:8]
    de.abort("r0")
    de.step()
    assert "r0" not in de._requests
    held = set(r1.blocks) | set(r2.blocks)
    assert de.pool.num_free == de.pool.num_blocks - len(held)
    junk = de.pool.allocate(de.pool.num_free)
    de.pool.kv[:, :, junk] = 1e3
    while "r1" in de._requests or "r2" in de._requests:
        de.step()
    assert [e.token_id for e in s1] == generate(full, p1, params, scale=2).token_ids
    assert [e.token_id for e in s2] == generate(full, p2, params, scale=1).token_ids
    with pytest.raises(Exception, match="aborted"):
        list(s0)
    de.pool.free(junk)
    de.stop()
    assert_pool_free(de)


def test_the_router_passes_salts_and_the_workers_count_hits(setup):
    """Through the router (in process, gRPC and HTTP): requests with one preamble and one salt hit the worker's cache
    (its stats and metrics count the hit tokens), another salt does not; tokens equal the reference; a bad
    ``cache_salt`` is a 400 / INVALID_ARGUMENT naming the field."""
    import json
    import urllib.error
    import urllib.request

    path, full = setup
    de = _engine(path, max_batched_tokens=64)
    router, bg = _router(path, {"decode-0": de})
    try:
        pre = prompts([40], seed=12)[0]
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        with Client(bg.grpc_addr) as c:
            for i, (tail, salt) in enumerate(zip(prompts([3, 7, 5], seed=13), ("t1", "t1", "t2"))):
                p = pre + tail
                got = c.complete(p, max_new_tokens=5, ignore_eos=True, scale=2, cache_salt=salt)["token_ids"]
                assert got == generate(full, p, params, scale=2).token_ids
            assert de.stats().num_prefix_hit_tokens == 40  # the second request's 10 preamble blocks
            with pytest.raises(Exception, match="cache_salt"):
                c.complete(pre, max_new_tokens=2, cache_salt="s" * (MAX_CACHE_SALT + 1))
        body = {"model": router.cfg.served_model_name, "prompt": pre + [1],
                "max_tokens": 2, "temperature": 0, "cache_salt": "t1"}
        for salt, status in (("t1", 200), (7, 400), ("s" * (MAX_CACHE_SALT + 1), 400)):
            req = urllib.request.Request(bg.http_url + "/v1/completions",
                                         data=json.dumps({**body, "cache_salt": salt}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    code, answer = r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                code, answer = e.code, json.loads(e.read())
            assert code == status, answer
            if status == 400:
                assert answer["error"]["param"] == "cache_salt", answer
        assert de.stats().num_prefix_hit_tokens == 80  # the HTTP request's preamble hit too
        labels = {"model_name": router.cfg.served_model_name, "worker": "decode-0"}
        deadline = time.monotonic() + 10
        while router.metrics.registry.get_sample_value("colm:prefix_cache_hits_total", labels) != 80:
            assert time.monotonic() < deadline, "the router's worker polls did not report the hits"
            time.sleep(0.05)
        assert router.metrics.registry.get_sample_value("colm:prefix_cache_queries_total", labels) == \
            de.stats().num_prefix_query_tokens
    finally:
        bg.stop()
    assert_pool_free(de)


# ---------------------------------------------------------------- prefix affinity in the router
def test_affinity_remembers_leading_blocks_per_worker():

    a = PrefixAffinity(max_digests_per_worker=4)
    d = [bytes([i]) * 16 for i in range(6)]
    a.record("w0", d[:3])
    assert a.matched("w0", d) == 3 and a.matched("w0", d[5:] + d) == 0 and a.matched("w1", d) == 0
    # past 4 digests the least recently placed goes, deepest first: d[2] (d[0] was placed again, last)
    a.record("w0", d[:1] + d[3:5])
    assert a.matched("w0", d) == 2 and a.matched("w0", d[3:]) == 2
    a.forget("w0")
    assert a.matched("w0", d) == 0
    with pytest.raises(ValueError):
        PrefixAffinity(0)


def test_the_registry_follows_a_prefix_within_the_load_balance():
    """Two colocated workers: a prompt goes where its leading blocks were placed while that worker runs at most
    ``affinity_balance`` sequences more than the other; past that, to the least loaded one; without digests, or with
    affinity off, by load alone."""

    def registry(balance):
        reg = WorkerRegistry(block_size=4, affinity_balance=balance)
        for wid in ("d0", "d1"):
            reg.update(WorkerReport(wid, "decode", free_blocks=1000, total_blocks=1000, prefills=True, block_size=4))
        return reg

    a, b = block_hashes(range(40), 4), block_hashes(range(100, 140), 4)
    reg = registry(2)
    assert reg.affinity_block_size() == 4
    first = reg.pick_decode(48, digests=a).worker_id
    other = reg.pick_decode(48, digests=b).worker_id
    assert first != other  # by load: the second goes to the idle worker, and its prefix is remembered there
    picks = [reg.pick_decode(48, digests=a[:6]).worker_id for _ in range(4)]  # the same 6 leading blocks
    assert picks == [first, first, first, other]  # first runs 3 to other's 1 then: past the balance, load wins
    assert reg.pick_decode(48, digests=b).worker_id == other
    plain = registry(None)
    assert plain.affinity is None and plain.affinity_block_size() == 0
    assert [plain.pick_decode(48, digests=a).worker_id for _ in range(4)] == ["d1", "d0", "d1", "d0"]
    reg.mark_unhealthy(first)  # it may come back restarted: its remembered prefixes are dropped
    reg.update(WorkerReport(first, "decode", free_blocks=1000, total_blocks=1000, prefills=True, block_size=4))
    assert reg.affinity.matched(first, a) == 0


@pytest.mark.parametrize("affinity", [True, False])
def test_two_colocated_workers_the_router_sends_a_prefix_back_to_its_cache(setup, affinity):
    """A prompt of prefix A runs on one worker (home); then home holds two more sequences than the other worker, and
    another prompt of prefix A goes home with affinity (within the balance: a hit) and to the idle worker without (a
    miss). Tokens equal the reference either way."""
    path, full = setup
    engines = {f"decode-{i}": _engine(path, max_batched_tokens=64) for i in range(2)}
    router, bg = _router(path, engines, prefix_affinity=affinity)

    def waiting(wid: str) -> int:
        w = router.registry.workers.get(wid)
        return w.report.num_waiting if w is not None and w.report is not None else -1

    try:
        deadline = time.monotonic() + 10
        while len([w for w in router.registry.healthy("decode") if router.registry.prefills_itself(w)]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pre = prompts([40], seed=14)[0]
        p1, p2 = (pre + t for t in prompts([3, 5], seed=15))
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        with Client(bg.grpc_addr) as c:
            assert c.complete(p1, max_new_tokens=4, ignore_eos=True, scale=2)["token_ids"] == \
                generate(full, p1, params, scale=2).token_ids
            home = next(wid for wid, e in engines.items() if e.stats().num_prefix_query_tokens)
            other = next(wid for wid in engines if wid != home)
            for rid in ("hold-0", "hold-1"):  # reservations waiting for their K/V: home is the busier worker
                engines[home].reserve(rid, 8, 4)
            while waiting(home) != 2:  # the router has seen it
                assert time.monotonic() < deadline + 10
                time.sleep(0.02)
            got = c.complete(p2, max_new_tokens=4, ignore_eos=True, scale=2)["token_ids"]
            assert got == generate(full, p2, params, scale=2).token_ids
            hits = {wid: e.stats().num_prefix_hit_tokens for wid, e in engines.items()}
            ran = {wid: e.stats().num_prefix_query_tokens for wid, e in engines.items()}
            if affinity:
                assert hits == {home: 40, other: 0} and ran[other] == 0
            else:
                assert hits == {home: 0, other: 0} and ran[other] == len(p2) - 1
            for rid in ("hold-0", "hold-1"):
                engines[home].abort(rid)
    finally:
        bg.stop()
    for e in engines.values():
        assert_pool_free(e)


def test_graphed_chunks_start_after_the_cached_blocks(setup, monkeypatch):
    """Chunks replayed through the packed prefill graphs (capture replaced by a direct call, as in the colocated
    engine's tests) start at a cached prefix's end: their attention reads the cached keys through the block list,
    and the tokens equal the reference."""
    from test_colocated_engine import _graphed_engine

    path, full = setup
    de = _graphed_engine(path, monkeypatch, max_batched_tokens=32).start()
    try:
        pre = prompts([45], seed=16)[0]
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        for i, tail in enumerate(prompts([2, 9, 30], seed=17)):
            p = pre + tail
            assert [e.token_id for e in _submit(de, f"g{i}", p, params, 2)] == generate(full, p, params,
                                                                                        scale=2).token_ids
        assert de.stats().num_prefix_hit_tokens == 2 * 44 and de.prefill_graphs.num_replays >= 3
    finally:
        de.stop()
    assert_pool_free(de)


def test_a_prompt_takes_over_the_blocks_a_running_prefill_has_completed(setup):
    """Driven step by step with 12 tokens an iteration: after the first chunk of a 44-token prefill its 3 full blocks
    are cached, so a prompt with the same opening that arrives then prefills from token 12 (and the chunk after the
    next, from the blocks completed meanwhile); tokens equal the reference."""
    path, full = setup
    de = _engine(path, max_batched_tokens=12)
    pre = prompts([44], seed=18)[0]
    pa, pb, pc = (pre + t for t in prompts([1, 3, 2], seed=19))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    sa = _submit(de, "a", pa, params, 2)
    de.step()  # a's first chunk: tokens 0..11
    sb = _submit(de, "b", pb, params, 1)
    assert de._requests["b"].cached_blocks == 3 and de._requests["b"].prefilled == 12
    de.step()
    de.step()  # a: 12..35 done (b's chunks share the budget after a's)
    sc = _submit(de, "c", pc, params, 2)
    assert de._requests["c"].cached_blocks >= 6
    while de._requests:
        de.step()
    for st, p, scale in ((sa, pa, 2), (sb, pb, 1), (sc, pc, 2)):
        assert [e.token_id for e in st] == generate(full, p, params, scale=scale).token_ids
    de.stop()
    assert_pool_free(de)


def test_prompts_arriving_together_compute_a_shared_prefix_once(setup):
    """Four prompts with one 40-token opening and an unrelated one, all queued before the first iteration: the
    first computes the opening, the other three wait for its blocks (the unrelated prompt does not wait behind them)
    and prefill only their own tails; tokens equal the reference. The same burst with the first one aborted while
    the others wait: one of them computes the opening instead."""
    path, full = setup
    pre = prompts([40], seed=20)[0]
    burst = [pre + t for t in prompts([5, 2, 9, 1], seed=21)]
    other = prompts([30], seed=22)[0]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    de = _engine(path, max_batched_tokens=80)
    streams = [_submit(de, f"b{i}", p, params, 1 + i % 2) for i, p in enumerate(burst)]
    so = _submit(de, "other", other, params, 2)
    de.step()
    first = de.iterations[-1][1]
    assert first == (len(burst[0]) - 1) + (len(other) - 1)  # the leader's prompt and the unrelated one
    while de._requests:
        de.step()
    assert sum(p for _, p in de.iterations) == sum(len(p) - 1 for p in burst) + len(other) - 1 - 3 * 40
    assert de.stats().num_prefix_hit_tokens == 3 * 40
    for i, (st, p) in enumerate(zip(streams, burst)):
        assert [e.token_id for e in st] == generate(full, p, params, scale=1 + i % 2).token_ids
    assert [e.token_id for e in so] == generate(full, other, params, scale=2).token_ids
    de.stop()
    assert_pool_free(de)

    de = _engine(path, max_batched_tokens=30)
    pre = prompts([40], seed=23)[0]
    burst = [pre + t for t in prompts([3, 6, 2], seed=24)]
    streams = [_submit(de, f"c{i}", p, params, 2) for i, p in enumerate(burst)]
    de.step()  # c0's first 30 tokens: c1 and c2 wait for its blocks
    assert de.iterations[-1][1] == 30
    assert de.abort("c0")
    de.step()  # c0 leaves; c1 takes over the 7 registered blocks and computes the rest of the opening itself
    while de._requests:
        de.step()
    assert de.stats().num_prefix_hit_tokens == 28 + 40  # c1 took over c0's 7 blocks, c2 all of c1's 10
    for st, p in zip(streams[1:], burst[1:]):
        assert [e.token_id for e in st] == generate(full, p, params, scale=2).token_ids
    with pytest.raises(Exception, match="aborted"):
        list(streams[0])
    de.stop()
    assert_pool_free(de)


def test_n_choices_compute_their_prompt_once(setup):
    """An HTTP request for 4 choices of one 45-token prompt on a colocated worker: the four sequences arrive
    together, one computes the prompt's full blocks and the other three take them over; every greedy choice equals
    the reference."""
    path, full = setup
    de = _engine(path, max_batched_tokens=64)
    router, bg = _router(path, {"decode-0": de})
    try:
        p = prompts([45], seed=25)[0]
        status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": p, "n": 4, "max_tokens": 3,
                                                                   "temperature": 0, "ignore_eos": True, "scale": 2})
        assert status == 200, body
        want = ByteTokenizer().decode(generate(full, p, SamplingParams(max_new_tokens=3, ignore_eos=True),
                                               scale=2).token_ids)
        assert [c["text"] for c in body["choices"]] == [want] * 4
        s = de.stats()
        assert s.num_prefix_query_tokens == 4 * 44 and s.num_prefix_hit_tokens == 3 * 44
        assert sum(t for _, t in de.iterations) == 44
    finally:
        bg.stop()
    assert_pool_free(de)


def test_reset_prefix_cache_forgets_every_prefix(setup):
    """``POST /reset_prefix_cache`` (vLLM's path) through the router: the worker's idle cached blocks become plain
    free blocks, the same prompt then computes its blocks again, tokens stay exact; over gRPC the worker's
    ResetPrefixCache does the same; the API key applies."""
    import grpc

    from colm.decode_worker.service import DecodeServer
    from colm.proto import load_proto
    from colm.proto.rpc import auth_metadata

    path, full = setup
    de = _engine(path, max_batched_tokens=64)
    router, bg = _router(path, {"decode-0": de}, api_key="k" * 16)
    key = {"Authorization": "Bearer " + "k" * 16}
    try:
        p = prompts([33], seed=26)[0]
        body = {"prompt": p, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "scale": 2}
        want = ByteTokenizer().decode(generate(full, p, SamplingParams(max_new_tokens=3, ignore_eos=True),
                                               scale=2).token_ids)
        for expect_hits in (0, 32):
            status, out = post_json(f"{bg.http_url}/v1/completions", body, headers=key)
            assert status == 200 and out["choices"][0]["text"] == want, out
            assert de.stats().num_prefix_hit_tokens == expect_hits
        assert post_json(f"{bg.http_url}/reset_prefix_cache", {})[0] == 401
        status, out = post_json(f"{bg.http_url}/reset_prefix_cache", {}, headers=key)
        assert status == 200 and out == {"workers": {"decode-0": 8}} and de.pool.num_cached == 0
        status, out = post_json(f"{bg.http_url}/v1/completions", body, headers=key)
        assert status == 200 and out["choices"][0]["text"] == want
        assert de.stats().num_prefix_hit_tokens == 32  # computed again, not found
    finally:
        bg.stop()
    assert_pool_free(de)
    kv_pb2, kv_grpc = load_proto("kv")
    server = DecodeServer(de.start(), "t" * 16).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            r = kv_grpc.DecodeWorkerStub(ch).ResetPrefixCache(kv_pb2.ResetPrefixCacheRequest(),
                                                               metadata=auth_metadata("t" * 16), timeout=10)
        assert r.num_freed_blocks == 8 and de.pool.num_cached == 0
    finally:
        server.stop()
        de.stop()
