"""What the run publishes to the Hub, and when: code + config + tokenizer + card at start (no weights), the model of a
checkpoint every `hub.push_every` steps, the final folder at the end.

Nothing of it runs on the step path. The training loop saves its checkpoint as usual (its model.safetensors holds
the full weights under the model's own names, FSDP2 included: training/checkpoint.py); push_checkpoint() only
hard-links that file (O(1), so pruning cannot pull it away) and queues a job; HubPusher's background thread then
loads it into a plain model, writes the model folder with `write_model_folder` (transformers' save_pretrained,
shards included, tokenizer and card) and uploads it. No process waits for the upload or for the folder being
written; no collective runs for a push. Only the main process talks to the Hub.
"""

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file

from .config import HubSection
from .hub import HubPusher, check_access
from .model_folder import WEIGHTS, plain_model, write_model_folder

logger = logging.getLogger("speedplm")


def link_weights(checkpoint: Path, target: Path) -> Path:
    """Hard-link (copy where links are impossible) a checkpoint's model.safetensors into `target`."""
    src, dst = checkpoint / WEIGHTS, target / WEIGHTS
    if not src.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {WEIGHTS} to push")
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: a copy (on the step path only in that case)
        shutil.copy2(src, dst)
    return dst


def check_hub(hub: HubSection) -> None:
    """The run's start check (before anything is written): a token that may write hub.model_id. HubPushError."""
    check_access(hub.model_id, private=hub.private, max_retries=hub.max_retries, backoff_s=hub.backoff_s)


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
                lambda folder: write_model_folder(start, folder, state_dict={}),
                "speedplm: code, config, tokenizer and model card",
                step=0,
                key="start",
            )
            logger.info("hub: pushing code and config to %s in the background", hub.model_id)

    def push_checkpoint(self, step: int, checkpoint: Path, summary: str | None = None) -> None:
        """Queue a push of the model saved in `checkpoint` (a finished checkpoint directory of step `step`)."""
        if self.pusher is None or self.pusher.fatal():  # no push can land (the loop stops on fatal(), all ranks)
            return
        weights = Path(tempfile.mkdtemp(prefix=f"weights-{step}-", dir=self.pusher.tmp_root))
        linked = link_weights(Path(checkpoint), weights)

        def build(folder: Path) -> None:
            plain = plain_model(self.model, load_file(linked))
            kwargs = {} if self.max_shard_size is None else {"max_shard_size": self.max_shard_size}
            write_model_folder(plain, folder, summary, **kwargs)

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

    def fatal(self) -> str | None:
        """A push failure no retry can fix (401/403), or None; always None off the main process."""
        return self.pusher.fatal() if self.pusher is not None else None

    def status(self) -> dict:
        if self.pusher is None:
            return {}
        status = self.pusher.status()
        return {key: status[key] for key in ("done", "failed", "retries", "dropped", "pending")}

    def finish(self, stop: Callable[[], bool] | None = None, poll_s: float = 0.1) -> bool:
        """Await the last push; raises HubPushError (the run then exits non-zero) if it failed. With `stop`, polled
        while waiting: once it is true the queued pushes are cancelled and False returned."""
        if self.pusher is None:
            return True
        try:
            while stop is not None and not self.pusher.idle():
                if stop():
                    self.pusher.close(cancel=True)
                    return False
                time.sleep(poll_s)
            self.pusher.wait()
        finally:
            self.pusher.close()
        return True

    def abort(self) -> None:
        if self.pusher is not None:
            self.pusher.close(cancel=True)
