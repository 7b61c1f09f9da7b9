"""Coalescing a request's events into batches for the public stream (``router.coalesce``)."""

from __future__ import annotations

import asyncio

import pytest

from colm.router.coalesce import coalesced


async def _source(n, log, fail_at=None, gap=0.0):
    try:
        for i in range(n):
            if i == fail_at:
                raise KeyError("boom")
            log.append(("made", i))
            yield i
            await asyncio.sleep(gap)
    finally:
        log.append("closed")


def test_a_consumer_that_keeps_up_gets_one_event_per_batch():
    async def main():
        log = []
        return [b async for b in coalesced(_source(5, log, gap=0.01))], log

    batches, log = asyncio.run(main())
    assert batches == [[0], [1], [2], [3], [4]] and log[-1] == "closed"


def test_a_consumer_that_falls_behind_gets_what_came_meanwhile_in_order():
    async def main():
        out = []
        async for b in coalesced(_source(50, [])):
            out.append(b)
            await asyncio.sleep(0.01)  # slower than the source
        return out

    batches = asyncio.run(main())
    assert [e for b in batches for e in b] == list(range(50))
    assert len(batches) < 10 and max(len(b) for b in batches) > 1


def test_an_error_comes_after_the_events_before_it():
    async def main():
        got = []
        with pytest.raises(KeyError, match="boom"):
            async for b in coalesced(_source(10, [], fail_at=4)):
                got.extend(b)
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3]


def test_closing_the_consumer_ends_the_producer():
    async def main():
        log = []
        gen = coalesced(_source(1000, log, gap=0.001))
        first = await anext(gen)
        await gen.aclose()
        n = len([x for x in log if x != "closed"])
        await asyncio.sleep(0.05)
        return first, log, n

    first, log, n = asyncio.run(main())
    assert first == [0] and "closed" in log
    assert len([x for x in log if x != "closed"]) == n < 1000  # nothing made after the close
