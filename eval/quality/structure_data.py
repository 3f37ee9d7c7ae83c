"""Secondary-structure and fold data for the quality yardsticks, from the sidechainnet 1.0.1 wheel (PyPI).

    python -m eval.quality.structure_data fetch --out data/quality/sidechainnet [--wheel FILE] [--seed 0]

`fetch` downloads the pinned wheel by package name (`pip download --no-deps sidechainnet==1.0.1`; or takes --wheel),
checks its sha256, reads three members of `sidechainnet/resources/` straight from the archive (nothing else of the
package is unpacked or imported), checks every count against the numbers measured when this module was written
(a mismatch is an error, never a warning) and writes, under --out:

    ss_chains.jsonl.gz     every PDB chain: id, sequence, dssp8, split (train|test), source (see "Splits")
    ss_subset.jsonl        the CPU subset the secondary-structure probe reads (600 train / 196 test chains, seeded)
    fold_domains.jsonl.gz  every SCOPe domain sequence (exact duplicates merged): id, sequence, sccs, fold,
                           superfamily, split (train|test), n_ids (domain ids sharing the sequence)
    fold_subset.jsonl      the CPU subset the fold probe reads (folds with >= 10 train and >= 5 test domains)
    manifest.json          counts, the wheel's and every member's / written file's sha256, options, sources

Sources (cite them): sidechainnet (King & Koes 2021, BSD-3-Clause), which ships the DSSP annotations computed by
AlQuraishi for ProteinNet (AlQuraishi 2019, BMC Bioinformatics 20:311) on PDB chains (wwPDB, CC0); DSSP states
(Kabsch & Sander 1983, Biopolymers 22:2577); SCOPe 2.07 classification (Chandonia et al. 2019, NAR 47:D475; its own
free terms, citation asked). The fold benchmark follows the superfamily-held-out protocol of Hou et al. 2018
(DeepSF, Bioinformatics 34:1295) as used by TAPE (Rao et al. 2019, NeurIPS).

Members read (all three are checked; counts measured on the wheel with WHEEL_SHA256)
    full_protein_dssp_annotations.json   {"200L_1_A": {"Sequence", "DSSP"}}: 159,026 chains (119,974 PDB ids),
                                         82,813 unique sequences; DSSP alphabet HLETSGBI, len(DSSP) == len(Sequence)
    single_domain_dssp_annotations.json  adds "SCCS" ("a.1.1.0"): 93,212 domains, 28,086 unique sequences,
                                         7 classes, 866 folds, 1,443 superfamilies; no sequence is in two superfamilies
    all_proteinnet_ids.csv               113,607 ProteinNet ids x casp{7..12}_{testing,validation,training_NN} flags

The 'L' caveat (measured; decides the coil label)
    The DSSP strings have no gap symbol: residues without coordinates are written 'L', like DSSP's blank (loop) state.
    Evidence: 25.3% of residues are 'L' here against 19.2% 'C' in ProMod3's StructureDB (gap-free resolved chains);
    the longest leading 'L' run is 1,477 residues; 12.8% of terminal and 0.58% of internal 'L' runs are >= 15
    residues long, against 0.035% of coil runs in ProMod3's resolved chains (1 in 2,800). So:
      - 'L' IS the coil label (DSSP blank; Q3 class C), as in DSSP-derived benchmarks;
      - residues inside a run of >= UNRESOLVED_RUN (10) consecutive 'L' are treated as probably unresolved and are
        neither trained on nor scored (`scored_mask`). This removes 6.3% of all residues and brings the 'L' share of
        the rest to 20.2%, close to resolved structures. Terminal runs shorter than 10 stay as coil (a chain's first
        and last resolved residues are usually coil in DSSP anyway).

Splits
    Secondary structure (split per unique sequence, so identical sequences never straddle train and test, and no
    chain is in both): 'test' if any chain with that sequence is a ProteinNet CASP12 validation chain (211 of its 224
    ids map, 335 chains share their sequences; the 40 CASP12 test targets are CASP domains, which map to none),
    'train' if any is in a CASP12 training set; the rest (chains ProteinNet left out) by sequence hash: test when
    int(sha256(sequence)[:8], 16) % 10 == 0. `source` says which rule applied: casp12_validation (335 chains) |
    casp12_training_30 (35,265) | casp12_training (107,684) | sequence_hash (15,742; 1,355 of them test).
    CPU subset: one chain per sequence (smallest id), 30..1000 residues, >= 50% of residues scored; test = every
    such casp12_validation sequence (196; ProteinNet chose them to be distant from its training sets), train = 600
    casp12_training_30 sequences (ProteinNet's 30%-identity-thinned training set) drawn with --seed.
    Fold (SCOPe): exact duplicate sequences merged first (28,086 left). In every fold with >= 2 superfamilies,
    superfamilies are held out for test in sha256(name) order while the held-out domains stay <= 1/3 of the fold's
    (at least one; never a superfamily holding more than half the fold), so a test domain's superfamily never occurs
    in train. Folds with one superfamily are all train. CPU subset: folds with >= 10 train and >= 5 test domains
    (72 folds), at most 25 train and 10 test domains per fold, 30..1000 residues, drawn with --seed.
"""

