"""Global-batch-size warmup: the number of accumulation micro-batches per optimizer step grows over the first steps.

Small batches early, while the gradient noise scale is small, buy more updates per token; larger ones later, when
the noise is what limits progress (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"); modded-
nanogpt's record runs grow tokens per step in stages (`train_bs_schedule`). Here the step takes
accumulation_steps(step) micro-batches of train.micro_batch_tokens, so the loader and the collator are unchanged
and gradients stay token-weighted (the trainer weights each micro-batch by its share of the step's scored tokens).
The loader keys masks by its own micro-step counter, so the mask-rate schedule then follows tokens seen
(micro_step // full accumulation) rather than optimizer steps.
"""

import math


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
