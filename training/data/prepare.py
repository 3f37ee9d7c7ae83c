"""Prepare token shards from protein sources: read -> validate -> tokenize -> shards + report.json.

    python -m training.data prepare --input PATH [PATH ...] --out DIR [--num-proc N] [options]
    python -m training.data prepare --builtin --out DIR          # DIR/train, DIR/valid, DIR/test (98/1/1)
    python -m training.data verify DIR                           # every shard's header, size and sha256
                                                                 # (of each split, for a prepared parent DIR)

Public API
    PrepareOptions(policy=ValidationPolicy(), split=None, sequence_column="sequence", id_column=None, dedup=False,
                   split_fractions=None, max_length=1024, shard_tokens=256 MiB, num_proc=1, chunk_bytes=16 MiB)
                                        # frozen, keyword-only: the CLI's prepare flags, with the CLI's defaults
    prepare(inputs, out_dir, options=PrepareOptions(), *, overwrite=False, log=print, extra=None) -> report dict
    prepare_builtin(out_dir, *, policy=None, fractions=(98, 1, 1), max_length=1024, overwrite=False, log=print)
    builtin_attribution() -> str        # licence/credit text for the built-in proteins (quoted by the README)
    hash_bucket(letters: bytes) -> int  # 0..9999 from blake2b of the upper-case sequence; with fractions 98/1/1
                                        # buckets < 9800 -> train, < 9900 -> valid, the rest -> test
    DataError(Exception)                # bad input that stops a run (unreadable file, existing output, ...)
    main(argv=None) -> int              # the CLI; exit 0 ok, 1 on a DataError/SourceError/ShardError
    Also used by eval.embed (same checks, same report): parse_piece(chunk, policy, id_keys, seq_keys) -> Piece;
    PrepareRun(writers, policy, max_length, dedup, fractions).feed(piece) -> indexes of the accepted records,
    .report(inputs, extra); rejection_lines(report, report_path); add_policy_arguments(parser),
    policy_from_args(args) -> ValidationPolicy

report.json holds read, accepted, rejected (list of {file, line, id, reason}), files ({file: {read, accepted,
rejected: {code: n}}}), cropped (accepted proteins longer
than max_length - 2 residues: kept whole in the shards, cropped by the loader), rejected_by_reason, duplicate_ids,
normalized counts, per-split counts and the policy; always accepted + len(rejected) == read. An input that yields no
records (an empty file, a 0-byte .gz) or cannot be read to its end (a truncated .gz) stops the run, naming the file,
with nothing written.

Parallel: this process reads the inputs in order and cuts them into pieces of whole records (training.data.sources:
decompression included); `num_proc` worker processes parse, validate, tokenize and checksum the pieces; this process
takes their results back in input order for what must see every record (duplicate ids and sequences, the report) and
writes the shards. The pieces depend on the inputs alone, so the shards and report.json are byte-identical for any
`num_proc`. The shards' sha256 are verified once, after writing.
"""

import argparse
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .checksum import protein_crc32
from .keyindex import KeyIndex
from .shards import SHARD_MANIFEST, ShardError, ShardSet, ShardWriter
from .sources import CHUNK_BYTES, Chunk, SourceError, builtin_files, chunk_records, iter_chunks
from .validate import ID_TO_BYTE, ValidationPolicy, validate_batch

SPLITS = ("train", "valid", "test")


class DataError(Exception):
    """Input or output problem that stops `prepare`; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    """What `prepare` makes of its inputs: the `python -m training.data prepare` flags as one typed object, with the
    CLI's defaults. Where prepare writes (out_dir, overwrite) and how it reports (log, extra) stay arguments."""

    policy: ValidationPolicy = ValidationPolicy()  # what counts as a valid protein
    split: str | None = None  # split of a dataset dir / Hub dataset to read (e.g. "train")
    sequence_column: str = "sequence"
    id_column: str | None = None  # None: the first present of id, entry, accession, ...
    dedup: bool = False  # reject exact duplicate sequences
    split_fractions: tuple | None = None  # (train, valid, test): out_dir/{train,valid,test} by sequence hash
    max_length: int = 1024  # tokens per protein, for the `cropped` count
    shard_tokens: int = 256 << 20
    num_proc: int = 1  # processes that parse and validate (0: one per core); the output is the same for any
    chunk_bytes: int = CHUNK_BYTES  # size of the pieces the inputs are cut into; the output is the same for any