import argparse
import csv
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PACKAGE = "sidechainnet==1.0.1"
WHEEL_NAME = "sidechainnet-1.0.1-py2.py3-none-any.whl"
WHEEL_SHA256 = "604f57ffb2ae35e293aaf2cdb3e5bbb79907930dddf963da602d4f9445429d78"
RESOURCES = "sidechainnet/resources/"
CHAINS_MEMBER = RESOURCES + "full_protein_dssp_annotations.json"
DOMAINS_MEMBER = RESOURCES + "single_domain_dssp_annotations.json"
PROTEINNET_MEMBER = RESOURCES + "all_proteinnet_ids.csv"
EXPECTED = dict(
    chains=159_026,
    chain_pdb_ids=119_974,
    chain_unique_sequences=82_813,
    domains=93_212,
    domain_unique_sequences=28_086,
    classes=7,
    folds=866,
    superfamilies=1_443,
    proteinnet_ids=113_607,
)

DSSP8 = "HGIEBTSL"  # class order of the Q8 labels (ids 0..7)
Q3_MAP = {"H": "H", "G": "H", "I": "H", "E": "E", "B": "E", "T": "C", "S": "C", "L": "C"}
Q3 = "HEC"
UNRESOLVED_RUN = 10  # a run of >= this many 'L' is treated as unresolved (see the module docstring)
RESIDUES = re.compile(r"[ACDEFGHIKLMNPQRSTVWYX]+")
FILES = ("ss_chains.jsonl.gz", "ss_subset.jsonl", "fold_domains.jsonl.gz", "fold_subset.jsonl")
SOURCES = ("casp12_validation", "casp12_training_30", "casp12_training", "sequence_hash")


class StructureDataError(ValueError):
    """Bad download, bad member, bad prepared file or a count mismatch; the message names file, line/key."""


@dataclass(frozen=True)
class Chain:
    id: str
    sequence: str
    dssp8: str
    split: str  # "train" | "test"
    source: str  # one of SOURCES


@dataclass(frozen=True)
class Domain:
    id: str
    sequence: str
    sccs: str
    fold: str  # class.fold, e.g. "a.1"
    superfamily: str  # class.fold.superfamily, e.g. "a.1.1"
    split: str  # "train" | "test"
    n_ids: int = 1  # SCOPe domain ids with this exact sequence


@dataclass(frozen=True)
class SubsetOptions:
    """Sizes of the CPU subsets (defaults: an 8M model's full evaluation takes minutes on one core)."""

    seed: int = 0
    ss_train: int = 600
    ss_test: int | None = None  # None: every qualifying casp12_validation sequence (196 with the defaults)
    fold_max_train: int = 25  # per fold
    fold_max_test: int = 10  # per fold
    lengths: tuple[int, int] = (30, 1000)  # residues, both subsets


