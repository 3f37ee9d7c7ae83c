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
- Resume refuses a checkpoint of a different model (any SpeedPLMConfig field but the implementation choices), of
  another world size, of an older speedplm without a run id, and a metrics.jsonl with another run's rows; a torn
  last metrics line (a write cut short by a crash) is dropped with a warning.
"""

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from modeling_speedplm import SpeedPLMConfig

from .checkpoint import CheckpointManager, TrainerState, model_config_difference, step_of
from .config import TrainSection
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

    def describe(self) -> str:
        if self.checkpoint is None:
            deleted = " (train.overwrite=true: the old run is deleted)" if self.delete else ""
            return f"fresh start of run {self.run_id}{deleted}"
        return f"resuming run {self.run_id} from {self.checkpoint} at step {self.step}"


def _how_to_start_over(run_dir: Path) -> str:
    return (
        f"to start over in {run_dir} (deleting its checkpoints, metrics.jsonl and final/): train.resume=none "
        f"train.overwrite=true; or keep it and choose another train.run_name"
    )


def plan_start(train: TrainSection, run_dir: Path, checkpoints: CheckpointManager, model: SpeedPLMConfig, world: int):
    """The StartPlan for this run directory, or RunRefused. Reads files only."""
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
    if state.world_size != world:
        raise RunRefused(
            f"{directory} was written by {state.world_size} rank(s), this run has {world}: resume with the same "
            f"number of ranks (the data position and sharded state are per rank)"
        )
    plan = StartPlan(state.run_id, directory, state.step, warnings=warnings)

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
        plan.delete = newer
    foreign = sorted({str(r.get("run_id")) for r in rows} - {plan.run_id})
    if foreign:
        raise RunRefused(
            f"{metrics_path} holds rows of run(s) {foreign}, not only of run {plan.run_id} (the checkpoint's); "
            f"{_how_to_start_over(run_dir)}"
        )
    if torn:
        plan.warnings.append(f"{metrics_path}:{torn}: torn last line (a write cut short by a crash) dropped")
    plan.metrics_rows = [r for r in rows if r.get("step", 0) <= plan.step]
    return plan
