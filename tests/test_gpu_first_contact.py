"""eval.perf.gpu_first_contact (issue #23) on CPU: the dry run end to end, a part killed over its budget, the import
chain without the packages a GPU image lacks; the attention inputs' dtype under bf16 autocast; the per-SKU peak table.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_speedplm import attention_speedplm as A
from training.throughput import peak_flops, sku_peak

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("wandb", "datasets", "evaluate", "aaanalysis", "sklearn")


@pytest.fixture(scope="module")
def builtin_data(tmp_path_factory) -> Path:
    """The built-in proteins prepared as the README says (the GPU node gets this folder carried along)."""
    prepared = ROOT / "data" / "builtin"
    if (prepared / "test" / "manifest.json").exists():
        return prepared
    out = tmp_path_factory.mktemp("data") / "builtin"
    subprocess.run(
        [sys.executable, "-m", "training.data", "prepare", "--builtin", "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def first_contact(out: Path, data: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it for its children
    return subprocess.run(
        [sys.executable, "-m", "eval.perf.gpu_first_contact", str(out), "--dry-run", "--data", str(data), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def part_rows(summary: str) -> dict[str, str]:
    """part name -> status, from summary.md's parts table."""
    rows = {}
    section = summary.split("## Parts", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] and cells[0][0] in "abcde" and cells[0] != "part":
            rows[cells[0]] = cells[2]
    return rows


def test_dry_run_end_to_end(tmp_path, builtin_data):
    out = tmp_path / "out"
    proc = first_contact(out, builtin_data, "--budget", "a=120,b=120,c=300,d=150,e=200", "--total", "890")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    status = part_rows(summary)
    assert set(status) == {"a", "b", "c-torch", "c-torch+fp8", "c-linear_relu2", "c-newton_schulz", "d", "e"}, status
    assert all(s == "ok" for s in status.values()), status
    for part in "abcde":
        assert (out / f"{part}.md").read_text().startswith(f"## {part}.")
    c_rows = [
        line for line in (out / "c.md").read_text().splitlines() if line.startswith("| ") and "tokens/s" not in line
    ]
    assert [r.split("|")[1].strip() for r in c_rows] == ["torch", "torch+fp8", "linear_relu2", "newton_schulz"]
    losses = {r.split("|")[1].strip(): r.split("|")[12].strip() for r in c_rows}
    losses.pop("torch+fp8")  # FP8 rounds (tests/test_fp8.py); after 3 tiny steps from a zero-init MLP it barely shows
    assert len(set(losses.values())) == 1, losses  # same data, seed and model: the kernels change speed, not numbers
    fp8 = summary.split("## FP8", 1)[1].split("\n## ", 1)[0]
    assert "| torch+fp8 |" in fp8 and "| 0.0000 |" in fp8, fp8  # on CPU both paths are the twin: parity exact
    assert (out / "d" / "metrics.jsonl").exists() and "| 4 | valid |" in (out / "d.md").read_text()
    assert "Decision" in summary and "AUTO_KERNELS" in summary and "FP8" in summary
    decision = summary.split("## Decision", 1)[1].split("\n## ", 1)[0]
    assert "CHECK" not in decision, decision  # parity ok for every kernel, the all-on set included
    pre = (out / "a.md").read_text()
    assert "flex mixed dtypes" in pre and "all bfloat16" in pre and "FAILED" not in pre


def test_part_over_budget_is_killed_and_the_next_part_runs(tmp_path, builtin_data):
    """Part c gets 3 s: its child is SIGKILLed mid-start; a and b's tables and the summary stay, d still runs."""
    out = tmp_path / "out"
    proc = first_contact(out, builtin_data, "--parts", "a,b,c,d", "--budget", "a=120,b=120,c=3,d=150")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a part was killed: not a clean run
    status = part_rows((out / "summary.md").read_text())
    assert status["a"] == "ok" and status["b"] == "ok", status
    assert status["c-torch"].startswith("KILLED: over its budget of 3 s"), status
    assert all(status[f"c-{v}"].startswith("SKIPPED") for v in ("linear_relu2", "newton_schulz")), status
    assert status["d"] == "ok", status  # the part after the killed one ran
    assert (out / "a.md").exists() and (out / "b.md").exists() and not (out / "c.md").exists()
    summary = (out / "summary.md").read_text()
    assert "### c-torch: KILLED" in summary  # with its log tail
    assert "kernels=torch was not measured" in summary


