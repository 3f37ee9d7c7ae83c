"""Packed loader: packing, rank/epoch layout, exact resume with workers (training/data/loader.py)."""

import csv
import functools
from dataclasses import replace

import numpy as np
import pytest
import torch

from training.data.batch_schedule import BatchSchedule
from training.data.collator import MLMCollator
from training.data.loader import LoaderOptions, WorkerOptions, build_eval_loader, build_loader, pack_best_fit
from training.data.prepare import PrepareOptions, prepare, prepare_builtin
from training.data.shards import ShardSet
from training.data.sources import builtin_dir
from training.data.validate import CLS, EOS, ValidationPolicy

N_PROTEINS, MAX_LEN, ROWS = 180, 128, 2  # 180 real proteins -> 44 batches per rank and epoch at world size 2


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """The first 180 records of the aaanalysis SEQ_LOCATION benchmark: an alphabet-reduced encoding of UniProt
    proteins (14 letters), not proteins, so prepared with the composition check off; the loader only needs their
    lengths, which are the real proteins' lengths."""
    d = tmp_path_factory.mktemp("small")
    with open(builtin_dir() / "SEQ_LOCATION.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:N_PROTEINS]
    with open(d / "proteins.tsv", "w", encoding="utf-8") as f:
        f.write("entry\tsequence\n" + "".join(f"{r['entry']}\t{r['sequence']}\n" for r in rows))
    options = PrepareOptions(policy=ValidationPolicy(composition_check=False))
    prepare([str(d / "proteins.tsv")], d / "shards", options, log=lambda *a: None)
    return d / "shards"


def loader(shards, rank=0, workers=0, **kw):
    options = LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=ROWS * MAX_LEN, rank=rank, world_size=2, seed=7)
    return build_loader(shards, MLMCollator(seed=3), replace(options, **kw), workers=WorkerOptions(num_workers=workers))


def take(it, n):
    return [next(it) for _ in range(n)]


def proteins_of(batch) -> list[tuple]:
    """Each protein of a batch as its original token tuple (masked positions restored from the labels)."""
    ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    out = []
    for r in range(ids.shape[0]):
        doc = batch["document_ids"][r]
        for k in range(int(doc.max()) + 1):
            out.append(tuple(ids[r][doc == k].tolist()))
    return out


def test_pack_best_fit_places_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 1025, size=5000)
    order, offsets = pack_best_fit(lengths, 1024)
    assert sorted(order.tolist()) == list(range(5000))
    fill = np.add.reduceat(lengths[order], offsets[:-1])
    assert fill.max() <= 1024
    assert 1 - lengths.sum() / (1024 * len(fill)) < 0.03
    with pytest.raises(ValueError):
        pack_best_fit([1025], 1024)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_gives_identical_batches_across_epoch_boundary(small_shards, workers):
    for rank in (0, 1):
        first = loader(small_shards, rank, workers)
        assert first.batches_per_epoch() == 44  # so batches 40..47 cross into epoch 1
        it = iter(first)
        take(it, 40)
        state = first.state_dict()
        expected = take(it, 8)
        assert first.epoch == 1 and state["epoch"] == 0 and state["batch"] == 40
        resumed = loader(small_shards, rank, workers)
        resumed.load_state_dict(state)
        got = take(iter(resumed), 8)
        for a, b in zip(expected, got):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (rank, workers, key)


def test_workers_do_not_change_the_stream(small_shards):
    a = take(iter(loader(small_shards, 1, 0)), 6)
    b = take(iter(loader(small_shards, 1, 2)), 6)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_ranks_get_disjoint_proteins_and_epochs_reshuffle(small_shards):
    seen = []
    for rank in (0, 1):
        ld = loader(small_shards, rank)
        seen.append([p for batch in take(iter(ld), ld.batches_per_epoch()) for p in proteins_of(batch)])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == len(seen[0])  # each protein at most once per epoch
    assert len(seen[0]) + len(seen[1]) >= 0.95 * N_PROTEINS  # only the incomplete last round is dropped
    ld = loader(small_shards, 0)
    it = iter(ld)
    e0 = take(it, ld.batches_per_epoch())
    e1 = take(it, 3)
    assert not torch.equal(e0[0]["input_ids"], e1[0]["input_ids"])  # new order (and crops) each epoch


def test_rows_are_full_packed_sequences(small_shards):
    batch = next(iter(loader(small_shards)))
    assert batch["input_ids"].shape == (ROWS, MAX_LEN)
    ids, pos, doc = batch["input_ids"], batch["position_ids"], batch["document_ids"]
    starts = (pos == 0) & (doc >= 0)
    assert (ids[starts] == CLS).all() and (ids[(pos > 0) & (doc >= 0)] != CLS).all()  # position 0 <=> <cls>
    assert batch["attention_mask"].sum() > 0.9 * ROWS * MAX_LEN
    for r in range(ROWS):
        real = doc[r] >= 0
        assert (ids[r][real] != 1).all() and (ids[r][~real] == 1).all()
        ends = (doc[r][1:] != doc[r][:-1]) & real[:-1]
        assert (ids[r][:-1][ends] == EOS).all()  # every protein, cropped or not, ends with <eos>


