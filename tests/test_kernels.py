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
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from modeling_speedplm import SpeedPLMConfig, SpeedPLMForMaskedLM  # noqa: E402
from modeling_speedplm import kernels_speedplm as K  # noqa: E402
from modeling_speedplm.modeling_speedplm import RotaryEmbedding, apply_rotary, positions_from, rms_norm  # noqa: E402,E501

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# triton was imported (by conftest -> model -> torch._dynamo) before TRITON_INTERPRET was set: run in a subprocess.
REEXEC = DEVICE == "cpu" and not K.INTERPRET


@pytest.fixture(autouse=True)
def _interpreter_or_subprocess(request):
    if REEXEC and request.node.name != "test_in_fresh_interpreter":
        pytest.skip("triton imported before TRITON_INTERPRET=1: runs in test_in_fresh_interpreter's subprocess")


LATE_INTERPRETER = """
import os, torch, triton  # triton first, without the variable: its @jit library is compiled-mode
os.environ["TRITON_INTERPRET"] = "1"  # too late for triton
from modeling_speedplm import kernels_speedplm as K
assert not K.INTERPRET, "INTERPRET claims the interpreter although triton was imported before the variable"
try:
    K.xxt(torch.randn(4, 8))
except RuntimeError as err:
    print("refused:", err)
"""


def test_in_fresh_interpreter():
    """The kernels run under the interpreter only if TRITON_INTERPRET=1 came before triton's import: a process that
    set it too late must not claim the interpreter and refuses CPU kernels with that reason (checked in a fresh
    interpreter, every run). If this process is such a one (REEXEC), the module re-runs itself in a fresh one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    late = subprocess.run(
        [sys.executable, "-c", LATE_INTERPRETER], env=env, capture_output=True, text=True, timeout=300
    )
    assert late.returncode == 0, late.stderr[-3000:]
    assert "refused: Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported" in late.stdout
    if not REEXEC:
        assert DEVICE == "cuda" or (K.INTERPRET and triton.knobs.runtime.interpret)  # the kernels run right here
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    """cos, sin (B, L, D/2) fp32: the model's own RotaryEmbedding."""
    return RotaryEmbedding(dim, 10000.0)(position_ids)


def test_interpreter_is_on_without_cuda():
    if DEVICE == "cpu":
        assert triton.knobs.runtime.interpret and K.INTERPRET
        assert sys.modules["torch"] and not REEXEC


# ---------------------------------------------------------------- linear_relu2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, k, m", [((37,), 48, 80), ((2, 13), 32, 24)])
def test_linear_relu2(dtype, lead, k, m):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, k, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(m, k, generator=gen) * k**-0.5).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(*lead, m, generator=gen).to(DEVICE, dtype)
    outs = []
    for fn in (K.linear_relu2, K.linear_relu2_reference):
        y = fn(x, weight)
        gx, gw = torch.autograd.grad(y, (x, weight), grad)
        outs.append((y, gx, gw))
    for got, want in zip(*outs):
        assert_matches(got, want, dtype)
    assert (outs[1][0] == 0).any() and (outs[1][0] > 0).any()  # both ReLU branches are exercised