BLOCKER = """
import importlib.machinery, sys
HIDDEN = {hidden!r}
class NotInstalled(importlib.machinery.PathFinder):  # as if these packages were not installed at all
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in HIDDEN else super().find_spec(name, path, target)
sys.meta_path[:] = [NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import importlib
for module in {modules!r}:
    importlib.import_module(module)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
assert not leaked, leaked
print("imported", len({modules!r}))
"""


def test_first_contact_imports_without_wandb_datasets_evaluate_aaanalysis_sklearn():
    from eval.perf.gpu_first_contact import NEEDED_MODULES

    modules = [*NEEDED_MODULES, "eval.perf.gpu_first_contact", "training.metrics"]
    code = BLOCKER.format(hidden=HIDDEN, modules=modules)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imported {len(modules)}" in proc.stdout


def test_attention_backend_gets_one_dtype_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the fp32 value-embedding table makes v fp32 (and the torch RMSNorm/rotary can make q, k
    fp32); the model casts q, k, v to the projection's dtype before the backend. Recorded at the backend itself,
    through the attention interface the model dispatches on."""
    from conftest import randomized_tiny_model

    seen = []
    for backend in ("sdpa", "flex_attention", "eager"):
        original = A.ALL_ATTENTION_FUNCTIONS.get_interface(backend, A.eager_attention_forward)

        def recording(module, q, k, v, *rest, _original=original, _backend=backend, **kw):
            seen.append((_backend, q.dtype, k.dtype, v.dtype))
            return _original(module, q, k, v, *rest, **kw)

        monkeypatch.setitem(A.ALL_ATTENTION_FUNCTIONS, backend, recording)
    ids = torch.randint(4, 24, (2, 24), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24], dtype=torch.int32)
    for backend, grad in (("sdpa", True), ("flex_attention", False), ("eager", True)):  # flex: no CPU backward
        model = randomized_tiny_model(seed=1, kernels="torch", attn_implementation=backend)
        assert model.config.value_embeddings and model.config.qk_norm  # the paths that produced fp32
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, document_ids=docs, labels=ids)
        if grad:
            out.loss.backward()
    backends = {s[0] for s in seen}
    assert backends == {"sdpa", "flex_attention", "eager"}, backends
    for backend, *dtypes in seen:
        assert dtypes == [torch.bfloat16] * 3, (backend, dtypes)


def test_attention_dtypes_unchanged_in_fp32():
    from conftest import randomized_tiny_model

    model = randomized_tiny_model(seed=1, kernels="torch")
    ids = torch.randint(4, 24, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(ids).logits
    assert a.dtype == torch.float32 and torch.isfinite(a).all()


@pytest.mark.parametrize(
    "name, sku, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "H100 NVL", 835),
        ("NVIDIA H200", "H200 SXM", 989),
        ("NVIDIA H200 NVL", "H200 NVL", 835),
        ("NVIDIA GH200 480GB", "GH200", 989),
        ("NVIDIA A100-SXM4-80GB", "A100", 312),
        ("NVIDIA A100 80GB PCIe", "A100", 312),
        ("NVIDIA B200", "B200", 2250),
        ("NVIDIA GB200", "GB200", 2500),
        ("NVIDIA GeForce GTX 1080", None, None),
    ],
)
def test_peak_table_by_device_name(name, sku, tflops):
    found = sku_peak(name)
    if sku is None:
        assert found is None
    else:
        assert found == (sku, tflops * 1e12)


def test_peak_override_and_cpu():
    assert peak_flops(torch.device("cpu"), None) is None  # no MFU on CPU
    assert peak_flops(torch.device("cpu"), 500.0) == 500e12  # train.peak_tflops wins everywhere


def test_cuda_refuses_fp32_unless_asked():
    """A plain `python train_accelerate.py` on CUDA would train in fp32: refused (exit 2 via ConfigError)."""
    from types import SimpleNamespace

    from training.config import ConfigError, load_config
    from training.trainer import refuse_silent_fp32

    cuda_fp32 = SimpleNamespace(device=torch.device("cuda"), mixed_precision="no")  # what Accelerator() reports
    with pytest.raises(ConfigError, match="train.allow_fp32=true"):
        refuse_silent_fp32(cuda_fp32, allow_fp32=False)
    refuse_silent_fp32(cuda_fp32, allow_fp32=True)
    refuse_silent_fp32(SimpleNamespace(device=torch.device("cuda"), mixed_precision="bf16"), allow_fp32=False)
    refuse_silent_fp32(SimpleNamespace(device=torch.device("cpu"), mixed_precision="no"), allow_fp32=False)
    assert load_config(None, ["train.allow_fp32=true"]).train.allow_fp32 is True
