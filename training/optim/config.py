"""The optimizer section of a run config (`optim:` in a recipe, `optim.key=value` overrides): learning rates,
schedule, Muon's momentum warmup and the recipe-v2 optimizer switches. Owned by this wing, as torchtitan's
`OptimizersContainer.Config` is: a new optimizer switch is a field here and its use in build.py, nothing else.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..schema import Section, setting


@dataclass
class OptimSection(Section):
    NAME: ClassVar[str] = "optim"
    schedule: Literal["wsd", "cosine"] = "wsd"  # warmup-stable-decay or cosine
    warmup_steps: int = setting(20, ge=0)
    decay_fraction: float = setting(0.4, ge=0, le=1)  # wsd: share of steps spent decaying to 0
    muon_lr: float = setting(0.02, ge=0)  # hidden 2-D matrices (0 freezes them)
    embed_lr: float = setting(0.05, ge=0)  # token and value embeddings (Adam)
    head_lr: float = setting(0.004, ge=0)  # LM head (Adam)
    scalar_lr: float = setting(0.02, ge=0)  # mixing weights, U-Net skip weights (Adam)
    weight_decay: float = setting(0.0, ge=0)
    muon_momentum_start: float = setting(0.85, ge=0, lt=1)  # momentum warmup (modded-nanogpt): 0.85 -> 0.95
    muon_momentum_end: float = setting(0.95, ge=0, lt=1)
    muon_momentum_warmup_steps: int = setting(300, ge=0)
    # Recipe-v2 switches, off until `python -m eval.speedrun` keeps one (docs/ablations-cpu.md)
    muon_ns: Literal["jordan", "polar_express"] = "jordan"  # Newton-Schulz coefficients (jordan: torch.optim.Muon's)
    muon_ns_steps: int = setting(5, ge=1, le=5)
    normuon: bool = False  # NorMuon: per-neuron second-moment normalisation of Muon's orthogonalised update
    normuon_beta2: float = setting(0.95, ge=0, lt=1)
    cautious_weight_decay: bool = False  # Muon and Adam: decay only where the update and the weight agree in sign
    adam_weight_decay: float = setting(0.0, ge=0)  # decoupled (AdamW) weight decay of the Adam groups
