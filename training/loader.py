"""Packed, resumable, multi-worker loader over token shards.

Public API
    pack_best_fit(lengths, capacity, max_open=1024) -> (order, row_offsets)
    PackedLoader(shards, *, max_length, tokens_per_micro_batch, collator, rank=0, world_size=1, seed=0,
                 global_batch_tokens=None, num_workers=0, prefetch_factor=4, pin_memory=None, shuffle=True,
                 packing=True, num_epochs=None, crop=None, fixed_mask_step=None, chunk_docs=131072)
        iter(loader) -> batch dicts (see training.collator); state_dict() / load_state_dict(state)
        batches_per_epoch(epoch=None), packing_stats(epoch=0) -> dict, grad_accum_steps, rows_per_micro_batch
    build_loader(shard_dir, *, max_length=1024, tokens_per_micro_batch, collator, rank=0, world_size=1, seed=0,
                 num_workers=0, verify="sha256", **kw) -> PackedLoader      # training: shuffled, endless
    build_eval_loader(shard_dir, *, max_length=1024, tokens_per_micro_batch, collator, rank=0, world_size=1,
                      seed=0, packing=True, num_workers=0, **kw) -> PackedLoader   # one pass, fixed masks

How an epoch is laid out (identically in every rank and worker, from (seed, epoch) alone)
    1. order: a permutation of all proteins from numpy default_rng([seed, epoch]) (identity when shuffle=False);
    2. proteins longer than max_length - 2 residues take a max_length - 2 window: a fresh random start per epoch
       (hash of seed, epoch, protein) for training, the first residues for eval (crop="first");
    3. packing: consecutive chunks of `chunk_docs` proteins of that order are packed into rows of max_length tokens
       by greedy best fit (packing=False: one protein per row, padded to the longest row of its batch);
    4. global micro-batch g holds rows [g*R, (g+1)*R) with R = tokens_per_micro_batch // max_length; rank r takes
       g = b*world_size + r as its b-th batch, so ranks see disjoint rows. Training drops the last incomplete
       round of world_size micro-batches; a finite loader keeps it and gives a rank with nothing left a filler batch
       (one empty protein, no scored label) so every rank runs the same number of steps.
Workers: worker w of n builds the rank's batches j with j % n == w (counted from where iteration starts); the
DataLoader's round-robin returns them in order. Masks: the collator is called with step = micro_step //
grad_accum_steps and micro = (micro_step % grad_accum_steps) x world_size + rank, rank = 0 (eval: step =
fixed_mask_step, micro = global batch index), so masks and the mask-rate schedule depend only on counters carried
in the state, and the same rows get the same masks for any number of ranks.
State: {epoch, batch (next batch index within the epoch), micro_step, seed, ...}; restoring it resumes exactly.
"""

import itertools
import math
from bisect import bisect_left, bisect_right, insort
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.collator import mix64
from training.shards import ShardSet

STATE_VERSION = 1


def pack_best_fit(lengths, capacity: int, max_open: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Greedy best fit in the given order: each item goes to the open row with the least room that fits it.

    lengths: (N,) tokens per item, each in 1..capacity. At most `max_open` rows stay open (the fullest is closed
    when a new row would exceed it), bounding the search. Returns order (N,) item positions in row order and
    row_offsets (rows + 1,): row i holds order[row_offsets[i]:row_offsets[i + 1]].
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in 1..{capacity}")
    min_len = int(lengths.min()) if lengths.size else 1
    shift = 32
    low = (1 << shift) - 1
    keys: list[int] = []  # sorted (room << 32 | row) of open rows
    rows: list[list[int]] = []
    for i, n in enumerate(lengths.tolist()):
        j = bisect_left(keys, n << shift)
        if j < len(keys):
            key = keys.pop(j)
            row, room = key & low, (key >> shift) - n
            rows[row].append(i)
        else:
            row, room = len(rows), capacity - n
            rows.append([i])
            if len(keys) >= max_open:
                keys.pop(0)  # close the fullest open row
        if room >= min_len:
            insort(keys, (room << shift) | row)
    order = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=lengths.size)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return order, offsets


