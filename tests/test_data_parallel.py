"""`prepare` at scale: pieces and worker processes do not change a byte of the output; empty and truncated inputs stop
the run naming the file (training/data/prepare.py, sources.py, keyindex.py)."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data.keyindex import KeyIndex
from training.data.prepare import DataError, PrepareOptions, main, prepare
from training.data.shards import ShardSet
from training.data.validate import decode

FIX = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIX))
import make_data_fixtures as F  # noqa: E402  (real protein sequences of the fixture files)


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """Every kind of input, with bad records, duplicates, a quoted newline in a CSV row and a 4-row-group parquet."""
    d = tmp_path_factory.mktemp("inputs")
    csv_text = (
        "id,sequence,note\n"
        f"P0CG48,{F.UBIQUITIN},plain\n"
        f'Q14802,{F.FXYD3},"a note\nover two lines"\n'
        f"O43914,{F.TYROBP[:40]}J{F.TYROBP[41:]},J inside\n"
        f"P15382,{F.KCNE1},after the quoted newline\n"
    )
    (d / "quoted.csv").write_text(csv_text)
    seqs = [F.UBIQUITIN, F.KCNE2, F.BTC + "42", F.TMIE, F.KCNE1, F.TGFA, F.FXYD3, F.TYROBP]
    table = pa.table({"accession": [f"PQ{i}" for i in range(len(seqs))], "sequence": seqs})
    pq.write_table(table, d / "groups.parquet", row_group_size=2)
    files = ["bad_records.fasta", "crlf_bom.fasta", "proteins.fasta.gz", "proteins.csv", "proteins.tsv"]
    return [str(FIX / f) for f in files] + [str(d / "quoted.csv"), str(d / "groups.parquet")]


@pytest.mark.parametrize("layout", [dict(split_fractions=(50, 25, 25), dedup=True), dict()])
def test_pieces_and_processes_do_not_change_the_output(tmp_path, inputs, layout):
    runs = {}
    for name, kw in {
        "whole": dict(num_proc=1),
        "pieces": dict(num_proc=1, chunk_bytes=150),  # every FASTA/CSV cut into pieces of a record or two
        "workers": dict(num_proc=2, chunk_bytes=150),
        "row_groups": dict(num_proc=3, chunk_bytes=1),  # a piece per parquet row group
    }.items():
        report = prepare(inputs, tmp_path / name, PrepareOptions(**layout, **kw), log=lambda *a: None)
        runs[name] = tree(tmp_path / name)
    assert runs["whole"] == runs["pieces"] == runs["workers"] == runs["row_groups"]  # byte for byte
    assert (
        report["read"] == 14 + 2 + 3 + 5 + 2 + 4 + 8 and report["accepted"] + len(report["rejected"]) == report["read"]
    )
    rejected = {(Path(r["file"]).name, r["line"], r["reason"].split(":")[0]) for r in report["rejected"]}
    assert ("quoted.csv", 5, "letter_J") in rejected  # the row after the quoted newline is text line 5
    assert ("groups.parquet", 3, "digit") in rejected  # row 3 lives in the second row group
    if layout:
        assert ("proteins.csv", 2, "duplicate_sequence") in rejected  # ubiquitin, seen first in bad_records.fasta
    quoted = ShardSet(tmp_path / "whole" / ("" if not layout else "train"))
    assert quoted.num_docs == report["splits"]["train" if layout else ""]["sequences"]


def test_num_proc_on_the_command_line(tmp_path, inputs, capsys):
    assert main(["prepare", "--input", *inputs, "--out", str(tmp_path / "a"), "--num-proc", "2"]) == 0
    assert main(["prepare", "--input", *inputs, "--out", str(tmp_path / "b")]) == 0
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    docs = [decode(ShardSet(tmp_path / "a").doc(i)) for i in range(3)]
    assert docs == [F.UBIQUITIN, F.FXYD3, F.UBIQUITIN[:60]] and report["read"] == 38


def empty_inputs(d: Path) -> dict[str, Path]:
    gz = gzip.compress(f">P0CG48\n{F.UBIQUITIN}\n".encode())
    files = {
        "empty.fasta": b"",
        "comments_only.fasta": b";just a comment\n\n",
        "empty.fasta.gz": b"",  # `gzip -t`: unexpected end of file
        "header_only.csv": b"id,sequence\n",
        "blank.tsv": b"\n",
        **{f"cut{n}.fasta.gz": gz[:n] for n in range(1, len(gz))},  # truncated at every other point
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


def test_empty_or_truncated_input_fails_naming_the_file(tmp_path, capsys):
    good = FIX / "proteins.tsv"
    for name, path in empty_inputs(tmp_path).items():
        out = tmp_path / f"out-{name}"
        for order in ([path], [good, path]):  # also after a good input: nothing half-written
            assert main(["prepare", "--input", *map(str, order), "--out", str(out)]) == 1, name
            err = capsys.readouterr().err
            assert str(path) in err, (name, err)
            assert not out.exists(), name
    with pytest.raises(DataError, match="0-byte gzip file is truncated"):
        prepare([str(tmp_path / "empty.fasta.gz")], tmp_path / "x", log=lambda *a: None)
    with pytest.raises(DataError, match="no protein records"):
        prepare([str(tmp_path / "empty.fasta")], tmp_path / "x", PrepareOptions(num_proc=2), log=lambda *a: None)


def test_key_index_finds_every_key_and_only_those():
    rng = np.random.default_rng(0)
    index, kept = KeyIndex(), []
    for piece in range(12):  # 12 adds: runs merge as they grow
        keys = rng.integers(0, 2**63, size=(1000, 2)).astype(np.uint64)
        assert (index.find(keys) == -1).all()
        index.add(keys, np.arange(piece * 1000, (piece + 1) * 1000))
        kept.append(keys)
    every = np.concatenate(kept)
    assert len(index) == 12000 and len(index.runs) < 12
    assert (index.find(every) == np.arange(12000)).all()
    twin = every[:3].copy()
    twin[:, 1] ^= np.uint64(1)  # same first half, another second half: a different key
    assert (index.find(twin) == -1).all()
    index.add(twin, np.array([7, 8, 9]))
    assert index.find(twin).tolist() == [7, 8, 9] and index.find(every[:3]).tolist() == [0, 1, 2]


def test_hub_dataset_streams_in_pieces(tmp_path):
    """The Hub path (datasets streaming; a local dir stands in for owner/name offline) is cut into pieces of
    records as it streams: never held whole, rows numbered across pieces."""
    from training.data.sources import _hub_chunks, chunk_records

    seqs = [F.UBIQUITIN, F.KCNE2, F.BTC, F.TMIE, F.KCNE1, F.TGFA, F.FXYD3, F.TYROBP] * 3
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"sequence": seqs}), tmp_path / "data" / "train-00000-of-00001.parquet")
    chunks = list(_hub_chunks(str(tmp_path), "train", chunk_bytes=400))
    assert len(chunks) >= 6 and chunks[-1].last and not any(c.last for c in chunks[:-1])
    assert max(len(c.payload) for c in chunks) <= 4  # a few records each
    records = [r for c in chunks for r in chunk_records(c)]
    assert [r.line for r in records] == list(range(1, len(seqs) + 1))
    assert [r.seq.decode() for r in records] == seqs
