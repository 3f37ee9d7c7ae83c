"""The data wing: input files -> validated tokens -> checksummed shards -> packed, masked, resumable batches.

    sources -> validate -> prepare (+ keyindex, checksum) -> shards -> loader (+ batch_schedule) -> collator
    python -m training.data prepare | verify       python -m training.data.corpora download

It imports nothing else of `training/` (the run core imports it, never the reverse). The names below are its face;
each loads its module on first use, so `import training.data.validate` stays as cheap as that module.
"""

import importlib

_FACE = {
    "sources": ("SourceError", "iter_chunks", "iter_records", "builtin_files", "builtin_dir"),
    "validate": ("ValidationPolicy", "encode", "decode", "VOCAB", "CLS", "PAD", "EOS", "MASK"),
    "prepare": ("PrepareOptions", "prepare", "prepare_builtin", "builtin_attribution", "DataError"),
    "shards": ("ShardSet", "ShardWriter", "ShardError", "SHARD_MANIFEST"),
    "loader": ("LoaderOptions", "WorkerOptions", "PackedLoader", "build_loader", "build_eval_loader"),
    "collator": ("MLMCollator", "MaskRateSchedule", "EVAL_MASK_RATE", "TRAIN_MASK_RATE", "REPLACEMENTS"),
    "batch_schedule": ("BatchSchedule",),
    "corpora": ("CORPORA", "CorpusPart", "download_corpus"),
}
_HOME = {name: module for module, names in _FACE.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module 'training.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
