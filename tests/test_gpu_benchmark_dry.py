"""`python -m eval.perf.gpu_benchmark --dry-run`: every section runs on CPU (tiny shapes, Triton interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    proc = subprocess.run(
        [sys.executable, "-m", "eval.perf.gpu_benchmark", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,  # ~75 s alone; several times that on a loaded 2-core machine
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    for title in ("## Parity", "## Per-kernel time", "## Newton-Schulz", "## Attention", "## End-to-end train step"):
        assert title in out
    e2e = out[out.index("## End-to-end") :].splitlines()  # title, blank, markdown header, |---|, rows
    assert e2e[3].startswith("|---|")
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in e2e[4:7]]
    assert [row[0] for row in rows] == ["torch", "triton", "linear_relu2"]  # kernels off, on, one
    for row in rows:  # the same model, data and seed: the same losses whichever kernels run
        assert row[-3:] == rows[0][-3:]
    assert "sdpa (dense bool mask)" in out and "flex_attention" in out
    assert out.rstrip().splitlines()[-1].startswith("total")  # tables come last
    for kernel in ("linear_relu2", "qk_norm_rotary", "xxt", "newton_schulz"):
        assert kernel in out
    assert "CHECK" not in out and "failed" not in out
