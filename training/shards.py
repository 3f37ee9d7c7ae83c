"""Token shards: residue ids (uint8) + an offsets index in one memory-mappable file, checked on load.

Public API
    ShardWriter(directory, shard_tokens=256 MiB).add(tokens, lengths); .close() -> manifest dict
    ShardSet(directory, verify="sha256")   # verify: "sha256" (hash every shard) or "header" (magic/version/sizes)
        .num_docs, .num_tokens, .lengths (num_docs,) int64 residues per protein, .doc(i) -> (n,) uint8 view
    ShardError(Exception)                  # bad magic / version / vocabulary / size / sha256; names the shard file

Shard file layout (little-endian), `shard-NNNNN.bin`
    0   8s   magic b"SPLMTOK\\0"
    8   u32  format version (1)
    12  u32  header size (64)
    16  32s  vocabulary hash (ASCII hex, validate.VOCAB_HASH)
    48  u64  number of proteins D
    56  u64  number of residue tokens T
    64  T bytes of residue ids (4..30; no <cls>/<eos>: the collator adds them, so crops keep both ends marked)
    then zero padding to a multiple of 8, then (D + 1) int64 offsets (offsets[0] = 0, offsets[D] = T)
`manifest.json` beside the shards lists each file with its sha256, proteins and tokens.
"""

import hashlib
import json
import os
import struct
from bisect import bisect_right
from pathlib import Path

import numpy as np

from training.validate import VOCAB, VOCAB_HASH

MAGIC = b"SPLMTOK\x00"
VERSION = 1
HEADER = struct.Struct("<8sII32sQQ")  # 64 bytes
MANIFEST = "manifest.json"


class ShardError(Exception):
    """A shard that fails its checks; the message names the file."""


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class ShardWriter:
    """Appends proteins and writes a shard file every `shard_tokens` residues; `close()` writes the manifest."""

    def __init__(self, directory, shard_tokens: int = 256 << 20):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        self._tokens, self._lengths, self._buffered = [], [], 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append proteins stored back to back in `tokens` (uint8), `lengths` residues each."""
        if len(lengths) == 0:
            return
        self._tokens.append(np.asarray(tokens, dtype=np.uint8))
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self._buffered += int(tokens.size)
        if self._buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._lengths:
            return
        tokens = np.concatenate(self._tokens)
        lengths = np.concatenate(self._lengths)
        self._tokens, self._lengths, self._buffered = [], [], 0
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        name = f"shard-{len(self.shards):05d}.bin"
        header = HEADER.pack(MAGIC, VERSION, HEADER.size, VOCAB_HASH.encode(), len(lengths), tokens.size)
        pad = bytes(_align8(HEADER.size + tokens.size) - HEADER.size - tokens.size)
        digest = hashlib.sha256()
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:
            for part in (header, tokens.tobytes(), pad, offsets.tobytes()):
                f.write(part)
                digest.update(part)
        os.replace(tmp, self.dir / name)  # never leave a half-written shard under its final name
        entry = dict(file=name, sha256=digest.hexdigest(), num_docs=len(lengths), num_tokens=int(tokens.size))
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
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class ShardSet:
    """All shards of one directory as one indexable set of proteins; memory maps reopen lazily in each process."""

    def __init__(self, directory, verify: str = "sha256"):
        if verify not in ("sha256", "header"):
            raise ValueError(f"verify must be 'sha256' or 'header', got {verify!r}")
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.exists():
            raise ShardError(f"{path}: no manifest (run `python -m training.data prepare` first)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("vocab_hash") != VOCAB_HASH:
            raise ShardError(f"{path}: vocabulary hash {self.manifest.get('vocab_hash')} != {VOCAB_HASH}")
        self.files = [self.dir / s["file"] for s in self.manifest["shards"]]
        lengths, starts = [], [0]
        for entry, f in zip(self.manifest["shards"], self.files):
            offsets = self._check(f, entry, verify)
            lengths.append(np.diff(offsets))
            starts.append(starts[-1] + entry["num_docs"])
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)  # (num_docs,) residues
        self.num_docs = int(starts[-1])
        self.num_tokens = int(self.lengths.sum())
        self._starts = starts[:-1]  # first global protein index of each shard
        self._maps, self._pid = None, None

    @staticmethod
    def _check(path: Path, entry: dict, verify: str) -> np.ndarray:
        if not path.exists():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            raise ShardError(f"{path}: bad magic (not a speedplm token shard)")
        _, version, hsize, vocab, docs, tokens = HEADER.unpack(raw)
        if version != VERSION:
            raise ShardError(f"{path}: format version {version}, this code reads {VERSION}")
        if vocab.decode() != VOCAB_HASH:
            raise ShardError(f"{path}: vocabulary hash {vocab.decode()} != {VOCAB_HASH}")
        expected = _align8(hsize + tokens) + 8 * (docs + 1)
        if (docs, tokens) != (entry["num_docs"], entry["num_tokens"]) or path.stat().st_size != expected:
            raise ShardError(f"{path}: size does not match its header/manifest (truncated or corrupted)")
        if verify == "sha256" and _sha256(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 mismatch with the manifest (corrupted)")
        return np.fromfile(path, dtype=np.int64, count=docs + 1, offset=_align8(hsize + tokens))

    def _open(self) -> list:
        if self._pid != os.getpid():  # a forked/spawned worker maps the files itself
            self._maps = []
            for f in self.files:
                buf = np.memmap(f, dtype=np.uint8, mode="r").view(np.ndarray)  # plain views slice faster
                _, _, hsize, _, docs, tokens = HEADER.unpack(bytes(buf[: HEADER.size]))
                offsets = buf[_align8(hsize + tokens) :].view(np.int64)  # (docs + 1,)
                self._maps.append((buf[hsize : hsize + tokens], offsets))
            self._pid = os.getpid()
        return self._maps

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_pid")} | {"_maps": None, "_pid": None}

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """(n,) uint8 residue ids of protein `i` (a view into the memory map)."""
        s = bisect_right(self._starts, i) - 1
        tokens, offsets = self._open()[s]
        j = i - self._starts[s]
        return tokens[offsets[j] : offsets[j + 1]]
