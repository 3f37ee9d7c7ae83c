"""Swiss-Prot 2014 pretraining corpus from Debian `metastudent-data` 2.0.1-8 (UniProtKB/Swiss-Prot 2014_01 proteins,
as three BLAST v4 protein DBs: BPO, MFO, CCO) -> one FASTA of unique sequences -> token shards via training.data.

    python -m training.data.swissprot --out DIR [--deb-dir DIR] [--exclude FILE ...] [--max-proteins N] [--overwrite]
    python -m training.data.swissprot --out DIR --db-dir DATASET_DIR ...    # DBs already extracted (DATASET_DIR/BPO/...)

Steps: (1) read the --exclude files (FASTA/CSV/TSV/parquet: evaluation-set proteins) and check the output folder;
(2) find the .deb in --deb-dir, or `apt-get download metastudent-data=2.0.1-8` into DIR/deb; check its sha256;
(3) extract only the 9 DB files (stdlib ar + tar.xz; cached beside the .deb, so a re-run skips it); (4) read the 3
DBs (training.data.blastdb: header counts checked), dedupe by accession and by sequence, check the pinned counts
(516,371 accessions, 435,059 sequences, 165,223,205 residues); (5) drop every sequence that is exactly one of the
excluded proteins (upper-cased, terminal '*' stripped), keep the first --max-proteins; (6) write
DIR/swissprot2014.fasta (`>FIRST_ACC OTHER_ACC ...`, one line per sequence) and prepare it with training.data.prepare
(default validation policy, dedup on, split 98/1/1 by `hash_bucket`) into DIR/{train,valid,test} + DIR/report.json;
(7) write DIR/corpus.json: source, version, sha256, counts, exclusions, licence, citation.
A re-run with other --exclude files (and --overwrite) costs the reading and the prepare only (~2 min on 1 core).

Public API
    PACKAGE, VERSION, DEB, DEB_SHA256, EXPECTED, DBS, LICENCE, CITATION
    SwissProtError(Exception)                        # the message names the file and the reason
    CorpusOptions(exclude=(), max_proteins=None, fractions=(98, 1, 1), num_proc=1, overwrite=False)  # frozen
    read_exclusions(paths) -> Exclusions             # the exact sequences to drop, per file counts
    fetch_deb(deb_dir, log=print) -> Path            # the checked .deb (downloaded when absent)
    extract(deb, log=print) -> Path                  # the dataset folder holding BPO/ MFO/ CCO/
    build_corpus(db_dir, out, options, *, source=None, expected=None, log=print) -> corpus.json dict
    swissprot_corpus(out, options, *, deb_dir=None, log=print) -> corpus.json dict
    add_arguments(parser), run(args) -> int          # the flags, for a `swissprot` subcommand of another CLI
    main(argv=None) -> int                           # 0 ok, 1 on bad input (nothing written before it is checked)
"""

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .blastdb import BlastDBError, read_union
from .shards import SHARD_MANIFEST
from .sources import SourceError, iter_records

PACKAGE, VERSION = "metastudent-data", "2.0.1-8"
DEB = f"{PACKAGE}_{VERSION}_all.deb"
DEB_SHA256 = "020ed0c560a5ba96f39c434399b3ecf0fa790a4776c4aac24458f837969ae54b"
DATASET = "usr/share/metastudent-data/dataset_201401"  # inside the package
DBS = ("BPO", "MFO", "CCO")  # read in this order: an accession's first DB wins
MEMBERS = tuple(f"{DATASET}/{db}/goasp.fasta.{s}" for db in DBS for s in ("pin", "psq", "phr")) + (
    "usr/share/doc/metastudent-data/copyright",
    "usr/share/metastudent-data/dataversion.txt",
)
EXPECTED = dict(accessions=516_371, sequences=435_059, residues=165_223_205)  # measured on the pinned .deb
FASTA = "swissprot2014.fasta"
LICENCE = (
    "Sequences: UniProtKB/Swiss-Prot release 2014_01, UniProt Consortium; UniProt data are distributed under "
    "CC BY 4.0 (UniProt's current terms). Packaging: Debian metastudent-data 2.0.1-8 (c) 2011-2015 Tobias Hamp, "
    "Rostlab, GPL-2+."
)
CITATION = (
    "The UniProt Consortium. UniProt: a hub for protein information. Nucleic Acids Res. 43:D204-D212 (2015). "
    "Packaged for Metastudent: Hamp T. et al. Homology-based inference sets the bar high for protein function "
    "prediction. BMC Bioinformatics 14(Suppl 3):S7 (2013)."
)


