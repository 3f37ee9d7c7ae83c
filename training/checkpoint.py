"""Full-state checkpoints: atomic, checksummed, owned by one run, pruned safely, each one a from_pretrained folder.

Layout of `<run>/checkpoints/step-000100/`:
    Hugging Face model folder: config.json, model.safetensors (the model's own parameter names), the remote-code
        modeling files, tokenizer files, README.md: `AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)`
    accelerate's state: optimizer*.bin, scheduler*.bin, random_states_*.pkl (every rank's RNG); under FSDP2 the model
        and optimizers as sharded torch.distributed.checkpoint folders (pytorch_model_fsdp_0/, optimizer_*/, one file
        per rank), model.safetensors then holding the gathered full weights
    loader_rank{r}.pt (each rank's data position), trainer_state.json (run_id, step, tokens, counters, world size,
    the run's recipe (with model.init_from, the source of its starting weights), schedule extension and reached
    target),
    MANIFEST.json (sha256 of every file), COMPLETE (written last).
A save goes to `.tmp-step-*` first and is renamed only once complete, so a crash mid-save leaves no half checkpoint.

Ownership: every checkpoint names the run that wrote it (`run_id` in trainer_state.json). After a save the pruner
keeps the newest `keep` checkpoints of this run that it has verified (written by this process or checksummed), and
deletes only checkpoints of this run whose recorded step is older than all of those; a checkpoint it cannot read,
of another run, or newer, is never deleted. Assumes every rank sees the same filesystem (shared storage on
multi-node runs).
"""

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_speedplm import SpeedPLMConfig

from .accelerate_compat import one_model_for_every_optimizer
from .config import MODEL_FIELDS, MODEL_IMPLEMENTATION
from .data.checksum import sha256_file
from .publish.model_folder import WEIGHT_FILES, plain_model, write_model_folder

logger = logging.getLogger("speedplm")

CHECKPOINT_MANIFEST, COMPLETE, TRAINER_STATE = "MANIFEST.json", "COMPLETE", "trainer_state.json"
# How the same model is computed, not which model it is: may differ between a checkpoint and the run resuming it.
IMPLEMENTATION_FIELDS = MODEL_IMPLEMENTATION


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainerState:
    """trainer_state.json: which run wrote a checkpoint, on how many ranks, and the run's counters at it. `step` is
    the run's only clock (optimizer steps taken). The one home of the file's keys: the trainer, the start planner
    and the recipe judge read it through `read`."""

    run_id: str
    world_size: int
    step: int = 0
    tokens: int = 0
    bad_steps: int = 0
    train_seconds: float = 0.0  # time in data + train steps only (no eval, checkpoint or push): time-to-loss clock
    # RunConfig.recipe() of the run (every trajectory-relevant key): a resume compares it (training/run_start.py).
    # None: written by a speedplm that did not record it.
    recipe: dict | None = None
    # train.extend=true: the schedule from `from_step` on ({"from_step", "lr_factor", "max_steps"}; ScheduleExtension)
    extension: dict | None = None
    # train.target_loss reached: {"target_loss", "step" (the eval that reached it, where the run stopped),
    # "time_to_target" (train_seconds), "tokens_to_target"}, interpolated between the two bracketing evals
    target: dict | None = None

    def write(self, directory: Path) -> None:
        (directory / TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def read(cls, directory: Path) -> "TrainerState":
        """The checkpoint's state; ValueError naming the file and what is wrong (missing, unreadable, keys)."""
        path = directory / TRAINER_STATE
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable ({err})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or not {"run_id", "world_size", "step"} <= set(raw) or set(raw) - names:
            keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path}: expected the keys {sorted(names)}, found {keys}")
        state = cls(**raw)
        if not isinstance(state.step, int) or not state.run_id:
            raise ValueError(f"{path}: step must be an integer and run_id set, got {state.step!r}, {state.run_id!r}")
        return state


def is_sharded(directory: Path) -> bool:
    """True if the checkpoint's model and optimizer were saved as FSDP2 (torch.distributed.checkpoint) folders."""
    return any(Path(directory).glob("pytorch_model_fsdp_*"))


