"""eval.benchmark (identical masked positions across models, vocab mapping, ranks) and eval.probes (eval.speedrun:
tests/test_speedrun.py)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, randomized_tiny_model

from eval.benchmark import MaskSpec, build_batches, score_model
from eval.checkpoints import EvalError, VocabMap, inspect_model, load_model
from modeling_speedplm import ESM2_VOCAB, SpeedPLMConfig, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """~2,000 real proteins (the first rows of each aaanalysis TSV) prepared into train/valid/test shards."""
    from training.data.prepare import PrepareOptions, prepare
    from training.data.sources import builtin_files

    out = tmp_path_factory.mktemp("data") / "prepared"
    fasta = out.parent / "proteins.fasta"
    with open(fasta, "w") as f:
        for path in builtin_files():
            lines = path.read_text().splitlines()
            column = lines[0].split("\t").index("sequence")
            for n, line in enumerate(lines[1:150]):
                f.write(f">{path.stem}_{n}\n{line.split(chr(9))[column]}\n")
    prepare([fasta], out, PrepareOptions(split_fractions=(80, 10, 10), dedup=True, max_length=256), log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny SpeedPLM (save_pretrained) and a tiny random EsmForMaskedLM + EsmTokenizer of the same shape."""
    from eval.checkpoints import esm_twin

    root = tmp_path_factory.mktemp("ckpt")
    speedplm = randomized_tiny_model(seed=1)
    speedplm.save_pretrained(root / "speedplm")
    build_tokenizer().save_pretrained(root / "speedplm")  # save_pretrained is transformers': weights + config + code
    torch.manual_seed(2)
    esm = esm_twin(SpeedPLMConfig.from_preset("tiny"))
    esm.save_pretrained(root / "esm")
    build_tokenizer().save_pretrained(root / "esm")
    return {"speedplm": root / "speedplm", "esm": root / "esm"}


def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1024
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[0] > 100


# ---------------------------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_benchmark_cli_writes_csv_md_png(prepared, checkpoints, tmp_path):
    code, out = run_cli(
        "-m",
        "eval.benchmark",
        "--models",
        checkpoints["speedplm"],
        checkpoints["esm"],
        "--data",
        prepared,
        "--split",
        "test",
        "--mask-rate",
        "0.15",
        "--seed",
        "0",
        "--out",
        tmp_path,
        "--max-tokens",
        "20000",
        "--batch-tokens",
        "4096",
    )
    assert code == 0, out
    rows = read_csv(tmp_path / "results.csv")
    assert list(rows[0]) == [
        "model",
        "parameters",
        "tokens_scored",
        "loss",
        "perplexity",
        "accuracy",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "mcc",
        "masked_positions_sha256",
        "seconds",
    ]
    assert [r["model"] for r in rows] == [str(checkpoints["speedplm"]), str(checkpoints["esm"])]
    assert rows[0]["tokens_scored"] == rows[1]["tokens_scored"] and int(rows[0]["tokens_scored"]) > 500
    assert rows[0]["masked_positions_sha256"] == rows[1]["masked_positions_sha256"]
    for r in rows:
        assert 2.0 < float(r["loss"]) < 6.0 and 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["parameters"]) > 1000
    md = (tmp_path / "results.md").read_text()
    assert "| model |" in md and "python -m eval.benchmark" in md and "Hardware:" in md and "weighted" in md
    assert_png(tmp_path / "results.png")


def test_identical_masked_positions_for_every_model(prepared, checkpoints):
    shard = prepared / "test"
    first = build_batches(shard, MaskSpec(mask_rate=0.15, seed=0), max_length=256, batch_tokens=2048, max_tokens=8000)
    again = build_batches(shard, MaskSpec(mask_rate=0.15, seed=0), max_length=256, batch_tokens=2048, max_tokens=8000)
    assert len(first) == len(again) > 1
    for a, b in zip(first, again):
        for key in ("input_ids", "labels", "attention_mask"):
            assert a[key].numpy().tobytes() == b[key].numpy().tobytes()
    other = build_batches(shard, MaskSpec(mask_rate=0.15, seed=1), max_length=256, batch_tokens=2048, max_tokens=8000)
    assert not torch.equal(first[0]["labels"], other[0]["labels"])  # the seed does pick the positions

    results = {}
    for name, path in checkpoints.items():
        spec = inspect_model(str(path))
        assert spec.vocab.is_identity
        results[name] = score_model(load_model(spec, "cpu"), spec.vocab, list(enumerate(first)))
    a, b = results.values()
    assert a["tokens"] == b["tokens"] == sum(int((x["labels"] != -100).sum()) for x in first)
    assert a["masked_positions_sha256"] == b["masked_positions_sha256"]
    assert a["loss"] != b["loss"]


