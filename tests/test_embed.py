"""python -m eval.embed: packed == one protein at a time, bad records as in prepare, streaming, ESM checkpoints."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import PROTEINS, randomized_tiny_model

from eval.embed import main
from training.data.prepare import PrepareOptions, prepare
from training.data.shards import ShardSet
from training.data.sources import builtin_files, iter_records
from training.data.validate import VOCAB, ValidationPolicy, decode, encode

# one xdist worker runs this file: its module fixtures (trained checkpoints) are built once, not per worker
pytestmark = pytest.mark.xdist_group("test_embed")

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures"
TINY_LIMIT = 254  # residues: the tiny preset's max_position_embeddings 256 minus <cls> and <eos>

# One protein at a time, the way a user would do it without eval.embed: the checkpoint's own tokenizer and model,
# loaded with trust_remote_code in a fresh process outside the repository; every hidden state of every protein.
REFERENCE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from transformers import AutoModel, AutoTokenizer
    proteins, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    arrays = {}
    for m, ckpt in enumerate(sys.argv[3:]):
        tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
        model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
        with torch.no_grad():
            for i, seq in enumerate(proteins):
                output = model(**tokenizer(seq, return_tensors="pt"), output_hidden_states=True)
                arrays[f"{m}/{i}/last"] = output.last_hidden_state[0].numpy()
                for k, h in enumerate(output.hidden_states):
                    arrays[f"{m}/{i}/{k}"] = h[0].numpy()
    np.savez(out, **arrays)
    """
)


def real_proteins(n: int = 36) -> list[str]:
    """The conftest proteins + aaanalysis SEQ_DISULFIDE proteins of 20..TINY_LIMIT residues, in file order."""
    seqs = list(PROTEINS)
    location = next(f for f in builtin_files() if f.stem == "SEQ_DISULFIDE")
    for rec in iter_records(location):
        try:
            seq = decode(encode(rec.seq))
        except ValueError:
            continue
        if 20 <= len(seq) <= TINY_LIMIT and seq not in seqs:
            seqs.append(seq)
        if len(seqs) == n:
            return seqs
    raise AssertionError("not enough short built-in proteins")


def write_fasta(path: Path, seqs: list[str], prefix: str = "p") -> Path:
    path.write_text("".join(f">{prefix}{i} protein {i}\n{s}\n" for i, s in enumerate(seqs)))
    return path


def run_embed(*args, timeout=300) -> subprocess.CompletedProcess:
    """The real CLI, from the repository root, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "eval.embed", "--no-progress", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_reference(checkpoints: list, seqs: list[str], tmp: Path) -> dict:
    """{"m/i/last" or "m/i/k": (n + 2, H) hidden states} of protein i under checkpoint m, one protein at a time."""
    script, proteins, out = tmp / "reference.py", tmp / "proteins.json", tmp / "reference.npz"
    script.write_text(REFERENCE)
    proteins.write_text(json.dumps(seqs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(proteins), str(out), *map(str, checkpoints)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def pooled(hidden: np.ndarray, pool: str) -> np.ndarray:
    """hidden: (n + 2, H) of <cls> residues <eos>."""
    return {"mean": hidden[1:-1].mean(0), "cls": hidden[0], "none": hidden[1:-1]}[pool]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from modeling_speedplm import build_tokenizer

    directory = tmp_path_factory.mktemp("speedplm")
    randomized_tiny_model(seed=4).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)  # (save_pretrained may or may not write it too)
    return directory


@pytest.fixture(scope="module")
def esm_ckpt(tmp_path_factory) -> Path:
    """A transformers EsmForMaskedLM built locally (ESM2-like settings: rotary, token dropout) with the stock
    EsmTokenizer over the ESM2 vocabulary, as ESM2 checkpoints ship; no download."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    directory = tmp_path_factory.mktemp("esm")
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(5)
    config = EsmConfig(
        vocab_size=33,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        pad_token_id=1,
        mask_token_id=32,
        token_dropout=True,
        emb_layer_norm_before=False,
    )
    EsmForMaskedLM(config).save_pretrained(directory)
    EsmTokenizer(str(directory / "vocab.txt"), model_max_length=1024).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def proteins(tmp_path_factory):
    seqs = real_proteins()
    return seqs, write_fasta(tmp_path_factory.mktemp("in") / "proteins.fasta", seqs)