def step_of(directory: Path) -> int:
    """step-000100 -> 100 (-1 for a name that is not a checkpoint's)."""
    digits = directory.name.removeprefix("step-")
    return int(digits) if directory.name.startswith("step-") and digits.isdigit() else -1


def step_dirs(root: Path) -> list[Path]:
    """The finished (renamed) `step-*` checkpoint directories under `root`, oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted((p for p in Path(root).iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of)


def full_state_dict(accelerator, model) -> dict | None:
    """Under FSDP2 the parameters are DTensor shards: gather them into one full state dict on the main process
    ({} elsewhere). A collective: every rank must call it, at the same point. None without FSDP2 (the model's own
    state dict is already full)."""
    return accelerator.get_state_dict(model) if accelerator.is_fsdp2 else None


def save_pretrained(
    accelerator,
    model,
    directory: Path,
    state_dict: dict | None = None,
    weights=True,
    training_summary: str | None = None,
) -> None:
    """The main process writes a `save_pretrained` folder of the full model, with the tokenizer and model card
    beside it (training/publish/model_folder.py): what final/, each checkpoint and every Hub push hold. Call it on
    every rank: under FSDP2 the full weights are gathered first (unless `state_dict`, from full_state_dict(), is
    given). weights=False writes everything but the weights (config, remote code, tokenizer, card), except under
    FSDP2."""
    if state_dict is None:
        state_dict = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    if state_dict is not None:
        unwrapped = plain_model(unwrapped, state_dict)
    elif not weights:
        # transformers writes no weight file for an empty state dict; staged apart so that nothing it writes can
        # replace the weights already in `directory`
        staging = Path(directory) / ".model-files"
        write_model_folder(unwrapped, staging, training_summary, state_dict={})
        for path in staging.iterdir():
            if path.name not in WEIGHT_FILES:
                os.replace(path, Path(directory) / path.name)
        shutil.rmtree(staging)
        return
    write_model_folder(unwrapped, directory, training_summary)


def model_config_difference(directory: Path, current: SpeedPLMConfig) -> list[str]:
    """'field: saved -> current' for every SpeedPLMConfig field in which the checkpoint's model differs."""
    saved = SpeedPLMConfig.from_json_file(str(directory / "config.json"))
    return [
        f"{name}: {getattr(saved, name)!r} -> {getattr(current, name)!r}"
        for name in MODEL_FIELDS
        if name not in IMPLEMENTATION_FIELDS and getattr(saved, name) != getattr(current, name)
    ]


