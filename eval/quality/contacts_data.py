"""Real protein structures for contact prediction: the ProMod3 StructureDB from Debian's `promod3-data`, parsed raw.

    python -m eval.quality.contacts_data fetch --out data/quality/promod3 [--cache DIR] [--db PATH] [--seed 0]
        [--train-pool 60] [--test 100] [--min-length 50] [--max-length 300]
    python -m eval.quality.contacts_data verify --out data/quality/promod3

`fetch` downloads the package by name (`apt-get download promod3-data=3.2.1+ds-6`, no root needed; run
`apt-get update` once first), checks the .deb's sha256 (pinned below), extracts only `structure_db.dat` (520.7 MB)
into the cache (default `<out>/cache`, ~0.9 GB with the .deb; delete it afterwards if you like), checks its size and
sha256, parses it, checks the counts and the backbone geometry, and writes a small prepared subset into `--out`:

    contacts.npz    ids ("12AS.A"), split (0 = training pool, 1 = test), sequences, lengths, offsets (into cb),
                    cb (sum of lengths, 3) float32 virtual C-beta coordinates in Angstrom (the chain's local frame:
                    the StructureDB's per-chain shift is not added; distances within a chain do not need it)
    manifest.json   package, version, sha256 of the .deb, of structure_db.dat and of contacts.npz (file and content),
                    the measured counts, the CA-CA check, the subset options and the per-split counts

`--db PATH` parses an already extracted structure_db.dat instead (its sha256 is checked all the same).

Source. ProMod3 (Studer et al. 2021, "ProMod3 - A versatile homology modelling toolbox", PLoS Comput Biol 17:
e1008667) ships a StructureDB of non-redundant PDB chains (the longest gap-free stretch of each) with backbone
coordinates. Debian package promod3-data 3.2.1+ds-6, Apache-2.0 (SIB / Biozentrum Basel); the coordinates are PDB
data (CC0). Reading it through Debian's python3-promod3 pulls ~150 packages, so the raw file is parsed here.

Raw layout of structure_db.dat (little-endian; these offsets hold for this Debian version only, hence the checks):
    0x00        u32 1234 (magic), then header fields not used here
    0x4d        u64 number of chains (21,119)
    0x55        table of contents, one entry per chain: u32 4, 4-char PDB id, u32 n, n-char chain name, u32 offset of
                the chain's first residue in the arrays below, u16 length, u16 first residue number, 3 x f32 shift
    then 8 arrays, each a u64 count (4,561,225 residues) + count records:
                1 sequence (1 byte/residue, one-letter code), 2 backbone N/CA/C/O as 12 x int16 in 0.01 A relative to
                the chain's shift, 3 phi/psi 2 x int16, 4-5 two u16 tracks, 6 DSSP (1 byte), 7-8 two 20 x u16 profiles
    the file ends right after array 8 (checked).

Virtual C-beta (trRosetta, Yang et al. 2020 PNAS; the same constants in ESM's contact data and in AlphaFold-era
tools): b = CA - N, c = C - CA, a = b x c, CB = -0.58273431 a + 0.56802827 b - 0.54067466 c + CA. A contact is
CB-CB < 8 A (CASP's definition, used by Rao et al. 2021).

Subset (seeded, CPU-sized): chains of `min_length..max_length` residues whose consecutive CA-CA distances are all
<= 4.2 A (no hidden chain break); sequences deduplicated (first chain of each sequence kept), so no sequence appears
twice or in both splits; a seeded permutation gives `test` test chains first, then `train_pool` training chains
whose PDB id is not among the test chains' (the contacts probe draws its 20 training chains per seed from this pool).
"""

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PACKAGE = "promod3-data"
VERSION = "3.2.1+ds-6"
DEB_NAME = "promod3-data_3.2.1+ds-6_all.deb"
DEB_SHA256 = "7d1011a2686ea92e263f3daf9940f787351ff94f19eb47646c624754d80b8f56"
DB_MEMBER = "./usr/share/promod3/loop_data/structure_db.dat"
DB_SIZE = 520_676_726
DB_SHA256 = "0f1c6e35a3f248fddd0c2c0da2c0d1145b502d4663fe8adb7239f27adad3301a"
MAGIC = 1234
CHAIN_COUNT_OFFSET = 0x4D
TOC_OFFSET = 0x55
EXPECTED_CHAINS = 21_119
EXPECTED_RESIDUES = 4_561_225
ARRAY_RECORD_BYTES = (1, 24, 4, 2, 2, 1, 40, 40)  # sequence, backbone, phi/psi, 2 tracks, DSSP, 2 profiles
CA_CA_RANGE = (3.6, 4.0)
CA_CA_MIN_FRACTION = 0.99  # measured 0.9970; less means the layout was misread
CONTACT_CUTOFF = 8.0  # Angstrom, CB-CB
PREPARED_FILE = "contacts.npz"
MANIFEST_FILE = "manifest.json"
CB_WEIGHTS = (-0.58273431, 0.56802827, -0.54067466)  # a, b, c (trRosetta)