def builtin_attribution() -> str:
    return (
        "Built-in proteins: the benchmark datasets shipped with aaanalysis 1.1.0 (aaanalysis/_data/benchmarks/*.tsv), "
        "BSD-3-Clause licence, Copyright (c) 2023 Stephan Breimann; AAanalysis by Breimann et al. "
        "(https://github.com/breimanntools/aaanalysis). The sequences are UniProt-derived benchmark sets collected "
        "from published studies (Song et al. 2018; Tang et al. 2020; Yang et al. 2021; Teng et al. 2021; "
        "Galiez et al. 2016; Cheng et al. 2006; Shen et al. 2019; Magnan et al. 2009; Breimann et al. 2024/2025). "
        "speedplm uses only the `sequence` column, deduplicated and split 98/1/1 by a hash of each sequence."
    )


def hash_bucket(letters: bytes) -> int:
    """Bucket 0..9999 of an upper-case sequence: first 8 bytes (big-endian) of its 16-byte blake2b, mod 10000."""
    return int.from_bytes(_digest(letters)[:8], "big") % 10000


def _digest(letters: bytes) -> bytes:
    return hashlib.blake2b(letters, digest_size=16).digest()


class Piece(NamedTuple):
    """What a worker returns for one Chunk: every record's line and id, the rejections it already knows, and the
    validated records' residues, crc32s and 16-byte digests of their ids and sequences (numpy arrays: cheap to
    send back and to check in bulk)."""

    file: str
    last: bool
    lines: np.ndarray  # (n,) int64 line/row of each record
    ids: bytes  # every record's id (UTF-8, surrogateescape), back to back, ...
    id_ends: np.ndarray  # (n,) ... ending here
    problems: list  # (index, reason) of records rejected by the reader or by validation, in order
    valid: np.ndarray  # (v,) indexes of the validated records
    tokens: np.ndarray  # (sum of lengths,) uint8 residue ids of the validated records, back to back
    lengths: np.ndarray  # (v,) int64
    crcs: np.ndarray  # (v,) uint32, training.data.checksum.protein_crc32
    id_keys: np.ndarray | None  # (v, 2) uint64 blake2b of each validated record's id (None: ids not tracked)
    seq_keys: np.ndarray | None  # (v, 2) uint64 blake2b of the upper-case letters (None: not needed)
    uppercased: int
    stops: int

    def id(self, i: int) -> str:
        return self.ids[self.id_ends[i - 1] if i else 0 : self.id_ends[i]].decode("utf-8", "surrogateescape")


def _keys(texts) -> np.ndarray:
    """(k, 2) uint64 view of the 16-byte blake2b of each bytes object."""
    blob = b"".join(_digest(t) for t in texts)
    return np.frombuffer(blob, dtype="<u8").reshape(-1, 2)


def parse_piece(chunk: Chunk, policy: ValidationPolicy, id_keys: bool, seq_keys: bool) -> Piece:
    """Parse + validate + tokenize one chunk (runs in the worker processes; a pure function of its arguments)."""
    records = list(chunk_records(chunk))
    problems = [(i, r.problem) for i, r in enumerate(records) if r.seq is None]
    reached = [i for i, r in enumerate(records) if r.seq is not None]
    res = validate_batch([records[i].seq for i in reached], policy)
    problems += [(reached[k], reason) for k, reason in enumerate(res.reasons) if reason is not None]
    problems.sort()
    valid = np.array([reached[k] for k, reason in enumerate(res.reasons) if reason is None], dtype=np.int64)
    lengths = res.lengths[res.lengths >= 0]
    ids = [r.id.encode("utf-8", "surrogateescape") for r in records]
    sequences = None
    if seq_keys:
        letters, ends = ID_TO_BYTE[res.tokens].tobytes(), np.cumsum(lengths).tolist()
        sequences = _keys(letters[e - n : e] for e, n in zip(ends, lengths.tolist()))
    return Piece(
        chunk.file,
        chunk.last,
        np.array([r.line for r in records], dtype=np.int64),
        b"".join(ids),
        np.cumsum([len(x) for x in ids], dtype=np.int64),
        problems,
        valid,
        res.tokens,
        lengths,
        protein_crc32(res.tokens, lengths),
        _keys(ids[i] for i in valid.tolist()) if id_keys else None,
        sequences,
        res.uppercased,
        res.stops_stripped,
    )


