"""Muon with its orthogonalization split across data-parallel ranks.

Every rank holds the same (all-reduced) gradients, so every rank could run Newton-Schulz on every matrix; instead
parameter i (in parameter-group order) is orthogonalized only by rank i % world_size and its bf16 update is broadcast
to the others (modded-nanogpt splits Muon the same way). Works for any world size and any mix of shapes: no padding,
no assumption that the parameter count divides the world size. A rank's matrices of one shape are orthogonalised as one
stack (batched products; on CUDA by default). Communication is one bf16 copy of every matrix per step, launched
asynchronously, shape by shape, so a rank's Newton-Schulz work overlaps the previous broadcasts.

The update is exactly torch.optim.Muon's (torch 2.13): momentum buffer B <- lerp(B, g, 1 - mu); nesterov update
lerp(g, B, mu); O = NS(update) in bf16 (tall matrices transposed); p <- p * (1 - lr * wd) - lr_adj * O with
lr_adj = lr * sqrt(max(1, rows / cols)) ("original") or 0.2 * lr * sqrt(max(rows, cols)) ("match_rms_adamw").
With one rank, kernels="torch" and ns_dtype=bf16 it is bit-identical to torch.optim.Muon (tests/test_muon.py).

Momentum buffers are kept on every rank (elementwise, cheap), so any rank's state_dict resumes the run exactly.

FSDP2 (DTensor parameters, e.g. Shard(0) rows per rank): Newton-Schulz needs the whole matrix, so each rank updates
its momentum shard locally, the nesterov update is all-gathered (`full_tensor()`, a collective every rank calls in
the same parameter order), only the owner keeps it and orthogonalises it, the result is broadcast over the
parameter's mesh, and every rank applies its own slice. Elementwise ops on shards equal those on the full tensor,
so the parameters are bit-identical to an unsharded run with the same gradients (tests/test_fsdp2.py). Momentum
buffers stay DTensors shaped like their parameter, so the optimizer state saves and loads as sharded state (DCP).
"""

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from modeling_speedplm.kernels_speedplm import NS_COEFFICIENTS, Kernels, newton_schulz, select_kernels


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class DistributedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's hyperparameters and update; plus `kernels` (the model's resolved set, `model.kernels`, or
    a setting: "auto": Triton xxt Newton-Schulz on CUDA, "triton", "torch", or a "+"-joined kernel selection: Triton
    iff it names "newton_schulz"; kernels_speedplm.select_kernels either way) and `process_group` (default: the
    world group if torch.distributed is initialised).
    Precondition: gradients are identical on all ranks when `step()` runs (DDP / accelerate all-reduce them), or,
    for DTensor parameters (FSDP2), each rank holds its shard of the reduced gradient; `step()` is then a collective
    over the parameters' mesh that every rank must call."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients=NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        kernels: str | Kernels = "auto",
        process_group=None,
        ns_dtype: torch.dtype | None = None,
        stack: bool | None = None,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"DistributedMuon: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"DistributedMuon: adjust_lr_fn={adjust_lr_fn!r} is not supported")
        try:  # the model's resolved kernel set, or a `kernels` setting resolved by the same rule
            resolved = kernels if isinstance(kernels, Kernels) else select_kernels(kernels)
        except ValueError as err:
            raise ValueError(f"DistributedMuon: {err}") from None
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"DistributedMuon: only 2-D parameters, got one of shape {tuple(p.shape)}")
        self.use_triton = resolved.newton_schulz  # None: triton_auto decides per tensor
        self.process_group = process_group
        # Newton-Schulz precision: bf16 on GPUs (tensor cores; torch.optim.Muon's choice), fp32 on CPUs, where bf16
        # matmuls are ~19x slower and made Muon cost more than the forward/backward of a small model.
        self.ns_dtype = ns_dtype
        # Orthogonalise a rank's same-shape matrices as one stack: default on CUDA (launch-bound otherwise); off on
        # CPU by default, which keeps one rank bit-identical to torch.optim.Muon there.
        self.stack = stack

    def _ns_dtype(self, p: torch.Tensor) -> torch.dtype:
        return self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)

    def _world(self):
        if not (dist.is_available() and dist.is_initialized()):
            return 1, 0
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank = self._world()
        # Replicated parameters by Newton-Schulz job (shape, settings), in parameter order: the same on every rank.
        jobs = {}  # key -> [(param, its nesterov update if this rank owns it else None, owner, group)]
        sharded = []  # FSDP2 parameters: (param, full update if this rank owns it else None, owner, mesh group, group)
        index = 0  # running parameter index across groups: its owner is index % world
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    # zeros_like of a DTensor gradient is a DTensor with the parameter's placements: sharded state
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)  # every rank: identical state everywhere
                if isinstance(p, DTensor):
                    sharded.append(self._gather_sharded(p, grad, buf, group, index))
                    index += 1
                    continue
                owner = index % world
                index += 1
                update = (grad.lerp(buf, mu) if group["nesterov"] else buf) if owner == rank else None
                key = (tuple(p.shape), self._ns_dtype(p), group["ns_steps"], group["ns_coefficients"], group["eps"])
                jobs.setdefault(key, []).append((p, update, owner, group))
        pending = []  # (param, update buffer, async handle or None, its param group)
        for (_, ns_dtype, steps, coefficients, eps), items in jobs.items():
            mine = [update for _, update, _, _ in items if update is not None]
            if mine:
                if len(mine) > 1 and (self.stack if self.stack is not None else mine[0].is_cuda):
                    # One batched Newton-Schulz for this rank's same-shape matrices (speedrun-133m: 24 blocks x 4
                    # shapes -> 4 calls instead of 96), so small matrices stop being launch-bound.
                    mine = newton_schulz(
                        torch.stack(mine), steps, coefficients, eps, use_triton=self.use_triton, dtype=ns_dtype
                    ).unbind(0)
                else:
                    mine = [
                        newton_schulz(u, steps, coefficients, eps, use_triton=self.use_triton, dtype=ns_dtype)
                        for u in mine
                    ]
            results = iter(mine)
            # broadcasts in parameter order on every rank; async, so they overlap the next job's Newton-Schulz
            for p, update, owner, group in items:
                if update is not None:
                    update = next(results).contiguous()
                else:
                    update = torch.empty(p.shape, dtype=ns_dtype, device=p.device)
                handle = None
                if world > 1:
                    handle = dist.broadcast(update, group_src=owner, group=self.process_group, async_op=True)
                pending.append((p, update, handle, group))
        for p, update, handle, group in pending:
            if handle is not None:
                handle.wait()
            lr = float(group["lr"])
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        if sharded:
            self._step_sharded(sharded)
        return loss

    def _gather_sharded(self, p, grad, buf, group, index):
        """All-gather the nesterov update of a DTensor parameter; keep it only on its owner (memory ~ 1/world)."""
        mu = group["momentum"]
        update = (grad.lerp(buf, mu) if group["nesterov"] else buf).full_tensor()  # collective: every rank, in order
        mesh = p.device_mesh
        if mesh.ndim == 1 and mesh.size() > 1:
            mesh_group, mesh_world, mesh_rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        else:  # a 1-rank or multi-dimensional mesh (HSDP): every rank orthogonalises the full matrix itself
            mesh_group, mesh_world, mesh_rank = None, 1, 0
        owner = index % mesh_world
        return p, (update if owner == mesh_rank else None), owner, mesh_group, group

    def _step_sharded(self, sharded):
        # Two passes so that ranks orthogonalise their own matrices in parallel: Newton-Schulz on every owned matrix
        # first, then one broadcast per matrix (in parameter order on every rank), each rank applying its slice.
        for i, (p, update, owner, mesh_group, group) in enumerate(sharded):
            if update is not None:
                update = newton_schulz(
                    update,
                    group["ns_steps"],
                    group["ns_coefficients"],
                    group["eps"],
                    use_triton=self.use_triton,
                    dtype=self._ns_dtype(p),
                )
                sharded[i] = (p, update.contiguous(), owner, mesh_group, group)
        for p, update, owner, mesh_group, group in sharded:
            if mesh_group is not None:
                if update is None:
                    update = torch.empty(p.shape, dtype=self._ns_dtype(p), device=p.device)
                dist.broadcast(update, group_src=owner, group=mesh_group)
            # this rank's slice of the full update, placed like the parameter (no communication)
            local = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
            lr = float(group["lr"])
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(local, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
