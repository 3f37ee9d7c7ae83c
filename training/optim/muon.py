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

Public API
    MuonHyperparams(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=NS_COEFFICIENTS, eps=1e-7,
                    ns_steps=5, adjust_lr_fn=None, normuon=False, normuon_beta2=0.95, cautious_weight_decay=False)
                        # frozen, keyword-only: the param-group defaults (torch.optim.Muon's names and defaults + v2)
    DistributedMuon(params, hyper=MuonHyperparams(), *, kernels="auto", process_group=None, ns_dtype=None, stack=None)
    POLAR_EXPRESS_COEFFICIENTS, NS_VARIANTS (optim.muon_ns -> coefficients), normuon_(...), adjusted_lr(...)

Recipe-v2 switches (all off by default; off, the update is exactly the one above):
    ns_coefficients=POLAR_EXPRESS_COEFFICIENTS   one quintic per Newton-Schulz iteration (Polar Express), ns_steps <= 5
    normuon=True                                 NorMuon: the orthogonalised update divided by an EMA of its per-neuron
                                                 RMS, then rescaled to its former Frobenius norm (normuon_beta2)
    cautious_weight_decay=True                   decay only coordinates where the update and the parameter agree in sign
Both act after the broadcast, on every rank, so their state (NorMuon's per-neuron buffer) is the same everywhere too.

FSDP2 (DTensor parameters, e.g. Shard(0) rows per rank): Newton-Schulz needs the whole matrix, so each rank updates
its momentum shard locally, the nesterov update is all-gathered (`full_tensor()`, a collective every rank calls in
the same parameter order), only the owner keeps it and orthogonalises it, the result is broadcast over the
parameter's mesh, and every rank applies its own slice. Elementwise ops on shards equal those on the full tensor,
so the parameters are bit-identical to an unsharded run with the same gradients (tests/test_fsdp2.py). Momentum
buffers stay DTensors shaped like their parameter, so the optimizer state saves and loads as sharded state (DCP).
"""

import dataclasses
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from modeling_speedplm.kernels_speedplm import NS_COEFFICIENTS, Kernels, newton_schulz, ns_schedule, select_kernels

# Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932): a different odd quintic per iteration, each
# minimax-optimal for the interval of singular values the previous ones leave, so singular values approach 1 in
# fewer steps than with one fixed quintic. The triples for 5 iterations (safety factor 2e-2, cushion 2) are the ones
# modded-nanogpt and nanochat use with X / (1.02 ||X||_F); that 1.02 is folded into the first triple here (X = Y / 1.02
# turns a X + b X^3 + c X^5 into (a/1.02) Y + (b/1.02^3) Y^3 + (c/1.02^5) Y^5), so newton_schulz normalises as usual.
_POLAR_EXPRESS_PUBLISHED = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
_a, _b, _c = _POLAR_EXPRESS_PUBLISHED[0]
POLAR_EXPRESS_COEFFICIENTS = ((_a / 1.02, _b / 1.02**3, _c / 1.02**5), *_POLAR_EXPRESS_PUBLISHED[1:])
NS_VARIANTS = {"jordan": NS_COEFFICIENTS, "polar_express": POLAR_EXPRESS_COEFFICIENTS}  # optim.muon_ns


def _frozen(coefficients) -> tuple:
    """Hashable form (a job key): (a, b, c) or ((a, b, c), ...)."""
    if len(coefficients) == 3 and not isinstance(coefficients[0], (tuple, list)):
        return tuple(float(x) for x in coefficients)
    return tuple(tuple(float(x) for x in triple) for triple in coefficients)


def normuon_(update: torch.Tensor, buffer: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025, arXiv:2510.05491, in modded-nanogpt's / nanochat's form): EMA `buffer` of the
    orthogonalised update's per-neuron mean square, the update divided by its root, then rescaled to its former
    Frobenius norm so that the learning rate keeps its meaning. The neuron axis is the longer one: an orthogonalised
    tall matrix has unit-norm columns and a wide one unit-norm rows, so normalising those would do nothing
    (modded-nanogpt record 2025-12-11). update (m, n); buffer (m, 1) if m >= n else (1, n), fp32, updated in place."""
    o = update.float()
    v_mean = o.square().mean(dim=-1 if o.size(-2) >= o.size(-1) else -2, keepdim=True)  # (m, 1) or (1, n)
    buffer.lerp_(v_mean, 1 - beta2)
    scale = buffer.clamp_min(1e-10).rsqrt()
    # ||o||^2 and ||o * scale||^2 from the per-neuron sums, without forming the scaled matrix twice
    before, after = v_mean.sum().sqrt(), (v_mean * scale.square()).sum().sqrt()
    return o * (scale * (before / after.clamp_min(1e-10)))


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


# Why this split of DistributedMuon's settings: the fields of MuonHyperparams are exactly the keys of a param group
# (torch's `defaults`), the values a param-group dict may override and a scheduler changes (lr, momentum); they decide
# what the update is, and with kernels="torch" and ns_dtype=bf16 they give torch.optim.Muon's update bit for bit. The
# keyword arguments of DistributedMuon decide only how it is computed and shared (kernel set, Newton-Schulz precision
# and batching, process group): per optimizer, never per group.
@dataclasses.dataclass(frozen=True, kw_only=True)
class MuonHyperparams:
    """Param-group defaults: torch.optim.Muon's hyperparameters (same names and defaults), then the recipe-v2
    switches (module docstring)."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_coefficients: tuple = NS_COEFFICIENTS  # (a, b, c), or one triple per iteration (POLAR_EXPRESS_COEFFICIENTS)
    eps: float = 1e-7
    ns_steps: int = 5
    adjust_lr_fn: str | None = None  # None | "original" | "match_rms_adamw"
    normuon: bool = False
    normuon_beta2: float = 0.95
    cautious_weight_decay: bool = False


class DistributedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update with the param-group defaults `hyper`; plus `kernels` (the model's resolved set,
    `model.kernels`, or a setting: "auto": Triton xxt Newton-Schulz on CUDA, "triton", "torch", or a "+"-joined kernel
    selection: Triton iff it names "newton_schulz"; kernels_speedplm.select_kernels either way) and `process_group`
    (default: the world group if torch.distributed is initialised).
    Precondition: gradients are identical on all ranks when `step()` runs (DDP / accelerate all-reduce them), or,
    for DTensor parameters (FSDP2), each rank holds its shard of the reduced gradient; `step()` is then a collective
    over the parameters' mesh that every rank must call."""

    def __init__(
        self,
        params,
        hyper: MuonHyperparams = MuonHyperparams(),
        *,
        kernels: str | Kernels = "auto",
        process_group=None,
        ns_dtype: torch.dtype | None = None,
        stack: bool | None = None,
    ):
        lr, momentum, weight_decay = hyper.lr, hyper.momentum, hyper.weight_decay
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"DistributedMuon: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        if hyper.adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"DistributedMuon: adjust_lr_fn={hyper.adjust_lr_fn!r} is not supported")
        try:  # the model's resolved kernel set, or a `kernels` setting resolved by the same rule
            resolved = kernels if isinstance(kernels, Kernels) else select_kernels(kernels)
        except ValueError as err:
            raise ValueError(f"DistributedMuon: {err}") from None
        defaults = dataclasses.asdict(hyper) | dict(ns_coefficients=_frozen(hyper.ns_coefficients))
        super().__init__(params, defaults)
        for group in self.param_groups:
            group["ns_coefficients"] = _frozen(group["ns_coefficients"])
            try:
                ns_schedule(group["ns_coefficients"], group["ns_steps"])
            except ValueError as err:
                raise ValueError(f"DistributedMuon: ns_steps={group['ns_steps']}: {err}") from None
            if not 0 <= group["normuon_beta2"] < 1:
                raise ValueError(f"DistributedMuon: normuon_beta2={group['normuon_beta2']} must be in [0, 1)")
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"DistributedMuon: only 2-D parameters, got one of shape {tuple(p.shape)}")
                if group["normuon"] and isinstance(p, DTensor):
                    raise ValueError("DistributedMuon: normuon is not supported with FSDP2-sharded parameters yet")
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
                if isinstance(p, DTensor) and group["normuon"]:
                    # here, not in __init__: accelerate swaps the parameters for DTensors after the optimizer is
                    # built (the trainer refuses the combination at start: training/trainer.py check_topology)
                    raise ValueError("DistributedMuon: normuon is not supported with FSDP2-sharded parameters yet")
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
            self._apply(p, update, group)
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
            self._apply(p, local, group)

    def _apply(self, p, update, group):
        """p <- p - lr * wd * p [where update * p >= 0, if cautious] - lr_adj * update [NorMuon-scaled]."""
        lr, wd = float(group["lr"]), group["weight_decay"]
        if group["normuon"]:
            state = self.state[p]
            if "normuon_buffer" not in state:
                axis_shape = (p.shape[0], 1) if p.shape[0] >= p.shape[1] else (1, p.shape[1])
                state["normuon_buffer"] = torch.zeros(axis_shape, dtype=torch.float32, device=p.device)
            update = normuon_(update, state["normuon_buffer"], group["normuon_beta2"]).to(p.dtype)
        if group["cautious_weight_decay"]:
            # Cautious weight decay (Chen et al. 2025, arXiv:2510.12402; modded-nanogpt): decay only where the step
            # already moves the weight towards zero, so decay never fights the gradient's direction.
            if wd:
                p.sub_(p * (update * p >= 0) * (lr * wd))
        else:
            p.mul_(1 - lr * wd)
        p.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
