"""Packed, resumable, multi-worker loader over token shards, in memory that does not grow with the corpus.

Public API
    pack_best_fit(lengths, capacity, max_open=1024) -> (order, row_offsets)
    LoaderOptions(tokens_per_micro_batch, max_length=1024, rank=0, world_size=1, seed=0, schedule=BatchSchedule(1),
                  shuffle=True, packing=True, num_epochs=None, crop=None, fixed_mask_step=None,
                  block_docs=4096, window_blocks=16)   # frozen, keyword-only: which batches (defaults: training)
        .spec() -> LoaderSpec: the checked, resolved layout (frozen dataclass; `loader.spec`)
    WorkerOptions(num_workers=0, prefetch_factor=4, pin_memory=None)   # how batches are built, never which
    PackedLoader(shards, collator, options, workers=WorkerOptions())
        iter(loader) -> batch dicts (see training.data.collator); state_dict() / load_state_dict(state) / restart()
        resharded(state) -> state: a position saved by another world size / rows per micro-batch, as this loader's
        set_optimizer_step(step): the optimizer step the next micro-batch belongs to (the mask-rate clock)
        last_mask_rate: the mask rate the last batch handed out was built with
        batches_per_epoch(epoch=None), packing_stats(epoch=0) -> dict, grad_accum_steps, rows_per_micro_batch
    build_loader(shard_dir, collator, options, *, workers=WorkerOptions(), verify="header") -> PackedLoader
        # training: shuffled, endless
    build_eval_loader(shard_dir, collator, options, *, workers=WorkerOptions(), verify="header") -> PackedLoader
        # one pass in stored order, first-window crops, fixed masks (EVAL_LAYOUT replaces those fields of options)

How an epoch is laid out (identically in every rank and worker, from (seed, epoch) alone)
    1. blocks: each shard's proteins in runs of `block_docs` (a shard's last run may be shorter); the epoch visits
       the blocks in a permutation from numpy default_rng([seed, epoch]) (stored order when shuffle=False);
    2. windows: consecutive groups of `window_blocks` blocks of that order. A window's proteins are permuted by
       default_rng([seed, epoch, window]) and packed into rows of max_length tokens by greedy best fit
       (packing=False: one protein per row, padded to the longest row of its batch); the rows of one window follow
       those of the previous one. So a batch mixes proteins of window_blocks random blocks spread over the corpus
       (65,536 proteins by default), the "shuffle block" of streaming loaders (MosaicML streaming's py1e, ...);
    3. proteins longer than max_length - 2 residues take a max_length - 2 window: a fresh random start per epoch
       (hash of seed, epoch, protein) for training, the first residues for eval (crop="first");
    4. global micro-batch g holds rows [g*R, (g+1)*R) with R = tokens_per_micro_batch // max_length; rank r takes
       g = b*world_size + r as its b-th batch, so ranks see disjoint rows. Training drops the last incomplete
       round of world_size micro-batches; a finite loader keeps it and gives a rank with nothing left a filler batch
       (one empty protein, no scored label) so every rank runs the same number of steps.
Memory: a process holds the manifest, a block table (a few bytes per block_docs proteins) and one or two windows
(ids, offsets, lengths, crc32s and the packing of window_blocks x block_docs proteins: ~2 MB); no array over all
proteins. Residues are read (os.pread) per protein when its batch is built, and checked against the protein's
crc32 (training.data.shards), so a start reads no residues and a corrupt protein is named with its file when read.
Workers: worker w of n builds the rank's batches j with j % n == w (counted from where iteration starts); the
DataLoader's round-robin returns them in order. Every worker packs every window (to number the rows).
Masks: the collator is called with step = the optimizer step of the micro-batch and micro = its index within that
step x world_size + rank, rank = 0 (eval: step = fixed_mask_step, micro = global batch index): the same rows get the
same masks for any number of ranks or workers. The step comes from the batch schedule (spec.accumulation, a
BatchSchedule: micro-batches per step, constant or growing during a batch warmup) applied to micro_step +
micro_offset; set_optimizer_step(step) sets the offset, so the clock is the trainer's optimizer step even when the
data position is not restored (train.resume_data_state=false).
State: {epoch, batch (next batch index within the epoch), micro_step, micro_offset, window and its first row (where
the rows of the last batch begin: a resume packs from there, not from the epoch's start), ...}; restoring it
resumes exactly. Another number of ranks continues at the same row of the epoch (resharded): same proteins, same
order.
"""

