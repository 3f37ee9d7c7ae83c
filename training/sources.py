"""Readers that turn input files into raw protein records, one (file, line, id, sequence) at a time.

Public API
    RawRecord(file, line, id, seq, problem)   # seq: whitespace-free bytes (may be empty), or None with `problem` set
    SourceError(Exception)                    # unreadable / truncated / wrong-schema input; the message names the file
    iter_records(source, *, split=None, sequence_column="sequence", id_column=None) -> Iterator[RawRecord]
    source_files(directory, split=None) -> list[Path]
    builtin_dir() -> Path, builtin_files() -> list[Path]   # aaanalysis benchmark TSVs, found without importing it

Sources and what `line` means in them
    FASTA  .fa .faa .fasta .fas (+ .gz)   line of the '>' header (1-based); id = header text up to the first space
    CSV/TSV .csv .tsv .tab (+ .gz)        text line of the row (header row = line 1); id from `id_column` or the
                                          first of ID_COLUMNS present, else "row<line>"
    parquet / arrow files                 1-based row number within the file
    a directory                           its FASTA/table/parquet/arrow files (sorted, recursive), or a dataset saved
                                          with `datasets.save_to_disk` (Dataset or DatasetDict + `split`)
    a Hub id "owner/name"                 streamed with `datasets.load_dataset(..., streaming=True)`; row number
Readers remove whitespace inside sequences (including CR of CRLF files) and a UTF-8 BOM; they never fix letters.
"""

import csv
import gzip
import importlib.util
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

FASTA_SUFFIXES = (".fa", ".faa", ".fasta", ".fas")
TABLE_SUFFIXES = (".csv", ".tsv", ".tab")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
ID_COLUMNS = ("id", "entry", "accession", "protein_id", "uniprot_id", "name")
SPLIT_NAMES = ("train", "valid", "validation", "test", "dev", "eval")
WHITESPACE = b" \t\r\n\v\f"
BOM = b"\xef\xbb\xbf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
READ_ERRORS = (OSError, EOFError, zlib.error, csv.Error, pa.ArrowException)


class SourceError(Exception):
    """An input that cannot be read at all (as opposed to a bad record, which is rejected with a reason)."""


class RawRecord(NamedTuple):
    file: str
    line: int
    id: str
    seq: bytes | None  # None: the reader already knows the record is bad (see `problem`)
    problem: str | None = None


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(FASTA_SUFFIXES):
        return "fasta"
    if base.endswith(TABLE_SUFFIXES):
        return "table"
    if name.endswith(COLUMNAR_SUFFIXES):
        return "columnar"
    return None


