"""Readers that turn inputs into raw protein records (file, line, id, sequence), in pieces that workers can parse.

Public API
    RawRecord(file, line, id, seq, problem)   # seq: whitespace-free bytes (may be empty), or None with `problem` set
    Chunk(kind, file, first, payload, last, columns)   # a piece of one input: whole records, and where they start
    SourceError(Exception)                    # unreadable / truncated / wrong-schema input; the message names the file
    iter_chunks(source, *, split=None, sequence_column="sequence", id_column=None, chunk_bytes=16 MiB)
        -> Iterator[Chunk]                    # reads, decompresses and cuts (one process, in order)
    chunk_records(chunk) -> Iterator[RawRecord]   # parses one piece (any process)
    iter_records(source, **kw) -> Iterator[RawRecord]   # both, one record at a time
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

Pieces: FASTA text is cut just before a header line, CSV/TSV text after a row (never inside a quoted field), each
about chunk_bytes long (a gzipped file is decompressed here, in order, and cut the same way); a parquet piece is a run
of whole row groups that the worker reads itself, an Arrow file is one piece, a Hub dataset is streamed and cut into
pieces of records. Nothing holds more than a piece of an input; the pieces depend on the input alone, not on how
many processes parse them.
"""

import contextlib
import csv
import gzip
import importlib.util
import io
import json
import os
import re
import stat
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
CHUNK_BYTES = 16 << 20  # raw input per piece handed to a `prepare` worker
csv.field_size_limit(2**31 - 1)  # titin-sized proteins exceed the 128 KiB default


class SourceError(Exception):
    """An input that cannot be read at all (as opposed to a bad record, which is rejected with a reason)."""


class Chunk(NamedTuple):
    """A piece of one input for a worker: whole records, and where they start."""

    kind: str  # "fasta" | "table" (payload: bytes) | "columnar" (payload: parquet row groups, None: whole file)
    # | "records" (payload: list of RawRecord, from a streamed Hub dataset)
    file: str  # the input it comes from (named in every message)
    first: int  # line (FASTA, tables) or row (columnar, Hub) number of its first record
    payload: object
    last: bool  # the input's last piece
    columns: tuple = ()  # table: (delimiter, sequence index, id index); columnar: (sequence name, id name)


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


def _opener(path: Path):
    return gzip.open if path.name.lower().endswith(".gz") else open


def _read_errors(path) -> contextlib.AbstractContextManager:
    """Turn a reader's low-level error (truncated gzip, bad CSV quoting, broken parquet) into a SourceError."""

    @contextlib.contextmanager
    def wrap():
        try:
            yield
        except READ_ERRORS as e:
            raise SourceError(f"{path}: cannot read: {type(e).__name__}: {e}") from e

    return wrap()


def _cut_chunks(f, chunk_bytes: int, cut) -> Iterator[tuple[bytes, int, bool]]:
    """(text, first line, last) pieces of an open binary file, each ending where `cut(data, pending)` says in the
    data just read (-1: read on);
    lines are counted by b"\n" so every piece knows the number of its first line."""
    line, pending = 1, b""
    try:  # a pipe or FIFO hands over what has arrived (a piece does not wait for chunk_bytes more to be written)
        regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (OSError, AttributeError, io.UnsupportedOperation):
        regular = True
    read = f.read if regular else f.read1
    while True:
        data = read(chunk_bytes)
        if not data:
            yield pending, line, True
            return
        end = cut(data, pending)
        if end < 0:  # no place to cut in what was read: one record longer than a chunk, read on
            pending += data
            continue
        text, pending = pending + data[:end], data[end:]  # one copy of the piece, the short tail kept
        yield text, line, False
        line += text.count(b"\n")


def _fasta_cut(buf: bytes, before: bytes) -> int:
    return buf.rfind(b"\n>") + 1 or -1  # just before the last header that starts in the buffer


