"""Scale policy, placement and admission fed with synthetic worker reports (no I/O)."""

import asyncio
import time

import pytest

from colm.presets import preset
from colm.router.admission import Admission, Overloaded
from colm.router.placement import NoWorker, WorkerRegistry
from colm.router.policy import (Budget, BudgetUnmet, OnMiss, PolicyConfig, RunningRequest, ScalePolicy,
                                WorkerReport)


def make_policy(**kw):
    return ScalePolicy(PolicyConfig(num_scales=3, param_counts=(100, 200, 400), alpha=1.0, **kw))


def decode_report(step_ms, running=1, wid="d0", free=100):
    return WorkerReport(wid, "decode", num_running=running, step_ms=step_ms, free_blocks=free, total_blocks=100)


def test_loose_budget_gets_largest_tight_gets_smaller():
    p = make_policy(per_seq_step_fraction=0.0)
    p.observe([decode_report({1: 5.0, 2: 10.0, 3: 20.0}),
               WorkerReport("p0", "prefill", queued_tokens=0, prefill_tokens_per_s=10000)])
    assert p.choose(Budget(tpot_ms=100), 10, 8).scale == 3
    assert p.choose(Budget(tpot_ms=15), 10, 8).scale == 2
    assert p.choose(Budget(tpot_ms=6), 10, 8).scale == 1
    assert p.choose(Budget(), 10, 8).scale == 3
    # TTFT = 1000 * 100 / 10000 = 10 ms prefill + one step at the scale
    d = p.choose(Budget(ttft_ms=21), 100, 8)
    assert d.scale == 2 and d.ttft_ms == pytest.approx(20.0) and not d.degraded
    # deadline: ttft + 7 * tpot
    assert p.choose(Budget(deadline_ms=10 + 8 * 10.0 + 1), 100, 8).scale == 2


def test_unmeetable_budget_degrades_or_rejects():
    p = make_policy(per_seq_step_fraction=0.0)
    p.observe([decode_report({1: 5.0, 2: 10.0, 3: 20.0})])
    d = p.choose(Budget(tpot_ms=1.0), 10, 8)
    assert d.scale == 1 and d.degraded
    with pytest.raises(BudgetUnmet) as e:
        p.choose(Budget(tpot_ms=1.0, on_miss=OnMiss.REJECT), 10, 8)
    assert e.value.retry_after_s > 0
    with pytest.raises(BudgetUnmet):
        p.choose(Budget(tpot_ms=1.0, on_miss="reject"), 10, 8, pinned_scale=3)
    assert p.choose(Budget(tpot_ms=1.0), 10, 8, pinned_scale=3).scale == 3
    with pytest.raises(ValueError, match="scale=4"):
        p.choose(Budget(), 10, 8, pinned_scale=4)


def test_unreported_scales_scale_by_params_and_ewma_smooths():
    p = ScalePolicy(PolicyConfig(num_scales=3, param_counts=(100, 200, 400), alpha=0.5, per_seq_step_fraction=0.0))
    # prior: full-model step 20 ms, others by parameter ratio
    assert p.model.tpot_ms(1) == pytest.approx(5.0)
    p.observe([decode_report({1: 8.0})])
    assert p.model.tpot_ms(3) == pytest.approx(32.0)  # 8 ms * 400/100
    p.observe([decode_report({1: 4.0})])
    assert p.model.tpot_ms(1) == pytest.approx(6.0)  # 0.5 * 8 + 0.5 * 4