import itertools
import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch_schedule import BatchSchedule
from .collator import mix64
from .shards import ShardSet

STATE_VERSION = 3


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


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that decides which rows and masks a rank sees (see the module docstring)."""

    max_length: int  # tokens per row
    rows: int  # rows per micro-batch
    rank: int
    world_size: int
    seed: int
    shuffle: bool
    packing: bool
    num_epochs: int | None  # None: endless (training)
    drop_last: bool  # drop the last incomplete round of world_size micro-batches of an epoch
    crop: str  # "random" | "first"
    fixed_mask_step: int | None  # eval: masks keyed by (this step, batch index)
    accumulation: BatchSchedule  # micro-batches per optimizer step (training/data/batch_schedule.py)
    block_docs: int
    window_blocks: int

    @property
    def rows_per_round(self) -> int:
        return self.rows * self.world_size


# Two objects, as torchtitan's typed config splits a loader's settings: LoaderOptions decides WHICH batches a rank
# sees (the stream, its masks and its resume state depend on them alone), WorkerOptions only HOW they are produced
# (the same stream for any number of worker processes). LoaderOptions is what a caller writes; LoaderSpec is the
# checked layout derived from it (rows per micro-batch, accumulation schedule, crop mode), which the loader reads.
@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """Batch shape, split into ranks and accumulation steps, and epoch layout. The defaults are a training loader
    (shuffled, endless, random crops); build_eval_loader sets the eval layout (EVAL_LAYOUT)."""

    tokens_per_micro_batch: int  # rows per micro-batch = tokens_per_micro_batch // max_length
    max_length: int = 1024  # tokens per row
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    # micro-batches per optimizer step (accumulation, and its growth during a batch warmup): the trainer's own plan
    schedule: BatchSchedule = BatchSchedule(1)
    shuffle: bool = True
    packing: bool = True  # False: one protein per row, padded to the longest row of its batch
    num_epochs: int | None = None  # None: endless
    crop: str | None = None  # "random" | "first"; None: "random" if shuffle else "first"
    fixed_mask_step: int | None = None  # eval: masks keyed by (this step, batch index)
    block_docs: int = 4096
    window_blocks: int = 16

    def spec(self) -> LoaderSpec:
        """The checked layout; ValueError naming the option that cannot work."""
        rows = self.tokens_per_micro_batch // self.max_length
        if rows < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need tokens_per_micro_batch >= max_length and 0 <= rank < world_size; got "
                f"{self.tokens_per_micro_batch}, {self.max_length}, rank {self.rank}, world {self.world_size}"
            )
        if self.crop not in (None, "random", "first"):
            raise ValueError(f"crop must be 'random' or 'first', got {self.crop!r}")
        if self.block_docs < 1 or self.window_blocks < 1:
            raise ValueError(f"block_docs and window_blocks must be >= 1, got {self.block_docs}, {self.window_blocks}")
        return LoaderSpec(
            max_length=self.max_length,
            rows=rows,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shuffle=self.shuffle,
            packing=self.packing,
            num_epochs=self.num_epochs,
            drop_last=self.num_epochs is None,
            crop=self.crop or ("random" if self.shuffle else "first"),
            fixed_mask_step=self.fixed_mask_step,
            accumulation=self.schedule,
            block_docs=self.block_docs,
            window_blocks=self.window_blocks,
        )


# What makes a loader an eval loader: one pass in stored order, the first residues of long proteins, masks fixed
# per batch index, so every evaluation of every model sees the same masked positions.
EVAL_LAYOUT = dict(shuffle=False, num_epochs=1, crop="first", fixed_mask_step=0)


@dataclass(frozen=True)
class WorkerOptions:
    """How batches are produced: DataLoader worker processes (0: in this process), batches prefetched per worker,
    pinned memory (None: iff CUDA is available)."""

    num_workers: int = 0
    prefetch_factor: int = 4
    pin_memory: bool | None = None


class _Blocks:
    """The corpus as runs of block_docs proteins of one shard: (nb,) arrays, a few bytes per block."""

    def __init__(self, shards: ShardSet, block_docs: int):
        counts = [np.diff(np.minimum(np.arange(0, n + block_docs, block_docs), n)) for n in shards.shard_docs]
        counts = [c[c > 0] for c in counts]
        self.shard = np.concatenate([np.full(len(c), s, np.int32) for s, c in enumerate(counts)] or [[]])
        self.first = np.concatenate([np.arange(len(c)) * block_docs for c in counts] or [[]]).astype(np.int64)
        self.count = np.concatenate(counts or [[]]).astype(np.int64)  # proteins in each block
        self.base = self.first + np.asarray(shards.starts[:-1], np.int64)[self.shard]  # global id of the first
        self.shards = shards

    def __len__(self) -> int:
        return len(self.count)


@dataclass
class _Window:
    """One packed window: its proteins in row order and where each row starts."""

    index: int
    first_row: int  # global row number (within the epoch) of its first row
    ids: np.ndarray  # (k,) global protein ids, in row order
    shard: np.ndarray  # (k,) int32
    start: np.ndarray  # (k,) int64 residue offset within the shard
    length: np.ndarray  # (k,) int64 residues
    crc: np.ndarray  # (k,) int64 crc32 (-1: version-1 shard)
    row_offsets: np.ndarray  # (rows + 1,) row i holds proteins row_offsets[i]:row_offsets[i + 1]

    @property
    def end_row(self) -> int:
        return self.first_row + len(self.row_offsets) - 1


class _EpochPlan:
    """Rows of one epoch, packed window by window from a start window; windows behind the reader are released."""

    def __init__(self, spec: LoaderSpec, blocks: _Blocks, epoch: int, window: int = 0, first_row: int = 0):
        self.spec, self.blocks, self.epoch = spec, blocks, epoch
        nb = len(blocks)
        self.order = np.random.default_rng([spec.seed, epoch]).permutation(nb) if spec.shuffle else np.arange(nb)
        self.num_windows = math.ceil(nb / spec.window_blocks)
        self.next_window, self.total_rows = window, first_row
        self.windows: deque[_Window] = deque()

    @property
    def complete(self) -> bool:
        return self.next_window >= self.num_windows

    def ensure(self, rows: int) -> bool:
        """Pack windows until `rows` rows exist; False if the epoch has fewer."""
        while self.total_rows < rows and not self.complete:
            self.windows.append(self.pack(self.next_window))
            self.next_window += 1
            self.total_rows = self.windows[-1].end_row
        return self.total_rows >= rows

    def proteins(self, w: int) -> tuple[np.ndarray, ...]:
        """Window w's proteins in its shuffled order: (ids, shard, start, length, crc), each (k,)."""
        spec, blocks = self.spec, self.blocks
        chosen = self.order[w * spec.window_blocks : (w + 1) * spec.window_blocks]
        parts = []
        for b in chosen.tolist():
            s, count = int(blocks.shard[b]), int(blocks.count[b])
            offsets, crcs = blocks.shards.index(s, int(blocks.first[b]), count)
            ids = blocks.base[b] + np.arange(count)
            parts.append((ids, np.full(count, s, np.int32), offsets[:-1], np.diff(offsets), crcs))
        columns = [np.concatenate(c) for c in zip(*parts)]
        if spec.shuffle:
            perm = np.random.default_rng([spec.seed, self.epoch, w]).permutation(len(columns[0]))
            columns = [c[perm] for c in columns]
        return tuple(columns)

    def pack(self, w: int) -> _Window:
        ids, shard, start, length, crc = self.proteins(w)
        tokens = np.minimum(length + 2, self.spec.max_length)  # (k,) tokens each protein takes in a row
        if self.spec.packing:
            order, row_offsets = pack_best_fit(tokens, self.spec.max_length)
            ids, shard, start, length, crc = (c[order] for c in (ids, shard, start, length, crc))
        else:
            row_offsets = np.arange(len(ids) + 1)
        return _Window(w, self.total_rows, ids, shard, start, length, crc, row_offsets)

    def window_of(self, row: int) -> _Window:
        firsts = [w.first_row for w in self.windows]
        return self.windows[bisect_right(firsts, row) - 1]

    def rows(self, start: int, stop: int) -> list[list[tuple[int, int, int, int, int]]]:
        """Rows [start, stop) (they must exist): each a list of (shard, start, length, crc, id) per protein."""
        out = []
        for r in range(start, stop):
            win = self.window_of(r)
            a, b = win.row_offsets[r - win.first_row : r - win.first_row + 2].tolist()
            columns = (win.shard[a:b], win.start[a:b], win.length[a:b], win.crc[a:b], win.ids[a:b])
            out.append(list(zip(*(c.tolist() for c in columns))))
        return out

    def release_before(self, row: int) -> None:
        while len(self.windows) > 1 and self.windows[1].first_row <= row:
            self.windows.popleft()


