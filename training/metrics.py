"""Masked-LM metrics: token-weighted loss, perplexity and classification scores of the masked positions.

The one home of these numbers. Training's in-loop eval (`evaluate`, below), the benchmark (eval/benchmark.py)
and the `masked_lm` evaluate module (eval/metrics/masked_lm) all compute them here.

MaskedLMAccumulator sums over eval batches and ranks. It must stay cheap to import and to update: no `evaluate`
import (6-8 s); an update is one fp32 cross-entropy, one argmax and one bincount on the logits' device. The state is
a loss sum and a V x V confusion matrix (rows: true id, columns: predicted id); token and correct counts are its sum
and trace, so they can never disagree with it. `classification_metrics` (scikit-learn) takes the confusion cells as
sample weights, so it gives exactly what it gives on one entry per token.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from modeling_speedplm import ESM2_VOCAB

from .data.collator import IGNORE_INDEX  # noqa: F401  (re-exported: its home is where labels are made)


def reach(points: list[dict], target: float, key: str) -> float | None:
    """First `key` (time or tokens) at which the piecewise-linear loss curve through `points` ({key, "loss"}, in
    order) is <= target; None if never. Between the two points that bracket the target it interpolates linearly;
    a curve already at or below it at its first point reaches it there. The one home of the crossing: the trainer's
    train.target_loss and the recipe judge (eval/speedrun/stats.py) both use it."""
    for prev, cur in zip([None] + points[:-1], points):
        if cur["loss"] <= target:
            if prev is None:
                return float(cur[key])
            frac = (prev["loss"] - target) / (prev["loss"] - cur["loss"])
            return float(prev[key] + frac * (cur[key] - prev[key]))
    return None


def classification_metrics(y_true, y_pred, sample_weight=None):
    """Accuracy, P/R/F1 (weighted, macro), MCC, per-class accuracy. `sample_weight`: counts, e.g. of confusion cells."""
    # scikit-learn only here: the training step (and a GPU node's image) must not need it (issue #23)
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    # Classes = ids present in references. Restricting `labels` keeps ids that are only ever predicted (e.g. a
    # special token) from adding an all-zero class to the macro average, while still counting those predictions
    # as misses of their true class.
    labels = np.unique(y_true)
    if labels[0] < 0 or labels[-1] >= len(ESM2_VOCAB):
        raise ValueError(f"references must be ESM2 token ids in [0, {len(ESM2_VOCAB)}), got {labels.tolist()}")
    result = {"accuracy": float(accuracy_score(y_true, y_pred, sample_weight=sample_weight))}
    for average in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, sample_weight=sample_weight, zero_division=0
        )
        result.update({f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)})
    # Weighted recall == accuracy, always: sum_c (n_c / N) * (TP_c / n_c) = sum_c TP_c / N, and the classes cover
    # every reference. It carries no information beyond accuracy; macro recall (mean per-class accuracy) does.
    result["mcc"] = float(matthews_corrcoef(y_true, y_pred, sample_weight=sample_weight))
    _, recall, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, sample_weight=sample_weight, zero_division=0
    )
    result["per_amino_acid_accuracy"] = {ESM2_VOCAB[c]: float(a) for c, a in zip(labels, recall)}
    return result


class MaskedLMAccumulator:
    """Sums cross-entropy and a confusion matrix over the scored positions of every batch passed to `update`."""

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        # float64: millions of fp32 per-token losses summed in fp32 would lose digits; int64 counts are exact.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(vocab_size, vocab_size, dtype=torch.int64, device=device)
        self.reduced = False

    @property
    def tokens(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(self.confusion.trace())

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits (..., V) and labels (...) with the same leading shape, e.g. (N, V)/(N,) or (B, L, V)/(B, L)."""
        V = self.vocab_size
        if self.reduced:
            raise RuntimeError("update after reduce: these sums already hold every rank's tokens")
        if logits.shape[-1] != V or logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} don't match vocab {V}")
        logits, labels = logits.reshape(-1, V).float(), labels.reshape(-1).long()
        scored = labels != IGNORE_INDEX
        # Per-token losses in fp32 (bf16 logits would round them), summed in fp64; unscored positions give 0.
        losses = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        self.loss_sum += losses.double().sum().to(self.loss_sum.device)
        # Unscored positions go to an overflow bin V*V that is dropped: no boolean indexing, no host sync for it.
        cells = torch.where(scored, labels * V + logits.argmax(dim=-1), V * V)
        counts = torch.bincount(cells, minlength=V * V + 1)[: V * V]
        self.confusion += counts.view(V, V).to(self.confusion.device)

    def reduce(self, accelerator=None) -> MaskedLMAccumulator:
        """Replace the local sums by the sums over all ranks, in place; returns self (`acc.reduce(a).compute()`).

        Collective: every rank must call it, once (a second call, or an update after it, raises: it would count
        tokens twice). Uses `accelerator.reduce(t, "sum")` when given, else `torch.distributed.all_reduce` when a
        process group is initialised, else nothing changes. With NCCL the state must live on the rank's GPU: build
        the accumulator with `device=accelerator.device`.
        """
        if self.reduced:
            raise RuntimeError("already reduced over ranks; reducing again would multiply the counts")
        for name in ("loss_sum", "confusion"):
            tensor = getattr(self, name)
            if accelerator is not None:
                setattr(self, name, accelerator.reduce(tensor, reduction="sum"))
            elif dist.is_available() and dist.is_initialized():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self.reduced = True
        return self

    def compute(self) -> dict:
        """loss (token-weighted mean cross-entropy), perplexity, tokens, and the `masked_lm` module's other metrics."""
        tokens = self.tokens
        if tokens == 0:
            raise ValueError("no scored tokens: every label was -100 (or update was never called)")
        loss = float(self.loss_sum) / tokens
        result = {"tokens": tokens, "loss": loss, "perplexity": math.exp(loss)}
        # Each nonzero cell (true, pred) stands for `count` identical samples: sklearn with sample_weight=count is
        # exactly sklearn on the expanded arrays, without materialising one entry per token.
        confusion = self.confusion.cpu().numpy()
        y_true, y_pred = np.nonzero(confusion)
        result.update(classification_metrics(y_true, y_pred, sample_weight=confusion[y_true, y_pred]))
        return result


@torch.no_grad()
def evaluate(model, loader, accelerator, max_tokens: int | None = None) -> dict:
    """`loader` yields the same masked batches every time (fixed seed, one pass, rank-disjoint). `max_tokens` caps
    the tokens scored per split (masked positions, summed over all ranks): whole batches, always the same leading
    ones, until at least `max_tokens` have been scored (the result's `tokens` says how many exactly)."""
    was_training = model.training
    model.eval()
    vocab_size = accelerator.unwrap_model(model).config.vocab_size
    accumulator = MaskedLMAccumulator(vocab_size, device=accelerator.device)
    scored = 0  # masked positions so far, all ranks: every rank sees the same sum, so all stop at the same batch
    # Always from the first batch: an earlier eval that stopped at max_tokens left the loader mid-pass.
    loader.restart()
    for batch in loader:
        if max_tokens and scored >= max_tokens:
            break
        if max_tokens:
            count = (batch["labels"] != IGNORE_INDEX).sum().reshape(1).to(accelerator.device)
            scored += int(accelerator.reduce(count, reduction="sum") if accelerator.num_processes > 1 else count)
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        accumulator.update(logits, batch["labels"])
    accumulator.reduce(accelerator)
    model.train(was_training)
    result = accumulator.compute()
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and math.isfinite(v)}