@pytest.fixture(scope="module")
def reference(ckpt, esm_ckpt, proteins, tmp_path_factory):
    """One process for both checkpoints: "0/..." speedplm, "1/..." ESM."""
    return run_reference([ckpt, esm_ckpt], proteins[0], tmp_path_factory.mktemp("ref"))


def read_output(path: Path):
    """(table sorted by index, parquet metadata)."""
    table = pq.read_table(path).sort_by("index")
    return table, pq.ParquetFile(path).metadata


# ---------------------------------------------------------------------------------------------------- equality


def check_against_reference(out: Path, reference: dict, model: int, seqs: list, pool: str, layer) -> None:
    table, _ = read_output(out)
    assert table.column("index").to_pylist() == list(range(len(seqs)))  # every protein once
    assert table.column("id").to_pylist() == [f"p{i}" for i in range(len(seqs))]
    assert table.column("length").to_pylist() == [len(s) for s in seqs]
    key = "last" if layer is None else str(layer)
    worst = 0.0
    for i, got in enumerate(table.column("embedding").to_pylist()):
        want = pooled(reference[f"{model}/{i}/{key}"], pool)
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-5, f"max |batched - single| = {worst:.2e}"


# 600 tokens = two packed rows of 256 per forward, several proteins per row; 16 proteins per chunk: three chunks
BATCHING = ["--batch-tokens", "600", "--chunk-proteins", "16"]