def iter_fasta(path: Path) -> Iterator[RawRecord]:
    """Records of a (multi-line, optionally gzipped) FASTA file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from _parse_fasta(f, str(path))
    except READ_ERRORS as e:
        raise SourceError(f"{path}: cannot read: {type(e).__name__}: {e}") from e


def _parse_fasta(lines, name: str) -> Iterator[RawRecord]:
    rid, header_line, parts, blank, orphan = None, 0, [], False, 0
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 and line.startswith(BOM):
            line = line[len(BOM) :]
        if line.startswith(b">"):
            if rid is not None:
                yield _fasta_record(name, header_line, rid, parts, blank)
            header = line[1:].strip()
            rid = header.split(None, 1)[0].decode("utf-8", "replace") if header else ""
            header_line, parts, blank = lineno, [], False
        elif line.startswith(b";"):  # classic FASTA comment line
            continue
        else:
            seq = line.translate(None, WHITESPACE)
            if not seq:
                blank = True
            elif rid is None:
                if not orphan:  # report one rejection per run of header-less lines, at its first line
                    orphan = lineno
                    yield RawRecord(name, lineno, "", None, "sequence_before_header: sequence text before any '>'")
            else:
                parts.append(seq)
    if rid is not None:
        yield _fasta_record(name, header_line, rid, parts, blank)


def _fasta_record(name: str, line: int, rid: str, parts: list, blank: bool) -> RawRecord:
    if parts:
        return RawRecord(name, line, rid, b"".join(parts))
    if blank:
        return RawRecord(name, line, rid, None, "empty_sequence: header followed only by blank lines")
    return RawRecord(name, line, rid, None, "header_without_sequence: next line is a header or the end of the file")


def _column(names: list, wanted: str | None, candidates: tuple, path, required: bool) -> int | None:
    lower = [str(n).strip().lower() for n in names]
    for cand in (wanted,) if wanted else candidates:
        if cand.lower() in lower:
            return lower.index(cand.lower())
    if required or wanted:
        raise SourceError(f"{path}: no {wanted or candidates[0]!r} column (columns: {', '.join(map(str, names))})")
    return None


def iter_table(path: Path, *, sequence_column: str = "sequence", id_column: str | None = None) -> Iterator[RawRecord]:
    """Records of a CSV/TSV file (optionally gzipped) with a header row."""
    delimiter = "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    csv.field_size_limit(2**31 - 1)  # titin-sized proteins exceed the 128 KiB default
    try:  # utf-8-sig drops a BOM; surrogateescape keeps invalid bytes so validation can name them
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{path}: empty file (no header row)")
            si = _column(header, sequence_column, (), path, required=True)
            ii = _column(header, id_column, ID_COLUMNS, path, required=False)
            for row in reader:
                if not row:  # blank line
                    continue
                line = reader.line_num
                cell = row[si] if si < len(row) else ""
                rid = row[ii] if ii is not None and ii < len(row) else f"row{line}"
                seq = cell.encode("utf-8", "surrogateescape").translate(None, WHITESPACE)
                yield RawRecord(str(path), line, rid, seq)
    except READ_ERRORS as e:
        raise SourceError(f"{path}: cannot read: {type(e).__name__}: {e}") from e


def _arrow_batches(path: Path) -> tuple[list, Iterator]:
    if path.name.lower().endswith(".parquet"):
        pf = pq.ParquetFile(path)
        return pf.schema_arrow.names, lambda cols: pf.iter_batches(batch_size=16384, columns=cols)
    source = pa.memory_map(str(path))
    try:  # datasets writes the IPC stream format; plain Arrow files use the file format
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        count = reader.num_record_batches
        return reader.schema.names, lambda cols: (reader.get_batch(i).select(cols) for i in range(count))
    return reader.schema.names, lambda cols: (b.select(cols) for b in reader)


def iter_columnar(
    path: Path, *, sequence_column: str = "sequence", id_column: str | None = None
) -> Iterator[RawRecord]:
    """Records of a parquet or Arrow IPC file."""
    try:
        names, batches = _arrow_batches(path)
        si = _column(names, sequence_column, (), path, required=True)
        ii = _column(names, id_column, ID_COLUMNS, path, required=False)
        cols = [names[si]] + ([names[ii]] if ii is not None else [])
        row = 0
        for batch in batches(cols):
            seqs = batch.column(names[si]).to_pylist()
            ids = batch.column(names[ii]).to_pylist() if ii is not None else None
            for k, s in enumerate(seqs):
                row += 1
                rid = str(ids[k]) if ids is not None else f"row{row}"
                seq = s.encode("utf-8", "surrogateescape").translate(None, WHITESPACE) if s is not None else b""
                yield RawRecord(str(path), row, rid, seq)
    except READ_ERRORS as e:
        raise SourceError(f"{path}: cannot read: {type(e).__name__}: {e}") from e


def _split_of(rel: Path) -> str | None:
    for part in rel.parts[:-1]:
        if part.lower() in SPLIT_NAMES:
            return part.lower()
    m = re.match(r"^(train|valid|validation|test|dev|eval)[-_.]", rel.name.lower())
    return m.group(1) if m else None


def source_files(directory: Path, split: str | None = None) -> list[Path]:
    """Input files of a directory: a `save_to_disk` dataset's arrow files, or its readable files (sorted)."""
    if (directory / "dataset_dict.json").exists():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise SourceError(f"{directory}: dataset splits are {splits}; choose one with --split (got {split!r})")
        return source_files(directory / split)
    if (directory / "state.json").exists():
        state = json.loads((directory / "state.json").read_text())
        return [directory / f["filename"] for f in state["_data_files"]]
    files = sorted(p for p in directory.rglob("*") if p.is_file() and _kind(p) is not None)
    by_split = {p: _split_of(p.relative_to(directory)) for p in files}
    found = sorted({s for s in by_split.values() if s is not None})
    if split is not None:
        files = [p for p in files if by_split[p] == split]
        if not files:
            raise SourceError(f"{directory}: no files for split {split!r} (splits found: {found or 'none'})")
    elif len(found) > 1:
        raise SourceError(f"{directory}: holds several splits {found}; choose one with --split")
    if not files:
        raise SourceError(f"{directory}: no FASTA, CSV/TSV, parquet or arrow files")
    return files


