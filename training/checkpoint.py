"""Full-state checkpoints: atomic, checksummed, rotated; resume from the newest complete one.

Layout of `<run>/checkpoints/step-000100/`: accelerate's state (model, optimizers, schedulers, every rank's RNG),
`loader_rank{r}.pt` (each rank's data position), `trainer_state.json` (step, tokens, counters), `shapes.json`
(parameter shapes, to refuse a checkpoint of another model), `MANIFEST.json` (sha256 of every file) and `COMPLETE`.
A save goes to `.tmp-step-*` first and is renamed only once complete, so a crash mid-save leaves no half checkpoint.
Assumes every rank sees the same filesystem (shared storage on multi-node runs).
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MANIFEST, COMPLETE = "MANIFEST.json", "COMPLETE"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.state_dict().items()}


class CheckpointError(RuntimeError):
    pass


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
        acc.save_state(str(tmp), safe_serialization=True)
        torch.save(loader_state, tmp / f"loader_rank{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            (tmp / "shapes.json").write_text(json.dumps(parameter_shapes(acc.unwrap_model(model))))
            manifest = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
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
        acc.load_state(str(directory))
        rank_file = directory / f"loader_rank{acc.process_index}.pt"
        if not rank_file.exists():
            raise CheckpointError(f"{rank_file} missing: the checkpoint was written with a different world size")
        loader_state = torch.load(rank_file, weights_only=False)
        return loader_state, json.loads((directory / "trainer_state.json").read_text())