class ContactsDataError(Exception):
    """Names the file (and key) that is wrong; the CLI prints it and exits 1."""


# ---------------------------------------------------------------------------------------------------- geometry


def virtual_cb(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(..., 3) virtual C-beta from backbone N, CA, C (trRosetta's ideal-geometry formula; see the module doc)."""
    b = ca - n
    c_ = c - ca
    a = np.cross(b, c_)
    wa, wb, wc = CB_WEIGHTS
    return wa * a + wb * b + wc * c_ + ca


def contact_map(cb: np.ndarray, cutoff: float = CONTACT_CUTOFF) -> np.ndarray:
    """(L, L) bool: CB-CB distance < cutoff."""
    cb = np.asarray(cb, dtype=np.float64)
    distance = np.linalg.norm(cb[:, None, :] - cb[None, :, :], axis=-1)
    return distance < cutoff


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- download


def download_deb(cache: Path) -> Path:
    """`apt-get download promod3-data=VERSION` into `cache` (kept there; reused when its sha256 matches)."""
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / DEB_NAME
    if not deb.exists():
        command = ["apt-get", "download", f"{PACKAGE}={VERSION}"]
        try:
            done = subprocess.run(command, cwd=cache, capture_output=True, text=True)
        except FileNotFoundError as err:
            raise ContactsDataError(f"{deb}: apt-get not found; download {DEB_NAME} by hand into {cache}") from err
        if done.returncode != 0 or not deb.exists():
            raise ContactsDataError(
                f"{deb}: `{shlex.join(command)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]} "
                "(run `apt-get update` once first)"
            )
    found = sha256_file(deb)
    if found != DEB_SHA256:
        raise ContactsDataError(f"{deb}: sha256 {found}, expected {DEB_SHA256} ({PACKAGE} {VERSION})")
    return deb


def extract_db(deb: Path, cache: Path) -> Path:
    """Only structure_db.dat out of the .deb (dpkg-deb --fsys-tarfile, streamed), into cache/structure_db.dat."""
    target = cache / "structure_db.dat"
    if target.exists() and target.stat().st_size == DB_SIZE:
        return target
    partial = target.with_suffix(".part")
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    found = False
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            if member.name == DB_MEMBER:
                with tar.extractfile(member) as src, open(partial, "wb") as dst:
                    while block := src.read(1 << 22):
                        dst.write(block)
                found = True
                break
    proc.stdout.close()
    proc.kill()  # stop streaming the rest of the archive
    proc.wait()
    if not found:
        raise ContactsDataError(f"{deb}: no member {DB_MEMBER}")
    partial.rename(target)
    return target


# ---------------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class StructureDB:
    path: Path
    ids: list  # "12AS.A" per chain
    offsets: np.ndarray  # (chains,) first residue in the arrays
    lengths: np.ndarray  # (chains,)
    sequence: bytes  # (residues,) one-letter codes
    backbone: np.ndarray  # (residues, 4, 3) float32 N, CA, C, O in Angstrom, chain-local frame


def _u(fmt: str, raw: np.ndarray, pos: int, path: Path, what: str):
    size = np.dtype(fmt).itemsize
    if pos + size > len(raw):
        raise ContactsDataError(f"{path}: truncated at byte {pos} while reading {what}")
    return raw[pos : pos + size].view(fmt)[0]


def read_structure_db(path: Path) -> StructureDB:
    """Parse structure_db.dat (layout in the module doc); every count and the file's end are checked."""
    path = Path(path)
    if not path.exists():
        raise ContactsDataError(f"{path}: no such file")
    raw = np.fromfile(path, dtype=np.uint8)
    if _u("<u4", raw, 0, path, "magic") != MAGIC:
        raise ContactsDataError(f"{path}: magic {_u('<u4', raw, 0, path, 'magic')} at byte 0, expected {MAGIC}")
    chains = int(_u("<u8", raw, CHAIN_COUNT_OFFSET, path, "chain count"))
    if chains != EXPECTED_CHAINS:
        raise ContactsDataError(
            f"{path}: chain count {chains} at byte {CHAIN_COUNT_OFFSET}, expected {EXPECTED_CHAINS}"
        )
    ids, offsets, lengths = [], np.zeros(chains, np.int64), np.zeros(chains, np.int64)
    pos = TOC_OFFSET
    for k in range(chains):
        if _u("<u4", raw, pos, path, f"TOC entry {k}") != 4:
            raise ContactsDataError(f"{path}: TOC entry {k} at byte {pos} does not start with u32 4 (PDB id length)")
        pdb_id = raw[pos + 4 : pos + 8].tobytes().decode("ascii")
        name_length = int(_u("<u4", raw, pos + 8, path, f"TOC entry {k} chain name length"))
        chain = raw[pos + 12 : pos + 12 + name_length].tobytes().decode("ascii")
        pos += 12 + name_length
        offsets[k] = _u("<u4", raw, pos, path, f"TOC entry {k} offset")
        lengths[k] = _u("<u2", raw, pos + 4, path, f"TOC entry {k} length")
        ids.append(f"{pdb_id}.{chain}")
        pos += 20  # offset u32, length u16, first residue number u16, shift 3 x f32
    arrays = []
    for index, record in enumerate(ARRAY_RECORD_BYTES, start=1):
        count = int(_u("<u8", raw, pos, path, f"array {index} count"))
        if count != EXPECTED_RESIDUES:
            raise ContactsDataError(f"{path}: array {index} at byte {pos} counts {count}, expected {EXPECTED_RESIDUES}")
        arrays.append((pos + 8, count))
        pos += 8 + count * record
    if pos != len(raw):
        raise ContactsDataError(f"{path}: the 8 arrays end at byte {pos} but the file has {len(raw)} bytes")
    if offsets[0] != 0 or np.any(offsets[1:] != offsets[:-1] + lengths[:-1]) or offsets[-1] + lengths[-1] != count:
        raise ContactsDataError(f"{path}: TOC offsets/lengths do not tile the {count} residues")
    (seq_at, n), (bb_at, _) = arrays[0], arrays[1]
    sequence = raw[seq_at : seq_at + n].tobytes()
    backbone = raw[bb_at : bb_at + n * 24].view("<i2").reshape(n, 4, 3).astype(np.float32) * np.float32(0.01)
    return StructureDB(path, ids, offsets, lengths, sequence, backbone)


def ca_ca_check(db: StructureDB) -> dict:
    """Consecutive CA-CA distances within chains: the fraction in CA_CA_RANGE (fails loudly below the floor)."""
    ca = db.backbone[:, 1].astype(np.float64)
    step = np.linalg.norm(ca[1:] - ca[:-1], axis=1)  # (residues - 1,)
    inside = np.ones(len(step), dtype=bool)
    inside[(db.offsets + db.lengths - 1)[:-1]] = False  # pairs that cross into the next chain
    step = step[inside]
    low, high = CA_CA_RANGE
    fraction = float(((step >= low) & (step <= high)).mean())
    if fraction < CA_CA_MIN_FRACTION:
        raise ContactsDataError(
            f"{db.path}: only {fraction:.4f} of consecutive CA-CA distances lie in {low}-{high} A "
            f"(expected >= {CA_CA_MIN_FRACTION}); the coordinate array was misread"
        )
    return dict(ca_ca_pairs=int(len(step)), ca_ca_fraction_3p6_4p0=round(fraction, 5))


def chain_cb(db: StructureDB, k: int) -> np.ndarray:
    """(L, 3) virtual C-beta of chain k."""
    bb = db.backbone[db.offsets[k] : db.offsets[k] + db.lengths[k]]
    return virtual_cb(bb[:, 0], bb[:, 1], bb[:, 2]).astype(np.float32)


def chain_sequence(db: StructureDB, k: int) -> str:
    return db.sequence[db.offsets[k] : db.offsets[k] + db.lengths[k]].decode("ascii")


# ---------------------------------------------------------------------------------------------------- subset


@dataclass(frozen=True)
class SubsetOptions:
    seed: int = 0
    train_pool: int = 60
    test: int = 100
    min_length: int = 50
    max_length: int = 300
    max_ca_step: float = 4.2  # Angstrom: a larger consecutive CA-CA step is a chain break; such chains are skipped


def select_subset(db: StructureDB, options: SubsetOptions) -> tuple[list, list, dict]:
    """(training-pool chain indices, test chain indices, counts); see the module doc for the rules."""
    seen, candidates, counts = set(), [], dict(length_ok=0, broken=0, duplicate_sequence=0)
    for k in range(len(db.ids)):
        if not options.min_length <= db.lengths[k] <= options.max_length:
            continue
        counts["length_ok"] += 1
        ca = db.backbone[db.offsets[k] : db.offsets[k] + db.lengths[k], 1]
        if np.linalg.norm(ca[1:] - ca[:-1], axis=1).max() > options.max_ca_step:
            counts["broken"] += 1
            continue
        sequence = chain_sequence(db, k)
        if sequence in seen:
            counts["duplicate_sequence"] += 1
            continue
        seen.add(sequence)
        candidates.append(k)
    counts["candidates"] = len(candidates)
    order = np.random.default_rng(options.seed).permutation(len(candidates))
    test = [candidates[i] for i in order[: options.test]]
    test_pdb = {db.ids[k].split(".")[0] for k in test}
    train = [candidates[i] for i in order[options.test :] if db.ids[candidates[i]].split(".")[0] not in test_pdb]
    train = train[: options.train_pool]
    if len(test) < options.test or len(train) < options.train_pool:
        raise ContactsDataError(
            f"{db.path}: only {len(candidates)} candidate chains for {options.test} test + {options.train_pool} train"
        )
    return train, test, counts


# ---------------------------------------------------------------------------------------------------- prepared file


@dataclass(frozen=True)
class Chains:
    """A prepared split set: parallel lists, one entry per chain."""

    ids: list
    split: np.ndarray  # (chains,) 0 = training pool, 1 = test
    sequences: list
    cb: list  # (L, 3) float32 each

    def indices(self, split: str) -> list:
        code = {"train": 0, "test": 1}[split]
        return [i for i, s in enumerate(self.split) if s == code]


def content_sha256(chains: Chains) -> str:
    """A digest of the arrays (not of the zip file, whose timestamps vary): equal for equal prepared data."""
    digest = hashlib.sha256()
    for i, (chain_id, sequence, cb) in enumerate(zip(chains.ids, chains.sequences, chains.cb)):
        digest.update(f"{chain_id}\t{int(chains.split[i])}\t{sequence}\n".encode())
        digest.update(np.ascontiguousarray(cb, dtype="<f4").tobytes())
    return digest.hexdigest()


def write_prepared(out: Path, chains: Chains, manifest: dict) -> dict:
    """contacts.npz + manifest.json (manifest gets the counts and both sha256 added); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(s) for s in chains.sequences], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    np.savez_compressed(
        out / PREPARED_FILE,
        ids=np.array(chains.ids),
        split=np.asarray(chains.split, dtype=np.uint8),
        sequences=np.array(chains.sequences),
        lengths=lengths,
        offsets=offsets,
        cb=np.concatenate(chains.cb).astype(np.float32),
    )
    contacts = [contact_map(cb) for cb in chains.cb]
    per_split = {}
    for name in ("train", "test"):
        idx = chains.indices(name)
        long_range = [int(np.triu(c, 24).sum()) for c in (contacts[i] for i in idx)]  # pairs j - i >= 24 in contact
        per_split[name] = dict(
            chains=len(idx),
            residues=int(lengths[idx].sum()),
            min_length=int(lengths[idx].min()),
            max_length=int(lengths[idx].max()),
            long_range_contacts=int(sum(long_range)),
        )
    manifest = dict(manifest)
    manifest.update(
        splits=per_split,
        contact_definition=f"virtual CB-CB < {CONTACT_CUTOFF} A",
        file=PREPARED_FILE,
        file_sha256=sha256_file(out / PREPARED_FILE),
        content_sha256=content_sha256(chains),
    )
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_prepared(directory: Path) -> tuple[Chains, dict]:
    """(chains, manifest) from a prepared folder; the file's sha256 must match the manifest's."""
    directory = Path(directory)
    manifest_path, data_path = directory / MANIFEST_FILE, directory / PREPARED_FILE
    for path in (manifest_path, data_path):
        if not path.exists():
            raise ContactsDataError(
                f"{path}: missing; run `python -m eval.quality.contacts_data fetch --out {directory}`"
            )
    manifest = json.loads(manifest_path.read_text())
    if "file_sha256" not in manifest:
        raise ContactsDataError(f"{manifest_path}: no key 'file_sha256'")
    found = sha256_file(data_path)
    if found != manifest["file_sha256"]:
        raise ContactsDataError(f"{data_path}: sha256 {found} differs from {manifest_path} key file_sha256")
    with np.load(data_path, allow_pickle=False) as data:
        missing = [k for k in ("ids", "split", "sequences", "lengths", "offsets", "cb") if k not in data]
        if missing:
            raise ContactsDataError(f"{data_path}: missing arrays {missing}")
        lengths, offsets, cb = data["lengths"], data["offsets"], data["cb"]
        chains = Chains(
            ids=[str(x) for x in data["ids"]],
            split=data["split"].astype(np.int64),
            sequences=[str(x) for x in data["sequences"]],
            cb=[cb[o : o + n] for o, n in zip(offsets, lengths)],
        )
    bad = [i for i, s in enumerate(chains.sequences) if len(s) != lengths[i]]
    if bad:
        raise ContactsDataError(f"{data_path}: key sequences: chain {chains.ids[bad[0]]} disagrees with key lengths")
    if content_sha256(chains) != manifest.get("content_sha256"):
        raise ContactsDataError(f"{data_path}: content differs from {manifest_path} key content_sha256")
    return chains, manifest


def prepare(db: StructureDB, options: SubsetOptions) -> tuple[Chains, dict]:
    """The subset as Chains, plus the manifest fields that describe the source database."""
    residues = len(db.sequence)
    if len(db.ids) != EXPECTED_CHAINS or residues != EXPECTED_RESIDUES:
        raise ContactsDataError(f"{db.path}: {len(db.ids)} chains / {residues} residues, expected counts differ")
    geometry = ca_ca_check(db)
    train, test, counts = select_subset(db, options)
    picked = train + test
    chains = Chains(
        ids=[db.ids[k] for k in picked],
        split=np.array([0] * len(train) + [1] * len(test)),
        sequences=[chain_sequence(db, k) for k in picked],
        cb=[chain_cb(db, k) for k in picked],
    )
    source = dict(
        package=PACKAGE,
        version=VERSION,
        licence="Apache-2.0 (ProMod3, SIB / Biozentrum Basel); coordinates: PDB data, CC0",
        citation="Studer et al. 2021, PLoS Comput Biol 17:e1008667 (ProMod3)",
        deb=DEB_NAME,
        deb_sha256=DEB_SHA256,
        structure_db_sha256=DB_SHA256,
        structure_db_bytes=DB_SIZE,
        chains=len(db.ids),
        unique_sequences=len({chain_sequence(db, k) for k in range(len(db.ids))}),
        residues=residues,
        **geometry,
        subset=asdict(options),
        subset_counts=counts,
    )
    return chains, source


# ---------------------------------------------------------------------------------------------------- CLI


def fetch(out: Path, cache: Path | None, db_path: Path | None, options: SubsetOptions) -> dict:
    if db_path is None:
        cache = cache or out / "cache"
        deb = download_deb(cache)
        db_path = extract_db(deb, cache)
    size = db_path.stat().st_size if db_path.exists() else None
    if size != DB_SIZE:
        raise ContactsDataError(f"{db_path}: {size} bytes, expected {DB_SIZE} ({PACKAGE} {VERSION})")
    found = sha256_file(db_path)
    if found != DB_SHA256:
        raise ContactsDataError(f"{db_path}: sha256 {found}, expected {DB_SHA256}")
    db = read_structure_db(db_path)
    chains, source = prepare(db, options)
    source["command"] = "python -m eval.quality.contacts_data " + shlex.join(sys.argv[1:])
    source["prepared_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return write_prepared(out, chains, source)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m eval.quality.contacts_data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, verify, parse and write the prepared subset")
    f.add_argument("--out", required=True, type=Path)
    f.add_argument("--cache", type=Path, help="where the .deb and structure_db.dat go (default OUT/cache)")
    f.add_argument("--db", type=Path, help="an extracted structure_db.dat (skips the download)")
    defaults = SubsetOptions()
    for name in ("seed", "train_pool", "test", "min_length", "max_length"):
        f.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    v = sub.add_parser("verify", help="re-check a prepared folder's sha256 and print its manifest counts")
    v.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "fetch":
            options = SubsetOptions(args.seed, args.train_pool, args.test, args.min_length, args.max_length)
            manifest = fetch(args.out, args.cache, args.db, options)
        else:
            _, manifest = load_prepared(args.out)
    except ContactsDataError as err:
        print(f"eval.quality.contacts_data: error: {err}", file=sys.stderr)
        return 1
    shown = {k: manifest[k] for k in ("chains", "residues", "ca_ca_fraction_3p6_4p0", "splits", "file_sha256")}
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
