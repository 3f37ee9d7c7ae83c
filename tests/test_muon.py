"""DistributedMuon: one rank is torch.optim.Muon bit for bit; N gloo ranks give the same parameters as one rank."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.muon import DistributedMuon

# Tall, wide and square matrices; 5 of them, so no world size > 1 used here divides the count.
SHAPES = [(48, 16), (16, 40), (32, 32), (24, 8), (8, 24)]
STEPS = 3


def make_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]


def run(params, optimizer):
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 + step)  # same gradients on every rank, as after DDP's all-reduce
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("hyper", [
    dict(lr=0.02, weight_decay=0.1, momentum=0.95),
    dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False, adjust_lr_fn="match_rms_adamw"),
])  # fmt: skip
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


@pytest.mark.parametrize("kernels, use_triton", [("auto", None), ("torch", False), ("triton", True),
                                                ("linear_relu2", False), ("linear_relu2+newton_schulz", True)])
def test_kernels_setting_is_the_model_configs(kernels, use_triton):
    """The trainer passes model.config.kernels: Triton Newton-Schulz iff the selection names it (None: CUDA decides)."""
    assert DistributedMuon([torch.nn.Parameter(torch.zeros(2, 2))], kernels=kernels).use_triton is use_triton
    with pytest.raises(ValueError, match="DistributedMuon: kernels='nope'"):
        DistributedMuon([torch.nn.Parameter(torch.zeros(2, 2))], kernels="nope")


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        DistributedMuon([torch.nn.Parameter(torch.zeros(3))])


def _rank(rank, world, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        params = make_params()
        result = run(params, DistributedMuon(params, lr=0.02, weight_decay=0.1, kernels="torch"))
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_gives_one_rank_result(world, tmp_path):
    params = make_params()
    expected = run(params, DistributedMuon(params, lr=0.02, weight_decay=0.1, kernels="torch"))
    mp.spawn(_rank, args=(world, _free_port(), str(tmp_path / "params")), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"params.{rank}")
        for a, b in zip(got, expected):
            assert torch.equal(a, b), f"rank {rank} of {world} differs from the single-rank run"
