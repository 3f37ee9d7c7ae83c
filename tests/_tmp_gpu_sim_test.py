"""Triton kernels vs their torch twins, forward and backward, fp32 and bf16, odd sizes.

Without CUDA the kernels run under the Triton interpreter (~1000x slower). TRITON_INTERPRET=1 must be set before the
first `import triton` anywhere in the process (importing torch first is fine). tests/conftest.py imports the model,
whose flex-attention import pulls in torch._dynamo and with it triton; if that happened without the variable, this
module re-runs itself in a fresh `pytest` subprocess with it set (test_in_fresh_interpreter) and skips in place.
With CUDA the same tests run compiled on the GPU, plus the full-size `gpu` tests at the bottom.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from modeling_speedplm import kernels_speedplm as K  # noqa: E402
from modeling_speedplm.modeling_speedplm import apply_rotary, positions_from, rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton was imported (by conftest -> model -> torch._dynamo) before TRITON_INTERPRET was set: run in a subprocess.
REEXEC = DEVICE == "cpu" and not K.INTERPRET


@pytest.fixture(autouse=True)
def _interpreter_or_subprocess(request):
    if REEXEC and request.node.name != "test_in_fresh_interpreter":
        pytest.skip("triton imported before TRITON_INTERPRET=1: runs in test_in_fresh_interpreter's subprocess")


def test_in_fresh_interpreter():
    if not REEXEC:
        pytest.skip("the kernels run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# Relative to the largest reference value. bf16 has 8 mantissa bits (2^-8 = 0.004 per rounding); the twin rounds
# intermediates the kernels keep in fp32, so allow a few roundings. A sign or index error is an O(1) error.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


def rotary_tables(position_ids: torch.Tensor, dim: int):
    """cos, sin (B, L, D/2) fp32, as the model's RotaryEmbedding computes them."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    return freqs.cos(), freqs.sin()


def test_interpreter_is_on_without_cuda():
    if DEVICE == "cpu":
        assert triton.knobs.runtime.interpret and K.INTERPRET
        assert sys.modules["torch"] and not REEXEC


# ---------------------------------------------------------------- full size, GPU only

@pytest.mark.gpu
def test_full_size_linear_relu2():
    x = torch.randn(48, 32, device="cpu", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(40, 32, device="cpu") * 32**-0.5).bfloat16().requires_grad_()
    grad = torch.randn(48, 40, device="cpu", dtype=torch.bfloat16)
    outs = []
    for fn in (K.linear_relu2, K.linear_relu2_reference):
        y = fn(x, weight)
        outs.append((y, *torch.autograd.grad(y, (x, weight), grad)))
    for got, want in zip(*outs):
        assert_matches(got, want, torch.bfloat16)


@pytest.mark.gpu
def test_full_size_qk_norm_rotary_and_compile():
    batch, length, heads, dim = 2, 24, 3, 16
    qkv = torch.randn(batch, length, 3, heads, dim, device="cpu", dtype=torch.bfloat16)
    q, k = (t.detach().requires_grad_() for t in qkv.unbind(2)[:2])  # strided views, as in the model
    documents = torch.arange(length, device="cpu").div(10, rounding_mode="floor").expand(batch, length)
    cos, sin = rotary_tables(positions_from(documents), dim)
    grads = torch.randn(2, batch, length, heads, dim, device="cpu", dtype=torch.bfloat16)
    compiled = torch.compile(K.qk_norm_rotary, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (K.qk_norm_rotary, compiled, K.qk_norm_rotary_reference):
        qo, ko = fn(q, k, cos, sin, 1e-6)
        outs.append((qo, ko, *torch.autograd.grad((qo, ko), (q, k), tuple(grads))))
    for i in (0, 1):
        for got, want in zip(outs[i], outs[2]):
            assert_matches(got, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(768, 768), (768, 2048), (40, 32)])
def test_full_size_newton_schulz(shape):
    g = torch.randn(*shape, device="cpu")
    x = g.bfloat16()
    assert_matches(K.xxt(x), K.xxt_reference(x), torch.bfloat16)
    got, want = K.newton_schulz(g, use_triton=True), K.newton_schulz_reference(g)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05 * want.abs().max().item())
