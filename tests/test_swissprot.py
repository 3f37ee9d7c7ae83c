"""Swiss-Prot 2014 corpus (training/blastdb.py, training/swissprot.py) on tiny BLAST v4 DBs written from real records of
Debian metastudent-data 2.0.1-8 (tests/fixtures/blastdb/make_blastdb_fixture.py; its writer rewrites the package's
486,000-record BPO DB byte for byte)."""

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from training.data.blastdb import BlastDBError, read_db, read_header, read_union
from training.data.shards import ShardSet
from training.data.swissprot import DBS, MEMBERS, CorpusOptions, SwissProtError, build_corpus, extract, main
from training.data.validate import decode

FIX = Path(__file__).parent / "fixtures" / "blastdb"
BASES = [FIX / db / "goasp.fasta" for db in DBS]
HBA_HUMAN = (  # P69905, hemoglobin subunit alpha (UniProt), 142 aa
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKLRVDPVNFKLLSHCLLVTLAA"
    "HLPAEFTPAVHASLDKFLASVSTVLTSKYR"
)
UBIQUITIN = (
    "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"  # P0CG48 1-76: not in the DBs
)
QUIET = lambda *a: None


def test_header_and_records():
    h = read_header(BASES[0].with_name("goasp.fasta.pin"))
    assert (h.num_sequences, h.total_residues, h.max_length) == (18, 811, 147)
    assert h.date == "Jan 20, 2022  10:32 AM" and h.title == "tests/fixtures/blastdb/BPO/goasp.fasta"
    bpo = read_db(BASES[0])
    assert [p.accession for p in bpo][:5] == ["P99504", "P0C7R8", "P0C7R9", "P0C7R7", "P80333"]
    seqs = dict(bpo)
    assert seqs["P69905"] == HBA_HUMAN.encode()
    assert seqs["P99504"] == b"ATQTSPSPKGAAAXXXRVV"  # NCBIstdaa X
    assert b"U" in seqs["P81335"] and b"B" in seqs["Q36570"]
    assert "Q9N117" in seqs  # its title is 512 bytes long (BER length 0x82 + 2 bytes)
    assert [len(read_db(b)) for b in BASES] == [18, 4, 5]


def test_union_dedupes_by_accession_then_sequence():
    u = read_union(BASES)
    assert (u.accessions, len(u.proteins), u.residues, u.shared_accessions) == (22, 15, 824, 5)
    assert [u.per_db[str(b)]["new_accessions"] for b in BASES] == [18, 2, 2]
    groups = {accs for accs, _ in u.proteins if len(accs) > 1}
    assert groups == {
        ("P0C7R8", "P0C7R9", "P0C7R7"),
        ("P85658", "P85649", "P85729"),
        ("P0C815", "A9JX08"),
        ("P68952", "P68953"),  # P68953 comes from MFO, P68952 from BPO
        ("Q2EES6", "Q3Z077"),  # Q3Z077 only in CCO
    }
    assert u.conflicts == []


def corrupt(tmp_path: Path, suffix: str, edit) -> Path:
    """A copy of the BPO fixture DB with one file changed by `edit(bytes) -> bytes`."""
    for s in (".pin", ".psq", ".phr"):
        shutil.copy(BASES[0].with_name("goasp.fasta" + s), tmp_path / ("goasp.fasta" + s))
    path = tmp_path / ("goasp.fasta" + suffix)
    path.write_bytes(edit(path.read_bytes()))
    return path


def _total_plus_one(pin: bytes) -> bytes:
    at = 8 + 4 + struct.unpack_from(">i", pin, 8)[0]
    at += 4 + struct.unpack_from(">i", pin, at)[0] + 4  # after the date, at N
    total = struct.unpack_from("<Q", pin, at)[0]
    return pin[:at] + struct.pack("<Q", total + 1) + pin[at + 8 :]


@pytest.mark.parametrize(
    "suffix, edit, reason",
    [
        (".pin", _total_plus_one, "header says 812 residues (longest 147), "),
        (".pin", lambda b: b[:-4], "but N = 18 needs"),
        (".pin", lambda b: b[:3] + b"\x05" + b[4:], "not a BLAST v4 protein DB (version 5"),
        (".psq", lambda b: b[:-1], "829 bytes, but the .pin's sequence offsets run 1..830"),
        (".phr", lambda b: b.replace(b"P69905|GO:", b"P69905|XX:"), "17 titles 'ACC|GO:...' for 18 records"),
    ],
)
def test_bad_db_fails_naming_the_file(tmp_path, suffix, edit, reason):
    path = corrupt(tmp_path, suffix, edit)
    with pytest.raises(BlastDBError) as e:
        read_db(tmp_path / "goasp.fasta")
    assert reason in str(e.value) and str(path) in str(e.value)


