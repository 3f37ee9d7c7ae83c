"""Reader of NCBI BLAST protein databases, format version 4 (pure numpy + stdlib; imports nothing from `training`).

A database is three files beside each other, `BASE.pin`, `BASE.psq` and `BASE.phr` (BASE e.g. `BPO/goasp.fasta`):

    .pin  big-endian i32 version (4), i32 type (1 = protein), i32-prefixed title, i32-prefixed date (zero-padded so
          what follows starts at a multiple of 8), i32 N, LITTLE-endian u64 total residues, i32 longest sequence,
          then N+1 big-endian u32 header offsets (into .phr) and N+1 u32 sequence offsets (into .psq)
    .psq  one 0 byte, then each sequence in NCBIstdaa codes followed by a 0: sequence i = psq[off[i] : off[i+1] - 1]
    .phr  each record's ASN.1 BER Blast-def-line-set; the title is a VisibleString (tag 0x1a) `ACC|GO:...,GO:...`
          (metastudent-data's layout), found by TITLE below

Every count the header states is checked against the files (N, total residues, longest sequence, file sizes, the 0
after each sequence, one title per record); a mismatch raises BlastDBError naming the file and the reason.

Public API
    NCBISTDAA: bytes                     # code -> letter ("-ABCDEFGHIKLMNPQRSTVWXYZU*OJ")
    BlastDBError(ValueError)             # the message names the file
    BlastHeader (frozen)                 # what a .pin says: title, date, num_sequences, total_residues, max_length,
                                         # header_offsets, sequence_offsets
    read_header(pin_path) -> BlastHeader
    read_db(base) -> list[Protein]       # Protein(accession, sequence: bytes of upper-case letters), in file order
    Union (frozen): proteins (list of (accessions tuple, sequence), first seen first), accessions, residues, per_db,
                    shared_accessions, conflicts
    read_union(bases) -> Union           # several DBs deduplicated by accession (first DB wins) and by sequence
"""

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

NCBISTDAA = b"-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
LETTERS = np.frombuffer(NCBISTDAA + b"\x00" * (256 - len(NCBISTDAA)), dtype=np.uint8)  # code -> letter (0: not a code)
# the title VisibleString: tag 0x1a, BER length (1 byte < 128, 0x81 + 1 byte, 0x82 + 2 bytes), then `ACC|GO:`
TITLE = re.compile(rb"\x1a(?:([\x00-\x7f])|\x81(.)|\x82(..))([A-Za-z0-9_.]+)\|GO:", re.DOTALL)
VERSION, PROTEIN = 4, 1


class BlastDBError(ValueError):
    """A BLAST DB file that is missing, truncated or disagrees with its header; the message names the file."""


class Protein(NamedTuple):
    accession: str
    sequence: bytes  # upper-case one-letter codes


@dataclass(frozen=True)
class BlastHeader:
    """The contents of a .pin file."""

    title: str
    date: str
    num_sequences: int
    total_residues: int
    max_length: int
    header_offsets: np.ndarray  # (N + 1,) int64 offsets into .phr
    sequence_offsets: np.ndarray  # (N + 1,) int64 offsets into .psq


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BlastDBError(f"{path}: cannot read: {e.strerror or e}") from e


def read_header(pin_path) -> BlastHeader:
    """Parse and check a .pin file (version 4, protein, offsets that never go back)."""
    path = Path(pin_path)
    data = _read(path)

    def ints(fmt: str, at: int) -> tuple:
        if at + struct.calcsize(fmt) > len(data):
            raise BlastDBError(f"{path}: truncated header ({len(data)} bytes)")
        return struct.unpack_from(fmt, data, at)

    version, kind = ints(">ii", 0)
    if (version, kind) != (VERSION, PROTEIN):
        raise BlastDBError(f"{path}: not a BLAST v4 protein DB (version {version}, type {kind}; want 4, 1)")
    at, texts = 8, []
    for _ in range(2):  # title, date
        (n,) = ints(">i", at)
        if n < 0 or at + 4 + n > len(data):
            raise BlastDBError(f"{path}: bad string length {n} at byte {at}")
        texts.append(data[at + 4 : at + 4 + n].rstrip(b"\x00").decode("ascii", "replace"))
        at += 4 + n
    (count,) = ints(">i", at)
    (total,) = ints("<Q", at + 4)
    (longest,) = ints(">i", at + 12)
    at += 16
    if count < 0 or len(data) != at + 8 * (count + 1):
        raise BlastDBError(f"{path}: {len(data)} bytes, but N = {count} needs {at + 8 * (count + 1)}")
    offsets = np.frombuffer(data, dtype=">u4", count=2 * (count + 1), offset=at).astype(np.int64)
    heads, seqs = offsets[: count + 1], offsets[count + 1 :]
    for name, off in (("header", heads), ("sequence", seqs)):
        if (np.diff(off) <= 0).any():
            raise BlastDBError(f"{path}: {name} offsets are not increasing")
    return BlastHeader(texts[0], texts[1], count, total, longest, heads, seqs)