class _BatchStream(IterableDataset):
    """Yields (epoch, batch, micro_step, window, window_row, mask_rate, batch dict) for one rank from a start
    position; see the module docstring."""

    def __init__(self, blocks: _Blocks, spec: LoaderSpec, collator, start: tuple, micro_offset: int):
        self.blocks, self.spec, self.collator, self.start = blocks, spec, collator, start
        self.micro_offset = micro_offset

    def batch_exists(self, plan: _EpochPlan, b: int) -> bool:
        per_round = self.spec.rows_per_round
        return plan.ensure((b + 1) * per_round) if self.spec.drop_last else plan.ensure(b * per_round + 1)

    def make_batch(self, plan: _EpochPlan, b: int, micro_step: int) -> tuple:
        s = self.spec
        g = b * s.world_size + s.rank
        plan.ensure((g + 1) * s.rows)
        first, last = g * s.rows, min((g + 1) * s.rows, plan.total_rows)
        rows = [[self.crop(plan.epoch, *protein) for protein in row] for row in plan.rows(first, last)]
        if not rows:  # finite loader, this rank has run out: filler with nothing to score
            rows = [[np.zeros(0, dtype=np.uint8)]]
        if s.fixed_mask_step is not None:
            step, micro = s.fixed_mask_step, b
        else:
            step, micro = s.accumulation.locate(micro_step + self.micro_offset)
        # Masks are keyed by the micro-batch's global slot (micro x world + rank, with rank 0 in the key): the same
        # rows get the same masks whatever the split into ranks and accumulation steps, so N ranks reproduce 1.
        slot = micro * s.world_size + s.rank
        length = s.max_length if s.packing else None
        batch = self.collator(rows, length=length, step=step, micro=slot)
        win = plan.window_of(min(first, plan.total_rows - 1))
        return win.index, win.first_row, self.collator.rate(step), batch

    def crop(self, epoch: int, shard: int, start: int, n: int, crc: int, d: int) -> np.ndarray:
        tokens = self.blocks.shards.read(shard, start, start + n, crc)
        window = self.spec.max_length - 2
        if n <= window:
            return tokens
        offset = 0 if self.spec.crop == "first" else mix64(self.spec.seed, epoch, d) % (n - window + 1)
        return tokens[offset : offset + window]

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, b, micro_step, window, window_row = self.start
        plan, j = None, 0
        while self.spec.num_epochs is None or epoch < self.spec.num_epochs:
            if plan is None:
                plan = _EpochPlan(self.spec, self.blocks, epoch, window, window_row)
            if not self.batch_exists(plan, b):
                if b == 0:  # an empty epoch would loop forever
                    raise ValueError(
                        f"{self.blocks.shards.dir}: too little data for one round of "
                        f"{self.spec.world_size} x {self.spec.rows} rows"
                    )
                epoch, b, window, window_row, plan = epoch + 1, 0, 0, 0, None
                continue
            if j % workers == worker:
                yield epoch, b, micro_step, *self.make_batch(plan, b, micro_step)
            plan.release_before(b * self.spec.rows_per_round)
            b, micro_step, j = b + 1, micro_step + 1, j + 1


