"""Prepare token shards from protein sources: read -> validate -> tokenize -> shards + report.json.

    python -m training.data prepare --input PATH [PATH ...] --out DIR [options]
    python -m training.data prepare --builtin --out DIR          # DIR/train, DIR/valid, DIR/test (98/1/1)

Public API
    prepare(inputs, out_dir, *, policy=None, split=None, sequence_column="sequence", id_column=None, dedup=False,
            split_fractions=None, max_length=1024, shard_tokens=256 MiB, overwrite=False, log=print,
            extra=None) -> report dict
    prepare_builtin(out_dir, *, policy=None, fractions=(98, 1, 1), max_length=1024, overwrite=False, log=print)
    builtin_attribution() -> str        # licence/credit text for the built-in proteins (quoted by the README)
    hash_bucket(letters: bytes) -> int  # 0..9999 from blake2b of the upper-case sequence; with fractions 98/1/1
                                        # buckets < 9800 -> train, < 9900 -> valid, the rest -> test
    DataError(Exception)                # bad input that stops a run (unreadable file, existing output, ...)
    main(argv=None) -> int              # the CLI; exit 0 ok, 1 on a DataError/SourceError/ShardError
    Also used by eval.embed (same checks, same report): PrepareRun(writers, policy, max_length, dedup, fractions)
    .feed(records) -> accepted positions, .report(inputs, extra); rejection_lines(report, report_path);
    add_policy_arguments(parser), policy_from_args(args) -> ValidationPolicy

report.json holds read, accepted, rejected (list of {file, line, id, reason}), cropped (accepted proteins longer
than max_length - 2 residues: kept whole in the shards, cropped by the loader), rejected_by_reason, duplicate_ids,
normalized counts, per-split counts and the policy; always accepted + len(rejected) == read.
"""

import argparse
import collections
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from training.shards import MANIFEST, ShardError, ShardWriter
from training.sources import RawRecord, SourceError, builtin_files, iter_records
from training.validate import ID_TO_BYTE, ValidationPolicy, validate_batch

BATCH_RECORDS, BATCH_BYTES = 8192, 8 << 20  # records validated together (one LUT gather per batch)
SPLITS = ("train", "valid", "test")


