"""Cautious weight decay for the Adam groups (Muon's is inside training/optim/muon.py).

Cautious weight decay (Chen et al. 2025, "Cautious Weight Decay", arXiv:2510.12402; used by modded-nanogpt):
    p <- p - lr * (u + wd * p * [u * p >= 0])
where u is the optimizer's step direction (p <- p - lr * u): a coordinate is decayed only where the step already
moves it towards zero, so the decay never pulls against the gradient's direction. Plain decoupled decay (AdamW)
decays every coordinate.
"""

import torch


class CautiousAdamW(torch.optim.Adam):
    """torch.optim.Adam, then decoupled weight decay `weight_decay` on the coordinates whose Adam step has the same
    sign as the weight before the step. The step direction is read off the parameter change, so Adam's own update
    (and its foreach/fused kernels) is untouched; the copy of the Adam-group weights it needs is small (embeddings,
    head, scalars)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs):
        if weight_decay < 0:
            raise ValueError(f"CautiousAdamW: weight_decay={weight_decay} must be >= 0")
        super().__init__(params, lr=lr, weight_decay=0.0, **kwargs)
        for group in self.param_groups:
            group["cautious_weight_decay"] = group.get("cautious_weight_decay", weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        before = {
            p: p.detach().clone() for g in self.param_groups if g.get("cautious_weight_decay") for p in g["params"]
        }
        loss = super().step(closure)
        for group in self.param_groups:
            decay = float(group["lr"]) * group.get("cautious_weight_decay", 0.0)
            for p in group["params"]:
                if p.grad is None or p not in before:
                    continue
                old = before[p]
                p.sub_(old * ((old - p) * old >= 0) * decay)  # (old - p) = lr * u
        return loss
