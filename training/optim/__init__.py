"""The optimizer wing: Muon for the hidden matrices, Adam for the rest, their schedules, and the `optim:` config
section that owns every knob of them (config.py). It imports nothing of `training/` but the typed-config machinery
(training/schema.py). The names below are its face; each loads its module on first use.
"""

import importlib

_FACE = {
    "config": ("OptimSection",),
    "build": ("build_optimizers", "build_schedulers", "muon_momentum", "set_muon_momentum", "parameter_groups"),
    "muon": ("DistributedMuon", "MuonHyperparams", "NS_VARIANTS"),
    "cautious": ("CautiousAdamW",),
}
_HOME = {name: module for module, names in _FACE.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'training.optim' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
