"""Time to loss on this machine: the SpeedPLM recipe vs the ESM2 recipe at the same parameter count, side by side.

    python -m eval.speedrun --out runs/speedrun                         # 3 seeds x 300 s per recipe, 'small' shape
    python -m eval.speedrun --seeds 0 1 2 --budget-s 90 --threads 1 --out runs/speedrun
    python -m eval.speedrun --short --out /tmp/speedrun                 # tiny models, 1 seed, ~30 s (tests)

Recipes (same built-in train split, same wall-clock budget, same validation batches)
    SpeedPLM  `train_accelerate.py --config configs/default.yaml` in a subprocess with the shape overridden: packed
              rows, 20% masking, Muon for hidden matrices + Adam for the rest, warmup-stable-decay schedule.
    ESM2      transformers' EsmForMaskedLM of the same shape and parameter count (eval.throughput.esm_twin, with
              dropout 0 as in the released ESM2 configs) trained by transformers.Trainer: padded batches of whole
              proteins (first max_length - 2 residues) from DataCollatorForLanguageModeling at 15% masking, about the
              same real tokens per step as SpeedPLM; AdamW lr 4e-4, betas (0.9, 0.98), eps 1e-8, weight decay 0.01
              (the ESM2 paper's), linear warmup then linear decay to 0, grad clip 1.0.
    Both warm up over 5% of their steps (ESM2: 2,000 of 500k steps, scaled up for runs of a few hundred steps).
Budget: the step time of each recipe is measured first (a few untimed + timed steps in this process), and each run
    gets max_steps = budget / step time, so its schedule (WSD decay, linear decay) completes within about the budget.
Validation: the valid split, padded batches built once by eval.benchmark.build_batches (mask rate 0.15, seed 0),
    scored with eval.benchmark.score_model (MaskedLMAccumulator) for both recipes at step 0 and ~`--evals` times
    per run. SpeedPLM is scored afterwards from the checkpoints its run saved at those steps; ESM2 inside a Trainer
    callback while its clock is paused.
Clocks (evaluation and checkpoint writing excluded)
    ESM2      perf_counter from Trainer's on_train_begin, minus the paused evaluation time.
    SpeedPLM  the trainer's `train_seconds` (data + train steps only; log_every=1). The wall clock of the logged
              windows (which also holds checkpoint saves) is kept in the JSON as raw_time.
    Tokens: real (non-padding) input tokens, the trainer's `tokens` and Trainer's num_input_tokens_seen (non_padding).
Speedup (per seed): T_esm = time at which the ESM2 curve first reaches its final validation loss, T_speedplm = time
    at which the SpeedPLM curve first reaches that loss (linear interpolation between evaluations); speedup =
    T_esm / T_speedplm; the same with tokens. Not reached within the budget -> no number (reported as such). Mean,
    std, min and max over seeds.
Outputs: speedrun.json (settings, curves, speedups), speedrun.md (table), speedrun.png (loss vs time, vs tokens).
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from eval.benchmark import BenchmarkError, VocabMap, build_batches, hardware, markdown_table, resolve_split, score_model
from eval.throughput import esm_twin  # ESM2's shape and recipe (no dropout)

ROOT = Path(__file__).resolve().parents[1]
EVAL_MASK_RATE, EVAL_SEED = 0.15, 0
WARMUP_FRACTION = 0.05
# Every field the SpeedPLM recipe's model section sets, so nothing leaks from configs/default.yaml.
SHAPES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0, value_embeddings=1),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4.0, value_embeddings=2),
    "default": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, mlp_ratio=4.0, value_embeddings=2),
    "esm2-8m-like": dict(
        hidden_size=320, num_hidden_layers=6, num_attention_heads=5, mlp_ratio=4.0, value_embeddings=3
    ),
}
MODES = {  # what --short and a full run default to; every value can be overridden on the command line
    "full": dict(
        shape="small",
        max_length=256,
        tokens_per_step=4096,
        budget_s=300.0,
        seeds=[0, 1, 2],
        evals=16,
        eval_max_tokens=30000,
    ),
    "short": dict(
        shape="tiny", max_length=128, tokens_per_step=1024, budget_s=5.0, seeds=[0], evals=4, eval_max_tokens=3000
    ),
}


class SpeedrunError(Exception):
    pass


@dataclass
class Settings:
    shape: str
    max_length: int
    tokens_per_step: int
    budget_s: float
    seeds: list
    evals: int
    eval_max_tokens: int
    data: str = "builtin"
    cache: str = "data"
    threads: int | None = None
    esm_lr: float = 4e-4
    calibration_steps: int = 4


# ---------------------------------------------------------------------------------------------------- models, data


def speedplm_config(s: Settings):
    from modeling_speedplm import SpeedPLMConfig

    return SpeedPLMConfig(**SHAPES[s.shape], max_position_embeddings=s.max_length)


def esm_dataset(train_dir: Path, max_length: int) -> list[dict]:
    """Whole proteins as the HF tokenizer gives them with truncation: <cls> + first max_length-2 residues + <eos>."""
    from training.shards import ShardSet

    shards = ShardSet(train_dir)
    return [{"input_ids": [0, *shards.doc(i)[: max_length - 2].tolist(), 2]} for i in range(shards.num_docs)]


# ---------------------------------------------------------------------------------------------------- calibration


def calibrate_speedplm(s: Settings, train_dir: Path, config) -> float:
    """Median seconds per optimizer step of the SpeedPLM recipe (same loader, collator, optimizers as the trainer)."""
    from transformers import AutoModelForMaskedLM  # knows SpeedPLMConfig: modeling_speedplm registers it

    from training.collator import MLMCollator
    from training.config import TrainSection
    from training.loader import build_loader
    from training.optim import build_optimizers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa").to(device)
    optimizers = build_optimizers(model, TrainSection())
    loader = build_loader(
        train_dir,
        max_length=s.max_length,
        tokens_per_micro_batch=s.tokens_per_step,
        collator=MLMCollator(mask_rate=0.2, seed=0),
        seed=0,
    )
    times = []
    for i, batch in zip(range(2 + s.calibration_steps), loader):
        start = time.perf_counter()
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate_esm(s: Settings, dataset: list, batch_size: int, config, out: Path) -> float:
    """Median seconds per step of the ESM2 recipe, measured inside transformers.Trainer."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    timer = StepTimes()
    trainer = esm_trainer(s, esm_twin(config), dataset, batch_size, 2 + s.calibration_steps, 0, out, [timer])
    trainer.train()
    return statistics.median(np.diff(timer.stamps[1:]).tolist())


