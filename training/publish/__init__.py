"""The publish wing: model folders (save_pretrained + tokenizer + card), Hub pushes off the step path. It imports
nothing of `training/` but the typed config. The names below are its face; each loads its module on first use.
"""

import importlib

_FACE = {
    "model_folder": ("write_model_folder", "model_card", "plain_model", "WEIGHTS", "WEIGHT_FILES"),
    "publisher": ("ModelPublisher", "check_hub"),
    "hub": ("HubPusher", "HubPushError", "check_access"),
    "config": ("HubSection",),
}
_HOME = {name: module for module, names in _FACE.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'training.publish' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
