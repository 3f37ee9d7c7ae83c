"""DistributedMuon: one rank is torch.optim.Muon bit for bit; N gloo ranks give the same parameters as one rank."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from modeling_speedplm.kernels_speedplm import AUTO_KERNELS, NS_COEFFICIENTS, newton_schulz, newton_schulz_reference
from training.optim import muon
from training.optim.muon import POLAR_EXPRESS_COEFFICIENTS, DistributedMuon, MuonHyperparams, adjusted_lr

# Tall, wide and square matrices; 5 of them, so no world size > 1 used here divides the count.
SHAPES = [(48, 16), (16, 40), (32, 32), (24, 8), (8, 24)]
# Repeated shapes, as in a model (every block has the same matrices): what stacked Newton-Schulz batches.
REPEATED = [(32, 32), (48, 16), (32, 32), (16, 40), (48, 16), (32, 32), (24, 8)]
STEPS = 3


def make_params(shapes=SHAPES):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]


def run(params, optimizer):
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 + step)  # same gradients on every rank, as after DDP's all-reduce
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.02, weight_decay=0.1, momentum=0.95),
        dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False, adjust_lr_fn="match_rms_adamw"),
    ],
)
def test_one_rank_is_torch_muon(hyper):
    ours = make_params()
    theirs = make_params()
    expected = run(theirs, torch.optim.Muon(theirs, **hyper))
    got = run(ours, DistributedMuon(ours, MuonHyperparams(**hyper), kernels="torch", ns_dtype=torch.bfloat16))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert sum((a - p0).abs().sum() for a, p0 in zip(got, make_params())) > 0  # it did move the parameters


def test_cpu_default_orthogonalizes_in_fp32_close_to_bf16():
    """On CPU the default Newton-Schulz runs in fp32 (bf16 matmuls are ~19x slower there): same update up to bf16
    rounding, and not bit-equal (so the precision switch really acts)."""
    fp32, bf16 = make_params(), make_params()
    got = run(fp32, DistributedMuon(fp32, kernels="torch"))
    ref = run(bf16, DistributedMuon(bf16, kernels="torch", ns_dtype=torch.bfloat16))
    assert_same_updates(got, ref, rel=5e-2)  # bf16 rounding: measured 1.6% of the update (3 steps move ~2e-3)
    assert any(not torch.equal(a, b) for a, b in zip(got, ref))


def assert_same_updates(got, want, rel):
    """Compare the UPDATES (parameters minus their start), relative to the update's own size: the parameters are
    O(1) and 3 steps move them by ~0.05, so a tolerance on the parameters would pass with no update at all."""
    for a, b, p0 in zip(got, want, make_params(SHAPES if len(got) == len(SHAPES) else REPEATED)):
        moved = (b - p0).abs().max().item()
        assert moved > 1e-4, "the reference run did not move the parameters"
        torch.testing.assert_close(a - p0, b - p0, rtol=0, atol=rel * moved)


@pytest.mark.parametrize(
    "kernels, use_triton",
    [
        ("auto", None if "newton_schulz" in AUTO_KERNELS else False),
        ("torch", False),
        ("triton", True),
        ("linear_relu2", False),
        ("linear_relu2+newton_schulz", True),
    ],
)
def test_kernels_setting_is_the_model_configs(kernels, use_triton):
    """The trainer passes model.config.kernels: Triton Newton-Schulz iff the selection names it (None: CUDA decides)."""
    assert DistributedMuon([torch.nn.Parameter(torch.zeros(2, 2))], kernels=kernels).use_triton is use_triton
    with pytest.raises(ValueError, match="DistributedMuon: kernels='nope'"):
        DistributedMuon([torch.nn.Parameter(torch.zeros(2, 2))], kernels="nope")


@pytest.mark.parametrize("ns_dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_stacked_newton_schulz_matches_one_at_a_time(ns_dtype, tol, monkeypatch):
    """Same-shape matrices orthogonalised as one stack give the per-matrix result (up to the batched products'
    rounding), and the stacked path really runs (the CPU default is unstacked)."""
    stacked, single = make_params(REPEATED), make_params(REPEATED)
    calls = []
    original = muon.newton_schulz
    recording = lambda G, *a, **kw: calls.append(tuple(G.shape)) or original(G, *a, **kw)  # noqa: E731
    monkeypatch.setattr(muon, "newton_schulz", recording)
    got = run(stacked, DistributedMuon(stacked, kernels="torch", ns_dtype=ns_dtype, stack=True))
    assert calls[:4] == [(3, 32, 32), (2, 48, 16), (16, 40), (24, 8)]  # one call per shape, in first-seen order
    monkeypatch.undo()
    want = run(single, DistributedMuon(single, kernels="torch", ns_dtype=ns_dtype, stack=False))
    assert_same_updates(got, want, rel=tol)


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        DistributedMuon([torch.nn.Parameter(torch.zeros(3))])


# Every recipe-v2 switch on at once (Polar Express, NorMuon, cautious weight decay).
SWITCHES = dict(ns_coefficients=POLAR_EXPRESS_COEFFICIENTS, normuon=True, cautious_weight_decay=True)


def _rank(rank, world, port, out_path, shapes=SHAPES, stack=None, switches=None):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        params = make_params(shapes)
        hyper = MuonHyperparams(lr=0.02, weight_decay=0.1, **(switches or {}))
        optimizer = DistributedMuon(params, hyper, kernels="torch", stack=stack)
        result = run(params, optimizer)
        if switches:  # NorMuon's per-neuron buffers must be the same on every rank (any rank's state resumes)
            result += [optimizer.state[p]["normuon_buffer"] for p in params]
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    "world, shapes, stack, switches",
    [(2, SHAPES, None, None), (3, SHAPES, None, None), (2, REPEATED, True, None), (2, SHAPES, None, SWITCHES)],
)
def test_ranks_split_gives_one_rank_result(world, shapes, stack, switches, tmp_path):
    params = make_params(shapes)
    hyper = MuonHyperparams(lr=0.02, weight_decay=0.1, **(switches or {}))
    optimizer = DistributedMuon(params, hyper, kernels="torch", stack=stack)
    expected = run(params, optimizer)
    if switches:
        expected += [optimizer.state[p]["normuon_buffer"] for p in params]
    args = (world, free_port(), str(tmp_path / "params"), shapes, stack, switches)
    mp.spawn(_rank, args=args, nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"params.{rank}")
        for a, b in zip(got, expected):
            if stack:  # each rank stacks its own share: batched products of another batch size, fp32 rounding
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a, b), f"rank {rank} of {world} differs from the single-rank run"


# ---------------------------------------------------------------------------------------------------- recipe v2


def singular_error(x: torch.Tensor) -> float:
    """max |sigma_i - 1|: how far from orthogonal (all singular values 1)."""
    return (torch.linalg.svdvals(x.double()) - 1).abs().max().item()


def gradient_like(shape, seed=0):
    """A matrix with a decaying spectrum (1 .. 1e-3), as momentum-averaged gradients have."""
    gen = torch.Generator().manual_seed(seed)
    u, _, v = torch.linalg.svd(torch.randn(shape, generator=gen), full_matrices=False)
    return u @ torch.diag(torch.logspace(0, -3, min(shape))) @ v


def test_per_iteration_coefficients():
    g = torch.randn(48, 16)
    same = [NS_COEFFICIENTS] * 5
    assert torch.equal(newton_schulz_reference(g, 5, same), newton_schulz_reference(g, 5, NS_COEFFICIENTS))
    assert not torch.equal(newton_schulz_reference(g, 5, POLAR_EXPRESS_COEFFICIENTS), newton_schulz_reference(g))
    with pytest.raises(ValueError, match="only 5 per-iteration"):
        newton_schulz_reference(g, 6, POLAR_EXPRESS_COEFFICIENTS)
    with pytest.raises(ValueError, match="ns_steps=6"):
        hyper = MuonHyperparams(ns_coefficients=POLAR_EXPRESS_COEFFICIENTS, ns_steps=6)
        DistributedMuon([torch.nn.Parameter(torch.zeros(2, 2))], hyper)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (32, 32)])
def test_polar_express_is_the_published_iteration(shape):
    """Our Polar Express (1.02 folded into the first triple, newton_schulz's Frobenius normalisation) is modded-
    nanogpt's iteration: X / (1.02 ||X||_F), then the 5 published quintics; fp64, so only the eps differs."""
    g = torch.randn(shape, dtype=torch.float64)
    x = g.T if shape[0] > shape[1] else g
    x = x / (x.norm() * 1.02)
    for a, b, c in muon._POLAR_EXPRESS_PUBLISHED:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    want = x.T if shape[0] > shape[1] else x
    got = newton_schulz_reference(g, 5, POLAR_EXPRESS_COEFFICIENTS, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 96)])