class _EpochPlan:
    """Rows of one epoch as global protein ids, packed lazily chunk by chunk; old chunks are released."""

    def __init__(self, spec: dict, lengths: np.ndarray, epoch: int):
        self.epoch, self.spec = epoch, spec
        n = len(lengths)
        rng = np.random.default_rng([spec["seed"], epoch])
        self.order = rng.permutation(n) if spec["shuffle"] else np.arange(n)
        self.tokens = np.minimum(lengths + 2, spec["max_length"])  # (n,) tokens each protein takes in a row
        self.chunks: list[tuple[int, np.ndarray, np.ndarray]] = []  # (first row, protein ids, row offsets)
        self.next_doc, self.total_rows = 0, 0

    @property
    def complete(self) -> bool:
        return self.next_doc >= len(self.order)

    def ensure(self, rows: int) -> bool:
        """Pack chunks until `rows` rows exist; False if the epoch has fewer."""
        while self.total_rows < rows and not self.complete:
            ids = self.order[self.next_doc : self.next_doc + self.spec["chunk_docs"]]
            self.next_doc += len(ids)
            if self.spec["packing"]:
                order, offsets = pack_best_fit(self.tokens[ids], self.spec["max_length"])
                ids = ids[order]
            else:
                offsets = np.arange(len(ids) + 1)
            self.chunks.append((self.total_rows, ids, offsets))
            self.total_rows += len(offsets) - 1
        return self.total_rows >= rows

    def rows(self, start: int, stop: int) -> list[np.ndarray]:
        """Protein ids of rows [start, stop) (rows must exist)."""
        out = []
        firsts = [c[0] for c in self.chunks]
        for r in range(start, stop):
            first, ids, offsets = self.chunks[bisect_right(firsts, r) - 1]
            out.append(ids[offsets[r - first] : offsets[r - first + 1]])
        return out

    def release_before(self, row: int) -> None:
        while len(self.chunks) > 1 and self.chunks[1][0] <= row:
            self.chunks.pop(0)


class _BatchStream(IterableDataset):
    """Yields (epoch, batch, micro_step, batch dict) for one rank from a start position; see the module docstring."""

    def __init__(self, shards: ShardSet, spec: dict, collator, start: tuple):
        self.shards, self.spec, self.collator, self.start = shards, spec, collator, start

    def batch_exists(self, plan: _EpochPlan, b: int) -> bool:
        s = self.spec
        per_round = s["rows"] * s["world_size"]
        return plan.ensure((b + 1) * per_round) if s["drop_last"] else plan.ensure(b * per_round + 1)

    def make_batch(self, plan: _EpochPlan, b: int, micro_step: int) -> dict:
        s = self.spec
        g = b * s["world_size"] + s["rank"]
        plan.ensure((g + 1) * s["rows"])
        first, last = g * s["rows"], min((g + 1) * s["rows"], plan.total_rows)
        rows = [[self.crop(plan.epoch, int(d)) for d in row] for row in plan.rows(first, last)]
        if not rows:  # finite loader, this rank has run out: filler with nothing to score
            rows = [[np.zeros(0, dtype=np.uint8)]]
        if s["fixed_mask_step"] is not None:
            step, micro = s["fixed_mask_step"], b
        else:
            step, micro = divmod(micro_step, s["grad_accum_steps"])
        # Masks are keyed by the micro-batch's global slot (micro x world + rank, with rank 0 in the key): the same
        # rows get the same masks whatever the split into ranks and accumulation steps, so N ranks reproduce 1.
        slot = micro * s["world_size"] + s["rank"]
        length = s["max_length"] if s["packing"] else None
        return self.collator(rows, length=length, step=step, rank=0, micro=slot)

    def crop(self, epoch: int, d: int) -> np.ndarray:
        tokens = self.shards.doc(d)
        window = self.spec["max_length"] - 2
        if len(tokens) <= window:
            return tokens
        start = 0 if self.spec["crop"] == "first" else mix64(self.spec["seed"], epoch, d) % (len(tokens) - window + 1)
        return tokens[start : start + window]

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, b, micro_step = self.start
        plan, j = None, 0
        while self.spec["num_epochs"] is None or epoch < self.spec["num_epochs"]:
            if plan is None:
                plan = _EpochPlan(self.spec, self.shards.lengths, epoch)
            if not self.batch_exists(plan, b):
                if b == 0:  # an empty epoch would loop forever
                    raise ValueError(
                        f"{self.shards.dir}: too little data for one round of "
                        f"{self.spec['world_size']} x {self.spec['rows']} rows"
                    )
                epoch, b, plan = epoch + 1, 0, None
                continue
            if j % workers == worker:
                yield epoch, b, micro_step, self.make_batch(plan, b, micro_step)
            plan.release_before(b * self.spec["rows"] * self.spec["world_size"])
            b, micro_step, j = b + 1, micro_step + 1, j + 1


