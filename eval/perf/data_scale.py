"""Corpus scale: memory, start-up and reads of the training loader, and `prepare` scaling, on synthetic proteins.

    python -m eval.perf.data_scale --proteins 2000000 20000000 [--workers 2] [--max-length 1024]
        [--micro-batch-tokens 65536] [--batches 50] [--dir DIR] [--keep] [--json PATH]
    python -m eval.perf.data_scale --prepare-proteins 1000000 --num-proc 1 2

Loader: for each N, N synthetic proteins (lengths log-normal around a median of 100 residues, 1..4,000, random
residue ids) are written by the real `ShardWriter` into a temporary directory, then a FRESH process builds the real
training loader (`build_loader`, shuffled, `--workers` DataLoader workers, one rank) and takes batches from it. That
process reports, for its whole process tree (itself + the DataLoader workers, found through /proc/*/stat):
    pss_first / pss_peak  PSS (/proc/PID/smaps_rollup: shared pages split among the processes) after the first batch
                          and the largest seen over `--batches` more batches
    build_s, first_s      loader construction; construction + first batch ("ready")
    batches_per_s         micro-batches per second after the first
    read_before_first     bytes read (rchar of /proc/PID/io, summed over the tree) from build_loader to the first
                          batch, beside the corpus size on disk
The table adds the per-protein slope of PSS between the smallest and the largest N and its extrapolation to 207 M
proteins (OMGprot50). Targets (issue 12): < 1.5 GiB at 20 M with 2 workers, <= 24 bytes/protein, reads <= 1%.

`prepare`: a synthetic FASTA of `--prepare-proteins` proteins prepared (in a fresh process) with each `--num-proc`;
wall time, residues/s, speedup over the first row, CPU seconds of the main process and of the workers, and whether the
shards and report are byte-identical to the first row's.

`--code-root DIR` runs everything (writer, loader, prepare) from another checkout (e.g. an unchanged one, for
before/after tables). Memory and time figures on a shared machine are noisy: compare rows of one run.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from eval.tables import markdown_table

OMG_PROTEINS = 207_000_000
GIB = 1 << 30


def synthetic_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) residues per protein: log-normal, median 100, clipped to 1..4,000 (a few exceed max_length)."""
    return np.clip(rng.lognormal(np.log(100), 0.7, size=n), 1, 4000).astype(np.int64)


