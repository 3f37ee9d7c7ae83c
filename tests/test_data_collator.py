"""MLM collator: masking rules, rate, schedule in workers, determinism, batch form (training/data/collator.py)."""

import csv

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from training.data.collator import EVAL_MASK_RATE, MaskRateSchedule, MLMCollator
from training.data.sources import builtin_dir
from training.data.validate import CLS, EOS, FIRST_RESIDUE, LAST_STANDARD, MASK, PAD, encode

UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"  # P0CG48


def real_proteins(name: str, n: int) -> list[str]:
    with open(builtin_dir() / name, encoding="utf-8") as f:
        return [r["sequence"] for r in list(csv.DictReader(f, delimiter="\t"))[:n]]


@pytest.fixture(scope="module")
def rows_1024():
    """~120k residues of real proteins (SEQ_SOLUBLE), first-fit packed into rows of 1024 tokens."""
    docs = [encode(s)[:1022] for s in real_proteins("SEQ_SOLUBLE.tsv", 500)]
    rows, used = [[]], 0
    for d in docs:
        if used + len(d) + 2 > 1024:
            rows, used = rows + [[]], 0
        rows[-1].append(d)
        used += len(d) + 2
    return rows


def batches(collator, rows, per_batch=8):
    for step, i in enumerate(range(0, len(rows), per_batch)):
        yield collator(rows[i : i + per_batch], length=1024, step=step)


@pytest.mark.parametrize("rate", [0.2, EVAL_MASK_RATE])
def test_observed_rate_within_one_percent_of_target(rows_1024, rate):
    scored = residues = 0
    for b in batches(MLMCollator(mask_rate=rate), rows_1024):
        scored += int((b["labels"] != -100).sum())
        residues += int(((b["labels"] != -100) | ((b["input_ids"] >= 4) & (b["input_ids"] <= 30))).sum())
    assert residues > 100_000
    assert abs(scored / residues - rate) < 0.01 * rate


def test_special_tokens_and_padding_never_masked(rows_1024):
    for b in batches(MLMCollator(mask_rate=0.5), rows_1024[:16]):
        scored = b["labels"] != -100
        special_pos = (b["position_ids"] == 0) | (b["document_ids"] < 0)
        assert not scored[special_pos].any()
        assert ((b["labels"][scored] >= FIRST_RESIDUE) & (b["labels"][scored] <= 30)).all()
        original = torch.where(scored, b["labels"], b["input_ids"])
        assert not scored[(original == CLS) | (original == EOS) | (original == PAD)].any()
        assert (b["input_ids"][b["document_ids"] < 0] == PAD).all()


def test_every_protein_gets_a_mask_even_short_peptides():
    peptides = [encode(s) for s in real_proteins("SEQ_AMYLO.tsv", 200)]  # 6-residue amyloid peptides
    rows = [peptides[i : i + 100] for i in range(0, 200, 100)]
    b = MLMCollator(mask_rate=0.01)(rows, length=1024)
    scored = b["labels"] != -100
    for r in range(2):
        docs = b["document_ids"][r]
        assert all(scored[r][docs == k].any() for k in range(100))


def test_replacement_mix_and_random_ids_are_standard_residues(rows_1024):
    counts = dict(mask=0, random_or_kept=0, changed=0)
    for b in batches(MLMCollator(), rows_1024):
        scored = b["labels"] != -100
        inp = b["input_ids"][scored]
        counts["mask"] += int((inp == MASK).sum())
        other = inp[inp != MASK]
        assert ((other >= FIRST_RESIDUE) & (other <= 30)).all()  # never a special token
        counts["random_or_kept"] += other.numel()
        counts["changed"] += int((other != b["labels"][scored][inp != MASK]).sum())
        replaced = (b["input_ids"] != b["labels"]) & scored & (b["input_ids"] != MASK)
        assert ((b["input_ids"][replaced] >= FIRST_RESIDUE) & (b["input_ids"][replaced] <= LAST_STANDARD)).all()
    total = counts["mask"] + counts["random_or_kept"]
    assert abs(counts["mask"] / total - 0.8) < 0.01
    assert abs(counts["changed"] / total - 0.1 * 19 / 20) < 0.01  # random residue may equal the original
    b = MLMCollator(replace="mask")([[encode(UBIQUITIN)]], length=128)
    assert (b["input_ids"][b["labels"] != -100] == MASK).all()


