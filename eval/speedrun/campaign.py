"""The judge of training recipes: time and tokens to a target loss, many seeds per arm, Welch tests, a decision.

    python -m eval.speedrun --out runs/speedrun                          # ESM2 recipe vs SpeedPLM recipe, 5 seeds
    python -m eval.speedrun --out runs/abl --variant normuon optim.normuon=true     # one more arm (appended)
    python -m eval.speedrun --out runs/abl --campaign eval/speedrun/campaigns/ablations-cpu.yaml  # every arm
    python -m eval.speedrun --out runs/abl --report [--probes]           # tables (and probes) from what has run
    python -m eval.speedrun --short --out /tmp/speedrun                  # tiny models, 1 seed, ~1 minute (tests)
    python -m eval.speedrun --campaign FILE --out runs/abl --confirm len-30   # kept arm + ESM2 again, seeds 5-9

Arms. An arm is a recipe plus overrides; `--variant NAME key=value ...` (repeatable) adds one:
    SpeedPLM arms take any run-config override (`optim.normuon=true`, `data.mask_rate=0.3`, `model.mlm_head=...`)
        on top of `configs/default.yaml` and the judge's own settings (shape, data, budget, seed: those keys are
        the judge's, an arm cannot set them); each runs `train_accelerate.py` in a subprocess. A value
        `N%steps` (`train.batch_warmup_steps=25%steps`) is N% of the control's calibrated steps (on the arm's
        `budget=` share).
    ESM2 arms (`recipe=esm2`): transformers' EsmForMaskedLM of the same shape and parameter count
        (eval.perf.throughput.esm_twin, dropout 0 as in the released ESM2 configs) trained by transformers.Trainer on
        padded batches of whole proteins (first max_length - 2 residues), DataCollatorForLanguageModeling at 15%,
        about the same real tokens per step as SpeedPLM; AdamW betas (0.9, 0.98), eps 1e-8, linear warmup then
        linear decay to 0, grad clip 1.0 (the ESM2 paper's), with `esm.lr=` (4e-4), `esm.warmup_fraction=` (0.05:
        ESM2's 2,000 of 500k steps, scaled up for runs of a few hundred steps), `esm.weight_decay=` (0.01);
        `esm.lr=best` takes the learning rate of the best ESM2 arm without it (run after those finish).
    `seeds=[5,6,7]` gives an arm its own seeds (an A/A arm: the control's overrides on other seeds).
    `budget=F` (0 < F <= 1, the judge's own key, kept among the overrides so it is part of the arm's identity) runs
        the arm for that share of the campaign budget, its whole schedule (warmup, decay) fitted to the shorter run:
        a speedrun's recipe includes its length, sized so that the run ends at the target rather than crossing it
        mid-schedule (modded-nanogpt's records fix the step count the same way). The target comes only from the tuned
        full-budget ESM2 arm; ESM2 arms with `budget=F` compete for the ESM2 tokens / time to it (the same fitting).
    The report compares every SpeedPLM arm with the control arm (`--control`, default "control") and with the
    tuned baseline: the ESM2 arm of lowest mean final validation loss.
Budget: the step times of both recipes are measured once per campaign (the fastest of 8 steps each, so a passing
    load spike does not shrink the budget; campaign.json, reused by every later call):
    the control gets budget / its step time steps, and every SpeedPLM arm the number of steps that gives it the
    same planned tokens (more steps for a batch-size warmup); every ESM2 arm gets budget / ESM2's step time steps
    (each times the arm's `budget=` share).
Runs: `--lanes N` runs N at a time, each in its own process with `--threads` torch threads; seed-major order,
    so slow drift of the machine spreads over all arms. Each finished run appends one line to results.jsonl (a
    crash loses at most the runs in flight); a run whose (arm, definition, seed) is there is not run again.
Validation: the whole valid split (or --eval-max-tokens of it), padded batches built by eval.benchmark.build_batches
    (mask rate 0.15, seed 0), identical for every run; scored ~--evals times per run, evenly in steps. SpeedPLM is
    scored afterwards from the checkpoints its run saved; ESM2 inside a Trainer callback with its clock paused.
    Every run's final point keeps its per-protein loss sums, from which the report bootstraps the eval noise.
Clocks: training time only (evaluation and checkpoints excluded): the trainer's `train_seconds` for SpeedPLM, a
    perf_counter from Trainer's on_train_begin minus paused evaluation time for ESM2. Tokens: real (non-padding)
    input tokens. Timings are only comparable between runs made on the same machine with the same --lanes/--threads.
Target: the tuned ESM2 arm's mean final validation loss (`--target LOSS` to fix one). Its runs reach it at about the
    end of their budget, where the loss still falls (linear decay to 0); a SpeedPLM run's tokens / time to target
    is the first crossing of its piecewise-linear validation curve. Speedup = the ESM2 side's mean time (or tokens)
    to target (the best of the target arm's end and every ESM2 arm, any budget share, whose runs all reach it) / the
    arm's, with a 95% interval from a bootstrap over the seeds of both sides that redraws the target too
    (eval/speedrun/stats.py says why and how).
Confirmation: arms are chosen after seeing seeds 0-4, so a kept arm's numbers are a claim only once they hold on
    fresh seeds: `--confirm ARM [ARM ...]` (with the campaign's settings) runs those arms and the ESM2 side again on
    `--confirm-seeds` (default 5-9) as `<arm>-confirm` arms, and the report judges them apart (fresh target) and
    labels every other number "selected on seeds 0-4, not confirmed".
Statistics (eval/speedrun/stats.py): per arm vs control, tokens- and time-to-target (mean, std, Welch p, CI), the
    loss gap at equal tokens and at equal time (CI), and the decision: a switch becomes a default only where
    tokens-to-target improves with p < 0.01 and time-to-target does not get worse (not higher with p < 0.05).
Outputs: results.jsonl (runs), speedrun.json (settings, comparisons), speedrun.md (tables), speedrun.png (curves),
    probes/ (with --probes: eval.probes on the control's and the baseline's first-seed models vs random-init twins).
"""