def test_one_slow_request_does_not_price_a_scale_out_for_good():
    """What an H100 load test showed: the first requests at scale 2 met CUDA graph captures (TTFT 10x the
    prediction); with a per-scale moving average that factor kept scale 2 over a loose budget, no request
    went to scale 2 again, so nothing ever corrected it. Corrections are medians now, shared by every scale
    (CoLM-Air: the same chain-1 prefill and transfer, one decode batch), so scale-1 traffic keeps them current."""
    p = ScalePolicy(PolicyConfig(num_scales=3, param_counts=(100, 200, 400), per_seq_step_fraction=0.0))  # alpha 0.3
    p.observe([decode_report({1: 1.0, 2: 1.6, 3: 3.0}),
               WorkerReport("p0", "prefill", queued_tokens=0, prefill_tokens_per_s=100000)])
    m = p.model
    base = {k: m.ttft_ms(k, 2048, corrected=False) for k in (1, 2, 3)}  # 20.48 ms prefill + one step
    m.observe_request(base[3], 10 * base[3], 3.0, 3.0)  # a capture: 10x
    m.observe_request(base[3], 1.3 * base[3], 3.0, 3.0)
    for _ in range(6):  # then the policy served scale 1 only, 1.3x its predictions
        m.observe_request(base[1], 1.3 * base[1], 1.0, 1.1)
    budget = Budget(ttft_ms=2 * 1.3 * base[3], tpot_ms=4.0)  # loose for every scale
    assert p.choose(budget, 2048, 64).scale == 3
    assert m.ttft_correction == pytest.approx(1.3)
    # TPOT's correction too is shared (scale 1's traffic measured 1.1x) and one outlier does not move it
    assert m.tpot_correction == pytest.approx(1.1)
    m.observe_request(base[2], base[2], 1.6, 50.0)
    assert m.tpot_correction == pytest.approx(1.1)


def test_a_scale_no_worker_measured_lately_is_priced_from_the_ones_that_ran():
    """The H100 case: scale 3's only figure was slow (warm-up steps), so no request chose it and nothing
    refreshed it. Once the worker's recent steps no longer include it, it is priced from scale 1."""
    p = make_policy(per_seq_step_fraction=0.0)
    p.observe([decode_report({1: 1.0, 3: 30.0})])
    assert p.choose(Budget(tpot_ms=10.0), 10, 8).scale == 2  # 3 priced out by its stale 30 ms
    p.observe([decode_report({1: 1.0}, wid="d1")])  # another worker measured scale 1 only: d0 still has 3
    assert 3 in p.model.step_ms
    p.observe([decode_report({1: 1.0})])  # d0's recent steps: scale 1 only
    assert 3 not in p.model.step_ms and p.model.tpot_ms(3) == pytest.approx(4.0)  # 1 ms * 400/100
    assert p.choose(Budget(tpot_ms=10.0), 10, 8).scale == 3
    p.observe([decode_report({}), decode_report({}, wid="d1")])  # idle workers: estimates stay
    assert p.model.step_ms == {1: 1.0}
    p.observe([decode_report({1: 1.0, 3: 6.0}), decode_report({1: 1.0}, wid="d1")])
    assert p.model.tpot_ms(3) == pytest.approx(6.0)
    p.model.forget("d0")  # d1 (scale 1 only) is all that is left
    assert 3 not in p.model.step_ms


def test_step_time_is_normalised_by_the_batch_it_was_measured_at():
    p = make_policy(per_seq_step_fraction=0.1)
    # measured at batch 11 (2x batch 1 at 10% per extra sequence), reported while 1 sequence runs
    p.observe([WorkerReport("d0", "decode", num_running=1, step_ms={1: 4.0}, step_batch={1: 11.0})])
    assert p.model.base_step_ms(1) == pytest.approx(2.0)
    p.observe([WorkerReport("d0", "decode", num_running=11, step_ms={1: 4.0})])  # no batch given: num_running
    assert p.model.base_step_ms(1) == pytest.approx(2.0)


def test_load_raises_prediction_and_rebalance_lowers_running_scales():
    p = make_policy(per_seq_step_fraction=0.1)
    p.observe([decode_report({1: 5.0, 2: 10.0, 3: 20.0}, running=1)])
    assert p.choose(Budget(tpot_ms=25), 10, 8).scale == 3  # batch 2: 20 * 1.1 = 22
    p.observe([decode_report({1: 5.0 * 2.0, 2: 10.0 * 2.0, 3: 20.0 * 2.0}, running=11)])  # batch 11 doubles steps
    assert p.model.tpot_ms(3, 11) == pytest.approx(40.0)
    assert p.choose(Budget(tpot_ms=25), 10, 8).scale == 2
    running = [RunningRequest("a", 3, Budget(tpot_ms=25)), RunningRequest("b", 3, Budget(tpot_ms=100)),
               RunningRequest("c", 3, Budget(tpot_ms=1)), RunningRequest("d", 3, Budget(tpot_ms=1), pinned=True)]
    assert p.rebalance(running) == {"a": 2, "c": 1}
    non_air = ScalePolicy(PolicyConfig(num_scales=3, param_counts=(100, 200, 400), kv_sharing=False))
    assert non_air.rebalance(running) == {}


