"""Token shards: residue ids (uint8), an offsets index and a crc32 per protein in one file, checked without reading
the corpus at start-up.

Public API
    ShardWriter(directory, shard_tokens=256 MiB).add(tokens, lengths, crcs=None); .close(extra=None) -> manifest
    ShardSet(directory, verify="header")
        verify="header": magic, version, vocabulary and sizes of every shard against the manifest (64 bytes read per
                         shard: what a training start does); "sha256": also the sha256 of every shard (reads it all:
                         `python -m training.data verify DIR`, and `prepare` right after writing)
        .num_docs, .num_tokens, .files, .shard_docs (proteins per shard), .starts (first protein of each shard)
        .doc(i) -> (n,) uint8, checked; .locate(i) -> (shard, index in it)
        .index(shard, first, count) -> (offsets (count + 1,) int64, crcs (count,) int64, -1 where unknown)
        .read(shard, start, stop, crc) -> (stop - start,) uint8 residues, checked against `crc`
        .lengths -> (num_docs,) int64 residues per protein (reads every offsets table: for tools and tests)
    ShardError(Exception)   # bad magic / version / vocabulary / size / sha256 / crc32; the message names the file

Shard file layout (little-endian), `shard-NNNNN.bin`
    0   8s   magic b"SPLMTOK\\0"
    8   u32  format version (2; version 1 files, which lack the crc32 table, are still read)
    12  u32  header size (64)
    16  32s  vocabulary hash (ASCII hex, validate.VOCAB_HASH)
    48  u64  number of proteins D
    56  u64  number of residue tokens T
    64  T bytes of residue ids (4..30; no <cls>/<eos>: the collator adds them, so crops keep both ends marked)
    then zero padding to a multiple of 8, then (D + 1) int64 offsets (offsets[0] = 0, offsets[D] = T),
    then D uint32: zlib crc32 of each protein's residue bytes (version 2)
`manifest.json` beside the shards lists each file with its sha256, proteins and tokens.

Reads go through os.pread on a descriptor each process opens for itself (DataLoader workers included): nothing is
memory-mapped, so a process holds only what it reads, and every protein read is checked against its crc32 (a
flipped byte is named with its file when the protein is read, not at start-up). A version-1 shard has no crc32s:
the first read from it in a process checks the whole file's sha256 instead.
"""

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .checksum import protein_crc32, sha256_file
from .validate import VOCAB, VOCAB_HASH

MAGIC = b"SPLMTOK\x00"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER = struct.Struct("<8sII32sQQ")  # 64 bytes
SHARD_MANIFEST = "manifest.json"


class ShardError(Exception):
    """A shard that fails its checks; the message names the file."""


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _layout(version: int, header: int, docs: int, tokens: int) -> tuple[int, int | None, int]:
    """(byte offset of the offsets table, of the crc32 table or None, file size)."""
    offsets_at = _align8(header + tokens)
    crcs_at = offsets_at + 8 * (docs + 1)
    return offsets_at, (crcs_at if version >= 2 else None), crcs_at + (4 * docs if version >= 2 else 0)