import concurrent.futures
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.benchmark import MaskSpec, build_batches, resolve_split
from eval.checkpoints import esm_twin  # ESM2's shape and recipe (no dropout)
from eval.speedrun.stats import BUDGET, baseline_arm, budget_share, current_runs, esm2_sides
from eval.tables import hardware
from training.data.collator import EVAL_MASK_RATE
from training.metrics import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "default.yaml"
RESULTS = "results.jsonl"
EVAL_SEED = 0
WARMUP_FRACTION = 0.05
ESM_DEFAULTS = {"esm.lr": 4e-4, "esm.warmup_fraction": WARMUP_FRACTION, "esm.weight_decay": 0.01}
# Run-config keys the judge sets for every SpeedPLM run (data, shape, budget, seed, logging); arms may not.
JUDGE_KEYS = {
    "data.train",
    "data.valid",
    "data.test",
    "data.max_length",
    "data.num_workers",
    "train.output_dir",
    "train.run_name",
    "train.seed",
    "train.max_steps",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.resume",
    "train.cpu_threads",
    "eval.every",
    "eval.max_tokens",
    "eval.test_at_end",
    "tracking.wandb",
}
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
        seeds=[0, 1, 2, 3, 4],
        evals=16,
        eval_max_tokens=None,
        lanes=2,
        threads=1,
    ),
    "short": dict(
        shape="tiny",
        max_length=128,
        tokens_per_step=1024,
        budget_s=5.0,
        seeds=[0],
        evals=4,
        eval_max_tokens=3000,
        lanes=1,
        threads=1,
    ),
}
IDENTITY = ("shape", "max_length", "tokens_per_step", "budget_s", "evals", "eval_max_tokens", "data", "threads")


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
    eval_max_tokens: int | None
    lanes: int = 1
    threads: int | None = None
    data: str = "builtin"
    cache: str = "data"
    calibration_steps: int = 4


