"""The one markdown-table helper of the benchmark scripts (every table they print or write goes through it), and
the names and machine description that stand beside those tables."""

import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cell(value) -> str:
    """Default cell text: floats with 4 decimals (thousands separated above 1000), ints separated, the rest as is."""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def markdown_table(rows: list, columns: list, fmt=cell) -> str:
    """A GitHub markdown table. `rows`: dicts keyed by `columns`, or sequences in the order of `columns`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = [row[c] for c in columns] if isinstance(row, dict) else list(row)
        lines.append("| " + " | ".join(fmt(v) for v in values) + " |")
    return "\n".join(lines)


def hardware(accelerator=None) -> str:
    """The machine a table was measured on: CPU model and cores, torch and its threads, GPU, processes."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name(0)}"
    if accelerator is not None:
        text += f"; {accelerator.num_processes} process(es) on {accelerator.device.type}"
        if accelerator.mixed_precision != "no":
            text += f", {accelerator.mixed_precision} autocast"
    return text


def short_name(name: str) -> str:
    parts = [p for p in str(name).rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) if parts else str(name)


def git_commit() -> str:
    """HEAD of the checkout that ran ("+dirty" when tracked code differs from it), or "unknown (not a git checkout)"."""

    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    # the published outputs (README.md, docs/) are what a regeneration writes: only code makes a checkout "+dirty"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)README.md", ":(exclude)docs")
    return commit + ("+dirty" if changed else "")


def stamp(command: str) -> list[str]:
    """Markdown lines to stand under a published table: commit, UTC date, machine (with its load when the table
    was made: a busy machine slows every timing) and the exact command that regenerates it."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = hardware()
    if hasattr(os, "getloadavg"):
        machine += "; load average {:.2f} / {:.2f} / {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
    lines = [f"Commit: `{git_commit()}`", f"Date: {date}", f"Machine: {machine}", f"Command: `{command}`"]
    return [part for line in lines for part in (line, "")]
