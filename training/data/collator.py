"""MLM collator: rows of proteins -> the model's packed (or padded) batch with masked positions and labels.

Public API
    MaskRateSchedule(start, end, steps, kind="linear")     # rate(step): start -> end over `steps`, then end
    MLMCollator(mask_rate=0.2, replace="80/10/10", seed=0)   # mask_rate: float or MaskRateSchedule; replace: a
        .rate(step) -> float                                   # REPLACEMENTS name or (mask, random, keep) fractions
        .__call__(rows, *, length=None, step=0, micro=0) -> batch dict
    REPLACEMENTS = {"80/10/10": (0.8, 0.1, 0.1), "mask": (1.0, 0.0, 0.0)}   # data.replacement, --replacement
    mix64(*ints) -> int   # 63-bit seed from several integers (splitmix64 chain)
    TRAIN_MASK_RATE = 0.2, EVAL_MASK_RATE = 0.15 (ESM2's evaluation protocol)
    IGNORE_INDEX = -100   # the label of unscored positions

`rows` is a list of rows; a row is a list of proteins, each an (n,) uint8 array of residue ids (validate.encode, or a
shard view). Every protein becomes <cls> residues <eos>. With `length` the rows are padded to that many tokens
(packed mode: the loader guarantees they fit); with length=None to the longest row (padded mode: one protein a row).

Returned batch, all torch tensors of shape (B, L):
    input_ids long, labels long (-100 where not scored), position_ids long (0 at each <cls>),
    document_ids int32 (0, 1, 2, ... per protein within a row, -1 on padding), attention_mask long (1 real, 0 pad)

Masking rules
    - only residue tokens (ids 4..30) are maskable: <cls>, <eos>, <pad>, <unk>, <mask> never are;
    - every protein gets at least one masked position (its lowest random score);
    - each row masks round-stochastic(rate x maskable residues) positions, never fewer than its protein count, so the
      observed rate tracks the target closely even over small batches;
    - masked positions: 80% <mask>, 10% a random standard residue (ids 4..23, never a special token), 10% unchanged
      (replace="mask" puts <mask> everywhere);
    - the random draws come from a torch.Generator seeded with mix64(seed, step, 0, micro), and the rate from
      `rate(step)`: both are functions of the arguments only, so DataLoader workers, resumed runs and repeated evals
      produce identical masks. `micro` is the micro-batch's global slot (training/data/loader.py), which already tells the
      ranks apart; the 0 keeps the masks of earlier versions, which also keyed a rank that was always 0.
"""

import dataclasses
import math

import numpy as np
import torch

from .validate import CLS, EOS, FIRST_RESIDUE, LAST_RESIDUE, LAST_STANDARD, MASK, PAD

IGNORE_INDEX = -100  # label of unscored positions (the Hugging Face / PyTorch cross-entropy convention)

TRAIN_MASK_RATE = 0.2
REPLACEMENTS = {"80/10/10": (0.8, 0.1, 0.1), "mask": (1.0, 0.0, 0.0)}  # (mask, random residue, unchanged)
EVAL_MASK_RATE = 0.15
M64 = (1 << 64) - 1


def mix64(*xs: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 applied after folding in each value)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & M64)) & M64
        h = (h + 0x9E3779B97F4A7C15) & M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & M64
        h ^= h >> 31
    return h >> 1  # torch.Generator.manual_seed takes up to 2**63 - 1


@dataclasses.dataclass(frozen=True)
class MaskRateSchedule:
    """Mask rate as a pure function of the optimizer step: start -> end over `steps` (linear or cosine), then end."""

    start: float
    end: float
    steps: int
    kind: str = "linear"

    def __post_init__(self):
        if self.kind not in ("linear", "cosine") or self.steps < 1:
            raise ValueError(f"kind must be linear|cosine and steps >= 1, got {self.kind!r}, {self.steps}")
        for r in (self.start, self.end):
            if not 0.0 < r < 1.0:
                raise ValueError(f"mask rates must be in (0, 1), got {r}")

    def __call__(self, step: int) -> float:
        t = min(max(step, 0) / self.steps, 1.0)
        if self.kind == "cosine":
            t = 0.5 - 0.5 * math.cos(math.pi * t)
        return self.start + (self.end - self.start) * t