def _parse_pieces(chunks, policy: ValidationPolicy, id_keys: bool, seq_keys: bool, num_proc: int):
    """_parse_piece over `chunks` in order: in this process, or in `num_proc` worker processes with at most
    2 x num_proc chunks in flight (the reading here stays ahead; results come back in input order)."""
    if num_proc <= 1:
        yield from (parse_piece(c, policy, id_keys, seq_keys) for c in chunks)
        return
    # fork where there is one: a worker starts at once with this module imported (a spawned one re-imports torch,
    # through the vocabulary, for seconds); the pool forks all its workers before it starts its own thread
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(parse_piece, chunk, policy, id_keys, seq_keys))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


class PrepareRun:
    """One prepare run: counts, rejections, duplicate ids/sequences and a shard writer per output split."""

    def __init__(self, writers: dict, policy: ValidationPolicy, max_length: int, dedup: bool, fractions):
        self.writers, self.policy, self.max_length, self.dedup = writers, policy, max_length, dedup
        self.names = list(writers)
        # split i takes buckets [edges[i-1], edges[i]) of 0..9999
        self.edges = None if fractions is None else np.cumsum(fractions) * 10000 // sum(fractions)
        self.read = self.accepted = self.cropped = self.uppercased = self.stops = 0
        self.rejected: list[dict] = []
        self.duplicate_ids: list[dict] = []
        self.files: list[str] = []  # a record's place is (file index << 40) | line, one int64
        self.ids = KeyIndex() if policy.duplicate_ids != "ignore" else None  # id -> place of its first record
        self.seen = KeyIndex() if dedup else None  # sequence -> place of its first record
        self.records_in: collections.Counter = collections.Counter()  # records per input file
        self.accepted_in: collections.Counter = collections.Counter()  # accepted records per input file
        self.split_counts = {name: dict(sequences=0, residues=0) for name in writers}

    @property
    def needs_seq_keys(self) -> bool:
        return self.dedup or self.edges is not None

    def _where(self, place: int) -> str:
        return f"{self.files[place >> 40]}:{place & ((1 << 40) - 1)}"

    def feed(self, piece: Piece) -> np.ndarray:
        """Count, check ids and sequences, write the accepted records of `piece`; returns their indexes in the
        piece (input order). A file that ends with no record stops the run (SourceError)."""
        if not self.files or self.files[-1] != piece.file:
            self.files.append(piece.file)
        self.read += len(piece.lines)
        self.records_in[piece.file] += len(piece.lines)
        self.uppercased += piece.uppercased
        self.stops += piece.stops
        v = len(piece.valid)
        places = ((len(self.files) - 1) << 40) | piece.lines[piece.valid]  # (v,)
        named = (np.diff(piece.id_ends, prepend=0) > 0)[piece.valid]  # (v,) an empty id is never a duplicate
        keep = np.ones(v, dtype=bool)  # (v,) validated records that survive dedup / duplicate-id rejection
        rejected = list(piece.problems)  # (record index, reason)
        id_first = self.ids.find(piece.id_keys) if self.ids is not None else np.full(v, -1)  # (v,)
        id_first[~named] = -1
        seq_first = self.seen.find(piece.seq_keys) if self.dedup else np.full(v, -1)  # (v,)
        clash = (id_first >= 0).any() or (seq_first >= 0).any() or _repeats(piece.id_keys, named)
        if self.dedup:
            clash = clash or _repeats(piece.seq_keys, np.ones(v, dtype=bool))
        if not clash:  # the common case, in bulk: no duplicate id or sequence in this piece or before it
            if self.ids is not None:
                self.ids.add(piece.id_keys[named], places[named])
            if self.dedup:
                self.seen.add(piece.seq_keys, places)
        else:
            rejected += self._one_by_one(piece, places, named, id_first, seq_first, keep)
        for i, reason in sorted(rejected):  # in input order, as they occur in the files
            self.rejected.append(dict(file=piece.file, line=int(piece.lines[i]), id=piece.id(i), reason=reason))
        dest = np.zeros(v, dtype=np.int64)  # (v,) output split of each validated record
        if self.edges is not None and v:
            buckets = piece.seq_keys[:, 0].byteswap() % 10000  # first 8 digest bytes, big-endian (hash_bucket)
            dest = np.searchsorted(self.edges, buckets, side="right")
        dest[~keep] = -1
        for k, name in enumerate(self.names):
            m = dest == k  # (v,)
            if m.any():
                tokens = piece.tokens if m.all() else piece.tokens[np.repeat(m, piece.lengths)]
                self._add(name, tokens, piece.lengths[m], piece.crcs[m])
        self.accepted_in[piece.file] += int(keep.sum())
        if piece.last and not self.records_in[piece.file]:
            gz = piece.file.lower().endswith(".gz") and Path(piece.file).stat().st_size == 0
            raise SourceError(
                f"{piece.file}: no protein records ({'a 0-byte gzip file is truncated' if gz else 'empty input'})"
            )
        return piece.valid[keep]

    def _one_by_one(self, piece: Piece, places, named, id_first, seq_first, keep) -> list:
        """Duplicates in or before this piece, record by record in input order: the first one wins."""
        rejected, ids, seqs = [], {}, {}  # this piece's first occurrences: key -> place
        new_ids, new_seqs = np.zeros(len(keep), dtype=bool), np.zeros(len(keep), dtype=bool)
        for j, i in enumerate(piece.valid.tolist()):
            if self.dedup:
                key = piece.seq_keys[j].tobytes()
                first = seq_first[j] if seq_first[j] >= 0 else seqs.get(key, -1)
                if first >= 0:
                    rejected.append((i, f"duplicate_sequence: same as {self._where(first)}"))
                    keep[j] = False
                    continue
            if named[j] and self.ids is not None:
                key = piece.id_keys[j].tobytes()
                first = id_first[j] if id_first[j] >= 0 else ids.get(key, -1)
                if first >= 0:
                    if self.policy.duplicate_ids == "reject":
                        rejected.append((i, f"duplicate_id: {piece.id(i)!r} first at {self._where(first)}"))
                        keep[j] = False
                        continue
                    file, line = self._where(first).rsplit(":", 1)
                    self.duplicate_ids.append(
                        dict(
                            file=piece.file,
                            line=int(piece.lines[i]),
                            id=piece.id(i),
                            first_file=file,
                            first_line=int(line),
                        )
                    )
                else:
                    ids[key], new_ids[j] = places[j], True
            if self.dedup:
                seqs[piece.seq_keys[j].tobytes()], new_seqs[j] = places[j], True
        if self.ids is not None:
            self.ids.add(piece.id_keys[new_ids], places[new_ids])
        if self.dedup:
            self.seen.add(piece.seq_keys[new_seqs], places[new_seqs])
        return rejected

    def _add(self, name: str, tokens: np.ndarray, lengths: np.ndarray, crcs: np.ndarray) -> None:
        self.writers[name].add(tokens, lengths, crcs)
        self.accepted += len(lengths)
        self.cropped += int((lengths + 2 > self.max_length).sum())
        self.split_counts[name]["sequences"] += len(lengths)
        self.split_counts[name]["residues"] += int(lengths.sum())

    def report(self, inputs: list, extra: dict) -> dict:
        assert self.accepted + len(self.rejected) == self.read, "record accounting is broken"
        by_reason = collections.Counter(r["reason"].split(":", 1)[0] for r in self.rejected)
        per_file = {f: dict(read=self.records_in[f], accepted=self.accepted_in[f], rejected={}) for f in self.files}
        for r in self.rejected:
            counts = per_file[r["file"]]["rejected"]
            code = r["reason"].split(":", 1)[0]
            counts[code] = counts.get(code, 0) + 1
        return dict(
            inputs=[str(i) for i in inputs],
            read=self.read,
            accepted=self.accepted,
            rejected=self.rejected,
            cropped=self.cropped,
            max_length=self.max_length,
            rejected_by_reason=dict(sorted(by_reason.items())),
            files=per_file,
            duplicate_ids=self.duplicate_ids,
            normalized=dict(uppercased=self.uppercased, terminal_stop_stripped=self.stops),
            splits=self.split_counts,
            policy=dataclasses.asdict(self.policy),
            **extra,
        )