@pytest.mark.parametrize("kind", ["gaussian", "gradient-like"])
def test_polar_express_orthogonalizes_better_at_equal_steps(shape, kind):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)) if kind == "gaussian" else gradient_like(shape)
    jordan = singular_error(newton_schulz_reference(g, 5, NS_COEFFICIENTS, dtype=torch.float32))
    polar = singular_error(newton_schulz_reference(g, 5, POLAR_EXPRESS_COEFFICIENTS, dtype=torch.float32))
    assert polar < jordan - 0.03, (polar, jordan)


def test_polar_express_triton_matches_reference():
    pytest.importorskip("triton")
    g = torch.randn(48, 80, device="cuda" if torch.cuda.is_available() else "cpu")  # Triton never on CPU tensors there
    got = newton_schulz(g, 5, POLAR_EXPRESS_COEFFICIENTS, use_triton=True)
    want = newton_schulz_reference(g, 5, POLAR_EXPRESS_COEFFICIENTS)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05 * want.abs().max().item())


def one_step(shapes, seed=7, **hyper):
    """Parameters before and after one DistributedMuon step with MuonHyperparams(**hyper) on fixed gradients."""
    params = make_params(shapes)
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    DistributedMuon(params, MuonHyperparams(**hyper), kernels="torch").step()
    return before, [p.detach().clone() for p in params]