class PackedLoader:
    """Iterable of batch dicts for one rank, resumable through state_dict()/load_state_dict()."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        max_length: int,
        tokens_per_micro_batch: int,
        collator,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        global_batch_tokens: int | None = None,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool | None = None,
        shuffle: bool = True,
        packing: bool = True,
        num_epochs: int | None = None,
        crop: str | None = None,
        fixed_mask_step: int | None = None,
        chunk_docs: int = 1 << 17,
    ):
        rows = tokens_per_micro_batch // max_length
        if rows < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need tokens_per_micro_batch >= max_length and 0 <= rank < world_size; got "
                f"{tokens_per_micro_batch}, {max_length}, rank {rank}, world {world_size}"
            )
        per_step = rows * max_length * world_size
        if global_batch_tokens is not None and global_batch_tokens % per_step:
            raise ValueError(
                f"global_batch_tokens {global_batch_tokens} is not a multiple of "
                f"rows x max_length x world_size = {per_step}"
            )
        if crop not in (None, "random", "first"):
            raise ValueError(f"crop must be 'random' or 'first', got {crop!r}")
        if shards.num_docs == 0:
            raise ValueError(f"{shards.dir}: no proteins")
        self.shards, self.collator, self.num_workers = shards, collator, num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.grad_accum_steps = 1 if global_batch_tokens is None else global_batch_tokens // per_step
        self.rows_per_micro_batch = rows
        self.spec = dict(
            max_length=max_length,
            rows=rows,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=shuffle,
            packing=packing,
            num_epochs=num_epochs,
            drop_last=num_epochs is None,
            crop=crop or ("random" if shuffle else "first"),
            fixed_mask_step=fixed_mask_step,
            grad_accum_steps=self.grad_accum_steps,
            chunk_docs=chunk_docs,
        )
        self.epoch, self.batch, self.micro_step = 0, 0, 0

    def __iter__(self):
        stream = _BatchStream(self.shards, self.spec, self.collator, (self.epoch, self.batch, self.micro_step))
        if self.num_workers == 0 and not self.pin_memory:
            items = iter(stream)
        else:
            items = DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor if self.num_workers else None,
            )
        for epoch, b, micro_step, batch in items:
            self.epoch, self.batch, self.micro_step = epoch, b + 1, micro_step + 1
            yield batch
        if self.spec["num_epochs"] is not None:  # a finite loader starts over on the next iteration (repeat evals)
            self.epoch, self.batch, self.micro_step = 0, 0, 0

    def state_dict(self) -> dict:
        """Position after the last batch handed out, plus what must match on restore. All randomness is derived
        from (seed, epoch, counters), so this is the whole RNG state too."""
        s = self.spec
        return dict(
            version=STATE_VERSION,
            epoch=self.epoch,
            batch=self.batch,
            micro_step=self.micro_step,
            seed=s["seed"],
            rank=s["rank"],
            world_size=s["world_size"],
            max_length=s["max_length"],
            rows=s["rows"],
            shuffle=s["shuffle"],
            packing=s["packing"],
            num_docs=self.shards.num_docs,
            num_tokens=self.shards.num_tokens,
        )

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        keys = (
            "version",
            "seed",
            "rank",
            "world_size",
            "max_length",
            "rows",
            "shuffle",
            "packing",
            "num_docs",
            "num_tokens",
        )
        diff = {k: (state.get(k), mine[k]) for k in keys if state.get(k) != mine[k]}
        if diff:
            raise ValueError(f"loader state does not match this loader (saved, current): {diff}")
        self.epoch, self.batch, self.micro_step = int(state["epoch"]), int(state["batch"]), int(state["micro_step"])

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """This rank's batches in `epoch` (default: the current one); packs the whole epoch to count."""
        plan = _EpochPlan(self.spec, self.shards.lengths, self.epoch if epoch is None else epoch)
        plan.ensure(math.inf)
        per_round = self.spec["rows"] * self.spec["world_size"]
        return plan.total_rows // per_round if self.spec["drop_last"] else math.ceil(plan.total_rows / per_round)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def packing_stats(self, epoch: int = 0) -> dict:
        """Padding waste of one epoch's layout: 1 - real tokens / tokens in all rows (padded mode: per batch)."""
        plan = _EpochPlan(self.spec, self.shards.lengths, epoch)
        plan.ensure(math.inf)
        real = int(plan.tokens.sum())
        if self.spec["packing"]:
            slots = plan.total_rows * self.spec["max_length"]
        else:  # padded: every row of a micro-batch is as long as its longest protein
            t = plan.tokens[plan.order]
            R = self.spec["rows"]
            t = np.pad(t, (0, -len(t) % R)).reshape(-1, R)
            slots = int((t.max(1) * (t > 0).sum(1)).sum())
        cropped = int((self.shards.lengths + 2 > self.spec["max_length"]).sum())
        return dict(
            rows=plan.total_rows,
            proteins=len(plan.order),
            real_tokens=real,
            slot_tokens=slots,
            padding_waste=1 - real / slots,
            cropped_proteins=cropped,
        )


