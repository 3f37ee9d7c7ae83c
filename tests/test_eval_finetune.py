"""`python -m eval.finetune`: the documented fine-tuning command, run as a user runs it (tiny checkpoint, few steps)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomized_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from training.publish.model_folder import write_model_folder

    model = randomized_tiny_model(seed=2)
    directory = tmp_path_factory.mktemp("ckpt")
    write_model_folder(model, directory)
    return directory


@pytest.mark.slow
def test_finetune_lora_command(checkpoint, tmp_path):
    pytest.importorskip("peft", reason="peft is the optional extra (requirements-dev.txt)")
    out = tmp_path / "out"
    args = ["--model", checkpoint, "--task", "SEQ_CAPSID", "--out", out, "--lora"]
    args += ["--max-per-task", "80", "--epochs", "1", "--batch-size", "16", "--save-steps", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "eval.finetune", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "finetune.csv") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["fine-tuned (LoRA)", "random init (LoRA)", "linear probe (last hidden state)"]
    for row in rows.values():
        assert (int(row["n_train"]), int(row["n_test"])) == (64, 16)
        assert 0 <= float(row["accuracy"]) <= 1 and -1 <= float(row["mcc"]) <= 1
    total = sum(p.numel() for p in randomized_tiny_model().parameters())
    assert 0 < int(rows["fine-tuned (LoRA)"]["trainable_params"]) < total / 4  # LoRA + head, not the encoder
    # save_steps on: 64 proteins / 16 = 4 steps, a checkpoint every 2 (each one loadable: config, weights, adapter)
    for arm in ("fine-tuned", "random-init"):
        assert sorted(p.name for p in (out / arm).iterdir()) == ["checkpoint-2", "checkpoint-4"]
        assert (out / arm / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert "| fine-tuned (LoRA) |" in (out / "finetune.md").read_text()


def test_finetune_refuses_a_bad_model_before_writing(tmp_path, capsys):
    from eval.finetune import main

    out = tmp_path / "out"
    code = main(["--model", str(tmp_path / "missing"), "--task", "SEQ_CAPSID", "--out", str(out)])
    assert code == 1
    assert "cannot load its config" in capsys.readouterr().err
    assert not out.exists()
