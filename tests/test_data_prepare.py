"""Sources -> validation -> shards -> report.json (training/data/: prepare, sources, shards) on the fixtures."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data.prepare import PrepareOptions, builtin_attribution, hash_bucket, main, prepare, prepare_builtin
from training.data.shards import ShardError, ShardSet
from training.data.sources import builtin_files
from training.data.validate import UNK, ValidationPolicy, decode

FIX = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIX))
import make_data_fixtures as F  # noqa: E402  (real protein sequences of the fixture files)

BAD = FIX / "bad_records.fasta"


def header_line(path: Path, prefix: str) -> int:
    """1-based line of the first header starting with `prefix` (so the test does not hard-code line numbers)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(">" + prefix))


def all_docs(directory: Path) -> list[str]:
    shards = ShardSet(directory)
    return [decode(shards.doc(i)) for i in range(shards.num_docs)]


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pq") / "proteins.parquet"
    table = pa.table({"accession": ["Q8NEW7", "P35070", "O43914"], "sequence": [F.TMIE, F.BTC[:30] + "42", F.TYROBP]})
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory, parquet_file):
    out = tmp_path_factory.mktemp("prepared")
    inputs = [
        BAD,
        FIX / "crlf_bom.fasta",
        FIX / "proteins.fasta.gz",
        FIX / "proteins.csv",
        FIX / "proteins.tsv",
        parquet_file,
    ]
    report = prepare([str(p) for p in inputs], out, overwrite=True, log=lambda *a, **k: None)
    return out, report


def test_counts_add_up_and_match_report_json(fixture_run):
    out, report = fixture_run
    assert report["accepted"] + len(report["rejected"]) == report["read"]
    # 14 FASTA records + 2 CRLF + 3 gz + 5 CSV rows + 2 TSV rows + 3 parquet rows
    assert report["read"] == 29
    assert json.loads((out / "report.json").read_text())["read"] == report["read"]
    assert ShardSet(out).num_docs == report["accepted"]


def test_each_bad_kind_is_rejected_with_file_line_id_reason(fixture_run):
    _, report = fixture_run
    got = {(Path(r["file"]).name, r["line"], r["id"]): r["reason"].split(":", 1)[0] for r in report["rejected"]}
    for r in report["rejected"]:
        assert r["file"] and r["line"] >= 1 and r["id"] and r["reason"]
    expected = {
        ("bad_records.fasta", header_line(BAD, "O43914"), "O43914"): "letter_J",
        ("bad_records.fasta", header_line(BAD, "Q9Y6J6"), "Q9Y6J6"): "digit",
        ("bad_records.fasta", header_line(BAD, "P15382"), "P15382"): "special_token_text",
        ("bad_records.fasta", header_line(BAD, "P01135 TGFA empty"), "P01135"): "empty_sequence",
        ("bad_records.fasta", header_line(BAD, "Q8NEW7 TMIE header"), "Q8NEW7"): "header_without_sequence",
        ("bad_records.fasta", header_line(BAD, "P35070"), "P35070"): "non_ascii",
        ("bad_records.fasta", header_line(BAD, "P01135 TGFA internal"), "P01135"): "internal_stop",
        ("bad_records.fasta", header_line(BAD, "Q14802 FXYD3 aligned"), "Q14802"): "gap",
        ("proteins.csv", 4, "O43914"): "letter_J",
        ("proteins.csv", 5, "P01135"): "empty_sequence",
        ("proteins.parquet", 2, "P35070"): "digit",
    }
    assert got == expected


def test_accepted_sequences_are_normalized_and_hold_no_unk(fixture_run):
    out, report = fixture_run
    shards = ShardSet(out)
    tokens = np.concatenate([shards.doc(i) for i in range(shards.num_docs)])
    assert UNK not in tokens and tokens.min() >= 4 and tokens.max() <= 30
    docs = all_docs(out)
    assert docs[:6] == [F.UBIQUITIN, F.FXYD3, F.UBIQUITIN[:60], F.TLR7, F.APP_N, F.TMIE[:12] + "X" + F.TMIE[13:]]
    assert docs[6:8] == [F.UBIQUITIN, F.KCNE1]  # CRLF + BOM file: no '\r', no BOM in the sequence
    assert docs[8:11] == [F.KCNE2, F.TYROBP, F.BTC]  # gzip
    assert docs[11:14] == [F.UBIQUITIN, F.FXYD3, F.BTC]  # CSV: lowercase upper-cased, terminal '*' stripped
    assert report["normalized"] == {"uppercased": 2, "terminal_stop_stripped": 2}


def test_over_long_is_kept_whole_and_counted_as_cropped(fixture_run):
    out, report = fixture_run
    assert report["cropped"] == 1 and report["max_length"] == 1024
    assert max(ShardSet(out).lengths) == len(F.TLR7) == 1049


