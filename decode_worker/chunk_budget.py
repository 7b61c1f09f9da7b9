"""The colocated engine's prompt budget per iteration, steered toward a time per output token.

In a colocated engine every loop iteration gives each running row one token, so an iteration's wall time is the
time per output token (TPOT) of every request in it. A prompt chunk rides in the same iteration: the larger the
chunk, the faster prompts are prefilled and the slower every running request's next token. A fixed budget
(``DecodeConfig.max_batched_tokens``) is right for one load and one GPU only; a burst of long prompts fills every
iteration's chunk and stretches the running requests' TPOT past the service's target.

``ChunkBudget`` sets the prompt tokens of the next iteration while rows run (``DecodeConfig.tpot_target_ms`` > 0):
after an iteration that ran decode rows and a prompt chunk it compares the iteration's time with the target and
scales the budget by ``1 - gain * (time - target) / target`` (bounded per iteration). A slow iteration lowers the
budget from the prompt tokens it actually ran (not from an unused allowance); a fast one raises it only when its
chunk used the whole budget (otherwise the budget did not bind and there is nothing to learn). The budget stays
between ``min_tokens`` (prompts always progress, however slow the decode rows alone are) and the fixed budget; it is
applied in whole multiples of ``GRAIN`` tokens above one grain, the step of the chunk graphs' sizes
(``prefill_graphs.token_sizes``), so a cut chunk is not padded to the next graph. With no decode row running, an
iteration takes the fixed budget: no running request's TPOT is at stake.

The loop is a multiplicative integral controller on the measured time: no model of the GPU's costs is needed, and
the same target holds on any GPU and model. With overlapped steps the time of iteration n covers the chunk of
iteration n - 1, a lag of one iteration that the per-iteration bound on the factor keeps stable.
"""

from __future__ import annotations

GRAIN = 512  # tokens: the step between the chunk graphs' sizes above 512


class ChunkBudget:
    def __init__(self, max_tokens: int, target_ms: float, min_tokens: int, gain: float = 0.5,
                 max_factor: float = 1.25) -> None:
        if target_ms < 0:
            raise ValueError(f"target_ms={target_ms}: must be >= 0 (0 = the fixed budget)")
        if not 0 < gain <= 1 or max_factor <= 1:
            raise ValueError(f"gain={gain}, max_factor={max_factor}: need 0 < gain <= 1 and max_factor > 1")
        self.max_tokens = max_tokens
        self.target_ms = target_ms
        self.min_tokens = max(1, min(min_tokens, max_tokens))
        self.gain, self.max_factor = gain, max_factor
        self._value = float(max_tokens)  # the continuous budget; ``tokens`` applies it in grains

    @property
    def adaptive(self) -> bool:
        return self.target_ms > 0

    def tokens(self, decoding: bool) -> int:
        """The prompt tokens the next iteration may take (before its decode rows' own tokens are counted):
        ``decoding``: rows are running."""
        if not self.adaptive or not decoding:
            return self.max_tokens
        v = int(self._value)
        if v >= GRAIN:
            v -= v % GRAIN
        return max(self.min_tokens, min(self.max_tokens, v))

    def observe(self, iteration_ms: float, decoding: bool, prompt_tokens: int, allowed: int) -> None:
        """One iteration's wall time, whether rows ran in it, the prompt tokens its chunk held and the most it was
        allowed (what ``tokens`` gave, less the rows' own tokens where the fixed budget bound)."""
        if not self.adaptive or not decoding or prompt_tokens <= 0:
            return
        err = (iteration_ms - self.target_ms) / self.target_ms
        factor = min(self.max_factor, max(1.0 / self.max_factor, 1.0 - self.gain * err))
        if err > 0:  # too slow: less than what this chunk held
            self._value = min(self._value, float(prompt_tokens)) * factor
        elif prompt_tokens >= allowed:  # fast, and the budget was what bound the chunk
            self._value *= factor
        self._value = min(float(self.max_tokens), max(float(self.min_tokens), self._value))
