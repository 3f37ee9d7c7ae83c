"""Train a SpeedPLM protein language model.

    accelerate launch train_accelerate.py                                   # configs/default.yaml, built-in data
    accelerate launch train_accelerate.py --config configs/speedrun-133m.yaml train.max_steps=2000 hub.push=true ...

    accelerate launch train_accelerate.py model.init_from=runs/default/final data.train=data/mine ...  # continue
    accelerate launch train_accelerate.py train.target_loss=2.6 ...          # stop once the valid loss reaches 2.6

Overrides are `section.key=value` (sections: model, data, train, eval, hub, tracking). Topology and precision come
from `accelerate launch --config_file accelerate_configs/<topology>.yaml`. Secrets (HF_TOKEN, WANDB_API_KEY) are
read from the environment only. Exit codes: 0 done, 2 bad config or refused start (nothing written), 143/130 stopped
by SIGTERM/SIGINT after saving a checkpoint, 1 any other failure (a Hub push refused for good: after saving a
checkpoint, with a message naming the push). A finished run started again with its recipe does nothing (exit 0).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from training.accelerate_compat import die_with_launcher
from training.config import ConfigError, load_config
from training.data.shards import ShardError
from training.publish.hub import HubPushError
from training.run_start import RunRefused
from training.trainer import Trainer, TrainingStopped

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
ALIVE = []  # the trainer outlives main(): exit_now ends the process before its torch objects are freed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run recipe (YAML)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, OSError) as err:
        parser.exit(2, f"train_accelerate.py: error: {err}\n")
    die_with_launcher()  # a SIGTERM to `accelerate launch` reaches us (it does not forward it)
    try:
        trainer = Trainer(config)
        ALIVE.append(trainer)  # freed by exit_now, never by Python: see exit_now
    except (ConfigError, RunRefused, ShardError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train_accelerate.py: error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except TrainingStopped as stopped:
        return stopped.code
    except HubPushError as err:  # the trainer saved a checkpoint first (a refused mid-run push) or wrote final/
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train_accelerate.py: error: HubPushError: {err}", file=sys.stderr)
        return 1
    return 0


def exit_now(code: int) -> None:
    """Exit without tearing down torch's objects. With several gloo ranks, freeing the DDP reducer (when main()
    returns and its trainer goes out of scope, or at interpreter exit) joins the process group's worker thread while
    this thread holds the GIL; that worker may be finishing the last collective, whose Python-owned tensors need the
    GIL: a deadlock that left one rank of a finished run waiting forever (seen in tests; py-spy: ~ProcessGroupGloo
    -> thread::join vs ~AsyncWork -> GIL). Everything the run writes is closed by then (checkpoints, final/,
    metrics.jsonl per line, trackers finished by end_training), so only the streams need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
