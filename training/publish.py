"""What the run publishes to the Hub, and when: code + config + tokenizer + card at start (no weights), the model of a
checkpoint every `hub.push_every` steps, the final folder at the end.

Nothing of it runs on the step path. The training loop saves its checkpoint as usual; push_checkpoint() only
hard-links the checkpoint's model files (O(1), so pruning cannot pull them away) and queues a job; HubPusher's
background thread then reads those weights (plain safetensors, or FSDP2's sharded torch.distributed.checkpoint
folder, gathered offline: no collective), writes the model folder with `write_model_folder` (transformers'
save_pretrained, shards included) and uploads it. No process waits for the upload or for the folder being written;
no collective runs for a push. Only the main process talks to the Hub.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import HubSection
from .hub import HubPusher

logger = logging.getLogger("speedplm")

SAFE_WEIGHTS, FSDP_WEIGHTS = "model.safetensors", "pytorch_model_fsdp_0"  # accelerate's save_state names


def write_model_folder(model, directory: Path, summary: str | None, weights: bool = True, max_shard_size=None):
    """The one place a Hub model folder is written: weights (unless weights=False: config, code, tokenizer and
    card only), sharded into several safetensors files above `max_shard_size` (transformers' default if None)."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if not weights:
        kwargs["state_dict"] = {}  # save_pretrained writes no weight file for an empty state dict
    model.save_pretrained(directory, training_summary=summary, **kwargs)


def link_model_files(checkpoint: Path, target: Path) -> None:
    """Hard-link (copy where links are impossible) a checkpoint's model weights into `target`."""
    sources = [checkpoint / SAFE_WEIGHTS] if (checkpoint / SAFE_WEIGHTS).exists() else []
    if (checkpoint / FSDP_WEIGHTS).is_dir():
        sources = sorted(p for p in (checkpoint / FSDP_WEIGHTS).rglob("*") if p.is_file())
    if not sources:
        raise FileNotFoundError(f"{checkpoint}: no {SAFE_WEIGHTS} or {FSDP_WEIGHTS}/ to push")
    for src in sources:
        dst = target / src.relative_to(checkpoint)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another filesystem: a copy (on the step path only in that case)
            shutil.copy2(src, dst)


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The full model state dict stored by accelerate's save_state in `folder` (CPU tensors)."""
    if (folder / FSDP_WEIGHTS).is_dir():  # one shard per rank: gathered here from the files, no process group
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            dcp_to_torch_save(folder / FSDP_WEIGHTS, Path(tmp) / "full.pt")
            state = torch.load(Path(tmp) / "full.pt", weights_only=True)["model"]
    else:
        state = load_file(folder / SAFE_WEIGHTS)
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP saves the wrapper's names


def plain_model(model, state_dict: dict | None = None):
    """A fresh instance of the model's own class (not an FSDP or compiled wrapper) holding `state_dict`, built on
    the meta device (no initialisation); without a state dict it stays on meta (enough for config + code)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    if state_dict is not None:
        missing, unexpected = plain.load_state_dict(state_dict, strict=False, assign=True)
        tied = set(getattr(plain, "_tied_weights_keys", None) or {})
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
        if getattr(plain.config, "tie_word_embeddings", False):
            plain.tie_weights()
    return plain


class ModelPublisher:
    """Construct it and call push_checkpoint()/push_final() on every rank (only the main process acts)."""

    def __init__(self, hub: HubSection, staging_dir: Path, accelerator, model, max_shard_size=None):
        self.model = accelerator.unwrap_model(model)
        self.max_shard_size = max_shard_size
        self.pusher = None
        if accelerator.is_main_process:
            Path(staging_dir).mkdir(parents=True, exist_ok=True)
            self.pusher = HubPusher(
                hub.model_id,
                private=hub.private,
                max_retries=hub.max_retries,
                backoff_s=hub.backoff_s,
                tmp_dir=staging_dir,  # the same filesystem as the checkpoints: weights are hard-linked
            )
            start = plain_model(self.model)
            self.pusher.push_built(
                lambda folder: write_model_folder(start, folder, None, weights=False),
                "speedplm: code, config, tokenizer and model card",
                step=0,
                key="start",
            )
            logger.info("hub: pushing code and config to %s in the background", hub.model_id)

    def push_checkpoint(self, step: int, checkpoint: Path, summary: str | None = None) -> None:
        """Queue a push of the model saved in `checkpoint` (a finished checkpoint directory of step `step`)."""
        if self.pusher is None:
            return
        self.pusher.check()  # fail early on a bad token or missing write access
        weights = Path(tempfile.mkdtemp(prefix=f"weights-{step}-", dir=self.pusher.tmp_root))
        link_model_files(Path(checkpoint), weights)

        def build(folder: Path) -> None:
            plain = plain_model(self.model, checkpoint_weights(weights))
            write_model_folder(plain, folder, summary, max_shard_size=self.max_shard_size)

        self.pusher.push_built(
            build,
            f"speedplm: model at step {step}",
            step=step,
            key="model",
            discard=lambda: shutil.rmtree(weights, ignore_errors=True),
        )

    def push_final(self, directory: Path, step: int) -> None:
        """Queue a push of the final save_pretrained folder (already complete: copied in the background)."""
        if self.pusher is not None:
            self.pusher.push_built(
                lambda folder: shutil.copytree(directory, folder, dirs_exist_ok=True),
                f"speedplm: final model at step {step}",
                step=step,
                key="model",
            )

    def check(self) -> None:
        if self.pusher is not None:
            self.pusher.check()

    def status(self) -> dict:
        if self.pusher is None:
            return {}
        status = self.pusher.status()
        return {key: status[key] for key in ("done", "failed", "retries", "dropped", "pending")}

    def finish(self, timeout: float | None = None) -> None:
        """Await the last push; raises HubPushError (the run then exits non-zero) if it failed."""
        if self.pusher is not None:
            try:
                self.pusher.wait(timeout=timeout)
            finally:
                self.pusher.close()

    def abort(self) -> None:
        if self.pusher is not None:
            self.pusher.close(cancel=True)