@pytest.mark.slow
def test_cli_packed_output_equals_one_protein_at_a_time(ckpt, proteins, reference, tmp_path):
    seqs, fasta = proteins
    out = tmp_path / "emb.parquet"
    proc = run_embed("--model", ckpt, "--input", fasta, "--out", out, "--layout", "packed", *BATCHING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"embedded {out}: read {len(seqs)}  accepted {len(seqs)}  rejected 0" in proc.stdout
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # one per chunk
    check_against_reference(out, reference, 0, seqs, "mean", None)


@pytest.mark.slow  # needs the reference subprocess; the CLI's main runs in-process here (no import time)
@pytest.mark.parametrize(
    "pool, layer, layout",
    [
        ("cls", None, "packed"),
        ("none", None, "packed"),
        ("mean", 2, "packed"),
        ("cls", -4, "packed"),
        ("mean", None, "padded"),
        ("none", 1, "auto"),
    ],
)
def test_pools_layers_layouts_equal_one_protein_at_a_time(
    ckpt, proteins, reference, pool, layer, layout, tmp_path, capsys
):
    seqs, fasta = proteins
    out = tmp_path / "emb.parquet"
    argv = ["--model", str(ckpt), "--input", str(fasta), "--out", str(out), "--pool", pool, *BATCHING]
    argv += ["--layout", layout, "--no-progress"] + (["--layer", str(layer)] if layer is not None else [])
    assert main(argv) == 0
    report = json.loads((tmp_path / "emb.report.json").read_text())
    assert report["layout"] == ("packed" if layout == "packed" else "padded")  # auto on CPU (SDPA): padded
    assert report["inputs"] == [str(fasta)]  # the input files (a loop variable once replaced them by batch keys)
    check_against_reference(out, reference, 0, seqs, pool, None if layer is None else layer % 5)


@pytest.mark.slow
def test_esm_checkpoint_padded_rows_equal_one_at_a_time(esm_ckpt, proteins, reference, tmp_path):
    seqs, fasta = proteins
    out = tmp_path / "esm.parquet"
    proc = run_embed("--model", esm_ckpt, "--input", fasta, "--out", out, "--layer", 2, "--batch-tokens", 1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_reference(out, reference, 1, seqs, "mean", 2)


# ---------------------------------------------------------------------------------------------------- bad records


@pytest.mark.slow
def test_bad_records_reported_like_prepare_and_never_embedded(ckpt, tmp_path):
    inputs = [FIX / "bad_records.fasta", FIX / "proteins.csv"]
    out = tmp_path / "emb.parquet"
    proc = run_embed("--model", ckpt, "--input", *inputs, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "emb.report.json").read_text())
    # prepare, with the same policy and the model's length limit, is the reference for what is rejected and why
    options = PrepareOptions(policy=ValidationPolicy(reject_longer_than=TINY_LIMIT))
    prepared = prepare(inputs, tmp_path / "prepared", options, log=lambda *a: None)
    assert report["rejected"] == prepared["rejected"]
    assert report["duplicate_ids"] == prepared["duplicate_ids"] != []
    assert report["read"] == report["accepted"] + len(report["rejected"]) == prepared["read"]
    reasons = {r["reason"].split(":")[0] for r in report["rejected"]}
    assert {"letter_J", "digit", "empty_sequence", "too_long", "special_token_text"} <= reasons
    for r in report["rejected"][:10]:  # printed as prepare prints them
        assert f"{r['file']}:{r['line']} {r['id']!r}: {r['reason']}" in proc.stdout
    table, _ = read_output(out)
    assert table.num_rows == report["accepted"]
    rejected = {(r["file"], r["line"]) for r in report["rejected"]}
    rows = list(zip(table.column("file").to_pylist(), table.column("line").to_pylist()))
    assert not rejected & set(rows)
    # index = the record's position among all records read, across the input files
    read = [(rec.file, rec.line) for source in inputs for rec in iter_records(source)]
    assert [read[i] for i in table.column("index").to_pylist()] == rows
    # accepted proteins in input order with their validated lengths: the lowercase FXYD3 upper-cased and embedded
    assert table.column("length").to_pylist() == list(ShardSet(tmp_path / "prepared").lengths)
    assert ("Q14802", 4) in zip(table.column("id").to_pylist(), table.column("line").to_pylist())


def test_policy_flags_and_crop(ckpt, tmp_path, capsys):
    out = tmp_path / "strict.parquet"
    args = ["--model", str(ckpt), "--input", str(FIX / "bad_records.fasta"), "--no-progress"]
    assert main([*args, "--out", str(out), "--lowercase", "reject", "--duplicate-ids", "reject"]) == 0
    report = json.loads((tmp_path / "strict.report.json").read_text())
    reasons = {(r["id"], r["reason"].split(":")[0]) for r in report["rejected"]}
    assert {("Q14802", "lowercase"), ("sp|P0CG48|UBB_HUMAN", "duplicate_id"), ("Q9NYK1", "too_long")} <= reasons
    assert "Q14802" not in pq.read_table(out).column("id").to_pylist()
    capsys.readouterr()
    cropped = tmp_path / "crop.parquet"
    assert main([*args, "--out", str(cropped), "--crop"]) == 0
    report = json.loads((tmp_path / "crop.report.json").read_text())
    assert report["cropped"] == 1 and "too_long" not in report["rejected_by_reason"]
    table = pq.read_table(cropped)
    assert table.column("length").to_pylist()[table.column("id").to_pylist().index("Q9NYK1")] == TINY_LIMIT


# ---------------------------------------------------------------------------------------------------- streaming


@pytest.mark.slow
def test_streaming_chunks_reach_disk_before_the_input_ends(ckpt, tmp_path):
    """The input is a FIFO fed by this test: the first chunks' row groups must be in OUT.partial while the rest of
    the input has not even been written. An implementation that holds embeddings until the end never gets there."""
    seqs = real_proteins(28)
    fifo = tmp_path / "stream.fasta"
    os.mkfifo(fifo)
    out = tmp_path / "emb.parquet"
    partial = tmp_path / "emb.parquet.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "eval.embed", "--no-progress", "--model", str(ckpt), "--input", str(fifo)]
    cmd += ["--out", str(out), "--pool", "mean", "--chunk-proteins", "4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:  # opening a FIFO for writing without a reader fails (ENXIO): wait until the CLI opens it
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.1)
        os.set_blocking(fd, True)
        text = "".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs))
        first, rest = text.split(">s9\n")  # 9 complete records: chunks 1 and 2 are complete
        os.write(fd, (first + ">s9\n").encode())
        # 4 proteins x 64 floats x 4 bytes per row group: the file grows past its 4-byte header only when written
        while not (partial.exists() and partial.stat().st_size > 2 * 4 * 64 * 4):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no row group on disk before the end of the input"
            time.sleep(0.1)
        assert not out.exists()
        os.write(fd, rest.encode())
        os.close(fd)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == len(seqs) and not partial.exists()
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [4] * math.ceil(len(seqs) / 4)  # one row group per chunk: nothing held across chunks


