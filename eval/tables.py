"""The one markdown-table helper of the benchmark scripts (every table they print or write goes through it)."""


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