def test_duplicate_ids_are_reported(fixture_run):
    _, report = fixture_run
    dup = [d for d in report["duplicate_ids"] if d["id"] == "sp|P0CG48|UBB_HUMAN"]
    assert dup == [
        dict(
            file=str(BAD),
            line=header_line(BAD, "sp|P0CG48|UBB_HUMAN duplicate"),
            id="sp|P0CG48|UBB_HUMAN",
            first_file=str(BAD),
            first_line=1,
        )
    ]
    first_crlf = next(d for d in report["duplicate_ids"] if d["id"] == "P0CG48")
    assert Path(first_crlf["first_file"]).name == "crlf_bom.fasta"  # BOM is not part of the first id


def test_duplicate_ids_can_be_rejected(tmp_path):
    options = PrepareOptions(policy=ValidationPolicy(duplicate_ids="reject"))
    report = prepare([str(BAD)], tmp_path, options, log=lambda *a: None)
    assert sum(r["reason"].startswith("duplicate_id") for r in report["rejected"]) == 1


@pytest.mark.parametrize(
    "name, needle",
    [
        ("truncated.fasta.gz", "truncated.fasta.gz"),
        ("no_sequence_column.csv", "no 'sequence' column"),
        ("missing.fasta", "missing.fasta"),
    ],
)
def test_unreadable_input_exits_nonzero_naming_the_file(tmp_path, capsys, name, needle):
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(FIX / name), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert needle in err and str(FIX / name) in err
    assert not out.exists()  # nothing half-written


