"""Muon for the hidden 2-D matrices, Adam for everything else, each group with its own learning rate.

Why split: Muon's orthogonalised update suits dense hidden matrices; embeddings (sparse rows), the LM head and the
scalar mixing weights are not matrices acting on a hidden state, so they keep Adam (modded-nanogpt, Jordan et al.).
"""

import torch
from transformers.optimization import get_cosine_schedule_with_warmup, get_wsd_schedule

from .cautious import CautiousAdamW
from .config import OptimSection
from .muon import NS_VARIANTS, DistributedMuon, MuonHyperparams


def parameter_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Names are the SpeedPLM module paths; a tied LM head is listed once (as the embedding)."""
    groups = {"muon": [], "embed": [], "head": [], "scalar": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 2 and (".layers." in f".{name}" or name.endswith("lm_head_dense.weight")):
            groups["muon"].append(param)
        elif "embed" in name:
            groups["embed"].append(param)
        elif name.endswith("lm_head.weight"):
            groups["head"].append(param)
        else:
            groups["scalar"].append(param)
    return groups


def build_optimizers(model: torch.nn.Module, cfg: OptimSection) -> list[torch.optim.Optimizer]:
    groups = parameter_groups(model)
    # torch.optim.Muon's update, with the Newton-Schulz work split across data-parallel ranks (training/optim/muon.py)
    hyper = MuonHyperparams(
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum_start,
        weight_decay=cfg.weight_decay,
        ns_coefficients=NS_VARIANTS[cfg.muon_ns],
        ns_steps=cfg.muon_ns_steps,
        normuon=cfg.normuon,
        normuon_beta2=cfg.normuon_beta2,
        cautious_weight_decay=cfg.cautious_weight_decay,
    )
    # the model's kernel set, resolved once when it was built
    muon = DistributedMuon(groups["muon"], hyper, kernels=model.base_model.kernels)
    adam_groups = [
        {"params": groups["embed"], "lr": cfg.embed_lr},
        {"params": groups["head"], "lr": cfg.head_lr},
        {"params": groups["scalar"], "lr": cfg.scalar_lr},
    ]
    # betas (0.8, 0.95) and eps 1e-10 as in modded-nanogpt's Adam groups: faster to react than (0.9, 0.999).
    adam_groups = [g for g in adam_groups if g["params"]]
    if cfg.cautious_weight_decay:
        adam = CautiousAdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=cfg.adam_weight_decay)
    elif cfg.adam_weight_decay:
        adam = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=cfg.adam_weight_decay)
    else:
        adam = torch.optim.Adam(adam_groups, betas=(0.8, 0.95), eps=1e-10)
    return [muon, adam]


def build_schedulers(optimizers, cfg: OptimSection, max_steps: int) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LR schedule per optimizer over the run's `max_steps` (train.max_steps)."""
    if cfg.schedule == "wsd":
        decay = max(1, int(cfg.decay_fraction * max_steps))
        make = lambda opt: get_wsd_schedule(  # noqa: E731
            opt,
            num_warmup_steps=cfg.warmup_steps,
            num_decay_steps=decay,
            num_training_steps=max_steps,
            decay_type="linear",
        )
    else:
        make = lambda opt: get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, max_steps)  # noqa: E731
    return [make(opt) for opt in optimizers]


def muon_momentum(step: int, cfg: OptimSection) -> float:
    """Linear warmup of Muon's momentum: low momentum early, while gradients change fast."""
    frac = min(step / max(1, cfg.muon_momentum_warmup_steps), 1.0)
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum_end


def set_muon_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    for group in optimizer.param_groups:
        group["momentum"] = momentum