class CheckpointManager:
    def __init__(self, root: Path, keep: int, accelerator):
        self.root, self.keep, self.accelerator = Path(root), keep, accelerator
        self.verified: set[str] = set()  # names of checkpoints this process wrote or checksummed
        # accelerate saves a DDP model under DDP's names ("module.model...") and loads them back into the wrapper;
        # save and load the unwrapped module instead, so model.safetensors is the plain model's (from_pretrained)
        accelerator.register_save_state_pre_hook(self._plain_weights)
        accelerator.register_load_state_pre_hook(self._plain_models)

    def _plain_weights(self, models, weights, output_dir) -> None:
        for i in range(len(weights)):  # empty under FSDP (sharded, saved by accelerate's FSDP path)
            weights[i] = self.accelerator.unwrap_model(models[i]).state_dict()

    def _plain_models(self, models, input_dir) -> None:
        models[:] = [self.accelerator.unwrap_model(m) for m in models]

    def step_dirs(self) -> list[Path]:
        """Finished (renamed) checkpoint directories, oldest first."""
        return step_dirs(self.root)

    def save(self, model, loader_state: dict, trainer_state: TrainerState, summary: str | None = None) -> Path:
        """Every rank calls it; the checkpoint is named by trainer_state.step."""
        step = trainer_state.step
        acc = self.accelerator
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with one_model_for_every_optimizer(acc):
            acc.save_state(str(tmp), safe_serialization=True)
        torch.save(loader_state, tmp / f"loader_rank{acc.process_index}.pt")
        # the from_pretrained files (a collective under FSDP2: gathers the full weights)
        save_pretrained(acc, model, tmp, weights=False, training_summary=summary)
        acc.wait_for_everyone()
        if acc.is_main_process:
            trainer_state.write(tmp)
            # every file, also inside the sharded (FSDP2) model/optimizer folders; keys are paths relative to tmp
            manifest = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=1))
            (tmp / COMPLETE).write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step replaces it
            os.replace(tmp, final)
            self.verified.add(final.name)
            self.prune(trainer_state.run_id)
        acc.wait_for_everyone()
        return final

    def prune(self, run_id: str) -> list[Path]:
        """Keep the newest `keep` verified checkpoints of run `run_id`; delete this run's checkpoints whose recorded
        step is older than all of those. Returns what was deleted."""
        mine = {}  # directory -> recorded step, for the checkpoints of this run whose state can be read
        for directory in self.step_dirs():
            state = self.read_state(directory)
            if state is not None and state.run_id == run_id:
                mine[directory] = state.step
        kept = sorted((step, d.name) for d, step in mine.items() if d.name in self.verified)[-self.keep :]
        deleted = []
        if len(kept) == self.keep:
            for directory, step in mine.items():
                if step < kept[0][0]:
                    shutil.rmtree(directory, ignore_errors=True)
                    deleted.append(directory)
        for stale in self.root.glob(".tmp-step-*"):  # left by a save that a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
        return deleted

    @staticmethod
    def read_state(directory: Path) -> TrainerState | None:
        """The checkpoint's trainer state, or None if it is missing or unreadable."""
        try:
            return TrainerState.read(directory)
        except ValueError:
            return None

    def verify(self, directory: Path) -> str | None:
        """None if the checkpoint is complete and intact (and remember it as verified), else the reason, naming
        the file."""
        if not (directory / COMPLETE).exists():
            return f"{directory / COMPLETE} missing (save did not finish)"
        try:
            manifest = json.loads((directory / CHECKPOINT_MANIFEST).read_text())
        except (OSError, ValueError) as err:
            return f"{directory / CHECKPOINT_MANIFEST} unreadable: {err}"
        for name, digest in manifest.items():
            path = directory / name
            if not path.is_file():
                return f"{path} missing"
            if sha256_file(path) != digest:
                return f"{path} is corrupt (sha256 mismatch)"
        self.verified.add(directory.name)
        return None

    def newest_valid(self) -> tuple[Path | None, list[str]]:
        """The newest intact checkpoint (or None) and the problems of the newer ones that were skipped."""
        problems = []
        for directory in reversed(self.step_dirs()):
            problem = self.verify(directory)
            if problem is None:
                return directory, problems
            logger.warning("skipping checkpoint %s: %s", directory, problem)
            problems.append(f"{directory.name}: {problem}")
        return None, problems

    def load(self, directory: Path, model) -> tuple[dict, TrainerState]:
        """Restore accelerate state in place; return (this rank's loader state, trainer state): rank 0's loader state
        when the checkpoint was written by another number of ranks. The checkpoint was verified and its model and
        layout compared before (training/run_start.py). Weights and optimizer state load on any number of ranks:
        without FSDP2 they are saved whole (model.safetensors, optimizer*.bin); under FSDP2 as
        torch.distributed.checkpoint folders, which DCP reshards to this run's ranks on load. The RNG files are
        per rank; a rank without its file keeps its seeded RNG (accelerate logs it): the data, masks and
        initialisation draw nothing from it."""
        acc = self.accelerator
        with one_model_for_every_optimizer(acc):
            acc.load_state(str(directory))
        state = TrainerState.read(directory)
        # another number of ranks: rank 0's position, which the loader converts (PackedLoader.resharded)
        rank = acc.process_index if state.world_size == acc.num_processes else 0
        rank_file = directory / f"loader_rank{rank}.pt"
        if not rank_file.exists():
            raise CheckpointError(f"{rank_file} missing: the checkpoint holds no data position for rank {rank}")
        return torch.load(rank_file, weights_only=False), state
