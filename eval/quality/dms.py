"""The built-in deep-mutational-scanning (DMS) set for eval.zeroshot: three assays from the mavenn 1.1.4 wheel (MIT),
converted to ProteinGym's DMS CSV format.

    python -m eval.quality.dms fetch --out data/quality/dms [--wheel mavenn-1.1.4-py3-none-any.whl]
                                     [--gb1-doubles 20000] [--seed 0]

Fetch: `pip download --no-deps mavenn==1.1.4` (PyPI only; or --wheel, a copy already on disk), the wheel's sha256 is
checked, and only `mavenn/examples/datasets/{gb1,tdp43,amyloid}_data.csv.gz` are read from it (nothing installed).
Each row's `x` is the full variant sequence; the files have no wild-type row, so WT = the per-position consensus of
`x`, and the `mutant` string (`A24C`, `A24C:G30T`, 1-based positions in that sequence) is derived from the
differences. Every count below was measured on the wheel; any mismatch stops the fetch, naming the file and both counts.

| assay   | paper (mavenn's `y` is DMS_score, sign as published) | length | rows    | singles | doubles | with stop |
|---------|------------------------------------------------------|--------|---------|---------|---------|-----------|
| gb1     | Olson et al. 2014 (protein G B1, IgG-Fc binding)     |   55   | 530,737 |       0 | 530,737 |       0   |
| tdp43   | Bolognesi et al. 2019 (TDP-43 290-373, toxicity)     |   84   |  57,996 |   1,266 |  56,730 |   4,528   |
| amyloid | Seuma et al. 2022 (Abeta42 nucleation)               |   42   |  16,066 |     499 |  15,567 |   1,583   |

Prepared files (out/<assay>.csv, columns mutant, mutated_sequence, DMS_score, set): variants with a stop codon (`*`)
are dropped (ProteinGym's substitution sets hold none): tdp43 keeps 1,196 singles + 52,272 doubles, amyloid 468 +
14,015. GB1 has no singles in mavenn; it keeps a fixed seeded subsample of --gb1-doubles doubles (default 20,000 of
530,737, numpy default_rng(seed), kept in file order), which is plenty for a Spearman and keeps files and per-variant
outputs small (masked-marginal scoring costs one forward per mutated position, 55 for GB1, whatever the variant
count). out/manifest.json records the version, wheel sha256, WT sequences, counts, seed and subsample size.
Positions are relative to the sequence in the file (TDP-43 residue 290 is position 1), not to full-length UniProt
sequences as in ProteinGym, so the model sees only the assayed segment.

Sources: mavenn (Tareen et al. 2022, Genome Biology); Olson, Wu & Sun 2014 (Curr Biol); Bolognesi et al. 2019
(Nat Commun); Seuma et al. 2022 (Nat Commun); format: ProteinGym (Notin et al. 2023).

Public API
    ASSAYS: dict[name, AssaySpec];  MAVENN_VERSION, WHEEL_SHA256
    DmsFetchError(Exception)
    fetch_wheel(dest) -> Path;  check_wheel(path) -> None
    read_mavenn(wheel, name) -> MavennAssay   # counts checked against ASSAYS[name]
    derive_mutant(wt, variant) -> str
    prepare(out, wheel=None, gb1_doubles=20000, seed=0) -> dict (the manifest)
"""

import argparse
import csv
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAVENN_VERSION = "1.1.4"
WHEEL_NAME = f"mavenn-{MAVENN_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "b54077ee40a94892ace26b609b1b6778bc906e14483d7e74f8258c9731871e57"
MEMBER = "mavenn/examples/datasets/{}_data.csv.gz"
COLUMNS = ("mutant", "mutated_sequence", "DMS_score", "set")
DEFAULT_OUT = "data/quality/dms"
GB1_DOUBLES = 20_000


@dataclass(frozen=True)
class AssaySpec:
    """What the wheel holds for one assay (measured), and where it comes from."""

    length: int
    rows: int
    singles: int
    doubles: int
    with_stop: int
    citation: str