def test_existing_output_needs_overwrite(fixture_run, capsys):
    out, _ = fixture_run
    assert main(["prepare", "--input", str(FIX / "proteins.tsv"), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_corrupted_shard_is_named_when_read(tmp_path, capsys):
    prepare([str(FIX / "proteins.tsv")], tmp_path, log=lambda *a: None)
    shard = tmp_path / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[70] ^= 1  # one residue byte of the first protein
    shard.write_bytes(data)
    with pytest.raises(ShardError, match=f"{shard}.*sha256 mismatch"):
        ShardSet(tmp_path, verify="sha256")
    assert main(["verify", str(tmp_path)]) == 1 and str(shard) in capsys.readouterr().err
    shards = ShardSet(tmp_path)  # a start checks headers and sizes only: it reads no residues
    assert decode(shards.doc(1))  # an intact protein of the same shard reads fine
    with pytest.raises(ShardError, match=f"{shard}: residues 0..[0-9]+ fail their crc32"):
        shards.doc(0)  # ... and the flipped byte is named with its file when its protein is read
    data[:8] = b"NOTASHRD"
    shard.write_bytes(data)
    with pytest.raises(ShardError, match=f"{shard}: bad magic"):
        ShardSet(tmp_path, verify="header")
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(ShardError, match=f"{shard}"):
        ShardSet(tmp_path, verify="header")


def test_split_fractions_and_dedup_on_any_input(tmp_path):
    report = prepare(
        [str(FIX / "proteins.fasta.gz"), str(FIX / "proteins.tsv")],
        tmp_path,
        PrepareOptions(dedup=True, split_fractions=(98, 1, 1)),
        log=lambda *a: None,
    )
    assert [r["reason"].split(":")[0] for r in report["rejected"]] == ["duplicate_sequence"]  # KCNE2 twice
    assert sum(c["sequences"] for c in report["splits"].values()) == report["accepted"] == 4


def test_cli_subprocess_prints_summary(tmp_path):
    cmd = [sys.executable, "-m", "training.data", "prepare", "--input", str(BAD), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "read 14  accepted 6  rejected 8  cropped 1" in proc.stdout
    assert "letter_J" in proc.stdout and (tmp_path / "report.json").exists() and (tmp_path / "manifest.json").exists()


# The built-in set, pinned (README "Built-in proteins"): (read, accepted, rejected by reason) per aaanalysis file.
BUILTIN_FILES = {
    "AA_CASPASE3": (233, 233, {}),
    "AA_FURIN": (71, 69, {"duplicate_sequence": 2}),
    "AA_LDR": (342, 338, {"duplicate_sequence": 4}),
    "AA_MMP2": (573, 536, {"duplicate_sequence": 37}),
    "AA_RNABIND": (221, 214, {"duplicate_sequence": 7}),
    "AA_SA": (233, 0, {"duplicate_sequence": 233}),  # the AA_CASPASE3 proteins again
    "DOM_GSEC": (126, 124, {"duplicate_sequence": 2}),
    "DOM_GSEC_PU": (694, 571, {"duplicate_sequence": 123}),
    "SEQ_AMYLO": (1414, 1411, {"duplicate_sequence": 3}),
    "SEQ_CAPSID": (7935, 7651, {"duplicate_sequence": 283, "composition": 1}),
    "SEQ_DISULFIDE": (2547, 2497, {"invalid_character": 10, "duplicate_sequence": 36, "mixed_case": 4}),
    "SEQ_LOCATION": (1835, 25, {"composition": 1810}),  # 14-letter encoding; the 25 kept are < 50 residues
    "SEQ_SOLUBLE": (17408, 17097, {"duplicate_sequence": 307, "composition": 4}),
    "SEQ_TAIL": (6668, 3177, {"duplicate_sequence": 3491}),
}


def test_builtin_proteins(tmp_path, capsys):
    report = prepare_builtin(tmp_path)
    printed = capsys.readouterr().out
    splits = report["splits"]
    assert (report["read"], report["accepted"], len(report["rejected"])) == (40300, 33943, 6357)
    assert report["rejected_by_reason"] == {
        "composition": 1815,
        "duplicate_sequence": 4528,
        "invalid_character": 10,
        "mixed_case": 4,
    }
    files = {Path(f).stem: (c["read"], c["accepted"], c["rejected"]) for f, c in report["files"].items()}
    assert files == BUILTIN_FILES
    assert splits == {
        "train": {"sequences": 33287, "residues": 10451114},
        "valid": {"sequences": 322, "residues": 94295},
        "test": {"sequences": 334, "residues": 101359},
    }
    assert report["normalized"] == {"uppercased": 0, "terminal_stop_stripped": 0} and report["cropped"] == 862
    assert "rejected composition: 1815" in printed and f"train: {splits['train']['sequences']} sequences" in printed
    location = [r for r in report["rejected"] if r["file"].endswith("SEQ_LOCATION.tsv")]
    assert location[0]["reason"].startswith("composition: 6 of the 15 common amino acids absent (E F I L P Q) in ")
    marks = [r["id"] for r in report["rejected"] if r["reason"].startswith("mixed_case: 1 lowercase letter(s)")]
    assert marks == ["DISULFIDE_1902", "DISULFIDE_1997", "DISULFIDE_2126", "DISULFIDE_2238"]
    bangs = [r for r in report["rejected"] if r["reason"].startswith("invalid_character")]
    assert {r["reason"] for r in bangs} == {"invalid_character: '!' at residue 990"}
    valid = all_docs(tmp_path / "valid")
    assert all(9800 <= hash_bucket(s.encode()) < 9900 for s in valid)  # the documented split rule
    test = set(all_docs(tmp_path / "test"))
    assert not test & set(valid) and len(test) == splits["test"]["sequences"]
    text = builtin_attribution()
    assert all(word in text for word in ("BSD-3", "aaanalysis", "Breimann", "UniProt"))
    assert report["attribution"] == text
    # verify on the prepared parent folder checks each split (it used to fail: no manifest in the parent)
    cmd = [sys.executable, "-m", "training.data", "verify", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{tmp_path / 'train'}: ok, 1 shards, 33287 proteins, 10451114 residues",
        f"{tmp_path / 'valid'}: ok, 1 shards, 322 proteins, 94295 residues",
        f"{tmp_path / 'test'}: ok, 1 shards, 334 proteins, 101359 residues",
    ]
    (tmp_path / "valid" / "manifest.json").unlink()  # a broken split still fails, naming it
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 1 and str(tmp_path / "valid") in proc.stderr


def test_no_composition_check_keeps_the_encoded_sequences(tmp_path):
    location = next(f for f in builtin_files() if f.stem == "SEQ_LOCATION")
    args = ["prepare", "--input", str(location), "--id-column", "entry"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert main([*args, "--out", str(tmp_path / "off"), "--no-composition-check"]) == 0
    default = json.loads((tmp_path / "default" / "report.json").read_text())
    off = json.loads((tmp_path / "off" / "report.json").read_text())
    assert (default["accepted"], default["rejected_by_reason"]) == (25, {"composition": 1810})
    assert (off["accepted"], off["rejected_by_reason"]) == (1835, {})
    assert default["policy"]["composition_check"] is True and off["policy"]["composition_check"] is False


def test_fasta_edge_cases(tmp_path):
    fasta = tmp_path / "edge.fa"
    fasta.write_text(f"{F.UBIQUITIN[:20]}\n;old-style comment\n>P0CG48 ok\n{F.UBIQUITIN}\n\n>\n{F.KCNE1}\n")
    report = prepare([str(fasta)], tmp_path / "out", log=lambda *a: None)
    assert [(r["line"], r["reason"].split(":")[0]) for r in report["rejected"]] == [(1, "sequence_before_header")]
    assert all_docs(tmp_path / "out") == [F.UBIQUITIN, F.KCNE1]  # an empty id is kept (nothing to compare)


CONCURRENT = """
import sys
from training.data_setup import builtin_root
print("ready", flush=True)
sys.stdin.readline()  # both go on together once both have imported torch
print(builtin_root(sys.argv[1]))
"""


def test_two_runs_starting_at_once_prepare_the_builtin_set_once(tmp_path):
    """Two trainings started together on a fresh machine share data.cache_dir: one prepares, the other waits for it
    (without the lock both stage shards in the same folder and one deletes the other's)."""
    cmd = [sys.executable, "-c", CONCURRENT, str(tmp_path)]
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen(cmd, cwd=Path(__file__).parents[1], **pipes) for _ in range(2)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2, [p.stderr.read()[-2000:] for p in procs]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    for name, sequences in (("train", 33287), ("valid", 322), ("test", 334)):
        shards = ShardSet(tmp_path / "builtin" / name, verify="sha256")
        assert len(shards) == sequences