def test_eval_loader_is_finite_repeatable_and_covers_everything(small_shards):
    collator = MLMCollator(mask_rate=0.15, seed=1)
    covered = []
    for rank in (0, 1):
        options = LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=ROWS * MAX_LEN, rank=rank, world_size=2)
        ev = build_eval_loader(small_shards, collator, options)
        first, second = list(ev), list(ev)
        assert len(first) == len(second) == len(ev)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)  # identical masks
        covered += [p for batch in first for p in proteins_of(batch) if len(p) > 2]
    assert len(covered) == N_PROTEINS == len(set(covered))


def test_padded_mode_one_protein_per_row(small_shards):
    options = LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=4 * MAX_LEN, packing=False)
    ev = build_eval_loader(small_shards, MLMCollator(mask_rate=0.15), options)
    batch = next(iter(ev))
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape == (4, longest) and longest <= MAX_LEN
    assert set(batch["document_ids"].unique().tolist()) <= {-1, 0}
    assert ev.packing_stats()["padding_waste"] > 0


def test_batch_schedule_sets_grad_accumulation(small_shards):
    ld = loader(small_shards, schedule=BatchSchedule(4))
    assert ld.grad_accum_steps == 4
    state = ld.state_dict()
    other_seed = LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=ROWS * MAX_LEN, world_size=2, seed=8)
    with pytest.raises(ValueError, match="seed"):
        build_loader(small_shards, MLMCollator(), other_seed).load_state_dict(state)


def test_builtin_padding_waste_under_two_percent(tmp_path):
    prepare_builtin(tmp_path, log=lambda *a: None)
    ld = build_loader(
        tmp_path / "train", MLMCollator(), LoaderOptions(max_length=1024, tokens_per_micro_batch=8 * 1024)
    )
    stats = ld.packing_stats()
    assert stats["padding_waste"] < 0.02 and stats["cropped_proteins"] > 0


def test_too_little_data_for_one_round_is_an_error(small_shards):
    options = LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=100 * MAX_LEN, world_size=2)
    ld = build_loader(small_shards, MLMCollator(), options)
    with pytest.raises(ValueError, match="too little data"):
        next(iter(ld))


# Several blocks and windows per epoch: 180 proteins in blocks of 16 -> 12 blocks -> 6 windows of 2 blocks.
WINDOWED = dict(block_docs=16, window_blocks=2)


def stream_equal(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


@functools.cache
def stored_docs(shards_dir) -> list[bytes]:
    shards = ShardSet(shards_dir)
    return [shards.doc(i).tobytes() for i in range(shards.num_docs)]


def block_of(shards_dir, protein: tuple) -> int:
    """Block (16 proteins of the stored order) of a protein as a batch holds it (<cls> + residues + <eos>, maybe a
    cropped window of its residues)."""
    return next(i for i, d in enumerate(stored_docs(shards_dir)) if bytes(protein[1:-1]) in d) // 16


@pytest.mark.parametrize("workers, points", [(0, range(0, 70)), (2, (0, 5, 21, 43, 44, 51))])
def test_resume_anywhere_in_windows_and_across_epochs(small_shards, workers, points):
    """Resume at every batch (no workers) or mid-window, at a window edge and at the epoch edge (2 workers)."""
    reference = loader(small_shards, 1, 0, **WINDOWED)
    per_epoch = reference.batches_per_epoch()
    assert 40 < per_epoch < 50  # so the points above cross into epoch 1
    it, states, batches = iter(reference), [], []
    for _ in range(max(points) + 3):
        states.append(reference.state_dict())
        batches.append(next(it))
    assert len({s["window"] for s in states[:per_epoch]}) == 6  # the resume point moves window by window
    for k in points:
        resumed = loader(small_shards, 1, workers, **WINDOWED)
        resumed.load_state_dict(states[k])
        assert stream_equal(take(iter(resumed), 3), batches[k : k + 3]), (workers, k)


def test_windows_mix_blocks_ranks_stay_disjoint_and_nothing_spans_the_corpus(small_shards):
    seen, blocks_per_batch = [], []
    for rank in (0, 1):
        ld = loader(small_shards, rank, **WINDOWED)
        batches = take(iter(ld), ld.batches_per_epoch())
        seen.append([p for batch in batches for p in proteins_of(batch)])
        blocks_per_batch += [len({block_of(small_shards, p) for p in proteins_of(b)}) for b in batches[:4]]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0])
    assert len(seen[0]) + len(seen[1]) >= 0.95 * N_PROTEINS
    assert max(blocks_per_batch) >= 2  # a batch mixes the blocks of its window
    ld = loader(small_shards, 0, **WINDOWED)
    next(iter(ld))
    arrays = [v for obj in (ld, ld.blocks, ld.shards) for v in vars(obj).values() if isinstance(v, np.ndarray)]
    assert arrays and max(a.size for a in arrays) < N_PROTEINS  # block tables only: no array over every protein