@dataclass
class Arm:
    name: str
    recipe: str = "speedplm"  # or "esm2"
    overrides: list = field(default_factory=list)  # "section.key=value" (SpeedPLM) or "esm.key=value" (ESM2)
    seeds: list | None = None  # None: the campaign's seeds
    template: list | None = None  # the overrides as written, where "esm.lr=best" was resolved into `overrides`
    confirms: str | None = None  # a confirmation arm (--confirm): the selected arm it repeats on fresh seeds

    @property
    def key(self) -> str:
        """Identity of the arm's definition: a run is reused only under the same name and key."""
        return hashlib.sha256(json.dumps([self.recipe, self.overrides]).encode()).hexdigest()[:12]

    @property
    def budget(self) -> float:
        """The arm's share of the campaign budget (`budget=F` among its overrides; 1 without)."""
        return budget_share(self.overrides)

    @property
    def run_overrides(self) -> list:
        """The overrides the recipe itself gets (the judge's `budget=` taken out)."""
        return [o for o in self.overrides if o.split("=", 1)[0] != BUDGET]

    def esm(self) -> dict:
        values = dict(ESM_DEFAULTS)
        for text in self.run_overrides:
            k, v = text.split("=", 1)
            values[k] = v if v == "best" else float(v)
        return values


# ---------------------------------------------------------------------------------------------------- arms


def parse_variant(tokens: list[str]) -> Arm:
    """['normuon', 'optim.normuon=true'] -> Arm; reserved keys: recipe=speedplm|esm2, seeds=[...]."""
    import yaml

    if not tokens or "=" in tokens[0]:
        raise SpeedrunError(f"--variant {' '.join(tokens)}: the first word is the arm's name, then key=value pairs")
    arm = Arm(tokens[0])
    for text in tokens[1:]:
        if "=" not in text:
            raise SpeedrunError(f"--variant {arm.name}: {text!r} is not key=value")
        key, value = text.split("=", 1)
        if key == "recipe":
            arm.recipe = value
        elif key == "seeds":
            seeds = yaml.safe_load(value)
            if not isinstance(seeds, list) or not all(isinstance(x, int) for x in seeds):
                raise SpeedrunError(f"--variant {arm.name}: seeds={value!r}: a list of integers, e.g. seeds=[5,6,7]")
            arm.seeds = seeds
        else:
            arm.overrides.append(text)
    return arm


def check_arm(arm: Arm, s: Settings) -> None:
    """Every problem with an arm's definition, before anything runs or is written."""
    if arm.recipe not in ("speedplm", "esm2"):
        raise SpeedrunError(f"arm {arm.name}: recipe={arm.recipe!r}: choose speedplm or esm2")
    if not arm.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SpeedrunError(f"arm {arm.name!r}: use letters, digits, '-', '_' and '.' only (it names files)")
    for text in arm.overrides:
        if not isinstance(text, str) or "=" not in text:
            raise SpeedrunError(f"arm {arm.name}: override {text!r} is not key=value")
    try:
        budget_share(arm.overrides)
    except ValueError as err:
        raise SpeedrunError(f"arm {arm.name}: {err}") from None
    if arm.recipe == "esm2":
        for text in arm.run_overrides:
            key, value = text.split("=", 1)
            if key not in ESM_DEFAULTS:
                raise SpeedrunError(f"arm {arm.name}: {key!r}: ESM2 arms take {sorted([*ESM_DEFAULTS, BUDGET])}")
            if value != "best" or key != "esm.lr":
                try:
                    float(value)
                except ValueError:
                    raise SpeedrunError(f"arm {arm.name}: {text!r}: not a number") from None
        return
    from training.config import load_config

    for text in arm.run_overrides:
        key = text.split("=", 1)[0]
        if key in JUDGE_KEYS or key.startswith("model.") and key[6:] in (*SHAPES[s.shape], "max_position_embeddings"):
            raise SpeedrunError(f"arm {arm.name}: {key} is set by the judge (shape, data, budget, seed, logging)")
    try:
        load_config(str(RECIPE), speedplm_overrides(s, arm, RunPlan(seed=0, steps=100, out=Path("/x")), save_every=10))
    except ValueError as err:
        raise SpeedrunError(f"arm {arm.name}: {err}") from None


def relative_steps(text: str, control_steps: int) -> str:
    """'train.batch_warmup_steps=25%steps' -> 'train.batch_warmup_steps=N', N = 25% of the control's steps, so a
    campaign file holds schedule lengths that follow the calibrated budget."""
    key, value = text.split("=", 1)
    if value.endswith("%steps"):
        try:
            return f"{key}={round(float(value[:-6]) / 100 * control_steps)}"
        except ValueError:
            raise SpeedrunError(f"{text!r}: expected a percentage of the steps, e.g. {key}=25%steps") from None
    return text


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """One training run of an arm (either recipe): its seed, its optimizer steps and the folder it writes in."""

    seed: int
    steps: int
    out: Path


