"""Masked-LM metrics: the `masked_lm` evaluate module and `MaskedLMAccumulator` agree with scikit-learn, are
token-weighted (batching-invariant) and reduce over real gloo ranks to the single-process result."""

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

from modeling_speedplm import ESM2_VOCAB
from training.metrics import IGNORE_INDEX, MaskedLMAccumulator

METRIC_DIR = Path(__file__).resolve().parents[1] / "eval" / "metrics" / "masked_lm"
V = 33


def random_batch(seed: int, batch: int = 4, length: int = 64, mask_rate: float = 0.3, temperature: float = 1.0):
    """(B, L, V) logits and labels: residue ids 4..28 at ~mask_rate of positions, -100 elsewhere. Logits lean
    towards the label so accuracy is ~0.5, and every id (special tokens too) can win the argmax."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, 29, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) > mask_rate] = IGNORE_INDEX
    logits = torch.randn(batch, length, V, generator=g) * 2 / temperature
    hint = F.one_hot(labels.clamp(min=0), V).float() * 3.5 / temperature
    return logits + hint, labels


def flat_scored(logits, labels):
    """Arrays the evaluate module takes: predictions, references and per-token losses at the scored positions."""
    logits, labels = logits.reshape(-1, V), labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    losses = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    return logits[keep].argmax(-1).numpy(), labels[keep].numpy(), losses.double().numpy()


def assert_same(a: dict, b: dict, rel: float = 1e-9):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert a[key].keys() == b[key].keys(), key
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), key
        else:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), key


@pytest.fixture(scope="module")
def masked_lm():
    import evaluate  # 6-8 s: only the tests that need it pay, and never the spawned ranks

    return lambda config=None: evaluate.load(str(METRIC_DIR), config, keep_in_memory=True)


def test_module_matches_sklearn(masked_lm):
    preds, refs, losses = flat_scored(*random_batch(0, batch=8, length=256))
    assert not np.isin(preds, np.unique(refs)).all()  # some predictions are ids absent from references
    result = masked_lm().compute(predictions=preds, references=refs, losses=losses)

    labels = np.unique(refs)
    expected = {
        "tokens": len(refs),
        "loss": losses.mean(),
        "perplexity": math.exp(losses.mean()),
        "accuracy": accuracy_score(refs, preds),
        "mcc": matthews_corrcoef(refs, preds),
    }
    for average in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(refs, preds, labels=labels, average=average, zero_division=0)
        expected.update({f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f})
    expected["per_amino_acid_accuracy"] = {ESM2_VOCAB[c]: (preds[refs == c] == c).mean() for c in labels}
    assert_same(result, expected)
    # Weighted recall is accuracy by construction; macro recall (mean per-residue accuracy) differs.
    assert result["recall_weighted"] == pytest.approx(result["accuracy"])
    assert abs(result["recall_macro"] - result["accuracy"]) > 1e-3


def test_module_streams_batches_with_losses(masked_lm):
    preds, refs, losses = flat_scored(*random_batch(1))
    one_shot = masked_lm().compute(predictions=preds, references=refs, losses=losses)
    metric = masked_lm("with_losses")
    for chunk in np.array_split(np.arange(len(refs)), [3, 50, 51]):
        metric.add_batch(predictions=preds[chunk], references=refs[chunk], losses=losses[chunk])
    assert_same(metric.compute(), one_shot)
    without_losses = masked_lm().compute(predictions=preds, references=refs)
    assert "loss" not in without_losses and without_losses["accuracy"] == one_shot["accuracy"]


def test_module_rejects_bad_input(masked_lm):
    with pytest.raises(ValueError, match="ESM2 token ids"):
        masked_lm().compute(predictions=[4, 5], references=[4, 40])
    with pytest.raises(ValueError, match="losses"):
        masked_lm().compute(predictions=[4, 5], references=[4, 5], losses=[0.1])
    with pytest.raises(ValueError, match="unknown config"):
        masked_lm("nope")


def test_accumulator_matches_module_and_sklearn(masked_lm):
    logits, labels = random_batch(2, batch=8, length=256)
    acc = MaskedLMAccumulator(V)
    acc.update(logits, labels)  # (B, L, V) form
    preds, refs, losses = flat_scored(logits, labels)
    assert acc.tokens == len(refs) and acc.correct == int((preds == refs).sum())
    assert_same(acc.compute(), masked_lm().compute(predictions=preds, references=refs, losses=losses))


def test_accumulator_is_token_weighted_across_batches():
    # Batches with very different numbers of scored tokens and loss levels: a per-batch mean is visibly wrong.
    batches = [
        random_batch(10, batch=2, mask_rate=0.02, temperature=0.3),
        random_batch(11, batch=8, mask_rate=0.5),
        random_batch(12, batch=1, mask_rate=0.1, temperature=3.0),
    ]
    many = MaskedLMAccumulator(V)
    per_batch_losses = []
    for logits, labels in batches:
        many.update(logits.reshape(-1, V), labels.reshape(-1))  # (N, V) form
        one = MaskedLMAccumulator(V)
        one.update(logits, labels)
        per_batch_losses.append(one.compute()["loss"])
    big = MaskedLMAccumulator(V)
    big.update(
        torch.cat([logits.reshape(-1, V) for logits, _ in batches]), torch.cat([y.reshape(-1) for _, y in batches])
    )
    assert torch.equal(many.confusion, big.confusion)
    assert_same(many.compute(), big.compute(), rel=1e-12)
    # Control: the anchor's average of per-batch losses is not the loss over the union of tokens.
    assert abs(np.mean(per_batch_losses) - big.compute()["loss"]) > 0.05


def test_accumulator_bf16_logits_and_errors():
    logits, labels = random_batch(3)
    low = MaskedLMAccumulator(V)
    low.update(logits.bfloat16(), labels.int())  # int32 labels are accepted too
    ref = MaskedLMAccumulator(V)
    ref.update(logits.bfloat16().float(), labels)  # the loss is computed in fp32 from the bf16 values
    assert_same(low.compute(), ref.compute(), rel=1e-12)
    with pytest.raises(ValueError, match="don't match"):
        low.update(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="no scored tokens"):
        MaskedLMAccumulator(V).compute()


def test_reduce_without_process_group_changes_nothing_and_runs_once():
    acc = MaskedLMAccumulator(V)
    acc.update(*random_batch(4))
    before = acc.compute()
    assert acc.reduce() is acc
    assert_same(acc.compute(), before, rel=0)
    with pytest.raises(RuntimeError, match="already reduced"):
        acc.reduce()
    with pytest.raises(RuntimeError, match="update after reduce"):
        acc.update(*random_batch(5))


def _rank_batches(rank: int):
    # Unequal shards: rank 0 holds two batches, rank 1 one with a different mask rate.
    return [random_batch(20), random_batch(21, batch=3)] if rank == 0 else [random_batch(22, mask_rate=0.6)]


def _gloo_rank(rank: int, world_size: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        # accelerate reads the topology from these variables and reuses the initialised group.
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            OMP_NUM_THREADS="1",
        )
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == world_size
        results = {}
        for how, reducer in (("local", None), ("torch", None), ("accelerate", accelerator)):
            acc = MaskedLMAccumulator(V)
            for logits, labels in _rank_batches(rank):
                acc.update(logits, labels)
            results[how] = acc.compute() if how == "local" else acc.reduce(reducer).compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # spawns two ranks
def test_reduce_over_two_gloo_ranks_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)

    union = MaskedLMAccumulator(V)
    for rank in (0, 1):
        for logits, labels in _rank_batches(rank):
            union.update(logits, labels)
    expected = union.compute()
    for rank in (0, 1):
        results = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert_same(results["torch"], expected)
        assert_same(results["accelerate"], expected)
        assert results["local"]["tokens"] < expected["tokens"]  # control: one rank alone sees only its shard
