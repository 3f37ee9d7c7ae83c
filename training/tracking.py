"""Where metrics go: `metrics.jsonl` in the run dir (always) and Accelerate's trackers (wandb, tensorboard).

Only the main process writes. Secrets never pass through here: the logged config is the run config, which holds
no token (tokens come from the environment only).
"""

import importlib
import importlib.util
import json
import math
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from .config import TrackingSection


def tracker_names(cfg: TrackingSection) -> list[str]:
    names = []
    if cfg.wandb != "disabled":
        names.append("wandb")
    if cfg.tensorboard:  # importable: checked at start (tracking_problems)
        names.append("tensorboard")
    return names


def tracking_problems(cfg: TrackingSection) -> list[str]:
    """What keeps the configured trackers from starting, one message per key, checked before the run writes
    anything: wandb installed (and, for online, logged in: an API key in WANDB_API_KEY or wandb's netrc entry; no
    network needed), tensorboard importable. Never reads out or logs the key itself."""
    problems = []
    if cfg.wandb != "disabled" and importlib.util.find_spec("wandb") is None:
        problems.append(
            f"tracking.wandb={cfg.wandb}: wandb is not installed (pip install wandb, or tracking.wandb=disabled)"
        )
    elif cfg.wandb == "online" and not _wandb_logged_in():
        host = _wandb_host()
        problems.append(
            f"tracking.wandb=online: no wandb login (neither WANDB_API_KEY nor a netrc entry for {host}); run "
            f"`wandb login`, or use tracking.wandb=offline (no network; `wandb sync` uploads later)"
        )
    if cfg.tensorboard:
        try:  # what accelerate's TensorBoardTracker imports
            importlib.import_module("torch.utils.tensorboard")
        except ImportError as err:
            try:
                importlib.import_module("tensorboardX")
            except ImportError:
                problems.append(
                    f"tracking.tensorboard=true: tensorboard cannot be imported ({err}); pip install tensorboard, "
                    f"or tracking.tensorboard=false"
                )
    return problems


def _wandb_host() -> str:
    return urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators(_wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def tracker_init_kwargs(cfg: TrackingSection, run_dir: Path, run_name: str) -> dict:
    # wandb "offline" writes to <run_dir>/wandb and needs no network or API key; `wandb sync` uploads it later.
    return {"wandb": {"mode": cfg.wandb, "dir": str(run_dir), "name": run_name}} if cfg.wandb != "disabled" else {}


class MetricsError(ValueError):
    pass


class MetricsLog:
    """One JSON object per line, each carrying the run's `run_id`; non-finite floats written as null so the file
    stays valid JSON. Only the main process writes (enabled=True)."""

    def __init__(self, path: Path, enabled: bool, run_id: str):
        self.path, self.enabled, self.run_id = Path(path), enabled, run_id

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({**clean, "run_id": self.run_id}) + "\n")

    @staticmethod
    def read(path: Path) -> tuple[list[dict], int | None]:
        """The rows of a metrics file and the line number of a torn last line (a write cut short by a crash), or
        None. Any other line that is not a JSON object raises MetricsError naming the file and line."""
        if not Path(path).exists():
            return [], None
        lines = Path(path).read_bytes().split(b"\n")
        rows, torn = [], None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode())
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if any(rest.strip() for rest in lines[number:]):
                    raise MetricsError(f"{path}:{number}: not a metrics row ({err}); fix or delete that line") from None
                torn = number
                continue
            rows.append(row)
        return rows, torn

    def rewrite(self, rows: list[dict]) -> None:
        """Replace the file by `rows` (on resume: the history up to the checkpoint)."""
        if self.enabled:
            self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))
