"""Where metrics go: `metrics.jsonl` in the run dir (always) and Accelerate's trackers (wandb, tensorboard).

Only the main process writes. Secrets never pass through here: the logged config is the run config, which holds
no token (tokens come from the environment only).
"""

import importlib.util
import json
import math
from pathlib import Path

from .config import TrackingSection


def tracker_names(cfg: TrackingSection) -> list[str]:
    names = []
    if cfg.wandb != "disabled":
        names.append("wandb")
    if cfg.tensorboard and (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        names.append("tensorboard")
    return names


def tracker_init_kwargs(cfg: TrackingSection, run_dir: Path, run_name: str) -> dict:
    # wandb "offline" writes to <run_dir>/wandb and needs no network or API key; `wandb sync` uploads it later.
    return {"wandb": {"mode": cfg.wandb, "dir": str(run_dir), "name": run_name}} if cfg.wandb != "disabled" else {}


class MetricsLog:
    """One JSON object per line; non-finite floats written as null so the file stays valid JSON."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows the crashed run logged after its last checkpoint (they are logged again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
