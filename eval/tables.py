"""The one markdown-table helper of the benchmark scripts (every table they print or write goes through it), and
the names and machine description that stand beside those tables."""

import os
import platform


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