def speedplm_overrides(
    s: Settings,
    arm: Arm,
    plan: RunPlan,
    *,
    save_every: int,
    data: Path | None = None,
    control_steps: int | None = None,
) -> list[str]:
    """The judge's settings, then the arm's overrides (which win where both set a key, e.g. warmup_steps).
    data: the prepared directory holding train/ and valid/ (None: a placeholder, for checking a config only);
    control_steps: what 'N%steps' values are a share of (default: plan.steps)."""
    seed, steps, out = plan.seed, plan.steps, plan.out
    return [
        f"data.train={data or 'unprepared'}",
        f"data.max_length={s.max_length}",
        "data.num_workers=0",
        *(f"model.{k}={v}" for k, v in SHAPES[s.shape].items()),
        f"model.max_position_embeddings={s.max_length}",
        f"train.output_dir={out.parent}",
        f"train.run_name={out.name}",
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        f"train.tokens_per_step={s.tokens_per_step}",
        f"train.micro_batch_tokens={s.tokens_per_step}",
        f"optim.warmup_steps={max(1, round(WARMUP_FRACTION * steps))}",
        f"train.save_every={save_every}",
        "train.keep_checkpoints=1000000",
        "train.log_every=1",
        "train.resume=none",
        *([f"train.cpu_threads={s.threads}"] if s.threads else []),
        "eval.every=0",
        f"eval.max_tokens={s.max_length}",
        "eval.test_at_end=false",
        "tracking.wandb=disabled",
        *(relative_steps(o, control_steps or steps) for o in arm.run_overrides),
    ]


