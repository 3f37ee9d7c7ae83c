"""Checksums of files and of proteins: sha256 of a whole file (shard manifests, checkpoint manifests) and crc32 of
each protein's residue bytes (the per-protein check of token shards, verified whenever a protein is read)."""

import hashlib
import zlib
from pathlib import Path

import numpy as np


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def protein_crc32(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n,) uint32 zlib crc32 of each protein's bytes; proteins stored back to back in `tokens`, `lengths` each."""
    view = memoryview(np.ascontiguousarray(tokens, dtype=np.uint8))
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    return np.fromiter((zlib.crc32(view[a:b]) for a, b in zip(starts, ends)), dtype=np.uint32, count=len(ends))
