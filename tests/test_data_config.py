"""The data/eval config switches: the mask-rate schedule keys go together; eval.max_tokens counts scored tokens."""

import contextlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training.config import load_config
from training.metrics import IGNORE_INDEX, evaluate
from training.schema import ConfigError

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "override, given, missing",
    [
        ("data.mask_rate_end=0.1", "data.mask_rate_end=0.1", "data.mask_schedule_steps (> 0)"),
        ("data.mask_schedule_steps=100", "data.mask_schedule_steps=100", "data.mask_rate_end"),
    ],
)
def test_mask_schedule_needs_both_keys(override, given, missing):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.yaml", [override])
    assert str(err.value).startswith(f"{given} without {missing}: a mask-rate schedule needs both data.mask_rate_end")
    both = load_config("configs/default.yaml", ["data.mask_rate_end=0.1", "data.mask_schedule_steps=100"])
    assert (both.data.mask_rate_end, both.data.mask_schedule_steps) == (0.1, 100)


def test_mask_schedule_half_given_exits_2_before_writing(tmp_path):
    cmd = [sys.executable, "train_accelerate.py", f"train.output_dir={tmp_path}", "data.mask_rate_end=0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.mask_rate_end=0.1 without data.mask_schedule_steps" in proc.stderr
    assert list(tmp_path.iterdir()) == []


class Loader:
    """Fixed batches of 4 rows x 8 tokens; batch b scores b + 1 positions per row (labels != -100)."""

    rows_per_micro_batch, spec = 4, SimpleNamespace(max_length=8)

    def __init__(self, batches: int):
        self.batches, self.restarts = batches, 0

    def restart(self):
        self.restarts += 1

    def __iter__(self):
        for b in range(self.batches):
            labels = torch.full((4, 8), IGNORE_INDEX)
            labels[:, : b + 1] = 5
            yield {"input_ids": torch.full((4, 8), 32), "labels": labels}


class Model(torch.nn.Module):
    config = SimpleNamespace(vocab_size=33)

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, input_ids):
        self.seen += 1
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 33))


ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"),
    num_processes=1,
    unwrap_model=lambda m: m,
    autocast=contextlib.nullcontext,
    reduce=lambda t, reduction: t,
)


@pytest.mark.parametrize(
    "max_tokens, batches, tokens", [(None, 6, 84), (4, 1, 4), (5, 2, 12), (12, 2, 12), (13, 3, 24), (500, 6, 84)]
)
def test_eval_max_tokens_counts_scored_tokens(max_tokens, batches, tokens):
    # batch b scores 4 * (b + 1) tokens: 4, 8, 12, ... (running sums 4, 12, 24, 40, 60, 84); each batch holds 32
    # row slots, so the old row-slot cap would have stopped max_tokens=13 after 1 batch, not 3
    model, loader = Model(), Loader(6)
    result = evaluate(model, loader, ACCELERATOR, max_tokens)
    assert (model.seen, result["tokens"], loader.restarts) == (batches, tokens, 1)
    assert result["loss"] == pytest.approx(torch.log(torch.tensor(33.0)).item())