_MATCH_KEYS = ("version", "seed", "rank", "world_size", "max_length", "rows", "shuffle", "packing", "block_docs")
_MATCH_KEYS += ("window_blocks", "num_docs", "num_tokens")


class PackedLoader:
    """Iterable of batch dicts for one rank, resumable through state_dict()/load_state_dict()."""

    def __init__(self, shards: ShardSet, collator, options: LoaderOptions, workers: WorkerOptions = WorkerOptions()):
        self.spec = options.spec()
        if shards.num_docs == 0:
            raise ValueError(f"{shards.dir}: no proteins")
        self.shards, self.collator, self.workers = shards, collator, workers
        self.pin_memory = torch.cuda.is_available() if workers.pin_memory is None else workers.pin_memory
        self.grad_accum_steps = self.spec.accumulation.full
        self.rows_per_micro_batch = self.spec.rows
        self.blocks = _Blocks(shards, self.spec.block_docs)
        self._rows_in_epoch: dict[int, int] = {}
        self.micro_offset = 0  # micro-batches of the optimizer-step clock before this loader's micro-step 0
        self.last_mask_rate: float | None = None
        self.restart()

    def restart(self) -> None:
        """Back to the first batch of epoch 0 (a finite loader does this by itself after its last batch)."""
        self.epoch, self.batch, self.micro_step, self.window, self.window_row = 0, 0, 0, 0, 0

    def set_optimizer_step(self, step: int) -> None:
        """The next micro-batch belongs to optimizer step `step` (call it after a resume, whether or not the data
        position was restored): the mask-rate schedule then follows the trainer's step, not this loader's count."""
        self.micro_offset = self.spec.accumulation.first_micro(step) - self.micro_step

    def __iter__(self):
        start = (self.epoch, self.batch, self.micro_step, self.window, self.window_row)
        stream = _BatchStream(self.blocks, self.spec, self.collator, start, self.micro_offset)
        workers = self.workers.num_workers
        if workers == 0 and not self.pin_memory:
            items = iter(stream)
        else:
            items = DataLoader(
                stream,
                batch_size=None,
                num_workers=workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.workers.prefetch_factor if workers else None,
            )
        for epoch, b, micro_step, window, window_row, rate, batch in items:
            self.epoch, self.batch, self.micro_step = epoch, b + 1, micro_step + 1
            self.window, self.window_row, self.last_mask_rate = window, window_row, rate
            yield batch
        if self.spec.num_epochs is not None:  # a finite loader starts over on the next iteration (repeat evals)
            self.restart()

    def state_dict(self) -> dict:
        """Position after the last batch handed out, plus what must match on restore. All randomness is derived
        from (seed, epoch, counters), so this is the whole RNG state too."""
        s = self.spec
        return dict(
            version=STATE_VERSION,
            epoch=self.epoch,
            batch=self.batch,
            micro_step=self.micro_step,
            micro_offset=self.micro_offset,
            window=self.window,
            window_row=self.window_row,
            seed=s.seed,
            rank=s.rank,
            world_size=s.world_size,
            max_length=s.max_length,
            rows=s.rows,
            shuffle=s.shuffle,
            packing=s.packing,
            block_docs=s.block_docs,
            window_blocks=s.window_blocks,
            num_docs=self.shards.num_docs,
            num_tokens=self.shards.num_tokens,
        )

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = {k: (state.get(k), mine[k]) for k in _MATCH_KEYS if state.get(k) != mine[k]}
        if diff:
            raise ValueError(f"loader state does not match this loader (saved, current): {diff}")
        for key in ("epoch", "batch", "micro_step", "micro_offset", "window", "window_row"):
            setattr(self, key, int(state[key]))

    def resharded(self, state: dict) -> dict:
        """Rank 0's state saved by another topology (world size, rows per micro-batch) as this loader's state.

        An epoch's rows are laid out from (seed, epoch) alone, whatever the topology (module docstring), and every
        rank of a round is at the same batch index: the saved position is row batch x world x rows of the epoch, the
        first row no rank has taken. This loader continues at that row, so the rest of the epoch's proteins come in
        the same order, each once. Exact: the proteins and their order. Not kept: the masks when the rows per
        micro-batch change (they are drawn per micro-batch slot), and the end of the epoch (each topology drops its
        own last incomplete round). The mask-rate clock is set by set_optimizer_step afterwards. ValueError when
        the layout differs (seed, max_length, packing, corpus, ...) or the row is not the start of one of this
        loader's rounds."""
        mine = self.state_dict()
        layout = [k for k in _MATCH_KEYS if k not in ("rank", "world_size", "rows")]
        diff = {k: (state.get(k), mine[k]) for k in layout if state.get(k) != mine[k]}
        if diff:
            raise ValueError(f"the saved data position is of another data layout (saved, current): {diff}")
        row, per_round = int(state["batch"]) * int(state["world_size"]) * int(state["rows"]), self.spec.rows_per_round
        if row % per_round:
            raise ValueError(
                f"the saved data position, row {row} of epoch {state['epoch']} ({state['world_size']} rank(s) x "
                f"{state['rows']} rows per micro-batch), is not the start of a round of {self.spec.world_size} rank(s) "
                f"x {self.spec.rows} rows: resume on a topology whose rows per round divide {row}, or without the data "
                f"position (train.resume_data_state=false)"
            )
        kept = {k: int(state[k]) for k in ("epoch", "window", "window_row")}  # the window of rank 0's last rows
        return {**mine, **kept, "batch": row // per_round, "micro_step": 0, "micro_offset": 0}

    def _epoch_windows(self, epoch: int):
        """Every packed window of `epoch` in order (O(window) memory: each is dropped once the next is packed)."""
        plan = _EpochPlan(self.spec, self.blocks, epoch)
        for w in range(plan.num_windows):
            win = plan.pack(w)
            plan.total_rows = win.end_row
            yield win

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """This rank's batches in `epoch` (default: the current one); packs the whole epoch once to count."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._rows_in_epoch:
            self._rows_in_epoch[epoch] = sum(len(w.row_offsets) - 1 for w in self._epoch_windows(epoch))
        rows, per_round = self._rows_in_epoch[epoch], self.spec.rows_per_round
        return rows // per_round if self.spec.drop_last else math.ceil(rows / per_round)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def packing_stats(self, epoch: int = 0) -> dict:
        """Padding waste of one epoch's layout: 1 - real tokens / tokens in all rows (padded mode: per batch)."""
        L, R = self.spec.max_length, self.spec.rows
        rows = proteins = real = slots = cropped = 0
        pending = np.zeros(0, np.int64)  # padded mode: tokens of rows not yet grouped into a batch of R rows
        for win in self._epoch_windows(epoch):
            tokens = np.minimum(win.length + 2, L)
            rows += len(win.row_offsets) - 1
            proteins += len(tokens)
            real += int(tokens.sum())
            cropped += int((win.length + 2 > L).sum())
            if self.spec.packing:
                slots += (len(win.row_offsets) - 1) * L
            else:  # every row of a micro-batch is as long as its longest protein
                pending = np.concatenate([pending, tokens])
                full = len(pending) // R * R
                slots += int(pending[:full].reshape(-1, R).max(1).sum()) * R
                pending = pending[full:]
        if len(pending):
            slots += int(pending.max()) * len(pending)
        return dict(
            rows=rows,
            proteins=proteins,
            real_tokens=real,
            slot_tokens=slots,
            padding_waste=1 - real / slots,
            cropped_proteins=cropped,
        )


def build_loader(
    shard_dir, collator, options: LoaderOptions, *, workers: WorkerOptions = WorkerOptions(), verify: str = "header"
) -> PackedLoader:
    """Training loader: shuffled each epoch, random crops, endless (count epochs with loader.epoch)."""
    return PackedLoader(ShardSet(Path(shard_dir), verify=verify), collator, options, workers)


def build_eval_loader(
    shard_dir, collator, options: LoaderOptions, *, workers: WorkerOptions = WorkerOptions(), verify: str = "header"
) -> PackedLoader:
    """Eval loader: `options` with EVAL_LAYOUT (one pass in stored order, first-window crops, masks fixed per batch
    index, step 0), so every evaluation of every model sees the same masked positions (for the same seed, world
    size, micro-batch tokens and packing mode: those decide which proteins share a batch)."""
    eval_options = replace(options, **EVAL_LAYOUT)
    return PackedLoader(ShardSet(Path(shard_dir), verify=verify), collator, eval_options, workers)