def _titles(phr_path: Path, header: BlastHeader) -> list[str]:
    """The accession of each record, from the one title inside each record's bytes of the .phr file."""
    data = _read(phr_path)
    heads = header.header_offsets
    if len(data) != heads[-1]:
        raise BlastDBError(f"{phr_path}: {len(data)} bytes, but the .pin's header offsets end at {heads[-1]}")
    found = list(TITLE.finditer(data))
    starts = np.array([m.start() for m in found], dtype=np.int64)
    owner = np.searchsorted(heads, starts, side="right") - 1  # the record each title lies in
    if len(found) != header.num_sequences or (owner != np.arange(header.num_sequences)).any():
        raise BlastDBError(
            f"{phr_path}: {len(found)} titles 'ACC|GO:...' for {header.num_sequences} records (want one per record)"
        )
    for i, m in enumerate(found):
        size = m.group(1) or m.group(2) or m.group(3)
        end = m.start(4) + int.from_bytes(size, "big")
        if end > heads[i + 1]:
            raise BlastDBError(f"{phr_path}: record {i}: title runs past the record's end")
    return [m.group(4).decode("ascii") for m in found]


def read_db(base) -> list[Protein]:
    """Every record of the DB `base` (path without .pin/.psq/.phr), in file order, after checking the header's
    counts against the files."""
    base = Path(base)
    pin, psq, phr = (base.with_name(base.name + s) for s in (".pin", ".psq", ".phr"))
    header = read_header(pin)
    codes = np.frombuffer(_read(psq), dtype=np.uint8)
    off = header.sequence_offsets
    if len(codes) != off[-1] or off[0] != 1 or codes[0] != 0:
        raise BlastDBError(f"{psq}: {len(codes)} bytes, but the .pin's sequence offsets run {off[0]}..{off[-1]}")
    if codes[off[1:] - 1].any():
        raise BlastDBError(f"{psq}: a sequence does not end with a 0 byte")
    lengths = np.diff(off) - 1
    total, longest = int(lengths.sum()), int(lengths.max(initial=0))
    if (total, longest) != (header.total_residues, header.max_length):
        raise BlastDBError(
            f"{pin}: header says {header.total_residues} residues (longest {header.max_length}), "
            f"{psq} holds {total} (longest {longest})"
        )
    letters = LETTERS[codes]
    inside = np.ones(len(codes), dtype=bool)
    inside[off[1:] - 1] = inside[0] = False
    if (letters[inside] == 0).any():  # a 0 inside a sequence is NCBIstdaa's gap '-' (validation rejects it)
        raise BlastDBError(f"{psq}: a byte that is not an NCBIstdaa code inside a sequence")
    text = letters.tobytes()
    accessions = _titles(phr, header)
    return [Protein(a, text[s : e - 1]) for a, s, e in zip(accessions, off[:-1].tolist(), off[1:].tolist())]


@dataclass(frozen=True)
class Union:
    """Several DBs read together: each protein once, deduplicated by accession and then by sequence."""

    proteins: list  # (accessions tuple, sequence bytes) per unique sequence, in first-seen order
    accessions: int  # unique accessions
    residues: int  # residues of the unique sequences
    per_db: dict  # base -> dict(records, residues, new_accessions)
    shared_accessions: int  # records whose accession an earlier record already had (same sequence)
    conflicts: list  # (accession, base) where an accession came back with another sequence (the first is kept)


def read_union(bases: Iterable) -> Union:
    """Read the DBs in order; an accession seen before is skipped (a different sequence is recorded as a conflict),
    then accessions with the same sequence are grouped under the first one."""
    seen: dict[str, bytes] = {}  # accession -> sequence
    slot: dict[bytes, int] = {}  # sequence -> index in groups
    groups: list[list] = []  # [sequence, accession, ...]
    per_db, shared, conflicts = {}, 0, []
    for base in bases:
        proteins = read_db(base)
        new = 0
        for acc, seq in proteins:
            first = seen.get(acc)
            if first is not None:
                shared += 1
                if first != seq:
                    conflicts.append((acc, str(base)))
                continue
            seen[acc], new = seq, new + 1
            k = slot.setdefault(seq, len(groups))
            if k == len(groups):
                groups.append([seq])
            groups[k].append(acc)
        per_db[str(base)] = dict(
            records=len(proteins), residues=sum(len(p.sequence) for p in proteins), new_accessions=new
        )
    unique = [(tuple(g[1:]), g[0]) for g in groups]
    residues = sum(len(s) for _, s in unique)
    return Union(unique, len(seen), residues, per_db, shared, conflicts)