def test_corpus_end_to_end_with_exclusions(tmp_path):
    exclude = tmp_path / "eval.fasta"  # HBA in lower case with a stop, the P85658 group's peptide, and a stranger
    group = dict(read_db(BASES[0]))["P85658"].decode()
    exclude.write_text(f">hba\n{HBA_HUMAN.lower()}*\n>pep\n{group}\n>ubq\n{UBIQUITIN}\n")
    out = tmp_path / "corpus"
    info = build_corpus(FIX, out, CorpusOptions(exclude=(str(exclude),)), log=QUIET)
    assert info["union"] == dict(accessions=22, sequences=15, residues=824, shared_accessions=5, conflicts=[])
    assert info["excluded"] == dict(
        files={str(exclude): dict(records=3, sequences=3)},
        sequences=2,
        accessions=4,  # P69905 + P85658/P85649/P85729
        residues=142 + len(group),
    )
    assert info["fasta"] == dict(path="swissprot2014.fasta", sequences=13, residues=824 - 142 - len(group))
    prep = info["prepare"]
    assert (prep["read"], prep["accepted"], prep["rejected_by_reason"]) == (13, 13, {})
    assert sum(s["sequences"] for s in prep["splits"].values()) == 13
    docs = [decode(d) for split in ("train", "valid", "test") for d in _docs(out / split)]
    assert len(docs) == 13 and HBA_HUMAN not in docs and group not in docs
    assert "ATQTSPSPKGAAAXXXRVV" in docs
    assert json.loads((out / "corpus.json").read_text())["licence"].startswith("Sequences: UniProtKB/Swiss-Prot")
    assert json.loads((out / "report.json").read_text())["accepted"] == 13
    with pytest.raises(SwissProtError, match="already exists"):
        build_corpus(FIX, out, CorpusOptions(), log=QUIET)
    again = build_corpus(FIX, out, CorpusOptions(overwrite=True, max_proteins=5), log=QUIET)
    assert again["prepare"]["accepted"] == 5 and again["excluded"]["sequences"] == 0


def _docs(directory: Path) -> list:
    shards = ShardSet(directory)
    return [shards.doc(i) for i in range(shards.num_docs)]


def test_cli_bad_inputs_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--db-dir", str(FIX), "--exclude", str(tmp_path / "missing.fasta")]) == 1
    assert f"{tmp_path / 'missing.fasta'}: exclusion file not found" in capsys.readouterr().err
    debs = tmp_path / "debs"
    debs.mkdir()
    (debs / "metastudent-data_2.0.1-8_all.deb").write_bytes(b"!<arch>\nnot the package")
    assert main(["--out", str(out), "--deb-dir", str(debs)]) == 1
    err = capsys.readouterr().err
    assert f"{debs / 'metastudent-data_2.0.1-8_all.deb'}: sha256 " in err and "expected 020ed0c5" in err
    assert not out.exists() and sorted(p.name for p in debs.iterdir()) == ["metastudent-data_2.0.1-8_all.deb"]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a .deb")
def test_extract_reads_a_real_deb(tmp_path):
    """A .deb built by dpkg-deb (xz) holding the fixture DBs at the package's paths: extract() takes out the members."""
    root = tmp_path / "pkg"
    for member in MEMBERS:
        dest = root / member
        dest.parent.mkdir(parents=True, exist_ok=True)
        if member.endswith((".pin", ".psq", ".phr")):
            db, name = member.split("/")[-2:]
            shutil.copy(FIX / db / name, dest)
        else:
            dest.write_text("201401\n")
    (root / "DEBIAN").mkdir()
    control = "Package: metastudent-data\nVersion: 2.0.1-8\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    (root / "DEBIAN" / "control").write_text(control)
    deb = tmp_path / "d" / "test.deb"
    deb.parent.mkdir()
    subprocess.run(
        ["dpkg-deb", "-Zxz", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True
    )
    dataset = extract(deb, log=QUIET)
    assert dataset == tmp_path / "d" / "metastudent-data_2.0.1-8" / "usr/share/metastudent-data/dataset_201401"
    assert read_union([dataset / db / "goasp.fasta" for db in DBS]).accessions == 22
    stamp = json.loads((dataset.parents[3] / "extracted.json").read_text())
    assert len(stamp["sizes"]) == 11 and stamp["sizes"][MEMBERS[1]] == 830
    assert extract(deb, log=lambda m: pytest.fail(m)) == dataset  # done once: a second call does not extract