def test_from_model_and_validation():
    cfg = PolicyConfig.from_model(preset("tiny-air"))
    assert cfg.num_scales == 2 and cfg.param_counts[0] < cfg.param_counts[1]
    with pytest.raises(ValueError, match="alpha=0"):
        PolicyConfig(num_scales=1, param_counts=(1,), alpha=0)
    with pytest.raises(ValueError, match="budget.ttft_ms=-1"):
        Budget(ttft_ms=-1)
    with pytest.raises(ValueError, match="role='x'"):
        WorkerReport("w", "x")


def test_placement_least_loaded_and_failures():
    reg = WorkerRegistry(block_size=16)
    for wid, q in (("p0", 500), ("p1", 100)):
        reg.update(WorkerReport(wid, "prefill", queued_tokens=q))
    assert reg.pick_prefill(300).worker_id == "p1"  # 100 queued
    assert reg.pick_prefill(300).worker_id == "p1"  # 400 < 500
    assert reg.pick_prefill(10).worker_id == "p0"  # 700 > 500
    reg.update(WorkerReport("d0", "decode", free_blocks=10, total_blocks=10, num_running=0))
    reg.update(WorkerReport("d1", "decode", free_blocks=4, total_blocks=10, num_running=0))
    assert reg.pick_decode(64).worker_id == "d0"  # needs 4 blocks; d0 has more per sequence
    assert reg.pick_decode(64).worker_id == "d1"  # d0: 6 free / 2 seqs < d1: 4 free / 1
    assert reg.pick_decode(64).worker_id == "d0"  # d1 has 0 free now
    with pytest.raises(NoWorker) as e:
        reg.pick_decode(64)
    assert e.value.full
    reg.start("d0", "r1")
    assert reg.mark_unhealthy("d0") == ["r1"]
    reg.update(WorkerReport("d1", "decode", free_blocks=10, total_blocks=10))
    assert reg.pick_decode(16, exclude=set()).worker_id == "d1"
    with pytest.raises(NoWorker):
        reg.pick_decode(16, exclude={"d1"})
    # a stale worker is out until it reports again
    reg.update(WorkerReport("d1", "decode", free_blocks=10, total_blocks=10), now=time.monotonic() - 60)
    assert reg.healthy("decode") == []


def test_admission_bounds_queue_and_deadline():
    async def main():
        adm = Admission(max_running=1, max_queued=1, retry_after_s=0.25)
        order = []
        gate = asyncio.Event()

        async def job(name, deadline=None):
            async with adm.slot(deadline):
                order.append(name)
                await gate.wait()

        t1 = asyncio.create_task(job("a"))
        await asyncio.sleep(0)
        t2 = asyncio.create_task(job("b"))
        await asyncio.sleep(0)
        assert adm.num_running == 1 and adm.num_queued == 1
        with pytest.raises(Overloaded) as e:
            async with adm.slot():
                pass
        assert e.value.retry_after_s == 0.25
        gate.set()
        await asyncio.gather(t1, t2)
        assert order == ["a", "b"] and adm.num_running == 0
        gate.clear()
        t3 = asyncio.create_task(job("c"))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.TimeoutError):
            await job("d", deadline=time.monotonic() + 0.05)
        assert adm.num_queued == 0
        gate.set()
        await t3
        assert adm.num_running == 0

    asyncio.run(main())


def spec_policy(**kw):
    """Two scales of 100 / 400 parameters, steps of 1 ms at scale 1 and 4 ms at scale 2 (no per-sequence growth)."""
    p = ScalePolicy(PolicyConfig(num_scales=2, param_counts=(100, 400), alpha=1.0, per_seq_step_fraction=0.0,
                                 speculative="auto", **kw))
    p.observe([decode_report({1: 1.0, 2: 4.0})])
    return p