class SwissProtError(Exception):
    """A missing or wrong .deb, a bad exclusion file, an existing output: the message names the file."""


@dataclass(frozen=True, kw_only=True)
class CorpusOptions:
    """What the corpus keeps and how it is prepared."""

    exclude: tuple = ()  # FASTA/CSV/TSV/parquet files: exact sequences to drop (evaluation-set proteins)
    max_proteins: int | None = None  # keep the first N unique sequences (after exclusion); None: all
    fractions: tuple = (98, 1, 1)  # train/valid/test by hash_bucket of the sequence
    num_proc: int = 1  # prepare's worker processes (same output for any)
    overwrite: bool = False  # replace shards already in the output folder


@dataclass(frozen=True)
class Exclusions:
    sequences: frozenset  # upper-case letters, terminal '*' stripped
    per_file: dict  # path -> dict(records, sequences)


def _normal(seq: bytes) -> bytes:
    return seq.upper().rstrip(b"*")


def read_exclusions(paths) -> Exclusions:
    """Every sequence of the exclusion files; SwissProtError naming a file that is missing, unreadable or empty."""
    found, per_file = set(), {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise SwissProtError(f"{path}: exclusion file not found")
        try:
            seqs = [_normal(r.seq) for r in iter_records(path) if r.seq]
        except SourceError as e:
            raise SwissProtError(f"exclusion file {e}") from e
        if not seqs:
            raise SwissProtError(f"{path}: exclusion file holds no sequences")
        per_file[str(path)] = dict(records=len(seqs), sequences=len(set(seqs)))
        found.update(seqs)
    return Exclusions(frozenset(found), per_file)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch_deb(deb_dir, log=print) -> Path:
    """deb_dir/DEB, downloaded with `apt-get download` when absent (into a temporary folder first); its sha256 must be
    DEB_SHA256."""
    folder = Path(deb_dir)
    deb = folder / DEB
    if not deb.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"downloading {PACKAGE}={VERSION} (225 MB) with apt-get into {folder}")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = ["apt-get", "download", f"{PACKAGE}={VERSION}"]
            try:
                done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            except OSError as e:
                raise SwissProtError(f"{deb}: not there, and apt-get cannot run: {e}") from e
            got = Path(tmp) / DEB
            if done.returncode or not got.is_file():
                raise SwissProtError(
                    f"{deb}: not there, and `{' '.join(cmd)}` failed (exit {done.returncode}; try `apt-get update`): "
                    f"{done.stderr.strip()[-500:]}"
                )
            _check_sha256(got, deb)
            got.replace(deb)
    _check_sha256(deb, deb)
    return deb


def _check_sha256(path: Path, name: Path) -> None:
    digest = _sha256(path)
    if digest != DEB_SHA256:
        raise SwissProtError(f"{name}: sha256 {digest}, expected {DEB_SHA256} ({PACKAGE} {VERSION})")