def test_deterministic_from_seed_step_micro():
    rows = [[encode(UBIQUITIN), encode(UBIQUITIN[::-1])]]
    c = MLMCollator(seed=5)
    same = [c(rows, length=256, step=3, micro=2) for _ in range(2)]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    for kw in (dict(step=4, micro=2), dict(step=3, micro=0)):
        assert not torch.equal(c(rows, length=256, **kw)["labels"], same[0]["labels"])
    assert not torch.equal(MLMCollator(seed=6)(rows, length=256, step=3, micro=2)["labels"], same[0]["labels"])


def test_schedule_is_a_function_of_step():
    s = MaskRateSchedule(start=0.3, end=0.15, steps=100)
    assert s(0) == 0.3 and s(50) == pytest.approx(0.225) and s(100) == s(10**6) == 0.15
    assert MaskRateSchedule(0.3, 0.15, 100, kind="cosine")(50) == pytest.approx(0.225)
    with pytest.raises(ValueError):
        MaskRateSchedule(0.3, 1.5, 10)


class _AtStep(Dataset):
    """Item s: the collator's rate and masks at step s, computed inside a DataLoader worker."""

    def __init__(self, collator, rows):
        self.collator, self.rows = collator, rows

    def __len__(self):
        return 6

    def __getitem__(self, step):
        b = self.collator(self.rows, length=1024, step=step * 40)
        return self.collator.rate(step * 40), b["labels"]


def test_schedule_in_workers_equals_main_process(rows_1024):
    collator = MLMCollator(mask_rate=MaskRateSchedule(start=0.4, end=0.1, steps=200), seed=9)
    rows = rows_1024[:4]
    in_workers = list(DataLoader(_AtStep(collator, rows), batch_size=None, num_workers=2))
    for step, (rate, labels) in enumerate(in_workers):
        assert rate == collator.rate(step * 40)
        assert torch.equal(labels, collator(rows, length=1024, step=step * 40)["labels"])
    observed = [float((labels != -100).float().sum()) for _, labels in in_workers]
    assert observed == sorted(observed, reverse=True)  # the rate really follows the schedule


def test_batch_form_and_tokenizer_agreement(tokenizer):
    seqs = [UBIQUITIN, UBIQUITIN[:30]]
    packed = MLMCollator()([[encode(s) for s in seqs]], length=128)  # both proteins in one row
    assert {k: (v.shape, v.dtype) for k, v in packed.items()} == {
        "input_ids": ((1, 128), torch.long),
        "labels": ((1, 128), torch.long),
        "position_ids": ((1, 128), torch.long),
        "document_ids": ((1, 128), torch.int32),
        "attention_mask": ((1, 128), torch.long),
    }
    n0, n1 = len(seqs[0]) + 2, len(seqs[1]) + 2
    assert packed["position_ids"][0, :n0].tolist() == list(range(n0))
    assert packed["position_ids"][0, n0 : n0 + n1].tolist() == list(range(n1))
    assert packed["document_ids"][0].tolist() == [0] * n0 + [1] * n1 + [-1] * (128 - n0 - n1)
    assert packed["attention_mask"][0].tolist() == [1] * (n0 + n1) + [0] * (128 - n0 - n1)
    original = torch.where(packed["labels"] != -100, packed["labels"], packed["input_ids"])[0]
    expected = tokenizer(seqs[0])["input_ids"] + tokenizer(seqs[1])["input_ids"]
    assert original[: n0 + n1].tolist() == expected
    padded = MLMCollator()([[encode(s)] for s in seqs])  # one protein a row, padded to the longest
    assert padded["input_ids"].shape == (2, n0) and padded["document_ids"][1].tolist() == [0] * n1 + [-1] * (n0 - n1)