def test_speculation_is_chosen_when_rounds_beat_plain_steps():
    p = spec_policy(speculative_gammas=(2, 4), prior_draft_acceptance=0.8, verify_step_factor=2.0)
    # gamma 2: (2 x 1 + 2 x 4) / (1 + 1.6) = 3.85 ms; gamma 4: (4 + 8) / 4.2 = 2.86 ms; plain 4 ms
    gamma, tpot = p.speculation(2)
    assert gamma == 4 and tpot == pytest.approx(12 / 4.2)
    d = p.choose(Budget(), 10, 32)
    assert d.scale == 2 and d.speculative == 4 and d.tpot_ms == pytest.approx(12 / 4.2)
    assert p.speculation(1) == (0, pytest.approx(1.0))  # scale 1 drafts from itself: nothing to gain
    # off (the default), or a model without shared KV: plain steps
    off = ScalePolicy(PolicyConfig(num_scales=2, param_counts=(100, 400), alpha=1.0, per_seq_step_fraction=0.0))
    off.observe([decode_report({1: 1.0, 2: 4.0})])
    assert off.choose(Budget(), 10, 32).speculative == 0
    dense = spec_policy(kv_sharing=False)
    assert dense.speculation(2)[0] == 0


def test_speculation_is_not_chosen_when_it_does_not_pay_or_the_batch_is_large():
    # low acceptance: gamma 2 -> 10 / 1.4 = 7.1 ms > 4 ms plain
    assert spec_policy(prior_draft_acceptance=0.2).speculation(2)[0] == 0
    # a margin: a round must beat plain steps by 10 %: gamma 2 at acceptance 0.5 is 10 / 2 = 5 ms > 3.6 ms
    assert spec_policy(speculative_gammas=(2,), prior_draft_acceptance=0.5).speculation(2)[0] == 0
    p = spec_policy(prior_draft_acceptance=0.9, speculative_max_batch=4)
    assert p.speculation(2)[0] > 0
    p.observe([decode_report({1: 1.0, 2: 4.0}, running=4)])  # the request would be the 5th sequence
    assert p.speculation(2) == (0, pytest.approx(4.0)) and p.choose(Budget(), 10, 32).speculative == 0


def test_measured_acceptance_replaces_the_prior():
    p = spec_policy(prior_draft_acceptance=0.9)
    assert p.speculation(2)[0] > 0
    rep = lambda drafted, accepted: WorkerReport("d0", "decode", num_running=1, step_ms={1: 1.0, 2: 4.0},  # noqa: E731
                                                 drafted=drafted, draft_accepted=accepted)
    assert p.model.draft_acceptance is None  # spec_policy's report had no drafts: the counters' origin only
    p.observe([rep(100, 90)])
    assert p.model.draft_acceptance == pytest.approx(0.9)
    p.observe([rep(300, 110)])  # 20 of 200 drafts accepted since
    assert p.model.draft_acceptance == pytest.approx(0.1)
    assert p.speculation(2)[0] == 0  # rounds no longer pay
    p.observe([rep(300, 110)])  # no drafts since: the estimate stays
    assert p.model.draft_acceptance == pytest.approx(0.1)


def test_a_tpot_budget_plain_steps_miss_is_met_with_drafts_at_the_larger_scale():
    p = spec_policy(speculative_gammas=(4,), prior_draft_acceptance=0.8)
    d = p.choose(Budget(tpot_ms=3.5), 10, 32)  # plain scale 2 is 4 ms; rounds 2.86 ms
    assert d.scale == 2 and d.speculative == 4 and not d.degraded
    plain = ScalePolicy(PolicyConfig(num_scales=2, param_counts=(100, 400), alpha=1.0, per_seq_step_fraction=0.0))
    plain.observe([decode_report({1: 1.0, 2: 4.0})])
    assert plain.choose(Budget(tpot_ms=3.5), 10, 32).scale == 1