@pytest.mark.parametrize("shape", [(48, 16), (16, 40)])
def test_normuon_equalizes_per_neuron_rms_and_keeps_the_norm(shape):
    lr = 0.02
    before, plain = one_step([shape], lr=lr, weight_decay=0.0)
    _, normed = one_step([shape], lr=lr, weight_decay=0.0, normuon=True)
    step_lr = adjusted_lr(lr, None, shape)
    u_plain, u_norm = (before[0] - plain[0]) / step_lr, (before[0] - normed[0]) / step_lr
    axis = -1 if shape[0] >= shape[1] else -2  # the longer axis holds the neurons NorMuon normalises
    rms_plain, rms_norm = (u.square().mean(dim=axis).sqrt() for u in (u_plain, u_norm))
    assert rms_plain.std() / rms_plain.mean() > 0.02  # plain Muon's per-neuron RMS varies ...
    assert rms_norm.std() / rms_norm.mean() < 1e-4  # ... NorMuon's first step makes it equal
    torch.testing.assert_close(u_norm.norm(), u_plain.norm(), rtol=1e-4, atol=0)  # the update's norm is kept


def test_normuon_second_step_uses_the_ema():
    """Two steps against a direct transcription of NorMuon (second moment EMA with beta2, rescale to the norm)."""
    shape, lr, mu, beta2 = (40, 24), 0.02, 0.95, 0.9
    params = make_params([shape])
    p = params[0]
    ref = p.detach().clone()
    hyper = MuonHyperparams(lr=lr, momentum=mu, weight_decay=0.0, normuon=True, normuon_beta2=beta2)
    opt = DistributedMuon(params, hyper, kernels="torch")
    buf, v = torch.zeros(shape), torch.zeros(shape[0], 1)
    for step in range(2):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        p.grad = grad.clone()
        opt.step()
        buf = buf.lerp(grad, 1 - mu)
        o = newton_schulz_reference(grad.lerp(buf, mu), 5, NS_COEFFICIENTS, dtype=torch.float32)
        v = beta2 * v + (1 - beta2) * o.square().mean(dim=1, keepdim=True)
        scaled = o / v.sqrt()
        ref -= adjusted_lr(lr, None, shape) * scaled * (o.norm() / scaled.norm())
    torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-6)


def test_cautious_weight_decay_skips_opposite_signs():
    lr, wd = 0.05, 0.5
    before, plain = one_step(SHAPES, lr=lr, weight_decay=0.0)
    _, cautious = one_step(SHAPES, lr=lr, weight_decay=wd, cautious_weight_decay=True)
    for p0, p_plain, p_cautious in zip(before, plain, cautious):
        update = p0 - p_plain  # lr_adj * orthogonalised update (the step taken without decay)
        agree = update * p0 >= 0
        assert 0 < agree.sum() < agree.numel()  # both kinds of coordinates occur
        decay = p_cautious - p_plain
        assert torch.equal(decay[~agree], torch.zeros_like(decay[~agree]))  # opposite signs: not decayed
        torch.testing.assert_close(decay[agree], -lr * wd * p0[agree], rtol=1e-5, atol=1e-7)  # same sign: decayed
