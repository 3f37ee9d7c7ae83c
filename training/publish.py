"""What the run publishes to the Hub, and when: code + config + tokenizer + card at start, the model periodically
and at the end. Only the main process talks to the Hub; the upload itself runs in HubPusher's background thread."""

import logging
import shutil
from pathlib import Path

from .checkpoint import full_state_dict, save_pretrained
from .config import HubSection
from .hub import HubPusher

logger = logging.getLogger("speedplm")


class ModelPublisher:
    """Construct it and call push_model() on every rank: under FSDP2 staging the model gathers its sharded weights
    (a collective); only the main process then writes and uploads."""

    def __init__(self, hub: HubSection, staging_dir: Path, accelerator, model):
        self.accelerator, self.model = accelerator, model
        self.staging = Path(staging_dir)
        self.pusher = None
        state_dict = full_state_dict(accelerator, model)  # collective under FSDP2
        if accelerator.is_main_process:
            self.pusher = HubPusher(
                hub.model_id, private=hub.private, max_retries=hub.max_retries, backoff_s=hub.backoff_s
            )
        if self.pusher is not None:
            start = self._stage("start", state_dict=state_dict)
            (start / "model.safetensors").unlink()  # the start push carries no weights yet
            self.pusher.push_folder(start, "speedplm: code, config, tokenizer and model card", step=0)
            logger.info("hub: pushing code and config to %s in the background", hub.model_id)

    def _stage(self, name: str, summary: str | None = None, state_dict: dict | None = None) -> Path:
        directory = self.staging / name
        shutil.rmtree(directory, ignore_errors=True)
        save_pretrained(self.accelerator, self.model, directory, state_dict=state_dict, training_summary=summary)
        return directory

    def push_model(self, step: int, summary: str | None = None, final: bool = False) -> None:
        state_dict = full_state_dict(self.accelerator, self.model)  # collective under FSDP2: before any return
        if self.pusher is None:
            return
        self.pusher.check()  # fail early on a bad token or missing write access
        directory = self._stage("model", summary, state_dict)
        self.pusher.push_folder(directory, f"speedplm: {'final model' if final else 'model'} at step {step}", step=step)

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
