"""Train-step throughput: SpeedPLM (packed rows) vs transformers' EsmForMaskedLM (padded, as the HF Trainer batches).

    python -m eval.perf.throughput                      # CPU, fp32, esm2-8m-like vs ESM2-8M shape, built-in proteins
    python -m eval.perf.throughput --json out.json --steps 12 --max-length 512 --rows 8
    python -m eval.perf.throughput --gpu                 # H100/H200: speedrun-133m tokens/s, MFU, peak memory (< 8 min)

Both models see real protein length spread from the built-in set: ESM gets `rows` proteins per batch padded to the
longest (DataCollatorForLanguageModeling with padding=True), SpeedPLM gets `rows` rows of `max-length` tokens with
several proteins packed per row. tokens/s counts real (non-padding) tokens; each figure is the median of `steps`
timed train steps (forward, backward, optimizer) after `warmup` untimed ones, measured side by side in one process.
"""

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from eval.checkpoints import esm_twin
from eval.tables import markdown_table
from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM
from training.data.collator import EVAL_MASK_RATE, MLMCollator
from training.data.loader import LoaderOptions, build_loader
from training.data_setup import builtin_root


def builtin_train_dir(cache: Path) -> Path:
    return builtin_root(cache) / "train"


def time_steps(model, batches, steps: int, warmup: int) -> tuple[float, int]:
    """Median seconds per train step and real tokens per step (mean)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times, tokens = [], []
    for i, batch in enumerate(batches[: warmup + steps]):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(int(batch["attention_mask"].sum()))
    return statistics.median(times), statistics.mean(tokens)


def measure(preset: str, rows: int, max_length: int, steps: int, warmup: int, cache: Path) -> list[dict]:
    torch.manual_seed(0)
    shard_dir = builtin_train_dir(cache)
    collator = MLMCollator(mask_rate=EVAL_MASK_RATE, seed=0)
    n = warmup + steps
    options = LoaderOptions(max_length=max_length, tokens_per_micro_batch=rows * max_length, seed=0)
    packed = [b for b, _ in zip(build_loader(shard_dir, collator, options), range(n))]
    padded_iter = build_loader(shard_dir, collator, replace(options, packing=False))
    padded = [
        {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")}
        for b, _ in zip(padded_iter, range(n))
    ]
    config = SpeedPLMConfig.from_preset(preset, attn_implementation="sdpa")
    speedplm = SpeedPLMForMaskedLM(config)
    esm = esm_twin(config)
    results = []
    for name, model, batches, layout in [
        ("EsmForMaskedLM (HF)", esm, padded, "padded"),
        ("SpeedPLMForMaskedLM", speedplm, packed, "packed"),
    ]:
        seconds, tokens = time_steps(model, batches, steps, warmup)
        slots = statistics.mean(b["input_ids"].numel() for b in batches[warmup:])
        results.append(
            dict(
                model=name,
                params_m=round(model.num_parameters() / 1e6, 2),
                layout=layout,
                real_tokens_per_step=round(tokens),
                padding_waste=round(1 - tokens / slots, 3),
                step_s=round(seconds, 3),
                tokens_per_s=round(tokens / seconds),
            )
        )
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup"] = round(r["tokens_per_s"] / base, 2)
    return results


def table(results: list[dict]) -> str:
    return markdown_table(results, list(results[0]), fmt=str)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="esm2-8m-like")
    parser.add_argument("--rows", type=int, default=8, help="rows (ESM: proteins) per batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache", default="data", help="where the built-in proteins are prepared once")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--gpu", action="store_true", help="run eval.perf.gpu_benchmark: bf16, compiled, speedrun-133m")
    args = parser.parse_args(argv)
    if args.gpu:  # the GPU figures (and kernel tables) live in one script with its own 8-minute budget
        import runpy
        import sys

        sys.argv = ["eval.perf.gpu_benchmark"]
        runpy.run_module("eval.perf.gpu_benchmark", run_name="__main__")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(args.preset, args.rows, args.max_length, args.steps, args.warmup, Path(args.cache))
    print(
        f"train step, CPU fp32, {torch.get_num_threads()} threads, {args.rows} x {args.max_length}, "
        f"median of {args.steps} steps"
    )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