def _repeats(keys: np.ndarray | None, mask: np.ndarray) -> bool:
    """Whether two of the masked (k, 2) keys are equal (compared on their first half: a rare false alarm only
    sends the piece down the exact, record-by-record path)."""
    if keys is None:
        return False
    first = np.sort(keys[mask, 0])
    return bool((first[1:] == first[:-1]).any())


def _processes(num_proc: int) -> int:
    if num_proc < 0:
        raise DataError(f"num_proc must be >= 0 (0: one per core), got {num_proc}")
    if num_proc:
        return num_proc
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _install(stage: Path, target: Path, overwrite: bool) -> None:
    """Move a finished split from the staging folder into place, removing old shards only with overwrite."""
    target.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in list(target.glob("shard-*.bin")) + [target / SHARD_MANIFEST]:
            old.unlink(missing_ok=True)
    for f in stage.iterdir():
        f.replace(target / f.name)


def prepare(
    inputs, out_dir, options: PrepareOptions = PrepareOptions(), *, overwrite: bool = False, log=print, extra=None
) -> dict:
    """Validate and tokenize `inputs` into shards under `out_dir` (or out_dir/{train,valid,test} with
    `options.split_fractions`); writes out_dir/report.json (plus the `extra` dict) and returns the report. Raises
    DataError naming the bad file; existing shards are replaced only with `overwrite`."""
    o = options
    processes = _processes(o.num_proc)
    out = Path(out_dir)
    names = SPLITS if o.split_fractions else ("",)
    if o.split_fractions is not None and len(o.split_fractions) != 3:
        raise DataError(f"split_fractions needs 3 numbers (train, valid, test), got {o.split_fractions}")
    for name in names:
        if (out / name / SHARD_MANIFEST).exists() and not overwrite:
            raise DataError(f"{out / name / SHARD_MANIFEST}: already exists (pass --overwrite to replace it)")
    created = not out.exists()
    stage = out / ".prepare-tmp"
    shutil.rmtree(stage, ignore_errors=True)
    writers = {n: ShardWriter(stage / (n or "all"), o.shard_tokens) for n in names}
    run = PrepareRun(writers, o.policy, o.max_length, o.dedup, o.split_fractions)
    kw = dict(split=o.split, sequence_column=o.sequence_column, id_column=o.id_column, chunk_bytes=o.chunk_bytes)
    chunks = (c for source in list(inputs) for c in iter_chunks(source, **kw))
    try:
        pieces = _parse_pieces(chunks, o.policy, run.ids is not None, run.needs_seq_keys, processes)
        for piece in pieces:
            run.feed(piece)
        for name, writer in run.writers.items():
            writer.close(dict(split=name or None))
            ShardSet(stage / (name or "all"), verify="sha256")  # checksums verified once, when written
        for name in names:
            _install(stage / (name or "all"), out / name, overwrite)
    except (SourceError, ShardError) as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise DataError(f"{e} (nothing written to {out})") from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # partial shards never survive a failed run
    report = run.report(list(inputs), dict(extra or {}))
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(summary(report, out))
    return report