def test_row_groups_flush_within_a_chunk(ckpt, proteins, tmp_path, capsys):
    """--row-group-mb bounds the output buffered within a chunk (per-residue output can be large)."""
    seqs, fasta = proteins
    out = tmp_path / "res.parquet"
    # ~64 floats x 4 bytes x ~150 residues = ~38 KB per protein; a 0.05 MB limit flushes every ~2 proteins' batch
    assert (
        main(
            [
                "--model",
                str(ckpt),
                "--input",
                str(fasta),
                "--out",
                str(out),
                "--pool",
                "none",
                "--row-group-mb",
                "0.05",
                "--batch-tokens",
                "300",
                "--no-progress",
            ]
        )
        == 0
    )
    meta = pq.ParquetFile(out).metadata
    total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    assert meta.num_row_groups >= 10 and meta.num_rows == len(seqs)
    assert max(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) < total / 5


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model="/nonexistent/ckpt"), "cannot load its config"),
        (dict(input="/nonexistent/x.fasta"), "no such file"),
        (dict(layer="7"), "--layer 7: model"),
        (dict(layer="-6"), "--layer -6: model"),
        (dict(input=str(FIX / "truncated.fasta.gz")), "truncated.fasta.gz: cannot read"),
    ],
)
def test_errors_exit_nonzero_and_leave_no_output(ckpt, tmp_path, capsys, change, message):
    args = dict(model=str(ckpt), input=str(FIX / "proteins.tsv"), out=str(tmp_path / "emb.parquet"))
    args.update(change)
    argv = [x for k, v in args.items() for x in (f"--{k}", v)] + ["--no-progress"]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no .partial, no report


def test_layer_is_checked_before_the_weights_are_loaded(ckpt, tmp_path, capsys):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(ckpt, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    args = ["--model", str(no_weights), "--input", str(FIX / "proteins.tsv"), "--out", str(tmp_path / "e.parquet")]
    assert main([*args, "--layer", "5"]) == 1
    assert "--layer 5: model" in capsys.readouterr().err
    assert main([*args, "--layer", "4"]) == 1  # a valid layer: now the missing weights are the problem
    assert "cannot load weights" in capsys.readouterr().err


def test_packed_layout_needs_a_model_that_takes_document_ids(esm_ckpt, tmp_path, capsys):
    argv = ["--model", str(esm_ckpt), "--input", str(FIX / "proteins.tsv"), "--out", str(tmp_path / "e.parquet")]
    assert main([*argv, "--layout", "packed"]) == 1
    assert "takes no document_ids" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_unknown_pool_and_existing_output(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(ckpt), "--input", str(FIX / "proteins.tsv"), "--out", "x.parquet", "--pool", "max"])
    assert exc.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err
    out = tmp_path / "emb.parquet"
    out.write_bytes(b"keep me")
    assert main(["--model", str(ckpt), "--input", str(FIX / "proteins.tsv"), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
