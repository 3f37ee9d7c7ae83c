"""`python -m eval.perf.kernel_compile_check`: every Triton kernel lowers to sm_90 code (triton's ptxas) with
the launchers' real specialisation, on a machine without a GPU. The interpreter tests cannot catch a compile error."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("_linear_relu2_kernel", "_qk_norm_rotary_kernel", "_xxt_kernel")


def run_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    return subprocess.run(
        [sys.executable, "-m", "eval.perf.kernel_compile_check", "--arch", "90", "--dtype", "bfloat16", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| sm_")]


def test_every_kernel_compiles_for_hopper_and_fits_shared_memory():
    proc = run_check()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = rows(proc.stdout)
    by_kernel = {name: [r for r in table if r[1] == name] for name in KERNELS}
    assert len(by_kernel["_linear_relu2_kernel"]) >= 2 * 4  # every autotune config, with and without STORE_PRE
    assert len(by_kernel["_qk_norm_rotary_kernel"]) == 4  # forward and backward, 6 x 128 and 20 x 64 heads
    assert {r[3].count("'BLOCK': 128") for r in by_kernel["_xxt_kernel"]} == {0, 1}  # 64- and 128-wide tiles
    for row in table:
        shared, spill = int(row[5]), int(row[7])
        assert 0 <= shared <= 232_448 and row[8] == "yes", row
        assert spill == 0, row  # register spills would turn these memory-bound kernels into local-memory traffic
    assert "0 failures" in proc.stdout


def test_check_fails_when_nothing_fits():
    # The same check with a 16 KiB shared-memory budget: the matmul tiles cannot fit, and the exit status says so.
    proc = run_check("--shared-limit", "16384")
    assert proc.returncode == 1
    assert "FAILED: sm_90 _linear_relu2_kernel torch.bfloat16: no autotune config fits" in proc.stderr
    assert "FAILED: sm_90 _xxt_kernel" in proc.stderr