ASSAYS = {
    "gb1": AssaySpec(55, 530_737, 0, 530_737, 0, "Olson, Wu & Sun 2014, Curr Biol 24:2643 (GB1, IgG-Fc binding)"),
    "tdp43": AssaySpec(84, 57_996, 1_266, 56_730, 4_528, "Bolognesi et al. 2019, Nat Commun 10:4046 (TDP-43 290-373)"),
    "amyloid": AssaySpec(42, 16_066, 499, 15_567, 1_583, "Seuma et al. 2022, Nat Commun 13:7084 (Abeta42 nucleation)"),
}


class DmsFetchError(Exception):
    """The wheel or one of its files is not what was measured; the message names the file and both values."""


@dataclass(frozen=True)
class MavennAssay:
    name: str
    wt: str
    variants: list  # (n,) full variant sequences, file order
    scores: list  # (n,) float y
    sets: list  # (n,) training / validation / test
    dists: np.ndarray  # (n,) int Hamming distance to wt


def fetch_wheel(dest: Path) -> Path:
    """pip download --no-deps mavenn==1.1.4 into dest; returns the wheel's path (sha256 checked)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", f"mavenn=={MAVENN_VERSION}", "-d", str(dest)]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.exists():
        raise DmsFetchError(f"`{' '.join(command)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    check_wheel(wheel)
    return wheel


def check_wheel(path: Path) -> None:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise DmsFetchError(f"{path}: sha256 {digest}, expected {WHEEL_SHA256} (mavenn {MAVENN_VERSION})")


def consensus(variants: list) -> str:
    """Per-position most frequent letter of equal-length sequences (ties: lowest byte)."""
    arr = np.frombuffer("".join(variants).encode("ascii"), dtype=np.uint8).reshape(len(variants), -1)  # (n, L)
    return bytes(int(np.bincount(column, minlength=256).argmax()) for column in arr.T).decode("ascii")


def derive_mutant(wt: str, variant: str) -> str:
    """'A24C:G30T' (1-based, ascending) for the letters where variant differs from wt."""
    return ":".join(f"{w}{i + 1}{v}" for i, (w, v) in enumerate(zip(wt, variant)) if w != v)


def _expect(where: str, what: str, measured: int, expected: int) -> None:
    if measured != expected:
        raise DmsFetchError(
            f"{where}: {what} {measured:,}, expected {expected:,} (measured on mavenn {MAVENN_VERSION})"
        )


def read_mavenn(wheel: Path, name: str) -> MavennAssay:
    """One assay from the wheel, every count checked against ASSAYS[name]."""
    spec, member = ASSAYS[name], MEMBER.format(name)
    where = f"{wheel}!{member}"
    with zipfile.ZipFile(wheel) as archive:
        text = gzip.decompress(archive.read(member)).decode("ascii")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("set", "dist", "y", "x") if c not in (reader.fieldnames or [])]
    if missing:
        raise DmsFetchError(f"{where}: missing columns {missing} (header {reader.fieldnames})")
    rows = list(reader)
    _expect(where, "rows", len(rows), spec.rows)
    variants = [r["x"] for r in rows]
    bad = next((i for i, v in enumerate(variants) if len(v) != spec.length), None)
    if bad is not None:
        raise DmsFetchError(f"{where}: line {bad + 2}: sequence length {len(variants[bad])}, expected {spec.length}")
    wt = consensus(variants)
    arr = np.frombuffer("".join(variants).encode("ascii"), dtype=np.uint8).reshape(len(rows), -1)  # (n, L)
    dists = (arr != np.frombuffer(wt.encode("ascii"), dtype=np.uint8)).sum(1)  # (n,)
    declared = np.array([int(r["dist"]) for r in rows])
    disagree = np.flatnonzero(dists != declared)
    if disagree.size:
        i = int(disagree[0])
        raise DmsFetchError(
            f"{where}: line {i + 2}: {dists[i]} differences from the consensus WT but dist={declared[i]} "
            f"({disagree.size:,} rows disagree)"
        )
    _expect(where, "singles", int((dists == 1).sum()), spec.singles)
    _expect(where, "doubles", int((dists == 2).sum()), spec.doubles)
    _expect(where, "rows with a stop '*'", sum("*" in v for v in variants), spec.with_stop)
    _expect(where, "rows that are neither single nor double", int(((dists < 1) | (dists > 2)).sum()), 0)
    scores = [float(r["y"]) for r in rows]
    return MavennAssay(name, wt, variants, scores, [r["set"] for r in rows], dists)


def keep_rows(assay: MavennAssay, gb1_doubles: int, seed: int) -> np.ndarray:
    """(k,) indices kept, in file order: no stop codons; for gb1 a seeded subsample of the doubles."""
    keep = np.array(["*" not in v for v in assay.variants])  # (n,)
    if assay.name == "gb1":
        doubles = np.flatnonzero(keep & (assay.dists == 2))
        if not 0 < gb1_doubles <= doubles.size:
            raise DmsFetchError(f"--gb1-doubles {gb1_doubles}: must be in 1..{doubles.size:,}")
        chosen = np.random.default_rng(seed).choice(doubles, size=gb1_doubles, replace=False)
        keep = np.isin(np.arange(len(assay.variants)), chosen) | (keep & (assay.dists == 1))
    return np.flatnonzero(keep)


def write_assay(path: Path, assay: MavennAssay, rows: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for i in rows:
            v = assay.variants[i]
            writer.writerow([derive_mutant(assay.wt, v), v, repr(assay.scores[i]), assay.sets[i]])


def prepare(out, wheel=None, gb1_doubles: int = GB1_DOUBLES, seed: int = 0) -> dict:
    """Write out/<assay>.csv (ProteinGym format) and out/manifest.json; returns the manifest."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(wheel) if wheel else fetch_wheel(Path(tmp))
        check_wheel(wheel_path)
        assays = {name: read_mavenn(wheel_path, name) for name in ASSAYS}  # every check before anything is written
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "source": f"mavenn=={MAVENN_VERSION} (PyPI, MIT)",
        "wheel_sha256": WHEEL_SHA256,
        "seed": seed,
        "gb1_doubles": gb1_doubles,
        "assays": {},
    }
    for name, assay in assays.items():
        rows = keep_rows(assay, gb1_doubles, seed)
        write_assay(out / f"{name}.csv", assay, rows)
        spec = ASSAYS[name]
        manifest["assays"][name] = {
            "file": f"{name}.csv",
            "citation": spec.citation,
            "wt": assay.wt,
            "rows_in_wheel": spec.rows,
            "singles_in_wheel": spec.singles,
            "doubles_in_wheel": spec.doubles,
            "with_stop_in_wheel": spec.with_stop,
            "rows_kept": int(rows.size),
            "singles_kept": int((assay.dists[rows] == 1).sum()),
            "doubles_kept": int((assay.dists[rows] == 2).sum()),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepared_files(directory) -> list:
    """The prepared CSVs of `directory` (manifest order); DmsFetchError if it holds no complete preparation."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        files = [directory / entry["file"] for entry in manifest["assays"].values()]
    except (OSError, ValueError, KeyError) as err:
        raise DmsFetchError(f"{directory}: not a prepared DMS set ({err})") from err
    absent = [str(p) for p in files if not p.exists()]
    if absent:
        raise DmsFetchError(f"{directory}: manifest.json lists missing files {absent}")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.quality.dms", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download mavenn 1.1.4 and write ProteinGym-format CSVs")
    fetch.add_argument("--out", default=DEFAULT_OUT, metavar="DIR")
    fetch.add_argument("--wheel", default=None, help=f"a local {WHEEL_NAME} instead of pip download")
    fetch.add_argument("--gb1-doubles", type=int, default=GB1_DOUBLES, help="seeded subsample of GB1 doubles")
    fetch.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.out, args.wheel, args.gb1_doubles, args.seed)
    except DmsFetchError as err:
        print(f"eval.quality.dms: error: {err}", file=sys.stderr)
        return 2
    for name, entry in manifest["assays"].items():
        print(
            f"{name}: {entry['rows_kept']:,} variants ({entry['singles_kept']:,} singles, "
            f"{entry['doubles_kept']:,} doubles) of {entry['rows_in_wheel']:,} -> {Path(args.out) / entry['file']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