def test_linear_relu2_strided_input_and_no_grad():
    x = torch.randn(40, 64, device=DEVICE)[3:40:2, ::2]  # (19, 32), no unit stride anywhere
    weight = torch.randn(24, 32, device=DEVICE)
    with torch.no_grad():  # no pre-activation stored
        assert_matches(K.linear_relu2(x, weight), K.linear_relu2_reference(x, weight), torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # casts like nn.Linear does under autocast
        assert_matches(K.linear_relu2(x, weight), K.linear_relu2_reference(x, weight), torch.bfloat16)


# ---------------------------------------------------------------- qk_norm_rotary


def qk_inputs(dtype, batch=2, length=13, heads=3, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(batch, length, 3, heads, dim, generator=gen) * 3).to(DEVICE, dtype)
    q, k, _ = qkv.unbind(2)  # strided views of a fused qkv output, as in SpeedPLMAttention
    documents = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2, [0] * 9 + [1] * 4], device=DEVICE)[:batch, :length]
    cos, sin = rotary_tables(positions_from(documents), dim)  # positions restart at 0 for every protein
    return q.detach().requires_grad_(), k.detach().requires_grad_(), cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rotary(dtype):
    q, k, cos, sin = qk_inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    gq, gk = (torch.randn(q.shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    outs = []
    for fn in (K.qk_norm_rotary, K.qk_norm_rotary_reference):
        qo, ko = fn(q, k, cos, sin, 1e-6)
        outs.append((qo, ko, *torch.autograd.grad((qo, ko), (q, k), (gq, gk))))
    for got, want in zip(*outs):
        assert_matches(got, want, dtype)


def test_qk_twin_is_the_model_code():
    q, k, cos, sin = qk_inputs(torch.float32)
    want = [apply_rotary(rms_norm(t, 1e-6), cos, sin) for t in (q, k)]  # the model's (B, L, H, D) path
    for got, w in zip(K.qk_norm_rotary_reference(q, k, cos, sin, 1e-6), want):
        assert torch.equal(got, w)


def test_qk_positions_restart_per_protein():
    # The second protein of row 0 (tokens 5..10) must come out exactly as if it started its own row.
    q, k, cos, sin = qk_inputs(torch.float32)
    packed, _ = K.qk_norm_rotary(q, k, cos, sin, 1e-6)
    alone_q, alone_k = q[:1, 5:11].detach(), k[:1, 5:11].detach()
    c, s = rotary_tables(torch.arange(6, device=DEVICE)[None], q.shape[-1])
    alone, _ = K.qk_norm_rotary(alone_q, alone_k, c, s, 1e-6)
    torch.testing.assert_close(packed[:1, 5:11], alone, rtol=1e-6, atol=1e-6)


def test_broken_kernels_are_caught():
    """The comparisons are sharp enough to see a sign error: rotating the wrong way (sin -> -sin) or a wrong ReLU
    side must fail (manually also checked by flipping a sign inside the Triton backward kernel)."""
    q, k, cos, sin = qk_inputs(torch.float32)
    wrong_q, _ = K.qk_norm_rotary(q, k, cos, -sin, 1e-6)
    with pytest.raises(AssertionError):
        assert_matches(wrong_q, K.qk_norm_rotary_reference(q, k, cos, sin, 1e-6)[0], torch.bfloat16)
    x, weight = torch.randn(8, 16, device=DEVICE), torch.randn(32, 16, device=DEVICE)
    with pytest.raises(AssertionError):
        assert_matches(K.linear_relu2(x, -weight), K.linear_relu2_reference(x, weight), torch.bfloat16)


# ---------------------------------------------------------------- torch.library registration / torch.compile


def test_custom_ops_pass_opcheck():
    x, weight = torch.randn(19, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE)
    torch.library.opcheck(torch.ops.speedplm.linear_relu2, (x.requires_grad_(), weight, True))
    q, k, cos, sin = qk_inputs(torch.float32, batch=1, length=5, heads=2, dim=8)
    torch.library.opcheck(torch.ops.speedplm.qk_norm_rotary, (q, k, cos, sin, 1e-6))
    a = torch.randn(20, 12, device=DEVICE)
    torch.library.opcheck(torch.ops.speedplm.xxt, (a, 1.0, 0.0, None))


def test_compiles_fullgraph():
    # aot_eager traces both ops with their fake kernels and autograd formulas (inductor is exercised on the GPU).
    q, k, cos, sin = qk_inputs(torch.float32, batch=1, length=5, heads=2, dim=8)
    weight = torch.randn(8, 16, device=DEVICE, requires_grad=True)

    def f(q, k, weight):
        qo, ko = K.qk_norm_rotary(q, k, cos, sin, 1e-6)
        return K.linear_relu2((qo + ko).flatten(2), weight).sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, weight)
    grads = torch.autograd.grad(loss, (q, k, weight))
    want = torch.autograd.grad(f(q, k, weight), (q, k, weight))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


@pytest.mark.slow
def test_model_blocks_compiled_with_inductor_train_like_eager():
    """The trainer's regional compile (each block, inductor) with the Triton ops inside: no graph break, no recompile
    after the first step, and the same losses as eager over two optimizer steps."""
    from torch._dynamo.utils import counters

    def run(compile_blocks):
        torch.manual_seed(0)
        config = SpeedPLMConfig.from_preset("tiny", kernels="triton", num_hidden_layers=2, value_embeddings=1)
        model = SpeedPLMForMaskedLM(config).to(DEVICE).train()
        if compile_blocks:
            for block in model.model.layers:
                block.compile()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(4, 24, (1, 48), generator=gen).to(DEVICE)
        docs = torch.zeros(1, 48, dtype=torch.int32, device=DEVICE)
        docs[:, 20:] = 1
        labels = torch.where(torch.rand(1, 48, generator=gen).to(DEVICE) < 0.3, ids, -100)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, graphs = [], []
        for _ in range(3):
            loss = model(input_ids=ids, document_ids=docs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            graphs.append(counters["stats"]["unique_graphs"])
        return losses, graphs

    torch._dynamo.reset()
    counters.clear()
    eager, _ = run(False)
    compiled, graphs = run(True)
    assert sum(counters["graph_break"].values()) == 0
    assert graphs[0] == graphs[-1] == 2  # block 0 (its input is x0) and block 1; nothing recompiles afterwards
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    assert eager[-1] < eager[0]
    torch._dynamo.reset()


# ---------------------------------------------------------------- xxt and Newton-Schulz


@pytest.mark.parametrize("dtype", DTYPES)
def test_xxt(dtype):
    x = torch.randn(40, 72, device=DEVICE).to(dtype)  # 40 rows: 3 tile rows, the last one partial
    assert_matches(K.xxt(x), K.xxt_reference(x), dtype)
    a = K.xxt_reference(x) / 72
    assert_matches(K.xxt(a, -4.775, 2.0315, a), K.xxt_reference(a, -4.775, 2.0315, a), dtype)
    assert_matches(K.xxt(x.T[:, :30].T), K.xxt_reference(x[:30]), dtype)  # strided input (NS transposes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_xxt_batched(dtype):
    # A stack of 3 matrices in one launch: each slice equals its own 2-D product (strided stack included).
    x = torch.randn(3, 40, 24, device=DEVICE).to(dtype)
    got = K.xxt(x)
    assert got.shape == (3, 40, 40)
    for i in range(3):
        assert_matches(got[i], K.xxt_reference(x[i]), dtype)
    a = K.xxt_reference(x) / 24
    assert_matches(K.xxt(a, -4.775, 2.0315, a), K.xxt_reference(a, -4.775, 2.0315, a), dtype)
    assert_matches(K.xxt(x.mT.contiguous().mT[:, :30]), K.xxt_reference(x[:, :30]), dtype)


@pytest.mark.parametrize("shape", [(3, 48, 80), (2, 80, 48)])
def test_newton_schulz_batched(shape):
    g = torch.randn(*shape, device=DEVICE)
    got, want = K.newton_schulz(g, use_triton=True), K.newton_schulz_reference(g)
    assert got.shape == g.shape
    for i in range(shape[0]):  # each matrix orthogonalised on its own: as the 2-D twin, up to bf16 rounding
        one = K.newton_schulz_reference(g[i])
        torch.testing.assert_close(want[i].float(), one.float(), rtol=0, atol=0.02 * one.abs().max().item())
        torch.testing.assert_close(got[i].float(), one.float(), rtol=0, atol=0.05 * one.abs().max().item())
    # the torch twin's batched path in fp32 equals its 2-D path in fp32 slice by slice
    want32 = K.newton_schulz_reference(g, dtype=torch.float32)
    for i in range(shape[0]):
        torch.testing.assert_close(
            want32[i], K.newton_schulz_reference(g[i], dtype=torch.float32), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_newton_schulz(shape):
    g = torch.randn(*shape, device=DEVICE)
    got, want = K.newton_schulz(g, use_triton=True), K.newton_schulz_reference(g)
    assert got.shape == g.shape and got.dtype == torch.bfloat16
    # Different bf16 rounding of intermediates compounds over 5 iterations; the twin itself is ~2% off fp64.
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05 * want.abs().max().item())
    singular = torch.linalg.svdvals(got.float())
    assert singular.min() > 0.5 and singular.max() < 1.5  # orthogonalized: singular values pushed into ~[0.7, 1.2]


def test_newton_schulz_twin_is_torch_muon():
    zeropower = getattr(torch.optim._muon, "_zeropower_via_newtonschulz", None)
    if zeropower is None:
        pytest.skip("torch.optim._muon._zeropower_via_newtonschulz not in this torch")
    for shape in [(48, 80), (80, 48)]:
        g = torch.randn(*shape)
        assert torch.equal(K.newton_schulz_reference(g), zeropower(g, K.NS_COEFFICIENTS, 5, 1e-7))


# ---------------------------------------------------------------- selection


def test_select_kernels(monkeypatch):
    assert K.select_kernels("torch", DEVICE).linear_relu2 is K.linear_relu2_reference
    assert K.select_kernels("triton", "cpu").qk_norm_rotary is K.qk_norm_rotary
    assert K.select_kernels("auto", "cpu").name == "torch"
    auto = K.select_kernels("auto", DEVICE)
    assert (auto.linear_relu2 is K.linear_relu2) == (DEVICE == "cuda" and "linear_relu2" in K.AUTO_KERNELS)
    assert (auto.qk_norm_rotary is K.qk_norm_rotary) == (DEVICE == "cuda" and "qk_norm_rotary" in K.AUTO_KERNELS)
    # a subset: Triton for the named kernels, the torch twins for the others
    some = K.select_kernels("qk_norm_rotary+newton_schulz", "cpu")
    assert some.name == "qk_norm_rotary+newton_schulz"
    assert some.qk_norm_rotary is K.qk_norm_rotary and some.linear_relu2 is K.linear_relu2_reference
    for bad in ("fast", "linear_relu2+bogus", "linear_relu2+linear_relu2", "", "+"):
        with pytest.raises(ValueError, match="'auto', 'triton', 'torch' or a '\\+'-joined subset"):
            K.select_kernels(bad, DEVICE)
    monkeypatch.setattr(K, "HAS_TRITON", False)
    assert K.select_kernels("auto", DEVICE).name == "torch"
    for named in ("triton", "linear_relu2"):
        with pytest.raises(RuntimeError, match="needs the `triton` package"):
            K.select_kernels(named, DEVICE)


# ---------------------------------------------------------------- full size, GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_size_linear_relu2():
    x = torch.randn(8192, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(2048, 768, device="cuda") * 768**-0.5).bfloat16().requires_grad_()
    grad = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (K.linear_relu2, K.linear_relu2_reference):
        y = fn(x, weight)
        outs.append((y, *torch.autograd.grad(y, (x, weight), grad)))
    for got, want in zip(*outs):
        assert_matches(got, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_size_qk_norm_rotary_and_compile():
    batch, length, heads, dim = 8, 1024, 6, 128
    qkv = torch.randn(batch, length, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k = (t.detach().requires_grad_() for t in qkv.unbind(2)[:2])  # strided views, as in the model
    documents = torch.arange(length, device="cuda").div(300, rounding_mode="floor").expand(batch, length)
    cos, sin = rotary_tables(positions_from(documents), dim)
    grads = torch.randn(2, batch, length, heads, dim, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(K.qk_norm_rotary, fullgraph=True)
    outs = []
    for fn in (K.qk_norm_rotary, compiled, K.qk_norm_rotary_reference):
        qo, ko = fn(q, k, cos, sin, 1e-6)
        outs.append((qo, ko, *torch.autograd.grad((qo, ko), (q, k), tuple(grads))))
    for i in (0, 1):
        for got, want in zip(outs[i], outs[2]):
            assert_matches(got, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(768, 768), (768, 2048), (2048, 768)])
def test_full_size_newton_schulz(shape):
    g = torch.randn(*shape, device="cuda")
    x = g.bfloat16()
    assert_matches(K.xxt(x), K.xxt_reference(x), torch.bfloat16)
    got, want = K.newton_schulz(g, use_triton=True), K.newton_schulz_reference(g)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05 * want.abs().max().item())


def test_model_with_triton_kernels_matches_torch_kernels():
    """The whole model, kernels=triton (interpreter on CPU) vs kernels=torch: logits and every gradient."""
    from conftest import randomized_tiny_model

    ids = torch.tensor([[0, 20, 15, 7, 4, 11, 5, 9, 13, 6, 2, 0, 18, 7, 17, 16, 2, 1, 1]])
    doc = torch.tensor([[0] * 11 + [1] * 6 + [-1] * 2], dtype=torch.int32)
    labels = torch.full_like(ids, -100)
    labels[0, [3, 8, 14]] = ids[0, [3, 8, 14]]
    ids, doc, labels = ids.to(DEVICE), doc.to(DEVICE), labels.to(DEVICE)  # with CUDA, Triton on CUDA tensors only
    results = {}
    for choice in ("torch", "triton"):
        model = randomized_tiny_model(seed=5, kernels=choice).to(DEVICE)  # the kernel set is resolved when built
        assert model.model.kernels.name == choice
        out = model(ids, document_ids=doc, labels=labels)
        out.loss.backward()
        results[choice] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
