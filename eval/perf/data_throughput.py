"""Data pipeline throughput: `prepare` and loader + collator, in tokens per second per CPU core.

    python -m eval.perf.data_throughput [--max-length 1024] [--micro-batch-tokens 8192] [--batches 150] [--repeats 5]
                                   [--prepare-repeats 3] [--input PATH ...] [--json PATH]

Data: the built-in proteins (aaanalysis benchmarks) unless --input is given. Each stage runs single-threaded
(torch.set_num_threads(1), no DataLoader workers), so "per core" = tokens / CPU seconds of this process; wall-clock
rates are shown beside them (on a shared machine the CPU-time figure is the stable one). Median of repeats.
Target (issue 3): loader + collator >= 2 M tokens/s per core; padding waste < 2% on the built-in set at 1024.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from eval.tables import markdown_table
from training.data.collator import EVAL_MASK_RATE, MLMCollator
from training.data.loader import LoaderOptions, build_eval_loader, build_loader
from training.data.prepare import PrepareOptions, prepare, prepare_builtin

TARGET = 2_000_000


def _timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def bench_prepare(inputs, repeats: int, max_length: int) -> dict:
    walls, cpus, tokens = [], [], 0
    options = PrepareOptions(max_length=max_length)
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            if inputs:
                run = lambda: prepare(inputs, tmp, options, log=lambda *a: None)  # noqa: E731
            else:
                run = lambda: prepare_builtin(tmp, max_length=max_length, log=lambda *a: None)  # noqa: E731
            wall, cpu, report = _timed(run)
        walls.append(wall)
        cpus.append(cpu)
        tokens = sum(s["residues"] for s in report["splits"].values())
    return dict(
        stage="prepare (read+validate+tokenize+write)",
        tokens=tokens,
        wall_s=statistics.median(walls),
        cpu_s=statistics.median(cpus),
        padding_waste=None,
    )


def bench_loader(loader, batches: int, repeats: int, name: str) -> dict:
    it = iter(loader)
    next(it)  # warm-up: first epoch plan, page cache
    walls, cpus, tokens = [], [], 0
    for _ in range(repeats):

        def run():
            return sum(int(next(it)["attention_mask"].sum()) for _ in range(batches))

        wall, cpu, tokens = _timed(run)
        walls.append(wall)
        cpus.append(cpu)
    return dict(
        stage=name,
        tokens=tokens,
        wall_s=statistics.median(walls),
        cpu_s=statistics.median(cpus),
        padding_waste=loader.packing_stats()["padding_waste"],
    )


def table(rows: list[dict]) -> str:
    cells = [
        [
            r["stage"],
            f"{r['tokens']:,}",
            f"{r['wall_s']:.3f}",
            f"{r['tokens_per_s_wall']:,.0f}",
            f"{r['tokens_per_s_per_core']:,.0f}",
            "" if r["padding_waste"] is None else f"{100 * r['padding_waste']:.2f}%",
        ]
        for r in rows
    ]
    return markdown_table(cells, ["stage", "tokens", "median s", "tok/s wall", "tok/s/core", "pad waste"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.perf.data_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", help="sources to prepare instead of the built-in proteins")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--micro-batch-tokens", type=int, default=8 * 1024)
    ap.add_argument("--batches", type=int, default=150, help="micro-batches per loader measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prepare-repeats", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core per measurement

    rows = [bench_prepare(args.input, args.prepare_repeats, args.max_length)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.input:
            prepare(args.input, tmp, PrepareOptions(split_fractions=(98, 1, 1)), log=lambda *a: None)
        else:
            prepare_builtin(tmp, log=lambda *a: None)
        options = LoaderOptions(max_length=args.max_length, tokens_per_micro_batch=args.micro_batch_tokens)
        train = build_loader(Path(tmp) / "train", MLMCollator(), options)
        name = f"loader+collator packed (train, L={args.max_length})"
        rows.append(bench_loader(train, args.batches, args.repeats, name))
        for packing, label in ((True, "packed"), (False, "padded")):
            ev_options = replace(options, packing=packing)
            ev = build_eval_loader(Path(tmp) / "train", MLMCollator(EVAL_MASK_RATE), ev_options)
            rows.append(bench_loader(ev, args.batches, args.repeats, f"loader+collator {label} (eval, one pass)"))
    for r in rows:
        r["tokens_per_s_wall"] = r["tokens"] / r["wall_s"]
        r["tokens_per_s_per_core"] = r["tokens"] / max(r["cpu_s"], 1e-9)
    print(table(rows))
    rate = rows[1]["tokens_per_s_per_core"]
    waste = rows[1]["padding_waste"]
    print(
        f"\ntarget loader+collator >= {TARGET / 1e6:.1f} M tokens/s per core: {'PASS' if rate >= TARGET else 'FAIL'}"
        f" ({rate / 1e6:.2f} M); packed padding waste {100 * waste:.2f}% (target < 2%)"
    )
    print(
        "tokens = real tokens (<cls> + residues + <eos>; padding excluded); per core = tokens / process CPU "
        "seconds with 1 torch thread, no workers; median of repeats"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(rows=rows, target_tokens_per_s_per_core=TARGET, args=vars(args)), indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