def _table_cut(buf: bytes, before: bytes) -> int:
    """After the last newline outside a quoted field (an even number of '"' before it, `before` included: csv's
    doubled quotes keep the parity), so a row with a quoted newline is never split."""
    odd = before.count(b'"') % 2
    end = buf.rfind(b"\n")
    while end >= 0 and (buf.count(b'"', 0, end) + odd) % 2:
        end = buf.rfind(b"\n", 0, end)
    return end + 1 if end >= 0 else -1


def _fasta_chunks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    with _read_errors(path), _opener(path)(path, "rb") as f:
        for text, line, last in _cut_chunks(f, chunk_bytes, _fasta_cut):
            yield Chunk("fasta", str(path), line, text, last)


def _parse_fasta(lines, name: str, first_line: int = 1) -> Iterator[RawRecord]:
    rid, header_line, parts, blank, orphan = None, 0, [], False, 0
    for lineno, line in enumerate(lines, first_line):
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


def _table_chunks(path: Path, chunk_bytes: int, sequence_column: str, id_column: str | None) -> Iterator[Chunk]:
    """A CSV/TSV file (optionally gzipped) with a header row, in pieces of whole rows."""
    delimiter = "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"
    with _read_errors(path), _opener(path)(path, "rb") as f:
        first = f.readline()
        if not first.strip():
            raise SourceError(f"{path}: empty file (no header row)")
        # utf-8-sig drops a BOM; surrogateescape keeps invalid bytes so validation can name them
        header = next(csv.reader([first.decode("utf-8-sig", "surrogateescape")], delimiter=delimiter))
        si = _column(header, sequence_column, (), path, required=True)
        ii = _column(header, id_column, ID_COLUMNS, path, required=False)
        for text, line, last in _cut_chunks(f, chunk_bytes, _table_cut):
            yield Chunk("table", str(path), line + 1, text, last, (delimiter, si, ii))


def _parse_table(chunk: Chunk) -> Iterator[RawRecord]:
    delimiter, si, ii = chunk.columns
    text = chunk.payload.decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    for row in reader:
        if not row:  # blank line
            continue
        line = chunk.first - 1 + reader.line_num
        cell = row[si] if si < len(row) else ""
        rid = row[ii] if ii is not None and ii < len(row) else f"row{line}"
        seq = cell.encode("utf-8", "surrogateescape").translate(None, WHITESPACE)
        yield RawRecord(chunk.file, line, rid, seq)


def _arrow_batches(path: Path) -> tuple[list, Iterator]:
    source = pa.memory_map(str(path))
    try:  # datasets writes the IPC stream format; plain Arrow files use the file format
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        count = reader.num_record_batches
        return reader.schema.names, lambda cols: (reader.get_batch(i).select(cols) for i in range(count))
    return reader.schema.names, lambda cols: (b.select(cols) for b in reader)


def _columnar_chunks(path: Path, chunk_bytes: int, sequence_column: str, id_column: str | None) -> Iterator[Chunk]:
    """A parquet file in pieces of whole row groups (read by the worker itself); an Arrow IPC file whole."""
    with _read_errors(path):
        parquet = path.name.lower().endswith(".parquet")
        meta = pq.ParquetFile(path).metadata if parquet else None
        names = meta.schema.to_arrow_schema().names if parquet else _arrow_batches(path)[0]
        si = _column(names, sequence_column, (), path, required=True)
        ii = _column(names, id_column, ID_COLUMNS, path, required=False)
        columns = (names[si], names[ii] if ii is not None else None)
        if not parquet:
            yield Chunk("columnar", str(path), 1, None, True, columns)
            return
        groups, size, row = [], 0, 1
        for g in range(meta.num_row_groups):
            groups.append(g)
            size += meta.row_group(g).total_byte_size
            if size >= chunk_bytes or g == meta.num_row_groups - 1:
                yield Chunk("columnar", str(path), row, groups, g == meta.num_row_groups - 1, columns)
                row += sum(meta.row_group(k).num_rows for k in groups)
                groups, size = [], 0
        if meta.num_row_groups == 0:
            yield Chunk("columnar", str(path), 1, [], True, columns)


