"""Downloaders for the anchors' public pretraining corpora: Hub datasets with train/valid/test splits and a
`sequence` column, fetched whole or in part (first N shards, first N sequences), then prepared into token shards.

    python -m training.data.corpora swissprot --out data/swissprot2014 [--exclude EVAL.fasta ...]   # offline: Debian
    python -m training.data.corpora download omg_prot50 --out data/omg_prot50 [--splits train valid test]
        [--max-shards N] [--max-sequences N] [--source DIR_OR_HUB_ID] [--revision REV] [--prepare SHARD_DIR]

Public API
    CORPORA: short name -> Hub id  (omg_prot50, uniref50, og_prot90 from Synthyra)
    split_files(source, split, revision=None) -> (fs, list of paths)   # one split's shard files, sorted
    CorpusPart(splits=("train", "valid", "test"), max_shards=None, max_sequences=None)   # frozen: what to fetch
    download_corpus(name, out_dir, part=CorpusPart(), *, source=None, revision=None, log=print)
        -> dict[split, list[Path]]
    main(argv=None) -> int

`source` is the Hub id by default, or a local directory with the same layout (how the tests run offline):
`data/<split>-*.parquet` (push_to_hub), `<split>/*.parquet`, `*/<split>/*.parquet` (the Hub's parquet
conversion) or `<split>/*.arrow` (save_to_disk). With `max_sequences` only the rows needed are read (parquet row
groups over HTTP range requests); otherwise whole shard files are copied and skipped when already present.
Output: out_dir/<split>/<files>.parquet|arrow and out_dir/corpus.json (source, revision, files, rows).
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .sources import SourceError

CORPORA = {
    "omg_prot50": "Synthyra/omg_prot50",
    "uniref50": "Synthyra/uniref50",
    "og_prot90": "Synthyra/og_prot90",
}
SPLITS = ("train", "valid", "test")
ALIASES = {"valid": ("valid", "validation"), "validation": ("validation", "valid")}
PATTERNS = (
    "data/{s}-*.parquet",
    "data/{s}/*.parquet",
    "{s}/*.parquet",
    "{s}-*.parquet",
    "*/{s}/*.parquet",
    "{s}/*.arrow",
)


def _filesystem(source: str, revision: str | None):
    """(fsspec filesystem, root path) for a local directory or a Hub dataset id."""
    if Path(source).is_dir():
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), str(Path(source).resolve())
    from huggingface_hub import HfFileSystem  # only needed for the Hub

    return HfFileSystem(), f"datasets/{source}" + (f"@{revision}" if revision else "")


def split_files(source: str, split: str, revision: str | None = None):
    """(fs, sorted shard paths) of one split; SourceError if the split has no files in any known layout."""
    fs, root = _filesystem(source, revision)
    for name in ALIASES.get(split, (split,)):
        for pattern in PATTERNS:
            try:
                found = sorted(fs.glob(f"{root}/{pattern.format(s=name)}"))
            except OSError as e:  # no network / unknown repo
                raise SourceError(f"{source}: cannot list files: {type(e).__name__}: {e}") from e
            if found:
                return fs, found
    raise SourceError(f"{source}: no files for split {split!r} (looked for {', '.join(PATTERNS)})")


def _batches(fs, path: str):
    f = fs.open(path, "rb")
    if path.endswith(".parquet"):
        pf = pq.ParquetFile(f)
        names, batches = pf.schema_arrow.names, pf.iter_batches(batch_size=8192)
    else:
        reader = pa.ipc.open_stream(f)
        names, batches = reader.schema.names, iter(reader)
    if "sequence" not in names:
        raise SourceError(f"{path}: no 'sequence' column (columns: {', '.join(names)})")
    return batches


def _copy(fs, path: str, dest: Path) -> None:
    if dest.exists() and dest.stat().st_size == fs.size(path):
        return  # already fetched: downloads resume shard by shard
    tmp = dest.with_name(dest.name + ".part")
    fs.get_file(path, str(tmp))
    tmp.replace(dest)


def _take(fs, paths: list, dest: Path, limit: int) -> int:
    """Write the first `limit` rows of `paths` into one parquet file; returns the rows written."""
    rows, writer = 0, None
    tmp = dest.with_name(dest.name + ".part")
    try:
        for path in paths:
            for batch in _batches(fs, path):
                batch = batch.slice(0, limit - rows)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema)
                writer.write_batch(batch)
                rows += batch.num_rows
                if rows >= limit:
                    break
            if rows >= limit:
                break
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        tmp.replace(dest)
    return rows


@dataclass(frozen=True)
class CorpusPart:
    """Which part of a corpus to fetch: these splits, each cut to its first `max_shards` shard files or to its first
    `max_sequences` rows (None: all of it)."""

    splits: tuple = SPLITS
    max_shards: int | None = None
    max_sequences: int | None = None


def download_corpus(
    name: str,
    out_dir,
    part: CorpusPart = CorpusPart(),
    *,
    source: str | None = None,
    revision: str | None = None,
    log=print,
) -> dict:
    """Fetch `part` of a corpus (short name or Hub id; read from `source` instead if given, at `revision` on the
    Hub) into out_dir/<split>/; returns the files per split."""
    repo = CORPORA.get(name, name)
    source = source or repo
    out = Path(out_dir)
    result, info = {}, dict(corpus=name, hub_id=repo, source=source, revision=revision, splits={})
    for split in part.splits:
        fs, paths = split_files(source, split, revision)
        paths = paths[: part.max_shards] if part.max_shards else paths
        target = out / split
        target.mkdir(parents=True, exist_ok=True)
        if part.max_sequences:
            dest = target / f"{split}-00000.parquet"
            rows = _take(fs, paths, dest, part.max_sequences)
            files = [dest] if rows else []
        else:
            files = []
            for path in paths:
                _batches(fs, path)  # schema check before fetching a large file
                dest = target / Path(path).name
                _copy(fs, path, dest)
                files.append(dest)
            rows = sum(_rows(f) for f in files)
        result[split] = files
        info["splits"][split] = dict(files=[f.name for f in files], rows=rows, source_files=len(paths))
        log(f"{name} {split}: {len(files)} file(s), {rows} sequences -> {target}")
    (out / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
    return result


def _rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_stream(f).read_all().num_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.data.corpora", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch a corpus (all or part of it)")
    d.add_argument("name", help=f"one of {', '.join(CORPORA)} or a Hub dataset id")
    d.add_argument("--out", required=True, metavar="DIR")
    d.add_argument("--splits", nargs="+", default=list(SPLITS))
    d.add_argument("--max-shards", type=int, help="first N shard files per split")
    d.add_argument("--max-sequences", type=int, help="first N sequences per split")
    d.add_argument("--source", help="local directory (same layout) or Hub id to read instead of the corpus' Hub id")
    d.add_argument("--revision")
    d.add_argument("--prepare", metavar="SHARD_DIR", help="also prepare token shards into SHARD_DIR/<split>")
    from . import swissprot

    swissprot.add_arguments(sub.add_parser("swissprot", help="Swiss-Prot 2014_01 (Debian metastudent-data) -> shards"))
    args = ap.parse_args(argv)
    if args.command == "swissprot":
        return swissprot.run(args)
    from .prepare import DataError, prepare  # heavy imports only for the CLI path that needs them

    try:
        part = CorpusPart(tuple(args.splits), args.max_shards, args.max_sequences)
        files = download_corpus(args.name, args.out, part, source=args.source, revision=args.revision)
        if args.prepare:
            for split, paths in files.items():
                prepare([str(p) for p in paths], Path(args.prepare) / split, overwrite=True)
    except (SourceError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