class DataError(Exception):
    """Input or output problem that stops `prepare`; the message names the file."""


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
        self.ids: dict[str, tuple] = {}  # id -> (file, line) of its first record; grows with the input
        self.seen: dict[bytes, tuple] = {}  # sequence digest -> (file, line, id); only when deduplicating
        self.split_counts = {name: dict(sequences=0, residues=0) for name in writers}

    def _reject(self, rec: RawRecord, reason: str) -> None:
        self.rejected.append(dict(file=rec.file, line=rec.line, id=rec.id, reason=reason))

    def feed(self, records: list[RawRecord]) -> list[int]:
        """Validate, check ids, write the accepted records; returns their positions in `records` (input order)."""
        self.read += len(records)
        res = validate_batch([r.seq for r in records if r.seq is not None], self.policy)
        self.uppercased += res.uppercased
        self.stops += res.stops_stripped
        lengths = res.lengths[res.lengths >= 0]  # (validated,) residues per record left in res.tokens
        ends = np.cumsum(lengths)
        letters = ID_TO_BYTE[res.tokens] if (self.dedup or self.edges is not None) else None
        dest = np.zeros(len(lengths), dtype=np.int64)  # (validated,) output split index, -1 = rejected late
        j = k = -1  # j: index among validated records, k: among records that reached validation
        kept = []  # positions in `records` of the accepted ones
        for pos, rec in enumerate(records):  # in input order, so report.json lists rejections as they occur
            if rec.seq is None:
                self._reject(rec, rec.problem)
                continue
            k += 1
            if res.reasons[k] is not None:
                self._reject(rec, res.reasons[k])
                continue
            j += 1
            if letters is not None:
                digest = _digest(letters[ends[j] - lengths[j] : ends[j]].tobytes())
                if self.dedup and digest in self.seen:
                    first = self.seen[digest]
                    self._reject(rec, f"duplicate_sequence: same as {first[0]}:{first[1]} ({first[2]})")
                    dest[j] = -1
                    continue
            if rec.id and rec.id in self.ids:
                first = self.ids[rec.id]
                if self.policy.duplicate_ids == "reject":
                    self._reject(rec, f"duplicate_id: {rec.id!r} first at {first[0]}:{first[1]}")
                    dest[j] = -1
                    continue
                self.duplicate_ids.append(
                    dict(file=rec.file, line=rec.line, id=rec.id, first_file=first[0], first_line=first[1])
                )
            elif rec.id:
                self.ids[rec.id] = (rec.file, rec.line)
            if letters is not None:
                if self.dedup:
                    self.seen[digest] = (rec.file, rec.line, rec.id)
                if self.edges is not None:
                    bucket = int.from_bytes(digest[:8], "big") % 10000
                    dest[j] = int(np.searchsorted(self.edges, bucket, side="right"))
            kept.append(pos)
        for i, name in enumerate(self.names):
            m = dest == i  # (validated,)
            if m.any():
                self._add(name, res.tokens if m.all() else res.tokens[np.repeat(m, lengths)], lengths[m])
        return kept

    def _add(self, name: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.writers[name].add(tokens, lengths)
        self.accepted += len(lengths)
        self.cropped += int((lengths + 2 > self.max_length).sum())
        self.split_counts[name]["sequences"] += len(lengths)
        self.split_counts[name]["residues"] += int(lengths.sum())

    def report(self, inputs: list, extra: dict) -> dict:
        assert self.accepted + len(self.rejected) == self.read, "record accounting is broken"
        by_reason = collections.Counter(r["reason"].split(":", 1)[0] for r in self.rejected)
        return dict(
            inputs=[str(i) for i in inputs],
            read=self.read,
            accepted=self.accepted,
            rejected=self.rejected,
            cropped=self.cropped,
            max_length=self.max_length,
            rejected_by_reason=dict(sorted(by_reason.items())),
            duplicate_ids=self.duplicate_ids,
            normalized=dict(uppercased=self.uppercased, terminal_stop_stripped=self.stops),
            splits=self.split_counts,
            policy=dataclasses.asdict(self.policy),
            **extra,
        )


def _batches(inputs: list, **kw):
    batch, nbytes = [], 0
    for source in inputs:
        for rec in iter_records(source, **kw):
            batch.append(rec)
            nbytes += len(rec.seq or b"")
            if len(batch) >= BATCH_RECORDS or nbytes >= BATCH_BYTES:
                yield batch
                batch, nbytes = [], 0
    if batch:
        yield batch


def _install(stage: Path, target: Path, overwrite: bool) -> None:
    """Move a finished split from the staging folder into place, removing old shards only with overwrite."""
    target.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in list(target.glob("shard-*.bin")) + [target / MANIFEST]:
            old.unlink(missing_ok=True)
    for f in stage.iterdir():
        f.replace(target / f.name)


def prepare(
    inputs,
    out_dir,
    *,
    policy: ValidationPolicy | None = None,
    split: str | None = None,
    sequence_column: str = "sequence",
    id_column: str | None = None,
    dedup: bool = False,
    split_fractions=None,
    max_length: int = 1024,
    shard_tokens: int = 256 << 20,
    overwrite: bool = False,
    log=print,
    extra: dict | None = None,
) -> dict:
    """Validate and tokenize `inputs` into shards under `out_dir` (or out_dir/{train,valid,test} with
    `split_fractions`); writes out_dir/report.json and returns the report. Raises DataError naming the bad file."""
    policy = policy or ValidationPolicy()
    out = Path(out_dir)
    names = SPLITS if split_fractions else ("",)
    if split_fractions is not None and len(split_fractions) != 3:
        raise DataError(f"split_fractions needs 3 numbers (train, valid, test), got {split_fractions}")
    for name in names:
        if (out / name / MANIFEST).exists() and not overwrite:
            raise DataError(f"{out / name / MANIFEST}: already exists (pass --overwrite to replace it)")
    created = not out.exists()
    stage = out / ".prepare-tmp"
    shutil.rmtree(stage, ignore_errors=True)
    run = PrepareRun(
        {n: ShardWriter(stage / (n or "all"), shard_tokens) for n in names}, policy, max_length, dedup, split_fractions
    )
    try:
        for batch in _batches(list(inputs), split=split, sequence_column=sequence_column, id_column=id_column):
            run.feed(batch)
        for name, writer in run.writers.items():
            writer.close(dict(split=name or None))
        for name in names:
            _install(stage / (name or "all"), out / name, overwrite)
    except SourceError as e:
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
    return prepare(
        builtin_files(),
        out_dir,
        policy=policy,
        id_column="entry",
        dedup=True,
        split_fractions=fractions,
        max_length=max_length,
        overwrite=overwrite,
        log=log,
        extra=dict(attribution=builtin_attribution()),
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
    p.add_argument("--duplicate-ids", choices=("report", "reject"), default="report")


def policy_from_args(args: argparse.Namespace) -> ValidationPolicy:
    return ValidationPolicy(
        lowercase=args.lowercase,
        strip_terminal_stop=not args.keep_terminal_stop,
        allow_gaps=args.allow_gaps,
        allow_ambiguous=not args.no_ambiguous,
        min_length=args.min_length,
        reject_longer_than=args.reject_longer_than,
        duplicate_ids=args.duplicate_ids,
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
    p.add_argument("--overwrite", action="store_true")
    add_policy_arguments(p)
    v = sub.add_parser("verify", help="check a shard directory (magic, version, vocabulary, sha256)")
    v.add_argument("dir")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            from training.shards import ShardSet

            shards = ShardSet(args.dir)
            print(
                f"{args.dir}: ok, {len(shards.files)} shards, {shards.num_docs} proteins, {shards.num_tokens} residues"
            )
            return 0
        policy = policy_from_args(args)
        if args.builtin:
            prepare_builtin(args.out, policy=policy, max_length=args.max_length, overwrite=args.overwrite)
        else:
            fractions = [float(x) for x in args.split_fractions.split(",")] if args.split_fractions else None
            prepare(
                args.input,
                args.out,
                policy=policy,
                split=args.split,
                sequence_column=args.sequence_column,
                id_column=args.id_column,
                dedup=args.dedup,
                split_fractions=fractions,
                max_length=args.max_length,
                shard_tokens=args.shard_tokens,
                overwrite=args.overwrite,
            )
    except (DataError, SourceError, ShardError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
