"""Fresh start or resume: which checkpoint, whose run, what may be deleted — decided from the files alone, before the
trainer writes anything, so a refused start leaves the run directory exactly as it was.

A run directory (`train.output_dir/train.run_name`) holds one history: one run id in every checkpoint's
trainer_state.json and every metrics.jsonl row. The rules:
- train.resume=auto: the newest intact checkpoint. Checkpoints present but none intact: refused (start over with
  train.resume=none train.overwrite=true, or another train.run_name). No checkpoint and no metrics: a fresh start.
- train.resume=none, or a checkpoint from another directory: a fresh history here, refused if the directory holds
  one already (checkpoints or metrics) unless train.overwrite=true, which deletes them first.
- train.resume=<one of this run's own checkpoints>: newer checkpoints of the run are refused unless
  train.overwrite=true (they would be a second future of the same history).
- Resume refuses a checkpoint of a different model (any SpeedPLMConfig field but the implementation choices), saved
  with or without FSDP2 when this run is the other (the optimizer state's layout), of an older speedplm without a
  run id, and a metrics.jsonl with another run's rows; a torn last metrics line (a write cut short by a crash) is
  dropped with a warning. Another number of ranks resumes: weights and optimizer state resharded on load, the data
  at the same row of the epoch (training/checkpoint.py CheckpointManager.load, PackedLoader.resharded).
- Resume never changes the recipe: every trajectory-relevant key (RunConfig.recipe(), recorded in each checkpoint's
  trainer_state.json) must equal the checkpoint's, or the start is refused naming each changed key, old and new
  value. The one explicit change is train.extend=true with a larger train.max_steps: the run goes on with a fresh
  schedule that starts at the checkpoint's learning rate (ScheduleExtension), recorded in its later checkpoints.
- A finished run (its newest checkpoint at train.max_steps, or at the step where it reached train.target_loss, and
  final/ written) started again with its recipe does nothing (StartPlan.finished). train.target_loss is part of the
  recipe: a run that stopped at its target is finished for that target; another target is another run.
- model.init_from is part of the recipe too (the source of the starting weights); a resume restores the run's own
  checkpoint and never loads the source again.
"""

import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointManager, TrainerState, is_sharded, model_config_difference, step_of
from .config import RunConfig
from .tracking import MetricsLog


class RunRefused(ValueError):
    """The run cannot start as configured; the message says why and which setting changes that."""


@dataclass
class StartPlan:
    run_id: str
    checkpoint: Path | None = None  # resume from here; None: a fresh start
    step: int = 0
    delete: list[Path] = field(default_factory=list)  # removed before the first write (train.overwrite=true)
    metrics_rows: list[dict] | None = None  # the history kept in metrics.jsonl (resume); None: a new file
    warnings: list[str] = field(default_factory=list)
    finished: bool = False  # the run is complete with this recipe: nothing to do, nothing written
    extension: dict | None = None  # the checkpoint's schedule extension, carried on (TrainerState.extension)
    extend_to: int | None = None  # train.extend=true: a new extension to this train.max_steps, from the checkpoint
    target: dict | None = None  # the checkpoint's TrainerState.target: the run reached train.target_loss there

    def describe(self) -> str:
        if self.finished:
            why = f" (train.target_loss={self.target['target_loss']} reached)" if self.target else ""
            return (
                f"run {self.run_id} finished at step {self.step}{why} ({self.checkpoint}; final/ written): nothing "
                f"to do"
            )
        if self.extend_to is not None:
            return (
                f"extending run {self.run_id} from {self.checkpoint} at step {self.step} to train.max_steps="
                f"{self.extend_to} (train.extend=true)"
            )
        if self.checkpoint is None:
            deleted = " (train.overwrite=true: the old run is deleted)" if self.delete else ""
            return f"fresh start of run {self.run_id}{deleted}"
        return f"resuming run {self.run_id} from {self.checkpoint} at step {self.step}"


def _how_to_start_over(run_dir: Path) -> str:
    return (
        f"to start over in {run_dir} (deleting its checkpoints, metrics.jsonl and final/): train.resume=none "
        f"train.overwrite=true; or keep it and choose another train.run_name"
    )