def permuted_esm(source: Path, target: Path) -> None:
    """The same ESM model under another vocabulary order (reversed) plus one extra token it never predicts."""
    from transformers import EsmForMaskedLM, EsmTokenizer

    model = EsmForMaskedLM.from_pretrained(source)
    n = len(ESM2_VOCAB)
    new_id = [n - 1 - c for c in range(n)]  # new id of ESM2 id c
    config = model.config
    config.vocab_size, config.pad_token_id, config.mask_token_id = n + 1, new_id[1], new_id[32]
    state = model.state_dict()
    for key, value in state.items():
        if value.shape[:1] == (n,):
            fill = -1e4 if value.ndim == 1 else 0.0  # the extra token's bias: it never wins, adds ~0 to the loss
            grown = torch.full((n + 1, *value.shape[1:]), fill, dtype=value.dtype)
            grown[new_id] = value
            state[key] = grown
    permuted = EsmForMaskedLM(config)
    permuted.load_state_dict(state)
    permuted.save_pretrained(target)
    vocab = target / "vocab.txt"
    vocab.write_text("\n".join([ESM2_VOCAB[n - 1 - i] for i in range(n)] + ["<extra>"]) + "\n")
    EsmTokenizer(str(vocab)).save_pretrained(target)


def test_vocab_with_other_ids_is_mapped(prepared, checkpoints, tmp_path):
    permuted_esm(checkpoints["esm"], tmp_path / "permuted")
    spec = inspect_model(str(tmp_path / "permuted"))
    assert not spec.vocab.is_identity and spec.vocab.num_classes == 34  # 33 ESM2 tokens + "other"
    batches = list(enumerate(build_batches(prepared / "test", max_length=256, batch_tokens=2048, max_tokens=4000)))
    mapped = score_model(load_model(spec, "cpu"), spec.vocab, batches)
    base_spec = inspect_model(str(checkpoints["esm"]))
    base = score_model(load_model(base_spec, "cpu"), base_spec.vocab, batches)
    assert mapped["tokens"] == base["tokens"]
    assert mapped["loss"] == pytest.approx(base["loss"], abs=1e-4)
    assert mapped["accuracy"] == pytest.approx(base["accuracy"])