def share_steps(s: Settings, arm: Arm, budget_tokens: int) -> int:
    """The control's steps on this arm's share of the budget: what its `N%steps` values are a share of. Rounded up,
    as `speedplm_steps` runs until the share is spent: a constant-batch arm runs exactly these steps."""
    return -(-round(budget_tokens * arm.budget) // s.tokens_per_step)


def speedplm_steps(s: Settings, arm: Arm, budget_tokens: int) -> int:
    """Optimizer steps that give this arm its share of the campaign's planned tokens (its own batch schedule, e.g.
    a warmup)."""
    from training.config import load_config
    from training.data.batch_schedule import accumulation_steps

    planned = round(budget_tokens * arm.budget)
    control_steps = share_steps(s, arm, budget_tokens)
    plan = RunPlan(seed=0, steps=1, out=Path("/x"))
    overrides = speedplm_overrides(s, arm, plan, save_every=1, control_steps=control_steps)
    t = load_config(str(RECIPE), overrides).train
    full = t.tokens_per_step // t.micro_batch_tokens
    steps, tokens = 0, 0
    while tokens < planned:
        tokens += accumulation_steps(steps, full, t.batch_warmup_steps, t.batch_warmup_start) * t.micro_batch_tokens
        steps += 1
    return steps


# ---------------------------------------------------------------------------------------------------- data, scoring


def speedplm_config(s: Settings, **model_overrides):
    from modeling_speedplm import SpeedPLMConfig

    return SpeedPLMConfig(**SHAPES[s.shape], max_position_embeddings=s.max_length, **model_overrides)


def esm_dataset(train_dir: Path, max_length: int) -> list[dict]:
    """Whole proteins as the HF tokenizer gives them with truncation: <cls> + first max_length-2 residues + <eos>."""
    from training.data.shards import ShardSet

    shards = ShardSet(train_dir)
    return [{"input_ids": [0, *shards.doc(i)[: max_length - 2].tolist(), 2]} for i in range(shards.num_docs)]


def esm_batch_size(s: Settings, dataset: list) -> int:
    mean_tokens = statistics.mean(len(d["input_ids"]) for d in dataset)
    return max(1, round(s.tokens_per_step / mean_tokens))  # whole proteins, about the same real tokens per step


def eval_batches(s: Settings) -> list[dict]:
    return build_batches(
        resolve_split(s.data, "valid", s.cache),
        MaskSpec(mask_rate=EVAL_MASK_RATE, seed=EVAL_SEED),
        max_length=s.max_length,
        batch_tokens=16 * s.max_length,
        max_tokens=s.eval_max_tokens,
    )


@torch.no_grad()
def score(model, batches: list[dict], per_protein: bool = False) -> dict:
    """Token-weighted cross-entropy and accuracy over the scored positions; optionally per-protein sums (one protein
    per row, rows in batch order) for the eval-noise bootstrap."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums, counts, correct = [], [], 0
    for batch in batches:
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits.float()  # (B, L, V)
        labels = batch["labels"].to(device)
        scored = labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
        sums += (loss * scored).double().sum(1).tolist()
        counts += scored.sum(1).tolist()
        correct += int(((logits.argmax(-1) == labels) & scored).sum())
    model.train(was_training)
    n = max(1, sum(counts))
    out = dict(loss=sum(sums) / n, accuracy=correct / n)
    if per_protein:
        out["per_protein"] = dict(loss_sum=[round(x, 6) for x in sums], count=counts)
    return out


def point(step: int, tokens: int, clock: float, result: dict, **extra) -> dict:
    return dict(step=step, tokens=tokens, time=clock, loss=result["loss"], accuracy=result["accuracy"], **extra)


# ---------------------------------------------------------------------------------------------------- calibration


def calibrate_speedplm(s: Settings, train_dir: Path, config) -> float:
    """Seconds per optimizer step of the SpeedPLM recipe (same loader, collator, optimizers as the trainer): the
    fastest of the timed steps, since other load on the machine only ever slows a step down."""
    from transformers import AutoModelForMaskedLM  # knows SpeedPLMConfig: modeling_speedplm registers it

    from training.config import load_config
    from training.data.collator import MLMCollator
    from training.data.loader import LoaderOptions, build_loader
    from training.optim.build import build_optimizers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa").to(device)
    optimizers = build_optimizers(
        model, load_config(str(RECIPE)).optim
    )  # the recipe's optimizer, as the trainer reads it
    options = LoaderOptions(max_length=s.max_length, tokens_per_micro_batch=s.tokens_per_step, seed=0)
    loader = build_loader(train_dir, MLMCollator(mask_rate=0.2, seed=0), options)
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
    return min(times)


def calibrate_esm(s: Settings, dataset: list, batch_size: int, config, out: Path) -> float:
    """Seconds per step of the ESM2 recipe inside transformers.Trainer (the fastest timed step, as above)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    timer = StepTimes()
    plan = RunPlan(seed=0, steps=2 + s.calibration_steps, out=out)
    trainer = esm_trainer(s, esm_twin(config), dataset, plan, batch_size=batch_size, hyper=ESM_DEFAULTS)
    trainer.add_callback(timer)
    trainer.train()
    shutil.rmtree(out / "esm_trainer", ignore_errors=True)
    return min(np.diff(timer.stamps[1:]).tolist())


def campaign_state(s: Settings, out: Path, log=print) -> dict:
    """campaign.json: the settings that define the runs and the step budgets, measured once and then reused."""
    path = out / "campaign.json"
    identity = {k: getattr(s, k) for k in IDENTITY}
    if path.exists():
        state = json.loads(path.read_text())
        differ = {k: (state["settings"].get(k), v) for k, v in identity.items() if state["settings"].get(k) != v}
        if differ:
            raise SpeedrunError(
                f"{path}: this campaign was run with other settings {differ} (stored, given); use the stored "
                f"values or another --out"
            )
        return state
    if s.threads:
        torch.set_num_threads(s.threads)
    train_dir = resolve_split(s.data, "train", s.cache)
    config = speedplm_config(s)
    dataset = esm_dataset(train_dir, s.max_length)
    batch = esm_batch_size(s, dataset)
    log(f"calibrating step times ({s.shape}, {s.tokens_per_step} tokens/step, ESM2 batch {batch} proteins)")
    calibration = dict(
        speedplm_step_s=calibrate_speedplm(s, train_dir, config),
        esm_step_s=calibrate_esm(s, dataset, batch, config, out),
    )
    steps = {k: max(10, int(s.budget_s / calibration[f"{k}_step_s"])) for k in ("speedplm", "esm")}
    state = dict(
        settings=identity,
        calibration=calibration,
        steps=steps,
        budget_tokens=steps["speedplm"] * s.tokens_per_step,
        esm_batch_size=batch,
        eval_proteins=sum(len(b["input_ids"]) for b in eval_batches(s)),
        hardware=hardware(),
    )
    log(
        f"step time SpeedPLM {calibration['speedplm_step_s']:.3f} s, ESM2 {calibration['esm_step_s']:.3f} s -> "
        f"{steps['speedplm']} and {steps['esm']} steps in {s.budget_s} s"
    )
    path.write_text(json.dumps(state, indent=1))
    return state


# ---------------------------------------------------------------------------------------------------- one run


def esm_trainer(s: Settings, model, dataset, plan: RunPlan, *, batch_size: int, hyper: dict):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from modeling_speedplm import build_tokenizer

    seed, steps, out = plan.seed, plan.steps, plan.out
    args = TrainingArguments(
        output_dir=str(out / "esm_trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=float(hyper["esm.lr"]),
        warmup_steps=max(1, round(float(hyper["esm.warmup_fraction"]) * steps)),
        lr_scheduler_type="linear",
        weight_decay=float(hyper["esm.weight_decay"]),
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
    collator = DataCollatorForLanguageModeling(
        build_tokenizer(s.max_length), mlm_probability=EVAL_MASK_RATE
    )  # ESM2's 15%
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    return trainer


def run_esm(s: Settings, state: dict, arm: Arm, seed: int, batches, run_dir: Path) -> dict:
    from transformers import TrainerCallback, set_seed

    from modeling_speedplm import build_tokenizer

    steps = max(10, round(state["steps"]["esm"] * arm.budget))
    every = max(1, steps // s.evals)
    dataset = esm_dataset(resolve_split(s.data, "train", s.cache), s.max_length)

    class EvalClock(TrainerCallback):
        """Scores the validation batches every `every` steps with the training clock paused."""

        def __init__(self):
            self.points, self.paused, self.start, self.final = [], 0.0, None, None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            last = state.global_step >= state.max_steps
            if state.global_step % every and not last:
                return
            now = time.perf_counter()
            clock = now - self.start - self.paused
            result = score(model, batches, per_protein=last)
            self.final = result.get("per_protein", self.final)
            self.points.append(point(state.global_step, int(state.num_input_tokens_seen), clock, result))
            self.paused += time.perf_counter() - now
            if clock > 3 * s.budget_s + 60:  # the machine got much slower than calibrated: stop, keep the curve
                control.should_training_stop = True

    set_seed(seed)
    model = esm_twin(speedplm_config(s))
    clock = EvalClock()
    plan = RunPlan(seed=seed, steps=steps, out=run_dir)
    trainer = esm_trainer(s, model, dataset, plan, batch_size=state["esm_batch_size"], hyper=arm.esm())
    trainer.add_callback(clock)
    trainer.train()
    shutil.rmtree(run_dir / "esm_trainer", ignore_errors=True)
    if clock.final is None:  # stopped early: score the last state
        clock.final = score(model, batches, per_protein=True)["per_protein"]
    model.save_pretrained(run_dir / "final")  # for eval.probes
    build_tokenizer(s.max_length).save_pretrained(run_dir / "final")
    return dict(
        steps=clock.points[-1]["step"],
        planned_steps=steps,
        parameters=model.num_parameters(),
        batch=f"{state['esm_batch_size']} proteins, padded",
        points=clock.points,
        final_per_protein=clock.final,
    )


def run_speedplm(s: Settings, state: dict, arm: Arm, seed: int, batches, run_dir: Path) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from training.checkpoint import step_dirs, step_of
    from training.config import load_config

    steps = speedplm_steps(s, arm, state["budget_tokens"])
    every = max(1, steps // s.evals)
    shutil.rmtree(run_dir, ignore_errors=True)
    data = resolve_split(s.data, "train", s.cache).parent
    control_steps = share_steps(s, arm, state["budget_tokens"])
    plan = RunPlan(seed=seed, steps=steps, out=run_dir)
    overrides = speedplm_overrides(s, arm, plan, save_every=every, data=data, control_steps=control_steps)
    cmd = [sys.executable, str(ROOT / "train_accelerate.py"), "--config", str(RECIPE), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    if s.threads:
        env["OMP_NUM_THREADS"] = str(s.threads)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.train.log"
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=4 * s.budget_s + 300
            )
        except subprocess.TimeoutExpired as err:
            raise SpeedrunError(f"{arm.name} seed {seed}: exceeded {err.timeout:.0f} s; log: {log_path}") from err
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise SpeedrunError(f"{arm.name} seed {seed}: exited {proc.returncode}; log {log_path}:\n{tail}")

    times = speedplm_clock(run_dir / "metrics.jsonl")
    config = load_config(str(RECIPE), overrides).model_config()
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")  # as the trainer builds it
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    points, final = [], None
    checkpoints = step_dirs(run_dir / "checkpoints")  # the trainer's own listing of its checkpoints
    for ckpt in checkpoints:
        step = step_of(ckpt)
        weights = load_file(ckpt / "model.safetensors")
        model.load_state_dict(weights)  # the checkpoint holds the model's own names (compiled or not)
        result = score(model, batches, per_protein=ckpt == checkpoints[-1])
        final = result.get("per_protein", final)
        points.append(point(step, times[step]["tokens"], times[step]["time"], result))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer states: large and no longer needed
    return dict(
        steps=points[-1]["step"],
        planned_steps=steps,
        parameters=model.num_parameters(),
        batch=f"{s.tokens_per_step} tokens, packed",
        points=points,
        final_per_protein=final,
    )


def speedplm_clock(metrics_path: Path) -> dict:
    """{step: {time, tokens}} on the trainer's own clock (`train_seconds`: data + steps, no eval or checkpoint)."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if "split" not in r), key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    if steps != list(range(1, len(rows) + 1)) or not all("train_seconds" in r for r in rows):
        raise SpeedrunError(f"{metrics_path}: expected one row per step with train_seconds, got steps {steps[:5]}...")
    return {r["step"]: {"time": float(r["train_seconds"]), "tokens": r["tokens"]} for r in rows}


def append_record(path: Path, record: dict) -> None:
    """One line per finished run; an exclusive lock keeps lines from concurrent lanes whole."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def run_one(s: Settings, out: Path, arm: Arm, seed: int) -> dict:
    """Train and score one (arm, seed); append its record to results.jsonl."""
    state = json.loads((out / "campaign.json").read_text())
    if s.threads:
        torch.set_num_threads(s.threads)
    batches = eval_batches(s)
    run_dir = out / "runs" / f"{arm.name}-seed{seed}"
    started = time.time()
    runner = run_esm if arm.recipe == "esm2" else run_speedplm
    record = dict(arm=arm.name, key=arm.key, recipe=arm.recipe, overrides=arm.overrides, seed=seed)
    record["template"] = arm.template or arm.overrides
    if arm.confirms:
        record["confirms"] = arm.confirms  # kept out of the selection's tables, reported on its own
    record.update(runner(s, state, arm, seed, batches, run_dir))
    record.update(wall_s=time.time() - started, lanes=s.lanes, threads=s.threads, model_dir=str(run_dir / "final"))
    append_record(out / RESULTS, record)
    return record


# ---------------------------------------------------------------------------------------------------- a campaign


def load_records(out: Path) -> list[dict]:
    path = out / RESULTS
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SpeedrunError(f"{path}:{n}: not a JSON record ({err}); remove that line") from None
    return records


def resolve_best(arm: Arm, records: list[dict]) -> Arm:
    """esm.lr=best -> the learning rate of the ESM2 arm (without 'best') of lowest mean final loss."""
    if not any(o == "esm.lr=best" for o in arm.overrides):
        return arm
    best = baseline_arm(records, exclude_best=True)
    if best is None:
        raise SpeedrunError(f"arm {arm.name}: esm.lr=best needs finished ESM2 arms with a fixed esm.lr")
    lr = Arm(best["arm"], "esm2", best["overrides"]).esm()["esm.lr"]
    resolved = [f"esm.lr={lr:g}" if o == "esm.lr=best" else o for o in arm.overrides]
    return Arm(arm.name, arm.recipe, resolved, arm.seeds, template=arm.overrides)


CONFIRM_SEEDS = [5, 6, 7, 8, 9]
CONFIRM_SUFFIX = "-confirm"


def confirmation_arms(records: list[dict], kept: list[str], seeds: list[int]) -> list[Arm]:
    """--confirm: a choice made after seeing results on seeds 0-4 is a claim only once it holds on fresh seeds.
    Arms `<name>-confirm` that repeat each kept SpeedPLM arm and the ESM2 side of the comparison (the tuned
    full-budget arm that sets the target, and the ESM2 arm that sets the tokens / time to it, where another) with
    their exact definitions (a resolved `esm.lr=best` included) on `seeds`, which none of them may have used.
    Their records carry `confirms`: the report keeps them out of the selection and judges them on their own (the
    target too is re-measured on the fresh seeds)."""
    selection = [r for r in records if not r.get("confirms")]
    runs = current_runs(selection)
    base, sides = baseline_arm(selection), esm2_sides(selection, draws=2)
    if base is None or sides is None:
        raise SpeedrunError("--confirm needs the selection's finished runs: a full-budget ESM2 arm (the target)")
    names = list(dict.fromkeys([*kept, base["arm"], sides["tokens"]["setter"], sides["time"]["setter"]]))
    arms = []
    for name in names:
        if name not in runs:
            raise SpeedrunError(f"--confirm {name}: no finished runs of that arm (arms: {sorted(runs)})")
        first = runs[name][0]
        if name in kept and first["recipe"] != "speedplm":
            raise SpeedrunError(f"--confirm {name}: a SpeedPLM arm (the ESM2 side is confirmed with it)")
        used = sorted({r["seed"] for r in runs[name]} & set(seeds))
        if used:
            raise SpeedrunError(f"--confirm: {name} already ran seeds {used}: confirm on fresh ones (--confirm-seeds)")
        arms.append(Arm(name + CONFIRM_SUFFIX, first["recipe"], list(first["overrides"]), list(seeds), confirms=name))
    return arms


def run_campaign(s: Settings, arms: list[Arm], out: Path, log=print) -> bool:
    """Run every (arm, seed) not yet in results.jsonl, `lanes` at a time; False if any run failed."""
    out.mkdir(parents=True, exist_ok=True)
    campaign_state(s, out, log)
    ok = True
    phases = [[a for a in arms if "esm.lr=best" not in a.overrides], [a for a in arms if "esm.lr=best" in a.overrides]]
    for phase in phases:
        records = load_records(out)
        phase = [resolve_best(a, records) for a in phase]
        done = {(r["arm"], r["key"], r["seed"]) for r in records}
        # seed-major: the i-th seed of every arm, then the (i+1)-th (an A/A arm's seeds 5, 6, ... pair with 0, 1, ...)
        todo = sorted(
            ((i, k, a, seed) for k, a in enumerate(phase) for i, seed in enumerate(a.seeds or s.seeds)),
            key=lambda item: item[:2],
        )
        todo = [(a, seed) for _, _, a, seed in todo if (a.name, a.key, seed) not in done]
        if todo:
            log(f"{len(todo)} run(s) to do, {s.lanes} at a time: " + ", ".join(f"{a.name}/{x}" for a, x in todo))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, s.lanes)) as pool:
            futures = {pool.submit(launch, s, out, a, seed): (a, seed) for a, seed in todo}
            for future in concurrent.futures.as_completed(futures):
                a, seed = futures[future]
                message = future.result()
                ok &= message is None
                log(f"{a.name} seed {seed}: " + (message or "done"))
    return ok


def launch(s: Settings, out: Path, arm: Arm, seed: int) -> str | None:
    """One run in its own process (its own torch threads and memory); None on success, else the problem."""
    cmd = [sys.executable, "-m", "eval.speedrun", "--worker", json.dumps(asdict(arm)), "--seed", str(seed)]
    cmd += ["--out", str(out), "--settings", json.dumps(asdict(s))]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    if s.threads:
        env["OMP_NUM_THREADS"] = str(s.threads)
    log_path = out / "runs" / f"{arm.name}-seed{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-8:])
        return f"FAILED (exit {proc.returncode}); log {log_path}:\n{tail}"
    return None
