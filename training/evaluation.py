"""In-loop evaluation: fixed masks, token-weighted loss, metrics reduced over every rank's tokens."""

import math

import torch

from .metrics import MaskedLMAccumulator


@torch.no_grad()
def evaluate(model, loader, accelerator, max_tokens: int | None = None) -> dict:
    """`loader` yields the same masked batches every time (fixed seed, one pass, rank-disjoint). `max_tokens` caps
    the tokens scored per split (over all ranks), always on the same leading batches."""
    was_training = model.training
    model.eval()
    vocab_size = accelerator.unwrap_model(model).config.vocab_size
    accumulator = MaskedLMAccumulator(vocab_size, device=accelerator.device)
    per_batch = loader.rows_per_micro_batch * loader.spec.max_length * accelerator.num_processes
    max_batches = math.ceil(max_tokens / per_batch) if max_tokens else None
    # Always from the first batch: an earlier eval that stopped at max_tokens left the loader mid-pass.
    loader.restart()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        accumulator.update(logits, batch["labels"])
    accumulator.reduce(accelerator)
    model.train(was_training)
    result = accumulator.compute()
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and math.isfinite(v)}
