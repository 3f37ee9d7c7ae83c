"""Global-batch-size warmup: the number of accumulation micro-batches per optimizer step grows over the first steps.

Small batches early, while the gradient noise scale is small, buy more updates per token; larger ones later, when
the noise is what limits progress (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"); modded-
nanogpt's record runs grow tokens per step in stages (`train_bs_schedule`). Here step s takes
`BatchSchedule.at(s)` micro-batches of train.micro_batch_tokens, so rows and packing are unchanged and gradients
stay token-weighted (the trainer weights each micro-batch by its share of the step's scored tokens).

The schedule is data shared by the trainer (how many micro-batches a step takes) and the loader (which optimizer
step a micro-batch belongs to: `locate`), so the mask-rate schedule follows the optimizer step, warmup or not.
"""

import bisect
import itertools
import math
from dataclasses import dataclass, field


def accumulation_steps(step: int, full: int, warmup_steps: int, start: float) -> int:
    """Micro-batches of optimizer step `step` (0-based): round(start * full) (at least 1) at step 0, growing linearly
    to `full` at step `warmup_steps`, then `full`. warmup_steps = 0 is off."""
    if warmup_steps <= 0:
        return full
    if full < 2:
        raise ValueError(
            f"train.batch_warmup_steps={warmup_steps} needs gradient accumulation to vary: tokens_per_step / "
            f"(ranks x micro_batch_tokens) = {full}; lower train.micro_batch_tokens"
        )
    if not 0 < start <= 1:
        raise ValueError(f"train.batch_warmup_start={start} must be in (0, 1]")
    frac = start + (1 - start) * min(step / warmup_steps, 1.0)
    return max(1, min(full, math.floor(frac * full + 0.5)))


@dataclass(frozen=True)
class BatchSchedule:
    """Micro-batches per optimizer step: accumulation_steps(step, full, warmup_steps, start)."""

    full: int
    warmup_steps: int = 0
    start: float = 1.0
    # first[s]: micro-batches before step s, for s <= warmup_steps (the steps after it all take `full`)
    first: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        counts = [accumulation_steps(s, self.full, self.warmup_steps, self.start) for s in range(self.warmup_steps)]
        object.__setattr__(self, "first", (0, *itertools.accumulate(counts)))

    def at(self, step: int) -> int:
        return accumulation_steps(step, self.full, self.warmup_steps, self.start)

    def first_micro(self, step: int) -> int:
        """Micro-batches taken by steps 0 .. step-1."""
        if step <= self.warmup_steps:
            return self.first[step]
        return self.first[-1] + (step - self.warmup_steps) * self.full

    def locate(self, micro: int) -> tuple[int, int]:
        """(optimizer step, index within it) of the micro-batch numbered `micro` from step 0."""
        if micro >= self.first[-1]:
            step, index = divmod(micro - self.first[-1], self.full)
            return self.warmup_steps + step, index
        step = bisect.bisect_right(self.first, micro) - 1
        return step, micro - self.first[step]