def write_shards(directory: Path, proteins: int, seed: int = 0, chunk: int = 1 << 20) -> dict:
    from training.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(directory)
    for start in range(0, proteins, chunk):
        lengths = synthetic_lengths(rng, min(chunk, proteins - start))
        writer.add(rng.integers(4, 24, size=int(lengths.sum()), dtype=np.uint8), lengths)
    return writer.close()


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (DataLoader workers), from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _proc_field(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(root: int) -> int:
    """Bytes of PSS of the process tree."""
    return sum(_proc_field(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in tree_pids(root)) * 1024


def tree_rchar(root: int, seen: dict) -> int:
    """Bytes read (rchar) by the tree; `seen` keeps the last value of processes that have exited."""
    for pid in tree_pids(root):
        value = _proc_field(f"/proc/{pid}/io", "rchar:")
        seen[pid] = max(seen.get(pid, 0), value)
    return sum(seen.values())


def measure_loader(args) -> dict:
    """In a fresh process: build the training loader over args.measure and take batches; print one JSON line."""
    import torch

    from training.data import loader as loaders
    from training.data.collator import MLMCollator

    torch.set_num_threads(1)
    me = os.getpid()
    reads: dict = {}
    before = tree_rchar(me, reads)
    t0 = time.perf_counter()
    shape = dict(max_length=args.max_length, tokens_per_micro_batch=args.micro_batch_tokens)
    if hasattr(loaders, "LoaderOptions"):
        options, workers = loaders.LoaderOptions(**shape), loaders.WorkerOptions(num_workers=args.workers)
        loader = loaders.build_loader(args.measure, MLMCollator(), options, workers=workers)
    else:  # a --code-root checkout from before LoaderOptions: keyword arguments
        loader = loaders.build_loader(args.measure, collator=MLMCollator(), num_workers=args.workers, **shape)
    build_s = time.perf_counter() - t0
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - t0
    read_before_first = tree_rchar(me, reads) - before
    pss_first = tree_pss(me)
    pss_peak, tokens = pss_first, int(first["attention_mask"].sum())
    t1 = time.perf_counter()
    for i in range(args.batches):
        tokens += int(next(it)["attention_mask"].sum())
        if i % 10 == 9:
            pss_peak = max(pss_peak, tree_pss(me))
    rate = args.batches / (time.perf_counter() - t1)
    pss_peak = max(pss_peak, tree_pss(me))
    workers = len(tree_pids(me)) - 1
    del it
    return dict(
        build_s=build_s,
        first_s=first_s,
        batches_per_s=rate,
        tokens_per_batch=tokens / (args.batches + 1),
        read_before_first=read_before_first,
        pss_first=pss_first,
        pss_peak=pss_peak,
        processes=workers + 1,
    )


def run_scale(args, root: Path) -> list[dict]:
    from training.data.shards import SHARD_MANIFEST

    rows = []
    for n in args.proteins:
        directory = root / f"shards-{n}"
        t0 = time.perf_counter()
        if not (directory / SHARD_MANIFEST).exists():
            shutil.rmtree(directory, ignore_errors=True)
            write_shards(directory, n)
        write_s = time.perf_counter() - t0
        corpus = sum(f.stat().st_size for f in directory.glob("shard-*.bin"))
        cmd = [sys.executable, "-m", "eval.perf.data_scale", "--measure", str(directory), *_common(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo())
        if proc.returncode != 0:
            raise SystemExit(f"measurement at {n} proteins failed:\n{proc.stderr[-3000:]}")
        row = dict(proteins=n, corpus_bytes=corpus, write_s=write_s, **json.loads(proc.stdout.splitlines()[-1]))
        rows.append(row)
        print(
            f"  {n:,} proteins: PSS {row['pss_peak'] / GIB:.2f} GiB, ready {row['first_s']:.2f} s, "
            f"read before first batch {row['read_before_first'] / 1e6:.1f} MB of {corpus / 1e6:.0f} MB",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return rows


def scale_table(rows: list[dict], workers: int) -> str:
    columns = [
        "proteins",
        "corpus (GB)",
        f"PSS, main + {workers} workers: first batch / peak (GiB)",
        "build (s)",
        "ready (s)",
        "batches/s",
        "read before first batch (MB, % of corpus)",
    ]
    cells = [
        [
            f"{r['proteins']:,}",
            f"{r['corpus_bytes'] / 1e9:.2f}",
            f"{r['pss_first'] / GIB:.2f} / {r['pss_peak'] / GIB:.2f}",
            f"{r['build_s']:.2f}",
            f"{r['first_s']:.2f}",
            f"{r['batches_per_s']:.1f}",
            f"{r['read_before_first'] / 1e6:.1f} ({100 * r['read_before_first'] / r['corpus_bytes']:.2f}%)",
        ]
        for r in rows
    ]
    lines = [markdown_table(cells, columns)]
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        slope = (b["pss_peak"] - a["pss_peak"]) / (b["proteins"] - a["proteins"])
        at_omg = b["pss_peak"] + slope * (OMG_PROTEINS - b["proteins"])
        lines.append(
            f"\nslope {slope:.1f} bytes per protein per rank (peak PSS, {a['proteins']:,} -> {b['proteins']:,}); "
            f"extrapolated to {OMG_PROTEINS / 1e6:.0f} M proteins: {at_omg / GIB:.1f} GiB per rank, "
            f"{8 * at_omg / GIB:.0f} GiB for 8 ranks on one node"
        )
    return "\n".join(lines)


def write_fasta(path: Path, proteins: int, seed: int = 1) -> int:
    letters = np.frombuffer(b"LAGVSERTIDPKQNFYMHWC", dtype=np.uint8)
    rng = np.random.default_rng(seed)
    residues = 0
    with open(path, "wb") as f:
        for start in range(0, proteins, 1 << 16):
            lengths = synthetic_lengths(rng, min(1 << 16, proteins - start))
            seq = letters[rng.integers(0, 20, size=int(lengths.sum()))].tobytes()
            ends = np.cumsum(lengths)
            parts = []
            for i, (end, n) in enumerate(zip(ends.tolist(), lengths.tolist())):
                body = seq[end - n : end]
                lines = b"\n".join(body[k : k + 60] for k in range(0, n, 60))
                parts.append(b">P%d synthetic\n%s\n" % (start + i, lines))
            f.write(b"".join(parts))
            residues += int(lengths.sum())
    return residues


def _digest_tree(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(directory).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def measure_prepare(args) -> dict:
    """In a fresh process: prepare args.prepare_measure[0] into [1] with num_proc [2]; wall and CPU seconds of this
    process (reading, cutting, bookkeeping, writing) and of its workers (parsing, validating, tokenizing)."""
    import inspect
    import resource

    from training.data import prepare as data

    fasta, out, n = args.prepare_measure
    parallel = hasattr(data, "PrepareOptions") or "num_proc" in inspect.signature(data.prepare).parameters
    t0, c0 = time.perf_counter(), time.process_time()
    if hasattr(data, "PrepareOptions"):
        report = data.prepare([fasta], out, data.PrepareOptions(num_proc=int(n)), log=lambda *a: None)
    else:  # a --code-root checkout from before PrepareOptions: keyword arguments, maybe no num_proc at all
        report = data.prepare([fasta], out, log=lambda *a: None, **(dict(num_proc=int(n)) if parallel else {}))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dict(
        wall_s=time.perf_counter() - t0,
        main_cpu_s=time.process_time() - c0,
        workers_cpu_s=children.ru_utime + children.ru_stime,
        accepted=report["accepted"],
        parallel=parallel,
    )


def run_prepare(args, root: Path) -> list[dict]:
    fasta = root / "proteins.fasta"
    residues = write_fasta(fasta, args.prepare_proteins)
    rows = []
    for n in args.num_proc:
        out = root / f"prepared-{n}"
        cmd = [sys.executable, "-m", "eval.perf.data_scale", "--prepare-measure", str(fasta), str(out), str(n)]
        cmd += [f"--code-root={args.code_root}"] * bool(args.code_root)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo())
        if proc.returncode != 0:
            raise SystemExit(f"prepare with {n} processes failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.splitlines()[-1])
        if not 0 < row["accepted"] <= args.prepare_proteins:  # every record read; the policy may reject some
            raise SystemExit(f"prepare with {n} processes accepted {row['accepted']} of {args.prepare_proteins}")
        if row["accepted"] < args.prepare_proteins:  # the composition rule rejects some random synthetic sequences
            print(f"  --num-proc {n}: {args.prepare_proteins - row['accepted']:,} synthetic proteins rejected")
        if n != 1 and not row["parallel"]:
            print(f"  --num-proc {n}: this code's prepare has no num_proc; skipped")
            shutil.rmtree(out)
            continue
        report_path = out / "report.json"
        report_path.write_text(json.dumps({**json.loads(report_path.read_text()), "inputs": None}))
        rows.append(dict(num_proc=n, residues=residues, digest=_digest_tree(out), **row))
        shutil.rmtree(out)
    fasta.unlink()
    return rows


def prepare_table(rows: list[dict], proteins: int) -> str:
    lines = [
        f"`prepare` of a synthetic FASTA, {proteins:,} proteins, {rows[0]['residues']:,} residues:",
        "",
    ]
    columns = ["processes", "wall (s)", "residues/s", "speedup", "CPU s: main / workers", "serial share"]
    cells = [
        [
            r["num_proc"],
            f"{r['wall_s']:.1f}",
            f"{r['residues'] / r['wall_s'] / 1e6:.1f} M",
            f"{rows[0]['wall_s'] / r['wall_s']:.2f}",
            f"{r['main_cpu_s']:.1f} / {r['workers_cpu_s']:.1f}",
            f"{r['main_cpu_s'] / (r['main_cpu_s'] + r['workers_cpu_s']):.0%}",
            "yes" if r["digest"] == rows[0]["digest"] else "NO",
        ]
        for r in rows
    ]
    lines.append(markdown_table(cells, [*columns, "same output as 1"]))
    lines.append(
        "\nserial share = the main process's CPU (reading, cutting, duplicate checks, writing) / all CPU: with "
        "N workers on N free cores the wall time is about max(main, workers / N)"
    )
    return "\n".join(lines)


def _repo() -> str:
    return str(Path(__file__).resolve().parents[2])


def _common(args) -> list[str]:
    return [f"--code-root={args.code_root}"] * bool(args.code_root) + [
        f"--workers={args.workers}",
        f"--max-length={args.max_length}",
        f"--micro-batch-tokens={args.micro_batch_tokens}",
        f"--batches={args.batches}",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.perf.data_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--proteins", type=int, nargs="*", default=[], help="corpus sizes for the loader table")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch-tokens", type=int, default=65536)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--prepare-proteins", type=int, default=0, help="proteins of the `prepare` scaling FASTA")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dir", help="where to write the synthetic data (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic shards (reused by the next run)")
    ap.add_argument("--code-root", help="import training/ from this checkout instead (before/after tables)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the fresh measuring process
    ap.add_argument("--prepare-measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.code_root:
        sys.path.insert(0, args.code_root)
    if args.measure:
        print(json.dumps(measure_loader(args)))
        return 0
    if args.prepare_measure:
        print(json.dumps(measure_prepare(args)))
        return 0
    root = Path(args.dir or tempfile.mkdtemp(prefix="speedplm-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args)}
    try:
        if args.proteins:
            rows = run_scale(args, root)
            result["loader"] = rows
            print(scale_table(rows, args.workers))
        if args.prepare_proteins:
            rows = run_prepare(args, root)
            result["prepare"] = rows
            print(prepare_table(rows, args.prepare_proteins))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