def test_speculation_config_is_checked():
    with pytest.raises(ValueError, match="speculative='yes'"):
        PolicyConfig(num_scales=2, param_counts=(1, 2), speculative="yes")
    with pytest.raises(ValueError, match="speculative_gammas"):
        PolicyConfig(num_scales=2, param_counts=(1, 2), speculative_gammas=(0,))
    from colm.router.config import RouterConfig
    with pytest.raises(ValueError, match=r"router.speculative='on'"):
        RouterConfig(speculative="on")
    with pytest.raises(ValueError, match=r"router.speculative_gammas=\[2, 17\]"):
        RouterConfig(speculative_gammas=[2, 17])
    with pytest.raises(ValueError, match="router.speculative_max_batch=0"):
        RouterConfig(speculative_max_batch=0)
    assert RouterConfig(speculative="auto", speculative_gammas=[3]).speculative_gammas == (3,)
    assert RouterConfig(speculative=False).speculative == "off"  # YAML's reading of an unquoted off


def test_measured_round_times_replace_the_priced_rounds():
    p = spec_policy(speculative_gammas=(4,), prior_draft_acceptance=0.8)
    assert p.speculation(2)[0] == 4  # priced: (4 x 1 + 2 x 4) / 4.2 = 2.86 ms against 4 ms plain
    slow = WorkerReport("d0", "decode", num_running=1, step_ms={1: 1.0, 2: 4.0}, round_ms={(2, 4): 20.0},
                        round_batch={(2, 4): 1.0})
    p.observe([slow])  # a worker measured 20 ms per round: 20 / 4.2 = 4.8 ms per token, worse than plain
    assert p.model.speculative_tpot_ms(2, 4) == pytest.approx(20.0 / 4.2) and p.speculation(2)[0] == 0
    p.observe([WorkerReport("d0", "decode", num_running=1, step_ms={1: 1.0, 2: 4.0}, round_ms={(2, 4): 8.0},
                            round_batch={(2, 4): 1.0})])
    assert p.speculation(2) == (4, pytest.approx(8.0 / 4.2))


def test_a_slow_round_figure_expires_and_the_rounds_are_priced_again():
    """A round once measured slow keeps speculation unchosen, so no rounds run and none are reported: after
    ``round_ttl_s`` of steps without a round report the figure goes and the prior chooses rounds again (which
    measures them again); idle workers keep it."""
    p = spec_policy(speculative_gammas=(4,), prior_draft_acceptance=0.8, round_ttl_s=60.0)
    now = [1000.0]
    p.model.clock = lambda: now[0]
    p.observe([WorkerReport("d0", "decode", num_running=1, step_ms={1: 1.0, 2: 4.0}, round_ms={(2, 4): 20.0},
                            round_batch={(2, 4): 1.0})])
    assert p.speculation(2)[0] == 0
    now[0] += 59.0
    p.observe([decode_report({1: 1.0, 2: 4.0})])  # stepping, no rounds: within the ttl the figure stays
    assert p.speculation(2)[0] == 0
    now[0] += 120.0
    p.observe([WorkerReport("d0", "decode", num_running=0)])  # idle: nothing fresher, the figure stays
    assert p.speculation(2)[0] == 0 and (2, 4) in p.model.round_ms
    p.observe([decode_report({1: 1.0, 2: 4.0})])
    assert (2, 4) not in p.model.round_ms and p.speculation(2) == (4, pytest.approx(12 / 4.2))
    with pytest.raises(ValueError, match="round_ttl_s=0"):
        PolicyConfig(num_scales=2, param_counts=(1, 2), round_ttl_s=0)


def test_round_figures_come_from_the_decode_stats_of_either_form():
    from colm.decode_worker.engine import DecodeStats
    from colm.proto.colm.v1 import kv_pb2

    s = DecodeStats("h", 2, 10, 10, 4, 0, 1, 5, round_ms_by_scale_gamma={"2:4": 7.5, "bad": 1.0},
                    round_batch_by_scale_gamma={"2:4": 3.0})
    r = WorkerReport.of_decode("d0", s)
    assert r.round_ms == {(2, 4): 7.5} and r.round_batch == {(2, 4): 3.0}
    msg = kv_pb2.DecodeStats(num_running=1, round_ms_by_scale_gamma={"2:4": 7.5}, round_batch_by_scale_gamma={"2:4": 3.0})
    assert WorkerReport.of_decode("d0", msg).round_ms == {(2, 4): 7.5}