# ------------------------------------------------------------------------------------------------ labels


def q3(dssp8: str) -> str:
    """DSSP 8 states -> 3: H,G,I -> H; E,B -> E; T,S,L -> C."""
    return "".join(Q3_MAP[c] for c in dssp8)


def scored_mask(dssp8: str) -> np.ndarray:
    """(n,) bool: False inside runs of >= UNRESOLVED_RUN consecutive 'L' (probably unresolved residues)."""
    mask = np.ones(len(dssp8), dtype=bool)
    for m in re.finditer(f"L{{{UNRESOLVED_RUN},}}", dssp8):
        mask[m.start() : m.end()] = False
    return mask


def label_ids(dssp8: str, states: str = DSSP8) -> np.ndarray:
    """(n,) int64 class ids: DSSP8 order for 8 states, Q3 order ("HEC") for states="HEC"."""
    text = q3(dssp8) if states == Q3 else dssp8
    return _lookup(states)[np.frombuffer(text.encode(), dtype=np.uint8)]


def _lookup(states: str) -> np.ndarray:
    table = np.full(256, -1, dtype=np.int64)
    for i, c in enumerate(states):
        table[ord(c)] = i
    return table


def _hash_test(sequence: str) -> bool:
    return int(hashlib.sha256(sequence.encode()).hexdigest()[:8], 16) % 10 == 0


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ raw members


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(directory: Path) -> Path:
    """`pip download --no-deps sidechainnet==1.0.1` into directory; the wheel path (sha256 not yet checked)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        PACKAGE,
        "-d",
        str(directory),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = directory / WHEEL_NAME
    if done.returncode != 0 or not wheel.exists():
        raise StructureDataError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return wheel


def _check(name: str, measured, member: str) -> None:
    if measured != EXPECTED[name]:
        raise StructureDataError(f"{member}: {name} = {measured:,}, expected {EXPECTED[name]:,} (wrong data version?)")


def read_chains(archive: zipfile.ZipFile) -> dict[str, dict]:
    data = json.loads(archive.read(CHAINS_MEMBER))
    check_entries(data, CHAINS_MEMBER)
    _check("chains", len(data), CHAINS_MEMBER)
    _check("chain_pdb_ids", len({k.split("_")[0] for k in data}), CHAINS_MEMBER)
    _check("chain_unique_sequences", len({e["Sequence"] for e in data.values()}), CHAINS_MEMBER)
    return data


def read_domains(archive: zipfile.ZipFile) -> dict[str, dict]:
    data = json.loads(archive.read(DOMAINS_MEMBER))
    check_entries(data, DOMAINS_MEMBER)
    sccs = [e["SCCS"].split(".") for e in data.values()]
    _check("domains", len(data), DOMAINS_MEMBER)
    _check("domain_unique_sequences", len({e["Sequence"] for e in data.values()}), DOMAINS_MEMBER)
    _check("classes", len({s[0] for s in sccs}), DOMAINS_MEMBER)
    _check("folds", len({tuple(s[:2]) for s in sccs}), DOMAINS_MEMBER)
    _check("superfamilies", len({tuple(s[:3]) for s in sccs}), DOMAINS_MEMBER)
    return data


def check_entries(data: dict, member: str) -> None:
    """Every entry of a sidechainnet DSSP JSON (chains; domains when the member name says so) is well formed."""
    domains = "domain" in member
    for key, entry in data.items():
        _check_entry(member, key, entry, ("Sequence", "DSSP", "SCCS") if domains else ("Sequence", "DSSP"))
        if domains and not re.fullmatch(r"[a-l]\.\d+\.\d+\.\d+", entry["SCCS"]):
            raise StructureDataError(f"{member}: {key!r}: key 'SCCS' = {entry['SCCS']!r} is not class.fold.sf.family")


def _check_entry(member: str, key: str, entry, fields: tuple) -> None:
    if not isinstance(entry, dict) or any(not isinstance(entry.get(f), str) for f in fields):
        raise StructureDataError(f"{member}: {key!r}: needs string fields {list(fields)}, got {entry!r:.200}")
    seq, dssp = entry["Sequence"], entry["DSSP"]
    if not RESIDUES.fullmatch(seq):
        raise StructureDataError(f"{member}: {key!r}: key 'Sequence' has letters outside ACDEFGHIKLMNPQRSTVWYX")
    if len(dssp) != len(seq) or not set(dssp) <= set(DSSP8):
        raise StructureDataError(
            f"{member}: {key!r}: key 'DSSP' must be {len(seq)} letters of {DSSP8}, got {len(dssp)} letters "
            f"{sorted(set(dssp) - set(DSSP8))} outside it"
        )


def read_proteinnet(archive: zipfile.ZipFile) -> dict[str, set]:
    """ProteinNet id without its 'NN#' thinning prefix -> set of CASP12 flags it carries."""
    flags, rows = parse_proteinnet(archive.read(PROTEINNET_MEMBER).decode(), PROTEINNET_MEMBER)
    _check("proteinnet_ids", rows, PROTEINNET_MEMBER)
    return flags


def parse_proteinnet(text: str, source: str) -> tuple[dict[str, set], int]:
    """(id -> CASP12 flags set to 1, rows read) of all_proteinnet_ids.csv text; errors name source:line."""
    reader = csv.DictReader(io.StringIO(text))
    wanted = ("casp12_validation", "casp12_training_30", "casp12_training_100")
    if reader.fieldnames is None or any(c not in reader.fieldnames for c in ("pnid", *wanted)):
        raise StructureDataError(f"{source}: line 1: needs columns pnid and {list(wanted)}")
    casp12 = [c for c in reader.fieldnames if c.startswith("casp12_")]
    flags, rows = {}, 0
    for line, row in enumerate(reader, start=2):
        rows += 1
        if any(row[c] not in ("0", "1") for c in reader.fieldnames[1:]):
            raise StructureDataError(f"{source}: line {line}: flags must be 0 or 1, got {row}")
        marks = {c for c in casp12 if row[c] == "1"}
        if marks:
            flags.setdefault(row["pnid"].split("#")[-1], set()).update(marks)
    return flags, rows


# ------------------------------------------------------------------------------------------------ splits


def split_chains(chains: dict[str, dict], proteinnet: dict[str, set]) -> list[Chain]:
    """Every chain with its split, decided per unique sequence (module docstring, "Splits")."""
    by_sequence = defaultdict(list)
    for key, entry in chains.items():
        by_sequence[entry["Sequence"]].append(key)
    rank = {s: i for i, s in enumerate(SOURCES)}
    out = []
    for sequence, keys in by_sequence.items():
        marks = set().union(*(proteinnet.get(k, set()) for k in keys))
        if "casp12_validation" in marks:
            source = "casp12_validation"
        elif "casp12_training_30" in marks:
            source = "casp12_training_30"
        elif any(m.startswith("casp12_training") for m in marks):
            source = "casp12_training"
        else:
            source = "sequence_hash"
        split = (
            "test" if source == "casp12_validation" or (source == "sequence_hash" and _hash_test(sequence)) else "train"
        )
        out.extend(Chain(k, sequence, chains[k]["DSSP"], split, source) for k in sorted(keys))
    out.sort(key=lambda c: (rank[c.source], c.id))
    return out


def split_domains(domains: dict[str, dict]) -> tuple[list[Domain], int]:
    """Unique-sequence domains with a superfamily-held-out split; also the number of merged duplicate ids."""
    by_sequence = defaultdict(list)
    for key, entry in domains.items():
        by_sequence[entry["Sequence"]].append(key)
    merged = []
    for sequence, keys in by_sequence.items():
        keys.sort()
        families = {".".join(domains[k]["SCCS"].split(".")[:3]) for k in keys}
        if len(families) > 1:  # never seen in 2.07; a new release would need a rule for it
            raise StructureDataError(f"{DOMAINS_MEMBER}: {keys[:3]}: one sequence in superfamilies {sorted(families)}")
        sccs = domains[keys[0]]["SCCS"]
        parts = sccs.split(".")
        merged.append(Domain(keys[0], sequence, sccs, ".".join(parts[:2]), ".".join(parts[:3]), "train", len(keys)))
    sizes = defaultdict(Counter)  # fold -> superfamily -> unique domains
    for d in merged:
        sizes[d.fold][d.superfamily] += 1
    held_out = set()
    for counts in sizes.values():
        total, taken, chosen = sum(counts.values()), 0, []
        if len(counts) < 2:
            continue
        for family in sorted(counts, key=_digest):
            if counts[family] > total / 2:
                continue
            if not chosen or taken + counts[family] <= total / 3:
                chosen.append(family)
                taken += counts[family]
        held_out.update(chosen)
    out = [Domain(**{**asdict(d), "split": "test" if d.superfamily in held_out else "train"}) for d in merged]
    out.sort(key=lambda d: (d.sccs, d.id))
    return out, len(domains) - len(merged)


def ss_subset(chains: list[Chain], options: SubsetOptions) -> list[Chain]:
    """One chain per sequence (smallest id), lengths in range, >= 50% scored; seeded draw of train and test."""
    low, high = options.lengths
    first = {}
    for c in sorted(chains, key=lambda c: c.id):
        first.setdefault(c.sequence, c)
    pools = {"test": [], "train": []}
    for c in first.values():
        if low <= len(c.sequence) <= high and scored_mask(c.dssp8).mean() >= 0.5:
            if c.source == "casp12_validation":
                pools["test"].append(c)
            elif c.source == "casp12_training_30":
                pools["train"].append(c)
    rng = np.random.default_rng(options.seed)
    picked = []
    for split, n in (("train", options.ss_train), ("test", options.ss_test)):
        pool = sorted(pools[split], key=lambda c: c.id)
        n = len(pool) if n is None else n
        if len(pool) < n:
            raise StructureDataError(f"secondary-structure subset: {split} pool has {len(pool)} chains, {n} asked")
        picked.extend(pool[i] for i in sorted(rng.choice(len(pool), n, replace=False)))
    return picked


def fold_subset(domains: list[Domain], options: SubsetOptions) -> list[Domain]:
    """Folds with >= 10 train and >= 5 test domains (in the length range); at most the caps per fold, seeded."""
    low, high = options.lengths
    groups = defaultdict(list)
    for d in domains:
        if low <= len(d.sequence) <= high:
            groups[(d.fold, d.split)].append(d)
    rng = np.random.default_rng(options.seed)
    picked = []
    for fold in sorted({f for f, _ in groups}):
        train, test = groups.get((fold, "train"), []), groups.get((fold, "test"), [])
        if len(train) < 10 or len(test) < 5:
            continue
        for members, cap in ((train, options.fold_max_train), (test, options.fold_max_test)):
            keep = sorted(rng.choice(len(members), cap, replace=False)) if len(members) > cap else range(len(members))
            picked.extend(members[i] for i in keep)
    return picked


# ------------------------------------------------------------------------------------------------ files


def write_jsonl(path: Path, records: list) -> str:
    """Rows as JSON lines (gzip with mtime 0 when the name ends .gz, so the bytes are reproducible); sha256."""
    text = "".join(json.dumps(asdict(r), separators=(",", ":")) + "\n" for r in records).encode()
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as f:
            f.write(text)
        text = buffer.getvalue()
    path.write_bytes(text)
    return hashlib.sha256(text).hexdigest()


def read_jsonl(path: Path, kind: type) -> list:
    """Rows of a prepared file as `kind` (Chain or Domain), each checked; errors name file:line:key."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise StructureDataError(f"{path}: cannot read: {err}") from err
    fields = set(kind.__dataclass_fields__)
    out = []
    for line, text in enumerate(lines, start=1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise StructureDataError(f"{path}:{line}: not JSON: {err}") from err
        missing = fields - set(row) - {"n_ids"}
        if missing:
            raise StructureDataError(f"{path}:{line}: missing keys {sorted(missing)}")
        record = kind(**{k: row[k] for k in fields if k in row})
        _check_record(path, line, record)
        out.append(record)
    return out


def _check_record(path: Path, line: int, r) -> None:
    if r.split not in ("train", "test"):
        raise StructureDataError(f"{path}:{line}: key 'split' = {r.split!r}, expected train or test")
    if not isinstance(r.sequence, str) or not RESIDUES.fullmatch(r.sequence):
        raise StructureDataError(f"{path}:{line}: key 'sequence' has letters outside ACDEFGHIKLMNPQRSTVWYX")
    if isinstance(r, Chain) and (len(r.dssp8) != len(r.sequence) or not set(r.dssp8) <= set(DSSP8)):
        raise StructureDataError(f"{path}:{line}: key 'dssp8' must be {len(r.sequence)} letters of {DSSP8}")
    if isinstance(r, Domain) and not (r.sccs.startswith(r.superfamily + ".") and r.superfamily.startswith(r.fold)):
        raise StructureDataError(f"{path}:{line}: keys 'sccs'/'superfamily'/'fold' disagree: {r.sccs} {r.fold}")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise StructureDataError(
            f"{path}: no manifest; prepare the data with "
            f"`python -m eval.quality.structure_data fetch --out {directory}`"
        ) from err
    except json.JSONDecodeError as err:
        raise StructureDataError(f"{path}: not JSON: {err}") from err


def load(directory: Path, name: str) -> list:
    """A prepared file (one of FILES) as Chain/Domain rows, after checking its sha256 against manifest.json."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    expected = manifest.get("files", {}).get(name, {}).get("sha256")
    if expected is None:
        raise StructureDataError(f"{directory / 'manifest.json'}: key files.{name}.sha256 missing")
    path = directory / name
    if not path.exists():
        raise StructureDataError(f"{path}: missing (listed in {directory / 'manifest.json'})")
    if sha256_file(path) != expected:
        raise StructureDataError(f"{path}: sha256 differs from {directory / 'manifest.json'} (edited or truncated?)")
    return read_jsonl(path, Chain if name.startswith("ss_") else Domain)


def check_splits(chains: list[Chain] = (), domains: list[Domain] = ()) -> None:
    """Raise unless train and test share no chain id, no identical sequence and (domains) no superfamily."""
    for rows, what in ((chains, "chain"), (domains, "domain")):
        sides = {s: [r for r in rows if r.split == s] for s in ("train", "test")}
        for key in ("id", "sequence") + (("superfamily",) if what == "domain" else ()):
            shared = {getattr(r, key) for r in sides["train"]} & {getattr(r, key) for r in sides["test"]}
            if shared:
                raise StructureDataError(
                    f"{what} split: {len(shared)} {key}(s) in both train and test, e.g. {min(shared)!r:.80}"
                )


def summary(chains: list[Chain], domains: list[Domain]) -> dict:
    """Counts of a chain list and a domain list (what the manifest records per file)."""
    out = {}
    if chains:
        out.update(
            chains=len(chains),
            unique_sequences=len({c.sequence for c in chains}),
            residues=sum(len(c.sequence) for c in chains),
            scored_residues=int(sum(scored_mask(c.dssp8).sum() for c in chains)),
            by_split=dict(Counter(c.split for c in chains)),
            by_source=dict(Counter(c.source for c in chains)),
        )
    if domains:
        out.update(
            domains=len(domains),
            residues=sum(len(d.sequence) for d in domains),
            folds=len({d.fold for d in domains}),
            superfamilies=len({d.superfamily for d in domains}),
            by_split=dict(Counter(d.split for d in domains)),
            test_folds=len({d.fold for d in domains if d.split == "test"}),
        )
    return out


def prepare(wheel: Path, out: Path, options: SubsetOptions = SubsetOptions()) -> dict:
    """Verified wheel -> the prepared files and manifest.json under out; returns the manifest."""
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise StructureDataError(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256} ({PACKAGE}); refusing to use it")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = {
            m: hashlib.sha256(archive.read(m)).hexdigest() for m in (CHAINS_MEMBER, DOMAINS_MEMBER, PROTEINNET_MEMBER)
        }
        raw_chains, raw_domains, proteinnet = read_chains(archive), read_domains(archive), read_proteinnet(archive)
    chains = split_chains(raw_chains, proteinnet)
    domains, merged = split_domains(raw_domains)
    check_splits(chains, domains)
    tables = {
        "ss_chains.jsonl.gz": (chains, []),
        "ss_subset.jsonl": (ss_subset(chains, options), []),
        "fold_domains.jsonl.gz": ([], domains),
        "fold_subset.jsonl": ([], fold_subset(domains, options)),
    }
    files = {}
    for name, (c, d) in tables.items():
        check_splits(c, d)
        files[name] = dict(sha256=write_jsonl(out / name, c or d), **summary(c, d))
    manifest = dict(
        package=PACKAGE,
        wheel=WHEEL_NAME,
        wheel_sha256=digest,
        members=members,
        counts=EXPECTED,
        proteinnet_mapped_chains=sum(k in proteinnet for k in raw_chains),
        domain_ids_merged_as_duplicates=merged,
        unresolved_run=UNRESOLVED_RUN,
        subset_options=asdict(options),
        files=files,
        licences="sidechainnet code BSD-3-Clause; PDB data CC0; SCOPe 2.07 (free, citation asked)",
        cite=[
            "King & Koes 2021 (SidechainNet), Proteins 89:1489",
            "AlQuraishi 2019 (ProteinNet), BMC Bioinformatics 20:311",
            "Kabsch & Sander 1983 (DSSP), Biopolymers 22:2577",
            "Chandonia, Fox & Brenner 2019 (SCOPe 2.07), Nucleic Acids Res 47:D475",
            "Hou, Adhikari & Cheng 2018 (DeepSF), Bioinformatics 34:1295",
            "Rao et al. 2019 (TAPE), NeurIPS",
        ],
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def fetch(out: Path, wheel: Path | None = None, options: SubsetOptions = SubsetOptions()) -> dict:
    """Download (unless wheel is given), verify, prepare; the manifest."""
    out = Path(out)
    if wheel is not None:
        return prepare(Path(wheel), out, options)
    with tempfile.TemporaryDirectory(prefix="sidechainnet-") as tmp:
        return prepare(download_wheel(Path(tmp)), out, options)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.quality.structure_data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the pinned wheel, verify, prepare")
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument("--wheel", metavar="FILE", help="an already downloaded sidechainnet-1.0.1 wheel (still verified)")
    f.add_argument("--seed", type=int, default=0, help="seed of the CPU subsets")
    args = p.parse_args(argv)
    try:
        manifest = fetch(Path(args.out), args.wheel, SubsetOptions(seed=args.seed))
    except StructureDataError as err:
        print(f"eval.quality.structure_data: error: {err}", file=sys.stderr)
        return 1
    for name, info in manifest["files"].items():
        counts = ", ".join(f"{k} {v}" for k, v in info.items() if k != "sha256")
        print(f"{Path(args.out) / name}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
