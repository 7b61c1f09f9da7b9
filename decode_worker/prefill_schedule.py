"""The colocated engine's prefill schedule: which prompt tokens join a step, under a token budget.

A decode engine with ``DecodeConfig.colocated_prefill`` computes its requests' chain-1 K/V itself
(one process, one CUDA context: no hand-off). Each loop iteration spends at most
``max_batched_tokens`` tokens: one per plain decode row, gamma + 1 per speculative row, and the rest
on prompt chunks taken from the prefill queue in order (``take_chunk``): whole prompts while they fit, and the
first one that does not is cut to what is left (its next chunk continues in a later iteration, between decode
steps, so running requests keep their token rate while long prompts are prefilled: chunked prefill). The chunk
runs packed, from a CUDA graph on the GPU whatever its mix of segments (``prefill_graphs``), so filling the budget
costs no extra host time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Prompt positions [start, end) of ``request`` (a ``DecodeRequest`` with ``prompt_tokens``)."""
    request: object
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def take_chunk(queue: deque, budget: int, max_segments: int, live, ready=None) -> list[Segment]:
    """Segments of at most ``budget`` tokens in all (requests whose ``prefilled`` < ``len(prompt_tokens)``), in
    queue order, the last one cut to the budget if it must be. Requests for which ``live(req)`` is false (ended
    meanwhile) are dropped from the queue; those for which ``ready(req)`` is false wait in it (prefix caching: the
    blocks they need next are being computed for another request); a request whose prompt is wholly taken leaves it,
    one cut short stays (at its head: the next iteration continues it first)."""
    out: list[Segment] = []
    for req in list(queue):
        if budget <= 0 or len(out) >= max_segments:
            break
        if not live(req):
            queue.remove(req)
            continue
        if ready is not None and not ready(req):
            continue
        start = req.prefilled
        end = min(len(req.prompt_tokens), start + budget)
        out.append(Segment(req, start, end))
        budget -= end - start
        req.prefilled = end  # scheduled: the next chunk of this prompt starts here
        if end == len(req.prompt_tokens):
            queue.remove(req)
    return out