def _parse_columnar(chunk: Chunk) -> Iterator[RawRecord]:
    path = Path(chunk.file)
    seq_name, id_name = chunk.columns
    cols = [seq_name] + ([id_name] if id_name is not None else [])
    if chunk.payload is None:
        batches = _arrow_batches(path)[1](cols)
    else:
        batches = pq.ParquetFile(path).iter_batches(batch_size=16384, row_groups=chunk.payload, columns=cols)
    row = chunk.first - 1
    for batch in batches:
        seqs = batch.column(seq_name).to_pylist()
        ids = batch.column(id_name).to_pylist() if id_name is not None else None
        for k, s in enumerate(seqs):
            row += 1
            rid = str(ids[k]) if ids is not None else f"row{row}"
            seq = s.encode("utf-8", "surrogateescape").translate(None, WHITESPACE) if s is not None else b""
            yield RawRecord(chunk.file, row, rid, seq)


def chunk_records(chunk: Chunk) -> Iterator[RawRecord]:
    """The records of one chunk (runs in prepare's worker processes)."""
    with _read_errors(chunk.file):
        if chunk.kind == "fasta":
            yield from _parse_fasta(io.BytesIO(chunk.payload), chunk.file, chunk.first)
        elif chunk.kind == "table":
            yield from _parse_table(chunk)
        elif chunk.kind == "columnar":
            yield from _parse_columnar(chunk)
        else:
            yield from chunk.payload


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


def _hub_chunks(repo_id: str, split: str | None, chunk_bytes: int, **kw) -> Iterator[Chunk]:
    """A Hub dataset streamed row by row, in pieces of about chunk_bytes of sequence (never held whole)."""
    name = f"{repo_id}[{split or 'train'}]"
    records, size, first = [], 0, 1
    for rec in iter_hub(repo_id, split, **kw):
        records.append(rec)
        size += len(rec.seq or b"")
        if size >= chunk_bytes:
            yield Chunk("records", name, first, records, False)
            records, size, first = [], 0, rec.line + 1
    yield Chunk("records", name, first, records, True)


def iter_chunks(
    source,
    *,
    split: str | None = None,
    sequence_column: str = "sequence",
    id_column: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[Chunk]:
    """Pieces of a file, a directory or a Hub dataset id, in order (see the module docstring); an input's last piece
    has last=True (an empty file gives one empty piece). Reading, decompressing and cutting happen here, parsing in
    chunk_records."""
    path = Path(source)
    kw = dict(sequence_column=sequence_column, id_column=id_column)
    if path.is_dir():
        for f in source_files(path, split):
            yield from iter_chunks(f, chunk_bytes=chunk_bytes, **kw)
    elif path.exists():
        kind = _kind(path)
        if kind == "fasta":
            yield from _fasta_chunks(path, chunk_bytes)
        elif kind == "table":
            yield from _table_chunks(path, chunk_bytes, **kw)
        elif kind == "columnar":
            yield from _columnar_chunks(path, chunk_bytes, **kw)
        else:
            known = " ".join(FASTA_SUFFIXES + TABLE_SUFFIXES + COLUMNAR_SUFFIXES)
            raise SourceError(f"{path}: unsupported file type (known: {known}, FASTA/CSV/TSV also .gz)")
    elif HUB_ID.match(str(source)) and _kind(path) is None:  # "owner/name", not a mistyped file path
        yield from _hub_chunks(str(source), split, chunk_bytes, **kw)
    else:
        raise SourceError(f"{source}: no such file or directory")


def iter_records(source, **kw) -> Iterator[RawRecord]:
    """Records of a file, a directory or a Hub dataset id, one at a time (keyword arguments of iter_chunks)."""
    for chunk in iter_chunks(source, **kw):
        yield from chunk_records(chunk)


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