class ShardWriter:
    """Appends proteins and writes a shard file every `shard_tokens` residues; `close()` writes the manifest."""

    def __init__(self, directory, shard_tokens: int = 256 << 20):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        self._tokens, self._lengths, self._crcs, self._buffered = [], [], [], 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, crcs: np.ndarray | None = None) -> None:
        """Append proteins stored back to back in `tokens` (uint8), `lengths` residues each; `crcs`: their
        protein_crc32 if already known (prepare's workers compute them)."""
        if len(lengths) == 0:
            return
        tokens = np.asarray(tokens, dtype=np.uint8)
        self._tokens.append(tokens)
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self._crcs.append(protein_crc32(tokens, lengths) if crcs is None else np.asarray(crcs, dtype=np.uint32))
        self._buffered += int(tokens.size)
        if self._buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._lengths:
            return
        parts, (lengths, crcs) = self._tokens, (np.concatenate(x) for x in (self._lengths, self._crcs))
        self._tokens, self._lengths, self._crcs, self._buffered = [], [], [], 0
        size = int(lengths.sum())
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        name = f"shard-{len(self.shards):05d}.bin"
        header = HEADER.pack(MAGIC, VERSION, HEADER.size, VOCAB_HASH.encode(), len(lengths), size)
        pad = bytes(_align8(HEADER.size + size) - HEADER.size - size)
        digest = hashlib.sha256()
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:  # the buffered pieces go out one by one: no concatenated copy of the residues
            for part in (header, *(p.data for p in parts), pad, offsets.data, crcs.astype("<u4").data):
                f.write(part)
                digest.update(part)
        os.replace(tmp, self.dir / name)  # never leave a half-written shard under its final name
        entry = dict(file=name, sha256=digest.hexdigest(), num_docs=len(lengths), num_tokens=size)
        self.shards.append(entry)

    def close(self, extra: dict | None = None) -> dict:
        self._flush()
        manifest = dict(
            format="speedplm-token-shards",
            version=VERSION,
            vocab_hash=VOCAB_HASH,
            vocab=list(VOCAB),
            num_docs=sum(s["num_docs"] for s in self.shards),
            num_tokens=sum(s["num_tokens"] for s in self.shards),
            shards=self.shards,
            **(extra or {}),
        )
        (self.dir / SHARD_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


class ShardSet:
    """All shards of one directory as one indexable set of proteins, read on demand (see the module docstring)."""

    def __init__(self, directory, verify: str = "header"):
        if verify not in ("sha256", "header"):
            raise ValueError(f"verify must be 'sha256' or 'header', got {verify!r}")
        self.dir = Path(directory)
        path = self.dir / SHARD_MANIFEST
        if not path.exists():
            raise ShardError(f"{path}: no manifest (run `python -m training.data prepare` first)")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as e:
            raise ShardError(f"{path}: unreadable manifest: {e}") from e
        if self.manifest.get("vocab_hash") != VOCAB_HASH:
            raise ShardError(f"{path}: vocabulary hash {self.manifest.get('vocab_hash')} != {VOCAB_HASH}")
        entries = self.manifest["shards"]
        self.files = [self.dir / s["file"] for s in entries]
        self._layouts = [self._check(f, entry, verify) for entry, f in zip(entries, self.files)]
        self.shard_docs = [int(s["num_docs"]) for s in entries]
        self.num_docs = sum(self.shard_docs)
        self.num_tokens = sum(int(s["num_tokens"]) for s in entries)
        self.starts = np.cumsum([0, *self.shard_docs])  # (shards + 1,) first global protein index of each shard
        self._fds, self._pid, self._sha_checked = {}, None, set()

    @staticmethod
    def _check(path: Path, entry: dict, verify: str) -> tuple:
        if not path.exists():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            raise ShardError(f"{path}: bad magic (not a speedplm token shard)")
        _, version, hsize, vocab, docs, tokens = HEADER.unpack(raw)
        if version not in READABLE_VERSIONS:
            raise ShardError(f"{path}: format version {version}, this code reads {READABLE_VERSIONS}")
        if vocab.decode(errors="replace") != VOCAB_HASH:
            raise ShardError(f"{path}: vocabulary hash {vocab.decode(errors='replace')} != {VOCAB_HASH}")
        offsets_at, crcs_at, size = _layout(version, hsize, docs, tokens)
        if (docs, tokens) != (entry["num_docs"], entry["num_tokens"]) or path.stat().st_size != size:
            raise ShardError(f"{path}: size does not match its header/manifest (truncated or corrupted)")
        if verify == "sha256" and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 mismatch with the manifest (corrupted)")
        return hsize, docs, tokens, offsets_at, crcs_at

    def __getstate__(self):  # descriptors are per process: a spawned worker opens its own
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __len__(self) -> int:
        return self.num_docs

    def _pread(self, shard: int, size: int, at: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker opens its own descriptors (and checks v1 shards itself)
            self._fds, self._pid, self._sha_checked = {}, os.getpid(), set()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        data = os.pread(fd, size, at)
        if len(data) != size:
            raise ShardError(f"{self.files[shard]}: {size} bytes at {at} cut short (truncated while in use?)")
        return data

    def index(self, shard: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Offsets (count + 1,) int64 (residue positions within the shard) and crc32s (count,) int64 (-1 for a
        version-1 shard) of proteins first .. first + count - 1 of `shard`."""
        hsize, docs, tokens, offsets_at, crcs_at = self._layouts[shard]
        offsets = np.frombuffer(self._pread(shard, 8 * (count + 1), offsets_at + 8 * first), dtype="<i8")
        if offsets[0] < 0 or offsets[-1] > tokens or (count and (np.diff(offsets) < 0).any()):
            raise ShardError(f"{self.files[shard]}: offsets of proteins {first}..{first + count} are corrupted")
        if crcs_at is None:
            crcs = np.full(count, -1, dtype=np.int64)
        else:
            crcs = np.frombuffer(self._pread(shard, 4 * count, crcs_at + 4 * first), dtype="<u4").astype(np.int64)
        return offsets.astype(np.int64), crcs

    def read(self, shard: int, start: int, stop: int, crc: int) -> np.ndarray:
        """(stop - start,) uint8 residues at positions start..stop of `shard`, checked against `crc` (-1: a
        version-1 shard, checked once per process by its sha256)."""
        data = self._pread(shard, stop - start, self._layouts[shard][0] + start)
        if crc < 0:
            self._check_sha256(shard)
        elif zlib.crc32(data) != crc:
            raise ShardError(
                f"{self.files[shard]}: residues {start}..{stop} fail their crc32 (corrupted); "
                f"`python -m training.data verify {self.dir}` checks every shard"
            )
        return np.frombuffer(data, dtype=np.uint8)

    def _check_sha256(self, shard: int) -> None:
        if shard not in self._sha_checked:
            if sha256_file(self.files[shard]) != self.manifest["shards"][shard]["sha256"]:
                raise ShardError(f"{self.files[shard]}: sha256 mismatch with the manifest (corrupted)")
            self._sha_checked.add(shard)

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, index within the shard) of global protein `i`."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"protein {i} of {self.num_docs}")
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return shard, i - int(self.starts[shard])

    def doc(self, i: int) -> np.ndarray:
        """(n,) uint8 residue ids of protein `i`, checked against its crc32."""
        shard, j = self.locate(i)
        offsets, crcs = self.index(shard, j, 1)
        return self.read(shard, int(offsets[0]), int(offsets[1]), int(crcs[0]))

    @property
    def lengths(self) -> np.ndarray:
        """(num_docs,) int64 residues per protein: reads every offsets table (O(num_docs) memory; not for loaders)."""
        parts = [np.diff(self.index(s, 0, n)[0]) for s, n in enumerate(self.shard_docs)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
