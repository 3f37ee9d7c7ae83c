"""End-to-end runs of train_accelerate.py in subprocesses: final model, exact resume, faults, 2 ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Small but real: a tiny SpeedPLM on real proteins, 2 micro-batches of 1024 tokens per step (accumulation).
SMALL = [
    "model.hidden_size=64",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=2",
    "model.value_embeddings=2",
    "model.max_position_embeddings=128",
    "data.max_length=128",
    "train.micro_batch_tokens=1024",
    "train.tokens_per_step=2048",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "eval.max_tokens=4000",
    "optim.muon_momentum_warmup_steps=10",
    "train.cpu_threads=1",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """~1,500 real proteins (aaanalysis benchmark sets) prepared into train/valid/test shards."""
    from training.data.prepare import PrepareOptions, prepare
    from training.data.sources import builtin_files

    out = tmp_path_factory.mktemp("data") / "prepared"
    fasta = out.parent / "proteins.fasta"
    with open(fasta, "w") as f:
        n = 0
        for path in sorted(builtin_files()):
            lines = path.read_text().splitlines()
            column = lines[0].split("\t").index("sequence")
            for line in lines[1:300]:
                f.write(f">{path.stem}_{n}\n{line.split(chr(9))[column]}\n")
                n += 1
    prepare([fasta], out, PrepareOptions(split_fractions=(90, 5, 5), dedup=True, max_length=128), log=lambda *a: None)
    return out


def run_training(
    tmp_path,
    shards,
    *overrides,
    config="configs/default.yaml",
    env=None,
    ranks=1,
    wait=True,
    name="run",
    accelerate_config=None,
    launch_args=(),
):
    """`accelerate_config`: launch with `accelerate launch --config_file accelerate_configs/<it>` (its own ranks),
    `launch_args` added to that launch (e.g. ("--num_processes", "1"))."""
    args = [
        "--config",
        str(ROOT / config),
        f"data.train={shards}",
        f"train.output_dir={tmp_path}",
        f"train.run_name={name}",
        *SMALL,
        *overrides,
    ]
    port = free_port()
    if accelerate_config is not None:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_configs" / accelerate_config),
            *launch_args,
            "--main_process_port",
            str(port),
            str(ROOT / "train_accelerate.py"),
            *args,
        ]
    elif ranks == 1:
        cmd = [sys.executable, str(ROOT / "train_accelerate.py"), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(ranks),
            "--main_process_port",
            str(port),
            str(ROOT / "train_accelerate.py"),
            *args,
        ]
    full_env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}  # a token only where a test gives one
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def rows(tmp_path, name="run", split=None):
    path = Path(tmp_path) / name / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == split]


def train_losses(tmp_path, name="run"):
    return {r["step"]: r["loss"] for r in rows(tmp_path, name)}


def wait_for_step(tmp_path, name, step, proc, timeout=300):
    deadline = time.time() + timeout
    path = Path(tmp_path) / name / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()[-3000:]}")
        if path.exists() and any(r["step"] >= step for r in rows(tmp_path, name)):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def test_default_recipe_end_to_end(tmp_path, shards):
    code, out = run_training(tmp_path, shards, "train.max_steps=30", "eval.every=10", "train.save_every=10")
    assert code == 0, out[-3000:]
    valid = rows(tmp_path, split="valid")
    assert [r["step"] for r in valid] == [0, 10, 20, 30]  # step 0: the untrained baseline
    assert valid[-1]["loss"] < valid[0]["loss"] - 0.05, valid  # validation loss falls
    assert rows(tmp_path, split="test")[0]["scored_tokens"] > 100
    train_rows = rows(tmp_path)
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mask_rate"} <= set(train_rows[0])
    assert train_rows[-1]["tokens"] > 30 * 2048 * 0.9  # packed rows: little padding
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000020",
        "step-000030",
    ]
    loader = (
        "import sys, torch; from transformers import AutoModelForMaskedLM, AutoTokenizer;"
        "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True);"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True);"
        "print(m(**t(['MKTAYIAKQRQISFVKSHFSRQ'], return_tensors='pt')).logits.shape)"
    )
    result = subprocess.run(
        [sys.executable, "-c", loader, str(run / "final")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 0 and "torch.Size([1, 24, 33])" in result.stdout, result.stderr[-2000:]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, shards):
    """An uninterrupted 12-step run, checkpoints every 3 steps (all kept)."""
    tmp = tmp_path_factory.mktemp("reference")
    code, out = run_training(
        tmp, shards, "train.max_steps=12", "train.save_every=3", "train.keep_checkpoints=10", "eval.every=0"
    )
    assert code == 0, out[-3000:]
    return tmp, train_losses(tmp)


def test_kill9_then_resume_is_bit_identical(tmp_path, shards, reference_run):
    _, expected = reference_run
    overrides = ["train.max_steps=12", "train.save_every=3", "train.keep_checkpoints=10", "eval.every=0"]
    proc = run_training(tmp_path, shards, *overrides, wait=False)
    kill_at = 4 + int(time.time()) % 5  # a "random" step between 4 and 8
    wait_for_step(tmp_path, "run", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    code, out = run_training(tmp_path, shards, *overrides, "train.resume=auto")
    assert code == 0, out[-3000:]
    assert "resumed from" in out
    assert train_losses(tmp_path) == expected  # exact float equality, every logged step

    # Control: same checkpoint, data position not restored -> the losses after the resume point differ.
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    code, out = run_training(
        tmp_path, shards, *overrides, f"train.resume={ckpt}", "train.resume_data_state=false", name="control"
    )
    assert code == 0, out[-3000:]
    control = train_losses(tmp_path, "control")
    assert all(control[s] != expected[s] for s in range(4, 13))


def test_corrupt_newest_checkpoint_falls_back(tmp_path, shards, reference_run):
    ref_dir, expected = reference_run
    import shutil

    shutil.copytree(ref_dir / "run", tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step-000012"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    # resume with more steps: step-000012 is corrupt, so the run continues from step-000009
    code, out = run_training(
        tmp_path,
        shards,
        "train.max_steps=12",
        "train.save_every=3",
        "eval.every=0",
        "train.resume=auto",
        "train.keep_checkpoints=10",
    )
    assert code == 0, out[-3000:]
    assert f"{weights} is corrupt" in out and "step-000009" in out
    assert train_losses(tmp_path) == expected


def test_resume_refuses_another_model_shape(tmp_path, shards, reference_run):
    ref_dir, _ = reference_run
    import shutil

    shutil.copytree(ref_dir / "run", tmp_path / "run")
    code, out = run_training(
        tmp_path, shards, "train.max_steps=14", "model.hidden_size=96", "model.num_attention_heads=3"
    )
    assert code == 2, out[-3000:]  # a refused start: exit 2, a message, no traceback
    assert "holds a different model" in out and "Traceback" not in out


def test_sigterm_saves_and_exits_143(tmp_path, shards):
    proc = run_training(tmp_path, shards, "train.max_steps=500", "train.save_every=1000", "eval.every=0", wait=False)
    wait_for_step(tmp_path, "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    steps = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(steps) == 1 and (tmp_path / "run" / "checkpoints" / steps[0] / "COMPLETE").exists()
    assert int(steps[0].split("-")[1]) >= 3


def test_injected_nan_skips_the_step(tmp_path, shards):
    code, out = run_training(
        tmp_path,
        shards,
        "train.max_steps=8",
        "train.save_every=1",
        "train.keep_checkpoints=10",
        "eval.every=0",
        "train.inject_nan_at=[5]",
    )
    assert code == 0, out[-3000:]
    by_step = {r["step"]: r for r in rows(tmp_path)}
    assert by_step[5]["bad_steps"] == 0 and by_step[6]["bad_steps"] == 1 and by_step[6]["loss"] is None
    ckpts = tmp_path / "run" / "checkpoints"
    before, after = (
        load_file(ckpts / "step-000005" / "model.safetensors"),
        load_file(ckpts / "step-000006" / "model.safetensors"),
    )
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    later = load_file(ckpts / "step-000007" / "model.safetensors")
    assert not all(torch.equal(after[k], later[k]) for k in after)  # the next step trains again
    for name in ("optimizer.bin", "optimizer_1.bin"):
        a = torch.load(ckpts / "step-000005" / name, weights_only=False)["state"]
        b = torch.load(ckpts / "step-000006" / name, weights_only=False)["state"]
        assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i] if torch.is_tensor(a[i][k]))


def test_repeated_nan_stops_the_run(tmp_path, shards):
    code, out = run_training(
        tmp_path, shards, "train.max_steps=10", "eval.every=0", "train.inject_nan_at=[2,3,4]", "train.max_bad_steps=3"
    )
    assert code != 0 and "3 non-finite steps in a row" in out


def test_two_ranks_match_one_rank(tmp_path, shards):
    common = ["train.max_steps=6", "eval.every=3", "train.save_every=100"]
    code, out = run_training(tmp_path, shards, *common, name="one")
    assert code == 0, out[-3000:]
    assert "1 rank(s) x 2 accumulation step(s)" in out
    code, out = run_training(tmp_path, shards, *common, name="two", ranks=2)
    assert code == 0, out[-3000:]
    assert "2 rank(s) x 1 accumulation step(s)" in out  # a real 2-process gloo group, not 2 single runs
    logged_steps = [r["step"] for r in rows(tmp_path, "two")]
    assert logged_steps == sorted(set(logged_steps))  # only the main process writes metrics
    one, two = train_losses(tmp_path, "one"), train_losses(tmp_path, "two")
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-5, abs=2e-5), (step, one[step], two[step])
    v1, v2 = rows(tmp_path, "one", "valid"), rows(tmp_path, "two", "valid")
    assert [r["scored_tokens"] for r in v1] == [r["scored_tokens"] for r in v2]
    assert v2[-1]["loss"] == pytest.approx(v1[-1]["loss"], rel=1e-4)


def test_compiled_blocks_train_like_eager(tmp_path, shards):
    """train.compile=true (the GPU default) on CPU: regional torch.compile gives the eager run's losses."""
    common = ["train.max_steps=3", "eval.every=0", "train.save_every=100"]
    code, out = run_training(tmp_path, shards, *common, name="eager")
    assert code == 0, out[-3000:]
    code, out = run_training(tmp_path, shards, *common, "train.compile=true", name="compiled")
    assert code == 0, out[-3000:]
    eager, compiled = train_losses(tmp_path, "eager"), train_losses(tmp_path, "compiled")
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step


def test_gradient_checkpointing_trains_like_without(tmp_path, shards):
    """train.gradient_checkpointing=true (CPU, fp32): the same losses, bit for bit, as the run without it."""
    common = ["train.max_steps=3", "eval.every=0", "train.save_every=100"]
    code, out = run_training(tmp_path, shards, *common, name="plain")
    assert code == 0, out[-3000:]
    assert "gradient checkpointing:" not in out
    code, out = run_training(tmp_path, shards, *common, "train.gradient_checkpointing=true", name="checkpointed")
    assert code == 0, out[-3000:]
    assert "gradient checkpointing: each block's activations are recomputed in the backward" in out
    plain, checkpointed = train_losses(tmp_path, "plain"), train_losses(tmp_path, "checkpointed")
    assert plain.keys() == checkpointed.keys() == {1, 2, 3}
    assert checkpointed == plain, (plain, checkpointed)