def test_ranks_and_accumulation_split_the_same_batches_and_masks(small_shards):
    """1 rank x 4 micro-batches per step, 2 ranks x 2 and 4 ranks x 1 see the same rows with the same masks."""
    options = LoaderOptions(
        max_length=MAX_LEN, tokens_per_micro_batch=ROWS * MAX_LEN, seed=7, schedule=BatchSchedule(4)
    )
    options = replace(options, **WINDOWED)
    collator = MLMCollator(seed=3)
    one = take(iter(build_loader(small_shards, collator, options)), 8)
    for world in (2, 4):
        ranks = [
            take(
                iter(
                    build_loader(
                        small_shards,
                        collator,
                        replace(options, rank=r, world_size=world, schedule=BatchSchedule(4 // world)),
                    )
                ),
                8 // world,
            )
            for r in range(world)
        ]
        interleaved = [ranks[g % world][g // world] for g in range(8)]
        assert stream_equal(interleaved, one), world


def test_mask_rate_follows_the_optimizer_step(small_shards):
    from training.data.collator import MaskRateSchedule

    schedule = MaskRateSchedule(0.05, 0.4, steps=100)
    options = LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=8 * MAX_LEN, seed=7, schedule=BatchSchedule(2))

    def make():
        return build_loader(small_shards, MLMCollator(mask_rate=schedule, seed=3), options)

    def observed(batch) -> float:  # scored / maskable residues
        return float((batch["labels"] != -100).sum() / ((batch["input_ids"] >= 4) | (batch["labels"] != -100)).sum())

    a = make()
    it = iter(a)
    take(it, 4)  # 2 optimizer steps of 2 micro-batches
    state = a.state_dict()
    continued = take(it, 2)
    assert a.last_mask_rate == schedule(2)
    restored = make()  # train.resume_data_state=true: position and clock restored
    restored.load_state_dict(state)
    restored.set_optimizer_step(2)
    assert stream_equal(take(iter(restored), 2), continued)
    fresh = make()  # train.resume_data_state=false at step 90: the data starts over, the schedule does not
    fresh.set_optimizer_step(90)
    first = next(iter(fresh))
    assert fresh.last_mask_rate == schedule(90) == pytest.approx(0.365)
    assert observed(first) == pytest.approx(0.365, abs=0.03)
    assert observed(next(iter(make()))) == pytest.approx(0.05, abs=0.02)  # the same rows at step 0


def test_a_start_reads_no_residues_and_a_flipped_byte_is_named_when_read(tmp_path, small_shards):
    import os
    import shutil

    from training.data.shards import ShardError, ShardWriter

    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 200, size=100_000)
    writer = ShardWriter(tmp_path / "big", shard_tokens=4 << 20)  # ~12 MB in 3 shards
    writer.add(rng.integers(4, 24, size=int(lengths.sum()), dtype=np.uint8), lengths)
    writer.close()
    corpus = sum(f.stat().st_size for f in (tmp_path / "big").glob("shard-*.bin"))

    def rchar() -> int:
        return int(next(line for line in open(f"/proc/{os.getpid()}/io") if line.startswith("rchar")).split()[1])

    before = rchar()
    options = LoaderOptions(max_length=512, tokens_per_micro_batch=8 * 512, block_docs=1024, window_blocks=4)
    next(iter(build_loader(tmp_path / "big", MLMCollator(), options)))
    assert rchar() - before < 0.01 * corpus  # header checks + one window's index + one batch, not the corpus

    shutil.copytree(small_shards, tmp_path / "flipped")
    shard = tmp_path / "flipped" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[64 + 1000] ^= 0x01  # one residue byte, somewhere in the middle of the corpus
    shard.write_bytes(bytes(data))
    options = LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=ROWS * MAX_LEN, **WINDOWED)
    for workers in (0, 2):
        # the start checks headers and sizes
        ld = build_loader(tmp_path / "flipped", MLMCollator(), options, workers=WorkerOptions(num_workers=workers))
        with pytest.raises(ShardError, match=f"{shard}: residues .* fail their crc32"):
            take(iter(ld), ld.batches_per_epoch())  # every protein once


def test_mask_clock_is_the_optimizer_step_during_a_batch_warmup(small_shards):
    """With a batch warmup a step takes 1, 2, 3, 4, 4, ... micro-batches; every micro-batch is masked at the rate
    of the optimizer step it belongs to, also after set_optimizer_step (resume_data_state=false) inside or after the
    warmup, and the schedule's locate() inverts first_micro()."""
    from training.data.batch_schedule import BatchSchedule
    from training.data.collator import MaskRateSchedule

    plan = BatchSchedule(4, warmup_steps=3, start=0.25)
    assert [plan.at(s) for s in range(6)] == [1, 2, 3, 4, 4, 4]
    for step in range(12):
        for index in range(plan.at(step)):
            assert plan.locate(plan.first_micro(step) + index) == (step, index)
    rate = MaskRateSchedule(0.05, 0.4, steps=20)
    options = LoaderOptions(
        max_length=MAX_LEN,
        tokens_per_micro_batch=4 * MAX_LEN,
        seed=7,
        schedule=BatchSchedule(4, 3, 0.25),
    )

    def rates(loader, steps: int, first_step: int = 0) -> list:
        it, seen = iter(loader), []
        for step in range(first_step, first_step + steps):
            seen.append([(next(it), loader.last_mask_rate)[1] for _ in range(plan.at(step))])
        return seen

    warm = build_loader(small_shards, MLMCollator(mask_rate=rate, seed=3), options)
    assert rates(warm, 6) == [[rate(s)] * plan.at(s) for s in range(6)]
    for start in (2, 9):  # a fresh data position at an optimizer step inside, then after, the warmup
        fresh = build_loader(small_shards, MLMCollator(mask_rate=rate, seed=3), options)
        fresh.set_optimizer_step(start)
        assert rates(fresh, 3, start) == [[rate(s)] * plan.at(s) for s in range(start, start + 3)]


@pytest.mark.parametrize("after_world, after_rows", [(1, 4), (4, 1), (1, 2), (4, 2)])
def test_resharded_position_continues_the_epoch_without_repeats_or_gaps(small_shards, after_world, after_rows):
    """2 ranks x 2 rows stop at batch 12 of the epoch (row 48); the position resharded for another world size and
    rows per micro-batch continues at row 48: the proteins before plus after are the uninterrupted 2-rank epoch's,
    each once."""
    options = replace(LoaderOptions(max_length=MAX_LEN, tokens_per_micro_batch=ROWS * MAX_LEN, seed=7), **WINDOWED)
    collator = MLMCollator(seed=3)  # proteins_of restores the masked residues from the labels
    before = [build_loader(small_shards, collator, replace(options, rank=r, world_size=2)) for r in (0, 1)]
    per_epoch = before[0].batches_per_epoch()  # 2-rank rounds of 4 rows
    seen = [p for ld in before for p in proteins_of_rest(ld, 12)]
    state = before[0].state_dict()  # at batch 12: row 12 x 2 x 2 = 48
    uninterrupted = seen + [p for ld in before for p in proteins_of_rest(ld, per_epoch - 12)]
    tokens = after_rows * MAX_LEN
    after = [
        build_loader(
            small_shards, collator, replace(options, rank=r, world_size=after_world, tokens_per_micro_batch=tokens)
        )
        for r in range(after_world)
    ]
    for ld in after:
        ld.load_state_dict(ld.resharded(state))
    rounds_left = (per_epoch * 2 * ROWS - 48) // (after_world * after_rows)  # the same rows, in this topology's rounds
    rest = [p for ld in after for p in proteins_of_rest(ld, rounds_left)]
    assert after[0].epoch == 0 and len(set(seen + rest)) == len(seen + rest)  # no protein twice in the epoch
    assert sorted(seen + rest) == sorted(uninterrupted)  # and none skipped


def proteins_of_rest(ld, batches: int) -> list[tuple]:
    return [p for batch in take(iter(ld), batches) for p in proteins_of(batch)]


def test_resharding_refuses_a_position_inside_a_round_or_another_layout(small_shards):
    ld = loader(small_shards, 0)  # 2 ranks x 2 rows: rounds of 4 rows
    it = iter(ld)
    take(it, 3)
    state = ld.state_dict()  # row 12
    eight = loader(small_shards, 0, world_size=4)  # rounds of 8 rows: row 12 is inside one
    with pytest.raises(ValueError, match="row 12 of epoch 0 .* is not the start of a round of 4 rank"):
        eight.resharded(state)
    with pytest.raises(ValueError, match="another data layout.*seed"):
        loader(small_shards, 0, world_size=1, seed=8).resharded(state)
    resumed = loader(small_shards, 0, world_size=1)
    resumed.load_state_dict(resumed.resharded(state))
    assert resumed.batch == 6  # 12 rows / 2 rows per round