def test_incompatible_vocab_fails_naming_the_model(checkpoints, tmp_path, capsys):
    from transformers import EsmTokenizer

    from eval import benchmark

    bad = tmp_path / "no_tryptophan"
    (bad).mkdir()
    for f in ("config.json", "model.safetensors"):
        (bad / f).write_bytes((checkpoints["esm"] / f).read_bytes())
    (bad / "vocab.txt").write_text("\n".join(t for t in ESM2_VOCAB if t != "W") + "\n")
    EsmTokenizer(str(bad / "vocab.txt")).save_pretrained(bad)
    with pytest.raises(EvalError, match=r"no_tryptophan.*\['W'\]"):
        inspect_model(str(bad))
    assert benchmark.main(["--models", str(checkpoints["speedplm"]), str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "no_tryptophan" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_vocab_map_gathers_logits_and_merges_extras():
    vocab = VocabMap(list(range(33))[::-1], 35)  # reversed ids, two extra outputs (33, 34)
    logits = torch.randn(2, 3, 35)
    out = vocab.canonical_logits(logits)  # (2, 3, 34)
    assert out.shape == (2, 3, 34)
    assert torch.equal(out[..., 0], logits[..., 32])
    assert torch.allclose(out[..., 33], logits[..., 33:].logsumexp(-1))
    assert torch.allclose(out.logsumexp(-1), logits.logsumexp(-1))  # full-vocabulary softmax preserved
    assert torch.equal(vocab.model_ids(torch.tensor([[0, 32]])), torch.tensor([[32, 0]]))


@pytest.mark.slow
def test_benchmark_two_ranks_match_one_rank(prepared, checkpoints, tmp_path):
    common = [
        "--models",
        checkpoints["speedplm"],
        checkpoints["esm"],
        "--data",
        prepared,
        "--split",
        "valid",
        "--batch-tokens",
        "2048",
        "--max-tokens",
        "12000",
    ]
    code, out = run_cli("-m", "eval.benchmark", *common, "--out", tmp_path / "one")
    assert code == 0, out
    port = str(free_port())
    code, out = run_cli(
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        port,
        "-m",
        "eval.benchmark",
        *common,
        "--out",
        tmp_path / "two",
    )
    assert code == 0, out
    one, two = read_csv(tmp_path / "one" / "results.csv"), read_csv(tmp_path / "two" / "results.csv")
    for a, b in zip(one, two):
        assert a["tokens_scored"] == b["tokens_scored"]
        assert a["masked_positions_sha256"] == b["masked_positions_sha256"]
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)
        assert float(a["accuracy"]) == pytest.approx(float(b["accuracy"]))


# ---------------------------------------------------------------------------------------------------- probes


def test_probes_give_a_row_per_hidden_state(checkpoints, tmp_path):
    from eval import probes

    models = [str(checkpoints["speedplm"]), str(checkpoints["esm"])]
    rows, tasks = probes.run(
        models, ["SEQ_DISULFIDE", "SEQ_CAPSID"], probes.ProbeOptions(max_per_task=60), log=lambda *a: None
    )
    layers = SpeedPLMConfig.from_preset("tiny").num_hidden_layers
    for model in models:
        for task in ("SEQ_DISULFIDE", "SEQ_CAPSID"):
            mine = [r for r in rows if r["model"] == model and r["task"] == task]
            assert [r["layer"] for r in mine] == list(range(layers + 1))
            assert all(0.0 <= r["accuracy"] <= 1.0 and -1.0 <= r["mcc"] <= 1.0 for r in mine)
            assert all(r["n_train"] == 48 and r["n_test"] == 12 for r in mine)
    for task in tasks:  # stratified held-out split, no protein on both sides
        assert not set(task.train) & set(task.test) and set(task.labels[task.test]) == {0, 1}
    probes.write_outputs(rows, tasks, tmp_path, "python -m eval.probes ...")
    assert len(read_csv(tmp_path / "probes.csv")) == 2 * 2 * (layers + 1)
    assert "Best layer" in (tmp_path / "probes.md").read_text()
    assert_png(tmp_path / "probes.png")


def test_probe_features_do_not_depend_on_batching_or_padding(checkpoints):
    from eval import probes

    spec = inspect_model(str(checkpoints["esm"]))
    model = load_model(spec, "cpu")
    task = probes.load_task("SEQ_DISULFIDE", max_per_task=12)
    alone = probes.embed(model, spec, task.tokens, 64, batch_tokens=1, device="cpu")  # one protein per forward
    together = probes.embed(model, spec, task.tokens, 64, batch_tokens=4096, device="cpu")  # padded batches
    assert alone.shape == (5, 12, 64)
    np.testing.assert_allclose(alone, together, atol=2e-5)


def test_probe_tasks_are_real_proteins():
    from eval import probes
    from eval.checkpoints import EvalError

    assert probes.TASKS == ("SEQ_SOLUBLE", "SEQ_DISULFIDE", "SEQ_CAPSID")
    with pytest.raises(EvalError, match=r"rejects 1810 of its 1835 sequences \(first: LOCATION_1: composition: 6 of"):
        probes.load_task("SEQ_LOCATION")
    task = probes.load_task("SEQ_DISULFIDE", max_per_task=0)  # 10 '!' marks and 4 lowercase marks dropped
    assert (task.dropped_invalid, task.dropped_duplicate, len(task.labels)) == (14, 19, 2514)