class MLMCollator:
    """Builds packed/padded MLM batches; see the module docstring for the exact rules."""

    def __init__(self, mask_rate: float | MaskRateSchedule = TRAIN_MASK_RATE, replace="80/10/10", seed: int = 0):
        replace = REPLACEMENTS.get(replace, replace) if isinstance(replace, str) else replace
        if isinstance(replace, str) or len(replace) != 3 or abs(sum(replace) - 1.0) > 1e-6 or min(replace) < 0:
            raise ValueError(
                f"replace must be one of {sorted(REPLACEMENTS)} or 3 fractions (mask, random, keep) summing to 1, "
                f"got {replace!r}"
            )
        if not isinstance(mask_rate, MaskRateSchedule) and not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
        self.mask_rate, self.replace, self.seed = mask_rate, tuple(replace), seed

    def rate(self, step: int) -> float:
        return self.mask_rate(step) if isinstance(self.mask_rate, MaskRateSchedule) else float(self.mask_rate)

    def __call__(self, rows, *, length: int | None = None, step: int = 0, micro: int = 0) -> dict:
        sizes = [sum(len(d) + 2 for d in row) for row in rows]
        L = length if length is not None else max(sizes)
        if max(sizes) > L:
            raise ValueError(f"a row holds {max(sizes)} tokens > length {L}")
        B = len(rows)
        ids = np.full((B, L), PAD, dtype=np.uint8)  # (B, L)
        pos = np.zeros((B, L), dtype=np.int64)  # (B, L)
        doc = np.full((B, L), -1, dtype=np.int32)  # (B, L)
        ramp = np.arange(L, dtype=np.int64)
        for r, row in enumerate(rows):
            p = 0
            for k, d in enumerate(row):
                n = len(d)
                ids[r, p] = CLS
                ids[r, p + 1 : p + 1 + n] = d
                ids[r, p + 1 + n] = EOS
                pos[r, p : p + n + 2] = ramp[: n + 2]
                doc[r, p : p + n + 2] = k
                p += n + 2
        input_ids = torch.from_numpy(ids).long()
        document_ids = torch.from_numpy(doc)
        input_ids, labels = self._mask(input_ids, document_ids, step, micro)
        return dict(
            input_ids=input_ids,
            labels=labels,
            position_ids=torch.from_numpy(pos),
            document_ids=document_ids,
            attention_mask=(document_ids >= 0).long(),
        )

    def _mask(self, ids: torch.Tensor, doc: torch.Tensor, step: int, micro: int):
        B, L = ids.shape
        g = torch.Generator().manual_seed(mix64(self.seed, step, 0, micro))
        maskable = (ids >= FIRST_RESIDUE) & (ids <= LAST_RESIDUE)  # (B, L)
        scores = torch.rand((B, L), generator=g, dtype=torch.float64)  # (B, L)
        scores.masked_fill_(~maskable, 2.0)
        # force each protein's lowest-scoring residue: key = row * L + document id (document ids < L)
        key = (torch.arange(B).unsqueeze(1) * L + doc.clamp(min=0).long()).flatten()  # (B*L,)
        lowest = torch.full((B * L,), 3.0, dtype=torch.float64).scatter_reduce_(0, key, scores.flatten(), "amin")
        forced = maskable & (scores == lowest.index_select(0, key).view(B, L))  # (B, L); faster than lowest[key]
        scores.masked_fill_(forced, -1.0)
        n = maskable.sum(1)  # (B,) maskable residues per row
        quota = torch.floor(n * self.rate(step) + torch.rand(B, generator=g, dtype=torch.float64)).long()
        k = torch.maximum(quota, forced.sum(1)).clamp(max=n)  # (B,)
        # k-th smallest score per row; topk of the largest k is much cheaper than a full sort
        ranked = scores.topk(max(int(k.max()), 1), dim=1, largest=False).values  # (B, max k), ascending
        threshold = ranked.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # (B, 1)
        masked = maskable & (scores <= threshold) & (k > 0).unsqueeze(1)  # (B, L)
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
        p_mask, p_rand, _ = self.replace
        u = torch.rand((B, L), generator=g)
        random_ids = torch.randint(FIRST_RESIDUE, LAST_STANDARD + 1, (B, L), generator=g)
        out = torch.where(masked & (u < p_mask), torch.full_like(ids, MASK), ids)
        out = torch.where(masked & (u >= p_mask) & (u < p_mask + p_rand), random_ids, out)
        return out, labels
