"""Signals and refused starts of real train_accelerate.py runs: SIGINT saves and exits 130; SIGTERM to one of 2 gloo
ranks stops both at the same step with one checkpoint; a DDP checkpoint resumed under FSDP2, or another run
directory's checkpoint without train.overwrite, is refused with exit 2 and nothing changed."""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from test_train_e2e import rows, run_training, shards, wait_for_step  # noqa: F401  (shards: fixture)

# one xdist worker runs this file: its module fixtures (trained checkpoints) are built once, not per worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_train_signals")]

LONG = ["train.max_steps=500", "train.save_every=1000", "eval.every=0", "eval.test_at_end=false"]


def only_checkpoint(run: Path) -> Path:
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").exists(), checkpoints
    return checkpoints[0]


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sigint_run(tmp_path_factory, shards):  # noqa: F811
    """A 1-rank run stopped by SIGINT (Ctrl-C) after step 2: (run dir, exit code, output)."""
    tmp = tmp_path_factory.mktemp("sigint")
    proc = run_training(tmp, shards, *LONG, wait=False)
    wait_for_step(tmp, "run", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    return tmp / "run", proc.returncode, out


def test_sigint_saves_and_exits_130(sigint_run):
    run, code, out = sigint_run
    assert code == 130, out[-3000:]
    checkpoint = only_checkpoint(run)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == int(checkpoint.name.split("-")[1]) >= 2
    assert max(r["step"] for r in rows(run.parent)) == state["step"]  # saved at the step it stopped


def _rank_pids(launcher: int) -> dict:
    """{RANK: pid} of the launcher's descendants that are training ranks."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(v.split("=", 1) for v in environ.read_bytes().decode().split("\0") if "=" in v)
            stat = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if "RANK" in env and "train_accelerate.py" in (environ.parent / "cmdline").read_bytes().decode(errors="ignore"):
            parent = int(stat[1])
            while parent > 1 and parent != launcher:
                try:
                    parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    break
            if parent == launcher:
                found[int(env["RANK"])] = int(environ.parent.name)
    return found


@pytest.fixture(scope="module")
def two_rank_sigterm(tmp_path_factory, shards):  # noqa: F811
    """2 gloo ranks (accelerate_configs/cpu_2ranks.yaml); SIGTERM to rank 1 only after step 2."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    proc = run_training(tmp, shards, *LONG, accelerate_config="cpu_2ranks.yaml", wait=False)
    wait_for_step(tmp, "run", 2, proc)
    ranks = _rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    return tmp / "run", proc.returncode, out


def test_sigterm_to_one_of_two_ranks_stops_both_with_one_checkpoint(two_rank_sigterm):
    run, code, out = two_rank_sigterm
    assert "2 rank(s)" in out, out[-3000:]
    checkpoint = only_checkpoint(run)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] >= 2, state
    assert max(r["step"] for r in rows(run.parent)) == state["step"]  # both ranks stopped at the same step
    # rank 0 leaves with 143 after the save; torchrun then reports the stop (and may SIGTERM a rank that is still
    # exiting: its exit reads -15); the launcher itself exits non-zero
    assert code != 0 and "exitcode  : 143" in out, out[-3000:]
    assert "TrainingStopped" not in out and "NonFiniteLosses" not in out
    assert not (run / "final").exists()


def test_checkpoint_of_another_state_layout_is_refused(two_rank_sigterm, tmp_path, shards):  # noqa: F811
    """Another number of ranks resumes (tests/test_train_elastic.py); DDP's whole optimizer files into an FSDP2 run
    (sharded torch.distributed.checkpoint folders) do not: exit 2 naming both layouts and the way forward."""
    run, _, _ = two_rank_sigterm
    checkpoint = only_checkpoint(run)
    before = snapshot(run)
    fsdp2_one_rank = dict(accelerate_config="fsdp2_cpu_2ranks.yaml", launch_args=("--num_processes", "1"))
    code, out = run_training(tmp_path, shards, *LONG, f"train.resume={checkpoint}", name="fsdp2", **fsdp2_one_rank)
    assert code != 0 and "exitcode  : 2" in out, out[-3000:]  # the launcher reports the rank's exit 2
    assert f"{checkpoint} was saved without FSDP2 and this run is under FSDP2" in out, out[-3000:]
    assert f"model.init_from={checkpoint}" in out
    assert not (tmp_path / "fsdp2").exists()  # exit 2 is the refusal, not a crash (1); nothing written
    assert snapshot(run) == before


def test_another_directorys_checkpoint_needs_overwrite(sigint_run, two_rank_sigterm, tmp_path, shards):  # noqa: F811
    """Resuming run B from run A's checkpoint while B holds a history of its own: exit 2, B untouched."""
    run_a, _, _ = sigint_run
    run_b, _, _ = two_rank_sigterm
    checkpoint = only_checkpoint(run_a)
    target = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_b), str(target)], check=True)
    before = snapshot(target)
    code, out = run_training(tmp_path, shards, *LONG, f"train.resume={checkpoint}")
    assert code == 2, out[-3000:]
    assert f"train.resume={checkpoint} is another directory's checkpoint" in out
    assert "Add train.overwrite=true" in out and "Traceback" not in out
    assert snapshot(target) == before