def prepare_builtin(
    out_dir,
    *,
    policy: ValidationPolicy | None = None,
    fractions=(98, 1, 1),
    max_length: int = 1024,
    overwrite: bool = False,
    log=print,
) -> dict:
    """The built-in real proteins (aaanalysis benchmark TSVs): deduplicated, split by `hash_bucket`."""
    options = PrepareOptions(
        policy=policy or ValidationPolicy(),
        id_column="entry",
        dedup=True,
        split_fractions=fractions,
        max_length=max_length,
    )
    return prepare(
        builtin_files(), out_dir, options, overwrite=overwrite, log=log, extra=dict(attribution=builtin_attribution())
    )


def summary(report: dict, out: Path, show: int = 10) -> str:
    """The stdout summary of a report: counts, rejections by reason, the first few rejections."""
    lines = [
        f"prepared {out}: read {report['read']}  accepted {report['accepted']}  "
        f"rejected {len(report['rejected'])}  cropped {report['cropped']} "
        f"(> {report['max_length'] - 2} residues: kept whole, cropped by the loader)"
    ]
    for name, c in report["splits"].items():
        lines.append(f"  {name or 'all'}: {c['sequences']} sequences, {c['residues']} residues")
    return "\n".join(lines + rejection_lines(report, out / "report.json", show))