def iter_hub(
    repo_id: str, split: str | None, *, sequence_column: str = "sequence", id_column: str | None = None
) -> Iterator[RawRecord]:
    """Rows of a Hub dataset (or any path `datasets.load_dataset` accepts), streamed: nothing is downloaded whole."""
    import datasets  # slow import; only this source needs it

    name = f"{repo_id}[{split or 'train'}]"
    try:
        rows = datasets.load_dataset(repo_id, split=split or "train", streaming=True)
        for n, row in enumerate(rows, 1):
            if n == 1:
                si = _column(list(row), sequence_column, (), name, required=True)
                ii = _column(list(row), id_column, ID_COLUMNS, name, required=False)
                seq_key, id_key = list(row)[si], (list(row)[ii] if ii is not None else None)
            s = row[seq_key]
            rid = str(row[id_key]) if id_key is not None else f"row{n}"
            seq = s.encode("utf-8", "surrogateescape").translate(None, WHITESPACE) if s else b""
            yield RawRecord(name, n, rid, seq)
    except (OSError, ValueError) as e:  # no network, unknown dataset or split
        raise SourceError(
            f"{name}: cannot read as a Hub dataset (no such local path either): {type(e).__name__}: {e}"
        ) from e


def iter_records(
    source, *, split: str | None = None, sequence_column: str = "sequence", id_column: str | None = None
) -> Iterator[RawRecord]:
    """Records of a file, a directory or a Hub dataset id (see the module docstring)."""
    path = Path(source)
    kw = dict(sequence_column=sequence_column, id_column=id_column)
    if path.is_dir():
        for f in source_files(path, split):
            yield from iter_records(f, **kw)
    elif path.exists():
        kind = _kind(path)
        if kind == "fasta":
            yield from iter_fasta(path)
        elif kind == "table":
            yield from iter_table(path, **kw)
        elif kind == "columnar":
            yield from iter_columnar(path, **kw)
        else:
            known = " ".join(FASTA_SUFFIXES + TABLE_SUFFIXES + COLUMNAR_SUFFIXES)
            raise SourceError(f"{path}: unsupported file type (known: {known}, FASTA/CSV/TSV also .gz)")
    elif HUB_ID.match(str(source)) and _kind(path) is None:  # "owner/name", not a mistyped file path
        yield from iter_hub(str(source), split, **kw)
    else:
        raise SourceError(f"{source}: no such file or directory")


def builtin_dir() -> Path:
    """Folder of the aaanalysis benchmark TSVs, located without importing aaanalysis (its import is slow)."""
    spec = importlib.util.find_spec("aaanalysis")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("aaanalysis is not installed (pip install aaanalysis==1.1.0); the built-in proteins need it")
    return Path(spec.submodule_search_locations[0]) / "_data" / "benchmarks"


def builtin_files() -> list[Path]:
    """The benchmark TSVs that have a `sequence` column (Overview.tsv, a summary table, has none)."""
    files = []
    for path in sorted(builtin_dir().glob("*.tsv")):
        with open(path, encoding="utf-8-sig") as f:
            if "sequence" in f.readline().rstrip("\r\n").split("\t"):
                files.append(path)
    if not files:
        raise SourceError(f"{builtin_dir()}: no benchmark TSVs with a 'sequence' column")
    return files