def build_loader(
    shard_dir,
    *,
    max_length: int = 1024,
    tokens_per_micro_batch: int,
    collator,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    verify: str = "sha256",
    **kw,
) -> PackedLoader:
    """Training loader: shuffled each epoch, random crops, endless (count epochs with loader.epoch)."""
    return PackedLoader(
        ShardSet(Path(shard_dir), verify=verify),
        max_length=max_length,
        tokens_per_micro_batch=tokens_per_micro_batch,
        collator=collator,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        **kw,
    )


def build_eval_loader(
    shard_dir,
    *,
    max_length: int = 1024,
    tokens_per_micro_batch: int,
    collator,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    packing: bool = True,
    num_workers: int = 0,
    verify: str = "sha256",
    **kw,
) -> PackedLoader:
    """Eval loader: one pass in stored order, first-window crops, masks fixed per batch index (step 0), so every
    evaluation of every model sees the same masked positions (for the same seed, world size, micro-batch tokens
    and packing mode: those decide which proteins share a batch)."""
    return PackedLoader(
        ShardSet(Path(shard_dir), verify=verify),
        max_length=max_length,
        tokens_per_micro_batch=tokens_per_micro_batch,
        collator=collator,
        rank=rank,
        world_size=world_size,
        seed=seed,
        packing=packing,
        num_workers=num_workers,
        shuffle=False,
        num_epochs=1,
        crop="first",
        fixed_mask_step=0,
        **kw,
    )