def rejection_lines(report: dict, report_path, show: int = 10) -> list[str]:
    """Summary lines for a report's rejections, normalizations and duplicate ids (also used by eval.embed)."""
    lines = []
    for code, n in report["rejected_by_reason"].items():
        lines.append(f"  rejected {code}: {n}")
    n = report["normalized"]
    lines.append(f"  normalized: {n['uppercased']} upper-cased, {n['terminal_stop_stripped']} terminal '*' stripped")
    # rare reasons first: thousands of duplicate_sequence lines would hide them
    ordered = sorted(report["rejected"], key=lambda r: r["reason"].startswith("duplicate_sequence"))
    for r in ordered[:show]:
        lines.append(f"    {r['file']}:{r['line']} {r['id']!r}: {r['reason']}")
    if len(report["rejected"]) > show:
        lines.append(f"    ... {len(report['rejected']) - show} more in {report_path}")
    if report["duplicate_ids"]:
        lines.append(f"  duplicate ids (kept, reported): {len(report['duplicate_ids'])}")
    return lines


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """The ValidationPolicy flags (shared by `prepare` and `eval.embed`); read back with `policy_from_args`."""
    p.add_argument("--lowercase", choices=("upper", "reject"), default="upper")
    p.add_argument("--keep-terminal-stop", action="store_true", help="reject a terminal '*' instead of stripping it")
    p.add_argument("--allow-gaps", action="store_true")
    p.add_argument("--no-ambiguous", action="store_true", help="reject X B U Z O")
    p.add_argument("--min-length", type=int, default=1)
    p.add_argument("--reject-longer-than", type=int)
    p.add_argument("--duplicate-ids", choices=("report", "reject", "ignore"), default="report")
    p.add_argument(
        "--mixed-case",
        choices=("reject", "upper"),
        default="reject",
        help="lowercase letters inside an upper-case sequence (annotation marks): reject (default) or upper-case",
    )
    p.add_argument(
        "--no-composition-check",
        action="store_true",
        help="accept sequences that are not natural proteins (>= 50 residues lacking >= 5 of the 15 common amino "
        "acids, or nucleotide-like); see training/data/validate.py",
    )


def policy_from_args(args: argparse.Namespace) -> ValidationPolicy:
    return ValidationPolicy(
        lowercase=args.lowercase,
        strip_terminal_stop=not args.keep_terminal_stop,
        allow_gaps=args.allow_gaps,
        allow_ambiguous=not args.no_ambiguous,
        min_length=args.min_length,
        reject_longer_than=args.reject_longer_than,
        duplicate_ids=args.duplicate_ids,
        mixed_case=args.mixed_case,
        composition_check=not args.no_composition_check,
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="validate + tokenize sources into token shards")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input", nargs="+", metavar="PATH", help="FASTA[.gz], CSV/TSV[.gz], parquet, arrow, dataset dir, Hub id"
    )
    src.add_argument(
        "--builtin", action="store_true", help="the built-in aaanalysis proteins -> DIR/{train,valid,test}"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--split", help="split of a dataset dir / Hub dataset to read (e.g. train)")
    p.add_argument("--sequence-column", default="sequence")
    p.add_argument("--id-column", help=f"default: first present of {', '.join(('id', 'entry', 'accession'))}, ...")
    p.add_argument("--dedup", action="store_true", help="reject exact duplicate sequences")
    p.add_argument("--split-fractions", help="e.g. 98,1,1: write DIR/{train,valid,test} split by sequence hash")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per protein for the `cropped` count")
    p.add_argument("--shard-tokens", type=int, default=256 << 20)
    p.add_argument(
        "--num-proc", type=int, default=1, help="processes that parse and validate (0: one per core); same output"
    )
    p.add_argument("--overwrite", action="store_true")
    add_policy_arguments(p)
    v = sub.add_parser("verify", help="check a shard directory: magic, version, vocabulary, sizes, sha256 of all")
    v.add_argument("dir")
    return ap


def verify(directory) -> int:
    """`verify DIR`: every shard's header, size and sha256; a prepared parent folder (DIR/train, DIR/valid,
    DIR/test, as `prepare --builtin` or `--split-fractions` write it) is verified split by split."""
    root = Path(directory)
    splits = [name for name in SPLITS if (root / name).is_dir()]
    if (root / SHARD_MANIFEST).is_file() or not splits:
        splits = [""]  # a shard directory itself (or nothing there: ShardSet names what is missing)
    for name in splits:
        shards = ShardSet(root / name, verify="sha256")
        print(
            f"{root / name if name else root}: ok, {len(shards.files)} shards, {shards.num_docs} proteins, "
            f"{shards.num_tokens} residues"
        )
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            return verify(args.dir)
        policy = policy_from_args(args)
        if args.builtin:
            prepare_builtin(args.out, policy=policy, max_length=args.max_length, overwrite=args.overwrite)
        else:
            fractions = [float(x) for x in args.split_fractions.split(",")] if args.split_fractions else None
            options = PrepareOptions(
                policy=policy,
                split=args.split,
                sequence_column=args.sequence_column,
                id_column=args.id_column,
                dedup=args.dedup,
                split_fractions=fractions,
                max_length=args.max_length,
                shard_tokens=args.shard_tokens,
                num_proc=args.num_proc,
            )
            prepare(args.input, args.out, options, overwrite=args.overwrite)
    except (DataError, SourceError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