@dataclass(frozen=True)
class ScheduleExtension:
    """The learning-rate schedule of an extended run (train.extend=true), from the checkpoint's step `from_step` to the
    new train.max_steps, as a multiple of each group's peak LR. It starts at `lr_factor`, the multiple the checkpoint's
    schedule had reached at `from_step` (its LR), with no new warmup:
      wsd:    stable at lr_factor, then a linear decay to 0 over the last optim.decay_fraction of the new steps
              (max(1, int(decay_fraction * (max_steps - from_step))) steps), ending at 0 at max_steps;
      cosine: a half cosine from lr_factor at from_step to 0 at max_steps."""

    from_step: int
    lr_factor: float
    max_steps: int

    def factor(self, step: int, schedule: str, decay_fraction: float) -> float:
        span = self.max_steps - self.from_step
        if schedule == "cosine":
            progress = min(max(step - self.from_step, 0) / span, 1.0)
            return self.lr_factor * 0.5 * (1 + math.cos(math.pi * progress))
        decay = max(1, int(decay_fraction * span))
        return self.lr_factor * min(1.0, max(0.0, (self.max_steps - step) / decay))


def recipe_difference(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every recipe key that differs (the model is compared by model_config_difference)."""
    unset = "<not recorded>"
    keys = sorted(k for k in set(saved) | set(current) if not k.startswith("model.") or k == "model.init_from")
    return [
        f"{k}: {saved.get(k, unset)!r} -> {current.get(k, unset)!r}"
        for k in keys
        if saved.get(k, unset) != current.get(k, unset)
    ]


def _recipe_refusal(directory: Path, step: int, changed: list[str], run_dir: Path) -> str:
    only_steps = all(c.startswith("train.max_steps:") for c in changed)
    extend = (
        "to train this run longer, add train.extend=true (a fresh decay from the checkpoint's learning rate; "
        'README "Training")'
        if only_steps
        else "train.extend=true lets only train.max_steps change"
    )
    return (
        f"{directory} (step {step}) was trained with another recipe; changed: {'; '.join(changed)}. A resume "
        f"continues the recorded recipe, so nothing was started. Ways forward: set those keys back to resume the run "
        f"as it was; train.run_name=<a new name> to start a new run with this recipe (beside {run_dir}); or {extend}"
    )


def plan_start(config: RunConfig, checkpoints: CheckpointManager, world: int, fsdp2: bool = False) -> "StartPlan":
    """The StartPlan for this run directory (`world` ranks, FSDP2 or not), or RunRefused. Reads files only."""
    train, run_dir, model = config.train, config.run_dir, config.model_config()
    metrics_path = run_dir / "metrics.jsonl"
    try:
        rows, torn = MetricsLog.read(metrics_path)
    except ValueError as err:
        raise RunRefused(str(err)) from None
    existing = checkpoints.step_dirs()
    old_run = [p for p in (checkpoints.root, metrics_path, run_dir / "final") if p.exists()]
    runs = sorted({str(r.get("run_id")) for r in rows})
    held = f"{run_dir} holds {len(existing)} checkpoint(s) and {len(rows)} metrics row(s)"
    held += f" of run {', '.join(runs)}" if runs else ""
    holds_run = bool(existing or rows or torn)
    starts_anew = train.resume == "none" or (train.resume == "auto" and not existing)

    if starts_anew:
        if holds_run and not train.overwrite:
            why = "train.resume=none" if train.resume == "none" else "train.resume=auto found no checkpoint to resume"
            raise RunRefused(f"{why}, but {held}: a new history here would mix two runs; {_how_to_start_over(run_dir)}")
        return StartPlan(uuid.uuid4().hex[:12], delete=old_run if train.overwrite else [])

    if train.resume == "auto":
        directory, problems = checkpoints.newest_valid()
        if directory is None:
            raise RunRefused(
                f"train.resume=auto: {checkpoints.root} has {len(existing)} checkpoint(s) and none is intact "
                f"({'; '.join(problems)}); nothing was started. {_how_to_start_over(run_dir)}"
            )
        warnings = [f"skipped checkpoint {p}" for p in problems]
    else:
        directory, warnings = Path(train.resume), []
        problem = checkpoints.verify(directory)
        if problem:
            raise RunRefused(f"train.resume={train.resume}: {problem}")

    try:
        state = TrainerState.read(directory)
    except ValueError as err:
        raise RunRefused(f"{err}: not a checkpoint this speedplm can resume; {_how_to_start_over(run_dir)}") from None
    changed = model_config_difference(directory, model)
    if changed:
        raise RunRefused(
            f"{directory} holds a different model: {'; '.join(changed)}. Use the checkpoint's model section, or "
            f"start a new run (train.resume=none with another train.run_name)"
        )
    if is_sharded(directory) != fsdp2:
        saved, now = ("FSDP2", "without FSDP2") if not fsdp2 else ("without FSDP2", "under FSDP2")
        raise RunRefused(
            f"{directory} was saved {saved} and this run is {now}: the optimizer state is saved in another layout "
            f"(sharded torch.distributed.checkpoint folders vs whole files), so it does not resume across that change. "
            f"Resume with the launch config that wrote it, or start a new run from its weights (fresh optimizer): "
            f"model.init_from={directory} train.run_name=<a new name>"
        )
    plan = StartPlan(state.run_id, directory, state.step, warnings=warnings, extension=state.extension)
    if state.world_size != world:  # resharded on load (CheckpointManager.load, PackedLoader.resharded)
        plan.warnings.append(
            f"{directory} was written by {state.world_size} rank(s), this run has {world}: weights and optimizer "
            f"state are resharded, the data continues at the same row of the epoch"
        )
    if state.recipe is None:
        plan.warnings.append(f"{directory} records no recipe (an older speedplm): the recipe is not compared")
        changed = []
    else:
        changed = recipe_difference(state.recipe, config.recipe())
    if changed and train.extend and all(c.startswith("train.max_steps:") for c in changed):
        if train.max_steps <= state.step:
            raise RunRefused(
                f"train.extend=true: train.max_steps={train.max_steps} must be larger than the step of {directory} "
                f"({state.step})"
            )
        plan.extend_to, changed = train.max_steps, []
    if changed:
        raise RunRefused(_recipe_refusal(directory, state.step, changed, run_dir))

    if directory.resolve().parent != checkpoints.root.resolve():  # another directory's checkpoint: a new history here
        if holds_run and not train.overwrite:
            raise RunRefused(
                f"train.resume={train.resume} is another directory's checkpoint, but {held}: continuing it here "
                f"would mix two histories. Add train.overwrite=true to delete them, or choose another train.run_name"
            )
        plan.delete = old_run
        return plan
    newer = [d for d in existing if step_of(d) > plan.step]
    if newer and train.resume != "auto":  # (auto: the newer ones failed verification; never deleted unverified)
        if not train.overwrite:
            raise RunRefused(
                f"train.resume={train.resume}: the run has newer checkpoints ({', '.join(d.name for d in newer)}); "
                f"continuing from {directory.name} would give it two futures. Add train.overwrite=true to delete "
                f"them, or resume into another train.run_name"
            )
        plan.delete = newer + [p for p in (run_dir / "final",) if p.exists()]  # final/ belongs to that future
    foreign = sorted({str(r.get("run_id")) for r in rows} - {plan.run_id})
    if foreign:
        raise RunRefused(
            f"{metrics_path} holds rows of run(s) {foreign}, not only of run {plan.run_id} (the checkpoint's); "
            f"{_how_to_start_over(run_dir)}"
        )
    if torn:
        plan.warnings.append(f"{metrics_path}:{torn}: torn last line (a write cut short by a crash) dropped")
    newest = directory.resolve() == checkpoints.step_dirs()[-1].resolve()
    # the run's last step: train.max_steps, or the step at which it reached train.target_loss (TrainerState.target)
    plan.target, ended = state.target, plan.step == train.max_steps or state.target is not None
    if ended and newest and not plan.delete and (run_dir / "final").is_dir():
        plan.finished = True
        return plan
    # the history up to the checkpoint; at the last step without final/ the final evals (and the summary) run again:
    # theirs go
    plan.metrics_rows = [
        r for r in rows if r.get("step", 0) < plan.step or (r.get("step") == plan.step and not (ended and "split" in r))
    ]
    return plan
