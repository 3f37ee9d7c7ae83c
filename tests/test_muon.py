"""DistributedMuon: one rank is torch.optim.Muon bit for bit; N gloo ranks give the same parameters as one rank."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from training import muon
from training.muon import DistributedMuon

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
    got = run(ours, DistributedMuon(ours, kernels="torch", ns_dtype=torch.bfloat16, **hyper))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert sum((a - p0).abs().sum() for a, p0 in zip(got, make_params())) > 0  # it did move the parameters


def test_cpu_default_orthogonalizes_in_fp32_close_to_bf16():
    """On CPU the default Newton-Schulz runs in fp32 (bf16 matmuls are ~19x slower there): same update up to bf16
    rounding, and not bit-equal (so the precision switch really acts)."""
    fp32, bf16 = make_params(), make_params()
    got = run(fp32, DistributedMuon(fp32, kernels="torch"))
    ref = run(bf16, DistributedMuon(bf16, kernels="torch", ns_dtype=torch.bfloat16))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * b.abs().max().item())
    assert any(not torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize(
    "kernels, use_triton",
    [("auto", None), ("torch", False), ("triton", True), ("linear_relu2", False), ("linear_relu2+newton_schulz", True)],
)
def test_kernels_setting_is_the_model_configs(kernels, use_triton):
    """The trainer passes model.config.kernels: Triton Newton-Schulz iff the selection names it (None: CUDA decides)."""
    assert DistributedMuon([torch.nn.Parameter(torch.zeros(2, 2))], kernels=kernels).use_triton is use_triton
    with pytest.raises(ValueError, match="DistributedMuon: kernels='nope'"):
        DistributedMuon([torch.nn.Parameter(torch.zeros(2, 2))], kernels="nope")


@pytest.mark.parametrize("ns_dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
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
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        DistributedMuon([torch.nn.Parameter(torch.zeros(3))])


def _rank(rank, world, port, out_path, shapes=SHAPES, stack=None):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        params = make_params(shapes)
        result = run(params, DistributedMuon(params, lr=0.02, weight_decay=0.1, kernels="torch", stack=stack))
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world, shapes, stack", [(2, SHAPES, None), (3, SHAPES, None), (2, REPEATED, True)])
def test_ranks_split_gives_one_rank_result(world, shapes, stack, tmp_path):
    params = make_params(shapes)
    expected = run(params, DistributedMuon(params, lr=0.02, weight_decay=0.1, kernels="torch", stack=stack))
    mp.spawn(_rank, args=(world, free_port(), str(tmp_path / "params"), shapes, stack), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"params.{rank}")
        for a, b in zip(got, expected):
            if stack:  # each rank stacks its own share: batched products of another batch size, fp32 rounding
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a, b), f"rank {rank} of {world} differs from the single-rank run"