# ---------------------------------------------------------------------------------------------------- the two runs


def esm_trainer(s: Settings, model, dataset, batch_size: int, steps: int, seed: int, out: Path, callbacks):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from modeling_speedplm import build_tokenizer

    args = TrainingArguments(
        output_dir=str(out / "esm_trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=s.esm_lr,
        warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
        lr_scheduler_type="linear",
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=seed,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForLanguageModeling(build_tokenizer(s.max_length), mlm_probability=0.15)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks)
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    return trainer


def run_esm(s: Settings, config, dataset, batch_size: int, steps: int, seed: int, eval_batches, out: Path) -> dict:
    from transformers import TrainerCallback, set_seed

    every = max(1, steps // s.evals)

    class EvalClock(TrainerCallback):
        """Scores the shared validation batches every `every` steps with the training clock paused."""

        def __init__(self):
            self.points, self.paused, self.start = [], 0.0, None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every and state.global_step < state.max_steps:
                return
            now = time.perf_counter()
            clock = now - self.start - self.paused
            result = score_model(model, VocabMap.identity(), eval_batches)
            self.points.append(point(state.global_step, int(state.num_input_tokens_seen), clock, result))
            self.paused += time.perf_counter() - now
            if clock > 2 * s.budget_s + 30:  # the machine got much slower than calibrated: stop, keep the curve
                control.should_training_stop = True

    set_seed(seed)
    model = esm_twin(config)
    clock = EvalClock()
    first = point(0, 0, 0.0, score_model(model, VocabMap.identity(), eval_batches))
    esm_trainer(s, model, dataset, batch_size, steps, seed, out, [clock]).train()
    shutil.rmtree(out / "esm_trainer", ignore_errors=True)
    points = [first, *clock.points]
    return dict(
        recipe="ESM2",
        seed=seed,
        steps=points[-1]["step"],
        planned_steps=steps,
        eval_every=every,
        parameters=model.num_parameters(),
        batch=f"{batch_size} proteins, padded",
        points=points,
    )


def run_speedplm(s: Settings, config, data_root: Path, steps: int, seed: int, eval_batches, out: Path) -> dict:
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM  # knows SpeedPLMConfig: modeling_speedplm registers it

    every = max(1, steps // s.evals)
    run_dir = out / f"speedplm_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"data.train={data_root}",
        f"data.max_length={s.max_length}",
        "data.num_workers=0",
        *(f"model.{k}={v}" for k, v in SHAPES[s.shape].items()),
        f"model.max_position_embeddings={s.max_length}",
        f"train.output_dir={out}",
        f"train.run_name={run_dir.name}",
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        f"train.tokens_per_step={s.tokens_per_step}",
        f"train.micro_batch_tokens={s.tokens_per_step}",
        f"train.warmup_steps={max(1, round(WARMUP_FRACTION * steps))}",
        f"train.save_every={every}",
        "train.keep_checkpoints=1000000",
        "train.log_every=1",
        "train.resume=none",
        "eval.every=0",
        f"eval.max_tokens={s.max_length}",
        "eval.test_at_end=false",
        "tracking.wandb=disabled",
        # the trainer sets its own torch threads (cores / ranks) unless told: --threads must reach it too
        *([f"train.cpu_threads={s.threads}"] if s.threads else []),
    ]
    recipe = ROOT / "configs" / "default.yaml"
    cmd = [sys.executable, str(ROOT / "train_accelerate.py"), "--config", str(recipe), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    if s.threads:
        env["OMP_NUM_THREADS"] = str(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"speedplm_seed{seed}.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=3 * s.budget_s + 180
            )
        except subprocess.TimeoutExpired as err:
            raise SpeedrunError(f"SpeedPLM run (seed {seed}) exceeded {err.timeout:.0f} s; log: {log_path}") from err
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise SpeedrunError(f"SpeedPLM run (seed {seed}) exited {proc.returncode}; log {log_path}:\n{tail}")

    times, raw = speedplm_clock(run_dir / "metrics.jsonl")
    set_seed(seed)  # the trainer's init: set_seed(train.seed), then the model
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")  # as the trainer builds it
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    points = [point(0, 0, 0.0, score_model(model, VocabMap.identity(), eval_batches))]
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        state = load_file(ckpt / "model.safetensors")
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})  # torch.compile on GPU
        result = score_model(model, VocabMap.identity(), eval_batches)
        points.append(point(step, times[step]["tokens"], times[step]["time"], result, raw_time=raw[step]))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer states: large and no longer needed
    return dict(
        recipe="SpeedPLM",
        seed=seed,
        steps=points[-1]["step"],
        planned_steps=steps,
        eval_every=every,
        parameters=model.num_parameters(),
        batch=f"{s.tokens_per_step} tokens, packed",
        points=points,
    )


def speedplm_clock(metrics_path: Path) -> tuple[dict, dict]:
    """{step: {time, tokens}} on the trainer's own clock (`train_seconds`: data + steps, no eval or checkpoint
    time), and {step: wall time of the logged windows} kept for reference as raw_time."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if "split" not in r), key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    if steps != list(range(1, len(rows) + 1)) or not all("train_seconds" in r for r in rows):
        raise SpeedrunError(f"{metrics_path}: expected one row per step with train_seconds, got steps {steps[:5]}...")
    wall = np.cumsum(np.diff([0] + [r["tokens"] for r in rows]) / np.array([r["tokens_per_s"] for r in rows]))
    times = {r["step"]: {"time": float(r["train_seconds"]), "tokens": r["tokens"]} for r in rows}
    return times, {st: float(t) for st, t in zip(steps, wall)}


def point(step: int, tokens: int, clock: float, result: dict, **extra) -> dict:
    return dict(step=step, tokens=tokens, time=clock, loss=result["loss"], accuracy=result["accuracy"], **extra)


# ---------------------------------------------------------------------------------------------------- speedup


def reach(points: list[dict], target: float, key: str) -> float | None:
    """First `key` (time or tokens) at which the piecewise-linear loss curve is <= target; None if never."""
    for prev, cur in zip([None] + points[:-1], points):
        if cur["loss"] <= target:
            if prev is None:
                return float(cur[key])
            frac = (prev["loss"] - target) / (prev["loss"] - cur["loss"])
            return float(prev[key] + frac * (cur[key] - prev[key]))
    return None


def speedups(esm: dict, speedplm: dict) -> dict:
    target = esm["points"][-1]["loss"]
    out = dict(seed=esm["seed"], esm_final_loss=target, speedplm_final_loss=speedplm["points"][-1]["loss"])
    # Reached by the first evaluation after step 0: the crossing is interpolated from step 0, so the evaluation
    # spacing limits the number (on a convex curve the true crossing is earlier: the speedup is then conservative).
    out["resolution_limited"] = len(speedplm["points"]) > 1 and speedplm["points"][1]["loss"] <= target
    for key in ("time", "tokens"):
        base, ours = reach(esm["points"], target, key), reach(speedplm["points"], target, key)
        out[f"esm_{key}"], out[f"speedplm_{key}"] = base, ours
        out[f"speedup_{key}"] = base / ours if ours else None
    return out


def summarize(values: list) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return dict(mean=None, std=None, min=None, max=None, reached=0, runs=len(values))
    return dict(
        mean=statistics.mean(got),
        std=statistics.stdev(got) if len(got) > 1 else 0.0,
        min=min(got),
        max=max(got),
        reached=len(got),
        runs=len(values),
    )


# ---------------------------------------------------------------------------------------------------- outputs


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colors = {"SpeedPLM": "C0", "ESM2": "C3"}
    for run in runs:
        pts = run["points"]
        label = f"{run['recipe']} seed {run['seed']}"
        for ax, key, scale in [(axes[0], "time", 1.0), (axes[1], "tokens", 1e-6)]:
            ax.plot(
                [p[key] * scale for p in pts],
                [p["loss"] for p in pts],
                marker="o",
                ms=2.5,
                lw=1.2,
                color=colors[run["recipe"]],
                alpha=0.35 + 0.65 / (1 + run["seed"]),
                label=label,
            )
    axes[0].set_xlabel("training wall time (s, evaluation excluded)")
    axes[1].set_xlabel("tokens seen (millions, non-padding)")
    axes[0].set_ylabel("validation loss (15% masked, same positions)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(v, digits=2):
    return "not reached" if v is None else f"{v:.{digits}f}"


def write_outputs(report: dict, out: Path) -> str:
    s, rows = report["settings"], []
    for sp in report["speedups"]:
        rows.append(
            {
                "seed": sp["seed"],
                "ESM2 final loss": fmt(sp["esm_final_loss"], 4),
                "SpeedPLM final loss": fmt(sp["speedplm_final_loss"], 4),
                "ESM2 time (s)": fmt(sp["esm_time"], 1),
                "SpeedPLM time (s)": fmt(sp["speedplm_time"], 1),
                "speedup (time)": fmt(sp["speedup_time"]) + ("*" if sp.get("resolution_limited") else ""),
                "ESM2 tokens": fmt(sp["esm_tokens"], 0),
                "SpeedPLM tokens": fmt(sp["speedplm_tokens"], 0),
                "speedup (tokens)": fmt(sp["speedup_tokens"]) + ("*" if sp.get("resolution_limited") else ""),
            }
        )
    if any(sp.get("resolution_limited") for sp in report["speedups"]):
        lines_note = [
            "",
            "\\* SpeedPLM was already below the ESM2 final loss at its first evaluation after step 0: "
            "its crossing is interpolated between step 0 and that evaluation, so the evaluation spacing "
            "limits this number (conservative on a convex curve); rerun with more --evals to resolve it.",
        ]
    else:
        lines_note = []
    summary = report["summary"]
    lines_summary = []
    for key in ("speedup_time", "speedup_tokens"):
        m = summary[key]
        lines_summary.append(
            f"- **{key.replace('_', ' ')}**: mean {fmt(m['mean'])}, std {fmt(m['std'])}, min "
            f"{fmt(m['min'])}, max {fmt(m['max'])} ({m['reached']} of {m['runs']} seeds reached "
            f"the ESM2 final loss)"
        )
    runs = [
        {
            "recipe": r["recipe"],
            "seed": r["seed"],
            "parameters": r["parameters"],
            "batch": r["batch"],
            "steps": r["steps"],
            "train time (s)": fmt(r["points"][-1]["time"], 1),
            "tokens": r["points"][-1]["tokens"],
            "final loss": fmt(r["points"][-1]["loss"], 4),
            "final accuracy": fmt(r["points"][-1]["accuracy"], 4),
        }
        for r in report["runs"]
    ]
    text = "\n".join(
        [
            "# Speedrun: SpeedPLM recipe vs ESM2 recipe (time to the ESM2 run's final validation loss)",
            "",
            markdown_table(rows, list(rows[0])),
            *lines_note,
            "",
            *lines_summary,
            "",
            "## Runs",
            "",
            markdown_table(runs, list(runs[0])),
            "",
            f"Settings: shape `{s['shape']}` ({SHAPES[s['shape']]}), max length {s['max_length']}, "
            f"{s['tokens_per_step']} tokens per step, budget {s['budget_s']} s per run, seeds {s['seeds']}, "
            f"validation: {report['eval_tokens']:,} real tokens of the valid split, "
            f"mask rate {EVAL_MASK_RATE}, seed {EVAL_SEED}, "
            f"identical batches for both. Step times measured before the runs: SpeedPLM "
            f"{report['calibration']['speedplm_step_s']:.3f} s, ESM2 {report['calibration']['esm_step_s']:.3f} s. "
            "Speedup = time (tokens) the ESM2 run needed to first reach its "
            "final validation loss / time (tokens) the SpeedPLM run needed to reach that loss (linear interpolation "
            "between evaluations); evaluation and checkpoint time are excluded from both clocks "
            "(see eval/speedrun.py).",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Hardware: {report['hardware']}",
            "",
        ]
    )
    (out / "speedrun.md").write_text(text)
    (out / "speedrun.json").write_text(json.dumps(report, indent=1))
    plot(report["runs"], out / "speedrun.png")
    return text


# ---------------------------------------------------------------------------------------------------- CLI


def run(s: Settings, out: Path, command: str, log=print) -> dict:
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.shape not in SHAPES:
        raise SpeedrunError(f"--shape {s.shape!r}: choose one of {sorted(SHAPES)}")
    out.mkdir(parents=True, exist_ok=True)
    train_dir, valid_dir = resolve_split(s.data, "train", s.cache), resolve_split(s.data, "valid", s.cache)
    if train_dir.parent != valid_dir.parent:
        raise SpeedrunError(f"--data {s.data}: needs train/ and valid/ prepared side by side")
    eval_batches = list(
        enumerate(
            build_batches(
                valid_dir,
                mask_rate=EVAL_MASK_RATE,
                seed=EVAL_SEED,
                max_length=s.max_length,
                batch_tokens=16 * s.max_length,
                max_tokens=s.eval_max_tokens,
            )
        )
    )
    config = speedplm_config(s)
    dataset = esm_dataset(train_dir, s.max_length)
    mean_tokens = statistics.mean(len(d["input_ids"]) for d in dataset)
    batch_size = max(1, round(s.tokens_per_step / mean_tokens))  # ESM2: whole proteins, same real tokens per step
    log(f"calibrating step times ({s.shape}, {s.tokens_per_step} tokens/step, ESM2 batch {batch_size} proteins)")
    calibration = dict(
        speedplm_step_s=calibrate_speedplm(s, train_dir, config),
        esm_step_s=calibrate_esm(s, dataset, batch_size, config, out),
    )
    steps = {k: max(10, int(s.budget_s / calibration[f"{k}_step_s"])) for k in ("speedplm", "esm")}
    log(
        f"step time SpeedPLM {calibration['speedplm_step_s']:.3f} s, ESM2 {calibration['esm_step_s']:.3f} s -> "
        f"{steps['speedplm']} and {steps['esm']} steps in {s.budget_s} s"
    )
    runs, results = [], []
    for seed in s.seeds:
        esm = run_esm(s, config, dataset, batch_size, steps["esm"], seed, eval_batches, out)
        log(
            f"seed {seed} ESM2: {esm['steps']} steps, {esm['points'][-1]['time']:.1f} s, "
            f"loss {esm['points'][-1]['loss']:.4f}"
        )
        ours = run_speedplm(s, config, train_dir.parent, steps["speedplm"], seed, eval_batches, out)
        log(
            f"seed {seed} SpeedPLM: {ours['steps']} steps, {ours['points'][-1]['time']:.1f} s, "
            f"loss {ours['points'][-1]['loss']:.4f}"
        )
        runs += [esm, ours]
        results.append(speedups(esm, ours))
    eval_tokens = sum(int(b["attention_mask"].sum()) for _, b in eval_batches)
    summary = {k: summarize([r[k] for r in results]) for k in ("speedup_time", "speedup_tokens")}
    report = dict(
        settings=asdict(s),
        command=command,
        hardware=hardware(),
        calibration=calibration,
        planned_steps=steps,
        eval_tokens=eval_tokens,
        runs=runs,
        speedups=results,
        summary=summary,
    )
    log(write_outputs(report, out))
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m eval.speedrun",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--short", action="store_true", help="tiny models, 1 seed, a few seconds per run (tests)")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--short: 0)")
    p.add_argument("--budget-s", type=float, help="training seconds per run (default 300; --short 5)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default small; --short tiny)")
    p.add_argument("--max-length", type=int, help="tokens per row / protein (default 256; --short 128)")
    p.add_argument("--tokens-per-step", type=int, help="SpeedPLM batch in tokens; ESM2 gets as many real tokens")
    p.add_argument("--evals", type=int, help="validation points per run besides step 0 (default 16; --short 4)")
    p.add_argument("--eval-max-tokens", type=int, help="real tokens of the valid split scored (default 30000)")
    p.add_argument("--esm-lr", type=float, default=4e-4)
    p.add_argument("--threads", type=int, help="torch threads for both recipes (default: torch's choice)")
    p.add_argument("--data", default="builtin", help="'builtin' or a directory with prepared train/ and valid/")
    p.add_argument("--cache", default="data", help="where --data builtin is prepared once")
    args = p.parse_args(argv)
    mode = dict(MODES["short" if args.short else "full"])
    for key in mode:
        if getattr(args, key) is not None:
            mode[key] = getattr(args, key)
    settings = Settings(
        **mode,
        data=args.data,
        cache=args.cache,
        threads=args.threads,
        esm_lr=args.esm_lr,
        calibration_steps=2 if args.short else 4,
    )
    try:
        run(settings, Path(args.out), "python -m eval.speedrun " + shlex.join(argv))
    except (SpeedrunError, BenchmarkError, ValueError) as err:
        print(f"eval.speedrun: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
