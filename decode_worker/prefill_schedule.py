"""The colocated engine's prefill schedule: which prompt tokens join a step, under a token budget.

A decode engine with ``DecodeConfig.colocated_prefill`` computes its requests' chain-1 K/V itself
(one process, one CUDA context: no hand-off). Each loop iteration spends at most
``max_batched_tokens`` tokens: one per plain decode row, gamma + 1 per speculative row, and the rest
on prompt chunks taken from the prefill queue (``take_chunk``). The head of the queue always goes in: whole,
or, when it is longer than the budget, its first part (its next chunk continues in a later iteration, between
decode steps, so running requests keep their token rate while long prompts are prefilled: chunked prefill).
Behind it, only prompts that fit whole in what is left join: a whole prompt replays a CUDA graph on the GPU
(``prefill_graphs``), a cut one runs eagerly at several times the host cost, so filling the budget by cutting
the next prompt would cost more than it gains.
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


def take_chunk(queue: deque, budget: int, max_segments: int, live) -> list[Segment]:
    """Segments of at most ``budget`` tokens in all (requests whose ``prefilled`` < ``len(prompt_tokens)``): the
    head of ``queue`` (cut to the budget if it must be), then later requests whose rest fits whole. Requests for
    which ``live(req)`` is false (ended meanwhile) are dropped from the queue; a request whose prompt is wholly
    taken leaves it, one cut short stays at its head."""
    out: list[Segment] = []
    for req in list(queue):
        if budget <= 0 or len(out) >= max_segments:
            break
        if not live(req):
            queue.remove(req)
            continue
        start = req.prefilled
        if out and len(req.prompt_tokens) - start > budget:
            continue  # not cut behind the head: it goes whole in a later iteration
        end = min(len(req.prompt_tokens), start + budget)
        out.append(Segment(req, start, end))
        budget -= end - start
        req.prefilled = end  # scheduled: the next chunk of this prompt starts here
        if end == len(req.prompt_tokens):
            queue.remove(req)
    return out
