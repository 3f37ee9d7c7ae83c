"""From the run config's data section to this rank's loaders: prepare the built-in set once, then build loaders."""

import fcntl
import logging
from pathlib import Path

from .config import BatchPlan, ConfigError, DataSection, RunConfig
from .data.collator import EVAL_MASK_RATE, MaskRateSchedule, MLMCollator
from .data.loader import LoaderOptions, WorkerOptions, build_loader
from .data.loader import build_eval_loader as eval_loader_over
from .data.prepare import prepare_builtin
from .data.shards import SHARD_MANIFEST

logger = logging.getLogger("speedplm")


def builtin_root(cache_dir, accelerator=None) -> Path:
    """`cache_dir`/builtin holding the built-in proteins' train, valid and test shards: prepared the first time, by
    the main process (every process waits for it when an accelerator is given), then reused."""
    root = Path(cache_dir) / "builtin"
    if (accelerator is None or accelerator.is_main_process) and not (root / "test" / SHARD_MANIFEST).exists():
        # Two runs started at once on a fresh machine share this folder: the first prepares, the other waits on the
        # lock and then finds the manifest (prepare's staging folder is fixed, so two writers would corrupt it).
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.parent / ".builtin.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "test" / SHARD_MANIFEST).exists():
                logger.info("preparing the built-in proteins into %s (once)", root)
                prepare_builtin(root, overwrite=True, log=logger.info)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return root


def resolve_splits(data: DataSection, accelerator) -> dict[str, Path | None]:
    """Shard directories per split. "builtin" is prepared once (main process) into `data.cache_dir/builtin`; any
    other directory must exist (ConfigError naming the key otherwise)."""
    if data.train == "builtin":
        root = builtin_root(data.cache_dir, accelerator)
        return {name: root / name for name in ("train", "valid", "test")}
    for name in ("train", "valid", "test"):
        path = getattr(data, name)
        if path is not None and not Path(path).is_dir():
            raise ConfigError(
                f"data.{name}={path}: no such directory (make one with `python -m training.data prepare --input "
                f"FILE --out DIR`, or use data.train=builtin)"
            )
    train = Path(data.train)
    if (train / "train").is_dir():  # a directory prepared with split fractions: DIR/train, DIR/valid, DIR/test
        found = {name: train / name if (train / name).is_dir() else None for name in ("train", "valid", "test")}
    else:
        found = {"train": train, "valid": None, "test": None}
    for name in ("valid", "test"):
        if getattr(data, name):
            found[name] = Path(getattr(data, name))
    return found


def train_collator(config: RunConfig) -> MLMCollator:
    data = config.data
    rate = data.mask_rate
    if data.mask_rate_end is not None and data.mask_schedule_steps > 0:
        rate = MaskRateSchedule(data.mask_rate, data.mask_rate_end, data.mask_schedule_steps)
    return MLMCollator(mask_rate=rate, replace=data.replacement, seed=config.train.seed)


def build_train_loader(config: RunConfig, plan: BatchPlan, shard_dir: Path, rank: int):
    """This rank's loader for the batch layout `plan` (resolve_batch: micro-batch and accumulation)."""
    options = LoaderOptions(
        max_length=config.data.max_length,
        tokens_per_micro_batch=plan.micro_batch_tokens,
        rank=rank,
        world_size=plan.world_size,
        seed=config.train.seed,
        schedule=plan.schedule,
    )
    workers = WorkerOptions(num_workers=config.data.num_workers)
    return build_loader(shard_dir, train_collator(config), options, workers=workers)


def build_eval_loader(config: RunConfig, shard_dir: Path, rank: int, world: int):
    collator = MLMCollator(
        mask_rate=config.eval.mask_rate or EVAL_MASK_RATE,
        replace=config.data.replacement,
        seed=config.eval.seed,
    )
    options = LoaderOptions(
        max_length=config.data.max_length,
        tokens_per_micro_batch=config.train.micro_batch_tokens,
        rank=rank,
        world_size=world,
        seed=config.eval.seed,
    )
    return eval_loader_over(shard_dir, collator, options)
