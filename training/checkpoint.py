"""Full-state checkpoints: atomic, checksummed, rotated; resume from the newest complete one.

Layout of `<run>/checkpoints/step-000100/`: accelerate's state (model, optimizers, schedulers, every rank's RNG;
under FSDP2 the model and optimizers are sharded torch.distributed.checkpoint folders, one file per rank),
`loader_rank{r}.pt` (each rank's data position), `trainer_state.json` (step, tokens, counters), `shapes.json`
(parameter shapes, to refuse a checkpoint of another model), `MANIFEST.json` (sha256 of every file) and `COMPLETE`.
A save goes to `.tmp-step-*` first and is renamed only once complete, so a crash mid-save leaves no half checkpoint.
Assumes every rank sees the same filesystem (shared storage on multi-node runs).
"""

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .checksum import sha256_file

logger = logging.getLogger(__name__)

MANIFEST, COMPLETE = "MANIFEST.json", "COMPLETE"


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.state_dict().items()}


class CheckpointError(RuntimeError):
    pass


def full_state_dict(accelerator, model) -> dict | None:
    """Under FSDP2 the parameters are DTensor shards: gather them into one full state dict on the main process
    ({} elsewhere). A collective: every rank must call it, at the same point. None without FSDP2 (the model's own
    state dict is already full)."""
    return accelerator.get_state_dict(model) if accelerator.is_fsdp2 else None


def unsharded_model(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """A plain instance of an FSDP2 model's own class holding `state_dict` (a full one). fully_shard swaps the
    module's class for a generated `FSDP<Name>` subclass, and save_pretrained would ship that class (and torch's
    FSDP sources) as the checkpoint's remote code; the plain class saves the same weights as a loadable model."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    with torch.device("meta"):  # no second initialisation of the weights: load_state_dict assigns the gathered ones
        plain = cls(model.config)
    plain.load_state_dict(state_dict, assign=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()  # assign=True replaced the shared tensor by two equal ones
    return plain


def save_pretrained(accelerator, model, directory: Path, state_dict: dict | None = None, **kwargs) -> None:
    """The main process writes a `save_pretrained` folder of the full model. Call it on every rank: under FSDP2
    the full weights are gathered first (unless `state_dict`, from full_state_dict(), is given)."""
    if state_dict is None:
        state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if state_dict is not None:
            unwrapped = unsharded_model(unwrapped, state_dict)
        unwrapped.save_pretrained(directory, **kwargs)


class _SameModelForEveryIndex(list):
    """The model list, iterated as is, but indexing past its end gives the one model."""

    def __getitem__(self, index):
        if isinstance(index, int) and index >= len(self):
            index = 0
        return super().__getitem__(index)


@contextlib.contextmanager
def one_model_for_every_optimizer(acc):
    """accelerate 1.15's FSDP save_state/load_state pair optimizer i with model i (`self._models[i]`), so our two
    optimizers (Muon, Adam) over one model raise IndexError there. Pair every optimizer with the one model while
    saving or loading; iteration over the models (what gets saved as a model) is unchanged."""
    if not acc.is_fsdp2 or len(acc._models) != 1:
        yield
        return
    models = acc._models
    acc._models = _SameModelForEveryIndex(models)
    try:
        yield
    finally:
        acc._models = models


class CheckpointManager:
    def __init__(self, root: Path, keep: int, accelerator):
        self.root, self.keep, self.accelerator = Path(root), max(1, keep), accelerator

    def step_dirs(self) -> list[Path]:
        """Finished (renamed) checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def save(self, step: int, model, loader_state: dict, trainer_state: dict) -> Path:
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
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            (tmp / "shapes.json").write_text(json.dumps(parameter_shapes(acc.unwrap_model(model))))
            # every file, also inside the sharded (FSDP2) model/optimizer folders; keys are paths relative to tmp
            manifest = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            (tmp / COMPLETE).write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)  # a re-run of the same step replaces it
            os.replace(tmp, final)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        complete = [d for d in self.step_dirs() if (d / COMPLETE).exists()]
        for old in complete[: -self.keep]:  # only after the new one is complete: never fewer than `keep`
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):  # left by a save that a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def verify(directory: Path) -> str | None:
        """None if the checkpoint is complete and intact, else the reason (naming the file)."""
        if not (directory / COMPLETE).exists():
            return f"{directory / COMPLETE} missing (save did not finish)"
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            return f"{directory / MANIFEST} unreadable: {err}"
        for name, digest in manifest.items():
            path = directory / name
            if not path.is_file():
                return f"{path} missing"
            if sha256_file(path) != digest:
                return f"{path} is corrupt (sha256 mismatch)"
        return None

    def newest_valid(self) -> Path | None:
        for directory in reversed(self.step_dirs()):
            problem = self.verify(directory)
            if problem is None:
                return directory
            logger.warning("skipping checkpoint %s: %s", directory, problem)
        return None

    def load(self, directory: Path, model) -> tuple[dict, dict]:
        """Restore accelerate state in place; return (this rank's loader state, trainer state)."""
        acc = self.accelerator
        saved = json.loads((directory / "shapes.json").read_text())
        current = parameter_shapes(acc.unwrap_model(model))
        if saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise CheckpointError(
                f"{directory} holds a different model: parameters differ in shape or name: {diff[:8]}"
                f"{' ...' if len(diff) > 8 else ''}. Use train.resume=none or a matching model section."
            )
        with one_model_for_every_optimizer(acc):
            acc.load_state(str(directory))
        rank_file = directory / f"loader_rank{acc.process_index}.pt"
        if not rank_file.exists():
            raise CheckpointError(f"{rank_file} missing: the checkpoint was written with a different world size")
        loader_state = torch.load(rank_file, weights_only=False)
        return loader_state, json.loads((directory / "trainer_state.json").read_text())