class _Slice(io.RawIOBase):
    """A read-only window of an open file: one member of an ar archive."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(memoryview(buf)[: min(len(buf), self.left)])
        self.left -= n
        return n


def _data_member(f, deb: Path) -> int:
    """Skip to the data.tar.* member of an ar archive (a .deb); returns its size."""
    if f.read(8) != b"!<arch>\n":
        raise SwissProtError(f"{deb}: not a Debian package (no ar magic)")
    while header := f.read(60):
        if len(header) < 60:
            break
        name, size = header[:16].strip().rstrip(b"/"), int(header[48:58])
        if name.startswith(b"data.tar"):
            return size
        f.seek(size + size % 2, io.SEEK_CUR)
    raise SwissProtError(f"{deb}: no data.tar member")


def extract(deb, log=print) -> Path:
    """Extract MEMBERS of the .deb beside it, into <deb dir>/<package>_<version>/ (skipped when a finished extraction
    of a .deb with this sha256 is there); returns the dataset folder holding BPO/, MFO/, CCO/."""
    deb = Path(deb)
    root = deb.parent / f"{PACKAGE}_{VERSION}"
    stamp, digest = root / "extracted.json", _sha256(deb)
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == digest:
        sizes = json.loads(stamp.read_text())["sizes"]
        if all((root / m).is_file() and (root / m).stat().st_size == n for m, n in sizes.items()):
            return root / DATASET
    log(f"extracting {len(MEMBERS)} files of {deb} -> {root}")
    tmp = deb.parent / f".{root.name}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    wanted, sizes = set(MEMBERS), {}
    with open(deb, "rb") as f:
        window = io.BufferedReader(_Slice(f, _data_member(f, deb)), 1 << 20)
        try:
            with tarfile.open(fileobj=window, mode="r|*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if name in wanted and member.isfile():
                        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(tmp / name, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
                        sizes[name] = member.size
        except (tarfile.TarError, EOFError, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SwissProtError(f"{deb}: cannot extract: {type(e).__name__}: {e}") from e
    missing = sorted(wanted - set(sizes))
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SwissProtError(f"{deb}: lacks {', '.join(missing)}")
    (tmp / "extracted.json").write_text(json.dumps(dict(deb=deb.name, sha256=digest, sizes=sizes), indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    return root / DATASET


def _check_out(out: Path, overwrite: bool) -> None:
    for split in ("train", "valid", "test"):
        if (out / split / SHARD_MANIFEST).exists() and not overwrite:
            raise SwissProtError(f"{out / split / SHARD_MANIFEST}: already exists (pass --overwrite to replace it)")


def _write_fasta(proteins: list, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        for accessions, seq in proteins:
            f.write(b">" + " ".join(accessions).encode("ascii") + b"\n" + seq + b"\n")
    tmp.replace(path)


def build_corpus(db_dir, out, options: CorpusOptions, *, source=None, expected=None, log=print) -> dict:
    """From db_dir/{BPO,MFO,CCO}/goasp.fasta: dedupe, exclude, write out/swissprot2014.fasta, prepare shards into
    out/{train,valid,test}, write out/corpus.json (with `source`, a dict saying where the DBs came from); `expected`
    (dict like EXPECTED) must equal the union's counts. Returns corpus.json's contents."""
    from .prepare import DataError, PrepareOptions, prepare  # torch-heavy: only when preparing

    out = Path(out)
    exclusions = read_exclusions(options.exclude)
    _check_out(out, options.overwrite)
    bases = [Path(db_dir) / db / "goasp.fasta" for db in DBS]
    union = read_union(bases)
    counts = dict(accessions=union.accessions, sequences=len(union.proteins), residues=union.residues)
    if expected is not None and counts != expected:
        raise SwissProtError(f"{db_dir}: read {counts}, the pinned package has {expected}")
    kept = [p for p in union.proteins if p[1] not in exclusions.sequences]
    dropped = [p for p in union.proteins if p[1] in exclusions.sequences]
    kept = kept[: options.max_proteins] if options.max_proteins is not None else kept
    log(
        f"{db_dir}: {counts['accessions']} accessions, {counts['sequences']} unique sequences, "
        f"{counts['residues']} residues; excluded {len(dropped)} sequences ({sum(len(a) for a, _ in dropped)} "
        f"accessions); writing {len(kept)}"
    )
    out.mkdir(parents=True, exist_ok=True)
    fasta = out / FASTA
    _write_fasta(kept, fasta)
    prep = PrepareOptions(dedup=True, split_fractions=tuple(options.fractions), num_proc=options.num_proc)
    try:
        report = prepare([fasta], out, prep, overwrite=options.overwrite, log=log, extra=dict(attribution=LICENCE))
    except DataError as e:
        raise SwissProtError(str(e)) from e
    info = dict(
        corpus="swissprot2014",
        source=source or dict(db_dir=str(db_dir)),
        databases={db: union.per_db[str(b)] for db, b in zip(DBS, bases)},
        union=dict(counts, shared_accessions=union.shared_accessions, conflicts=union.conflicts),
        excluded=dict(
            files=exclusions.per_file,
            sequences=len(dropped),
            accessions=sum(len(a) for a, _ in dropped),
            residues=sum(len(s) for _, s in dropped),
        ),
        max_proteins=options.max_proteins,
        fasta=dict(path=FASTA, sequences=len(kept), residues=sum(len(s) for _, s in kept)),
        prepare=dict(
            read=report["read"],
            accepted=report["accepted"],
            rejected_by_reason=report["rejected_by_reason"],
            cropped=report["cropped"],
            splits=report["splits"],
            fractions=list(options.fractions),
        ),
        licence=LICENCE,
        citation=CITATION,
    )
    (out / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"{out / 'corpus.json'}: written")
    return info


def swissprot_corpus(out, options: CorpusOptions, *, deb_dir=None, log=print) -> dict:
    """The whole corpus: check the inputs, fetch and check the .deb (deb_dir, default out/deb), extract, build."""
    out = Path(out)
    read_exclusions(options.exclude)  # bad exclusion files stop the run before anything is downloaded
    _check_out(out, options.overwrite)
    deb = fetch_deb(deb_dir if deb_dir is not None else out / "deb", log)
    db_dir = extract(deb, log)
    source = dict(
        package=PACKAGE,
        version=VERSION,
        deb=DEB,
        sha256=DEB_SHA256,
        fetched_with=f"apt-get download {PACKAGE}={VERSION} (Debian bookworm main)",
        members=list(MEMBERS[: 3 * len(DBS)]),
        data="UniProtKB/Swiss-Prot 2014_01 (dataset_201401)",
    )
    return build_corpus(db_dir, out, options, source=source, expected=EXPECTED, log=log)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The corpus flags (also for a `swissprot` subcommand of another CLI); run them with `run(args)`."""
    ap.add_argument("--out", required=True, metavar="DIR", help="shards in DIR/{train,valid,test}, DIR/corpus.json")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--deb-dir", metavar="DIR", help=f"holds {DEB} (downloaded there if absent; default DIR/deb)")
    where.add_argument("--db-dir", metavar="DIR", help="already extracted DBs: DIR/{BPO,MFO,CCO}/goasp.fasta.*")
    ap.add_argument("--exclude", nargs="+", default=[], metavar="FILE", help="drop these exact sequences")
    ap.add_argument("--max-proteins", type=int, metavar="N", help="keep the first N unique sequences")
    ap.add_argument("--num-proc", type=int, default=1, help="prepare's worker processes (same output for any)")
    ap.add_argument("--overwrite", action="store_true", help="replace shards already in DIR")


def run(args: argparse.Namespace) -> int:
    """Build the corpus the parsed flags ask for; 0 ok, 1 (message on stderr) on bad input."""
    if args.max_proteins is not None and args.max_proteins < 1:
        print(f"error: --max-proteins must be >= 1, got {args.max_proteins}", file=sys.stderr)
        return 1
    options = CorpusOptions(
        exclude=tuple(args.exclude), max_proteins=args.max_proteins, num_proc=args.num_proc, overwrite=args.overwrite
    )
    try:
        if args.db_dir:
            build_corpus(args.db_dir, args.out, options)
        else:
            swissprot_corpus(args.out, options, deb_dir=args.deb_dir)
    except (SwissProtError, BlastDBError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.data.swissprot", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
