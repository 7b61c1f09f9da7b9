"""``colm.kv.lease.WriterLease``: when the blocks a sender writes itself (cuda_pool, nixl) may go back after their
request ended. Pure rules, on a fake clock; the engine-level behaviour is in test_kv_pool, test_kv_ready_event and
the transports' tests."""

from __future__ import annotations

from colm.kv.lease import WriterLease, ready_state


class Event:
    """``query()`` like a CUDA event: True once done; raises once broken."""

    def __init__(self) -> None:
        self.done = self.broken = False

    def query(self) -> bool:
        if self.broken:
            raise RuntimeError("the event's process is gone")
        return self.done


def test_an_open_stream_holds_until_it_ends_and_stops_the_writer_once():
    stops = []
    lease = WriterLease(grace_s=2.0, ready_timeout_s=30.0, stop_writer=lambda: stops.append(1))
    assert lease.holds() and not lease.releasable(now=1e9)
    stop = lease.request_ended(now=10.0)
    assert stop is not None and lease.request_ended(now=10.5) is None  # handed out once
    stop()
    assert stops == [1] and lease.holds() and not lease.releasable(now=1e9)  # still open: writes may land
    assert lease.stream_ended(clean=True, now=11.0) and not lease.stream_ended(clean=False, now=12.0)
    assert lease.releasable(now=11.0) and not lease.holds()  # a clean end: at once


def test_a_broken_stream_waits_out_the_grace():
    lease = WriterLease(grace_s=2.0, ready_timeout_s=30.0)
    lease.request_ended(now=0.0)
    assert lease.stream_ended(clean=False, now=5.0)
    assert not lease.releasable(now=6.9) and lease.releasable(now=7.0)


def test_a_clean_end_with_queued_writes_waits_for_their_event_or_its_timeout():
    ev = Event()
    lease = WriterLease(grace_s=2.0, ready_timeout_s=30.0, ready=ev)
    lease.stream_ended(clean=True, now=0.0)
    assert lease.holds() and not lease.releasable(now=1.0)  # the writes have not run
    ev.done = True
    assert lease.releasable(now=1.0) and not lease.holds()
    late = WriterLease(grace_s=2.0, ready_timeout_s=30.0, ready=Event())
    late.stream_ended(clean=True, now=0.0)
    assert not late.releasable(now=29.0) and late.releasable(now=30.0)  # bounded by the timeout


def test_a_request_ending_after_the_stream_with_its_event_pending():
    ev = Event()
    lease = WriterLease(grace_s=2.0, ready_timeout_s=30.0, open=False, ready=ev)
    assert lease.holds() and lease.request_ended(now=100.0) is None
    assert not lease.releasable(now=129.0) and lease.releasable(now=130.0)
    ev.broken = True  # its writes will never run: nothing to wait for
    assert ready_state(ev) == "failed" and lease.releasable(now=101.0)
