"""Run safety (#13), as a user meets it: real `train_accelerate.py` runs in subprocesses (and the real `accelerate
launch`). One test (or more) per item of the issue: 1 checkpoint ownership, 2 run names, 3 typed values, 4 checks
before writes, 5 model comparison on resume, 8 SIGTERM through the launcher, 9 torn metrics line, 10 the README's
2-rank line, 11 checkpoints load with from_pretrained."""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_train_e2e import ROOT, SMALL, rows, run_training, shards, train_losses, wait_for_step  # noqa: F401

pytestmark = pytest.mark.slow
FINISHED = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=10", "eval.every=0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shards):  # noqa: F811
    """A finished 6-step run: checkpoints at steps 2, 4, 6, final/, metrics.jsonl."""
    tmp = tmp_path_factory.mktemp("finished")
    code, out = run_training(tmp, shards, *FINISHED)
    assert code == 0, out[-3000:]
    return tmp / "run"


def copy_run(finished_run, tmp_path, name="run"):
    shutil.copytree(finished_run, tmp_path / name)
    return tmp_path / name


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def run_id_of(checkpoint: Path) -> str:
    return json.loads((checkpoint / "trainer_state.json").read_text())["run_id"]


# ---- item 1: a run's checkpoints are its own


def test_resume_auto_refuses_when_no_checkpoint_is_intact(tmp_path, shards, finished_run):  # noqa: F811
    run = copy_run(finished_run, tmp_path)
    for checkpoint in (run / "checkpoints").iterdir():
        flip_byte(checkpoint / "model.safetensors")
    before = snapshot(run)
    code, out = run_training(tmp_path, shards, "train.max_steps=8", "train.save_every=2", "train.keep_checkpoints=2")
    assert code == 2, out[-3000:]
    assert "train.resume=auto" in out and "3 checkpoint(s) and none is intact" in out, out[-3000:]
    assert "train.resume=none train.overwrite=true" in out  # how to start over
    assert snapshot(run) == before  # nothing deleted, nothing appended, config.yaml untouched


def test_fresh_start_into_another_run_is_refused_unless_overwrite(tmp_path, shards, finished_run):  # noqa: F811
    run = copy_run(finished_run, tmp_path)
    old_id = run_id_of(run / "checkpoints" / "step-000006")
    before = snapshot(run)
    fresh = ["train.resume=none", "train.save_every=2", "eval.every=0"]
    code, out = run_training(tmp_path, shards, *fresh, "train.max_steps=4")
    assert code == 2 and f"holds 3 checkpoint(s) and 8 metrics row(s) of run {old_id}" in out, out[-3000:]
    assert "train.overwrite=true" in out and "another train.run_name" in out
    assert snapshot(run) == before

    code, out = run_training(
        tmp_path, shards, *fresh, "train.max_steps=6", "train.keep_checkpoints=3", "train.overwrite=true"
    )
    assert code == 0, out[-3000:]
    new_id = run_id_of(run / "checkpoints" / "step-000004")
    assert new_id != old_id
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5, 6]  # one history in metrics.jsonl
    assert {r["run_id"] for r in rows(tmp_path)} | {r["run_id"] for r in rows(tmp_path, split="valid")} == {new_id}

    # a crash after step 4 (its later files gone): the next resume continues the new run, and the pruner keeps its
    # newest checkpoints
    shutil.rmtree(run / "checkpoints" / "step-000006")
    shutil.rmtree(run / "final")
    code, out = run_training(tmp_path, shards, "train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=2")
    assert code == 0 and "resumed from" in out and "step-000004" in out, out[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    assert run_id_of(run / "checkpoints" / "step-000006") == new_id
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5, 6]


# ---- items 2, 3, 4: every input is checked before anything is written


def test_run_name_cannot_escape_output_dir(tmp_path, shards):  # noqa: F811
    out_dir = tmp_path / "a" / "b"
    out_dir.mkdir(parents=True)
    code, out = run_training(out_dir, shards, "train.run_name=../../escape")  # more names: test_train_config.py
    assert code == 2 and "train.run_name='../../escape': must be a plain directory name" in out, out[-3000:]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b"]  # nothing written


@pytest.mark.parametrize(
    "override,message",
    [  # one per kind of check; every key's type and range: test_train_config.py
        ("train.max_steps=abc", "train.max_steps='abc': must be an integer"),
        ("train.tokens_per_step=1000", "use train.tokens_per_step=896 or train.tokens_per_step=1024"),
        ("data.train=/nonexistent/prepared", "data.train=/nonexistent/prepared: no such directory"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, shards, override, message):  # noqa: F811
    code, out = run_training(tmp_path, shards, override)
    assert code == 2 and message in out, out[-3000:]
    assert "Traceback" not in out
    assert list(tmp_path.iterdir()) == []  # no run directory, no config.yaml


# ---- item 5: resume compares the whole model config


def test_resume_refuses_a_different_model_with_the_same_shapes(tmp_path, shards, finished_run):  # noqa: F811
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    code, out = run_training(tmp_path, shards, "train.max_steps=8", "model.num_attention_heads=4")  # 2 -> 4 heads
    assert code == 2, out[-3000:]
    assert "holds a different model: num_attention_heads: 2 -> 4" in out
    assert snapshot(run) == before  # config.yaml of the run is not overwritten by the refused one


# ---- item 8: SIGTERM to the documented launch command


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG / PR_SET_CHILD_SUBREAPER")
def test_sigterm_to_accelerate_launch_saves_and_leaves_no_trainer(tmp_path, shards):  # noqa: F811
    """`accelerate launch train_accelerate.py ...` (the simple launcher) in its own process group; SIGTERM to the
    launcher's pid only. The launcher exits non-zero, the trainer saves a checkpoint and exits 143, nothing is left.
    This test process becomes a child subreaper for the duration, so the orphaned trainer is reparented to it and
    its exit status can be read."""
    launcher = Path(sys.executable).parent / "accelerate"
    args = ["--config", str(ROOT / "configs/default.yaml"), f"data.train={shards}", f"train.output_dir={tmp_path}"]
    args += ["train.run_name=run", *SMALL, "train.max_steps=500", "train.save_every=1000", "eval.every=0"]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HOME": str(tmp_path / "hf")})  # no user default accelerate config
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen(
            [str(launcher), "launch", str(ROOT / "train_accelerate.py"), *args],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_step(tmp_path, "run", 2, proc)
        trainers = _children(proc.pid)
        assert len(trainers) == 1, trainers
        proc.send_signal(signal.SIGTERM)  # the launcher only
        assert proc.wait(timeout=30) != 0
        deadline, status = time.monotonic() + 120, None
        while status is None and time.monotonic() < deadline:  # the orphan was reparented to this process
            pid, raw = os.waitpid(trainers[0], os.WNOHANG)
            status = os.waitstatus_to_exitcode(raw) if pid else time.sleep(0.2)
        assert status == 143, f"trainer exit {status}: " + (tmp_path / "out.log").read_text()[-3000:]
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # no process of the launch is left
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        libc.prctl(36, 0, 0, 0, 0)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").exists()
    assert int(checkpoints[0].name.split("-")[1]) >= 2


# ---- item 9: a torn last line in metrics.jsonl


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, shards, finished_run):  # noqa: F811
    run = copy_run(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-000006")  # resume from step 4
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tokens": 1434')  # killed mid-write
    code, out = run_training(tmp_path, shards, *FINISHED)
    assert code == 0, out[-3000:]
    assert f"{run / 'metrics.jsonl'}:{lines + 1}: torn last line" in out
    assert train_losses(tmp_path) == train_losses(finished_run.parent)  # steps 1-6 once each, bit-identical


def test_bad_metrics_line_refuses_resume_naming_file_and_line(tmp_path, shards, finished_run):  # noqa: F811
    run = copy_run(finished_run, tmp_path)
    text = (run / "metrics.jsonl").read_text().splitlines()
    text[2] = text[2][:20]
    (run / "metrics.jsonl").write_text("\n".join(text) + "\n")
    before = snapshot(run)
    code, out = run_training(tmp_path, shards, "train.max_steps=8")
    assert code == 2 and f"{run / 'metrics.jsonl'}:3: not a metrics row" in out, out[-3000:]
    assert snapshot(run) == before


# ---- items 10 and 11: the README's 2-rank line; checkpoints are from_pretrained folders

LOAD_OUTSIDE_REPO = """
import json, sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
logits = []
for path in sys.argv[1:]:
    model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        logits.append(model(**tokenizer(["MKTAYIAKQRQISFVKSHFSRQ"], return_tensors="pt")).logits)
print(json.dumps([(logits[0] - x).abs().max().item() for x in logits]))
"""


def max_logit_diffs(tmp_path, *directories) -> list[float]:
    """From a fresh process outside the repository: logits of each directory minus the first one's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_OUTSIDE_REPO, *map(str, directories)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_checkpoints_load_with_from_pretrained(tmp_path, finished_run):
    checkpoints = finished_run / "checkpoints"
    diffs = max_logit_diffs(tmp_path, finished_run / "final", checkpoints / "step-000006", checkpoints / "step-000002")
    assert diffs[1] == 0.0  # the last checkpoint is the final model
    assert diffs[2] > 1e-3  # an earlier one is an earlier model


def test_readme_two_rank_line_with_the_default_recipe(tmp_path, shards):  # noqa: F811
    """`accelerate launch --config_file accelerate_configs/cpu_2ranks.yaml train_accelerate.py` (the default recipe:
    8,192 tokens per step, rows of 512) with a few steps and the test's data; then its step-1 checkpoint resumed by
    2 DDP ranks reproduces step 2 exactly, and its checkpoints load with from_pretrained."""
    overrides = [f"data.train={shards}", f"train.output_dir={tmp_path}", "train.max_steps=2", "train.save_every=1"]
    overrides += ["eval.every=0", "eval.max_tokens=4000", "eval.test_at_end=false", "train.cpu_threads=1"]
    overrides += ["train.log_every=1", "train.keep_checkpoints=2"]
    port = free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(ROOT / "accelerate_configs/cpu_2ranks.yaml"), "--main_process_port", str(port)]
    cmd += [str(ROOT / "train_accelerate.py"), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([*cmd, "train.run_name=run"], cwd=tmp_path, env=env, capture_output=True, text=True)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "2 rank(s) x 1 accumulation step(s) x 4096 tokens = 8192 tokens per step" in out
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]

    step1 = tmp_path / "run" / "checkpoints" / "step-000001"
    resumed = subprocess.run(
        [*cmd, "train.run_name=resumed", f"train.resume={step1}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert train_losses(tmp_path, "resumed") == {2: train_losses(tmp_path)[2]}  # exact

    # checkpoints saved by 2 DDP ranks are from_pretrained folders too (the model's own parameter names)
    run = tmp_path / "run"
    diffs = max_logit_diffs(
        tmp_path, run / "final", run / "checkpoints" / "step-000002", tmp_path / "resumed" / "final"
    )
    assert diffs == [0.0, 0.0, 0.0]


# ---- #21 item 2: resume never changes a recipe silently; train.extend; a finished run does nothing

QUICK = ["train.max_steps=10", "train.save_every=4", "eval.every=4"]  # the quick start, small: checkpoints 8, 10
SECOND = ["train.max_steps=25", "eval.every=5", "train.save_every=4"]  # the README's next command (500 / 100), small


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_readme_second_command_is_refused_then_extended_then_finished(tmp_path, shards):  # noqa: F811
    code, out = run_training(tmp_path, shards, *QUICK)
    assert code == 0, out[-3000:]
    run = tmp_path / "run"
    lr_at = {r["step"]: r["lr"] for r in rows(tmp_path)}
    # wsd over 10 steps: warmup 2, decay over the last 4: the LR at step 8 is half the peak, 0 at step 10
    assert lr_at[5] == pytest.approx(0.02) and lr_at[8] == pytest.approx(0.01) and lr_at[10] == 0
    assert state_of(run / "checkpoints" / "step-000010")["recipe"]["train.max_steps"] == 10
    before = snapshot(run)

    code, out = run_training(tmp_path, shards, *SECOND, "optim.muon_lr=0.03")  # resume=auto, same run_name
    assert code == 2, out[-3000:]
    assert "changed: optim.muon_lr: 0.02 -> 0.03; train.max_steps: 10 -> 25." in out  # each key, old and new
    assert "train.extend=true lets only train.max_steps change" in out
    assert snapshot(run) == before

    code, out = run_training(tmp_path, shards, *SECOND)  # the README's command itself
    assert code == 2, out[-3000:]
    assert "changed: train.max_steps: 10 -> 25." in out and "eval.every" not in out.split("changed:")[1][:80]
    assert "train.run_name=<a new name>" in out and "add train.extend=true" in out and "Traceback" not in out
    assert snapshot(run) == before

    # the newest checkpoint's LR is 0: extending it would not train; refused, naming the run's checkpoints
    code, out = run_training(tmp_path, shards, *SECOND, "train.extend=true")
    assert code == 2, out[-3000:]
    assert "has decayed the learning rate to 0" in out and "step-000008, step-000010" in out, out[-3000:]
    assert snapshot(run) == before

    step8 = run / "checkpoints" / "step-000008"
    extend = [*SECOND, "train.extend=true", f"train.resume={step8}", "train.overwrite=true"]
    code, out = run_training(tmp_path, shards, *extend)
    assert code == 0, out[-3000:]
    assert "extending run" in out and "schedule extension from step 8: stable at 0.5 x" in out, out[-3000:]
    steps = [r["step"] for r in rows(tmp_path)]
    assert steps == list(range(1, 26))  # one history: steps 9 and 10 of the first future are gone
    lr = {r["step"]: r["lr"] for r in rows(tmp_path)}
    assert all(lr[s] == lr_at[s] for s in range(1, 9))
    # the extension starts at the checkpoint's LR (0.01) and stays there, then decays over int(0.4 x 17) = 6 steps
    assert [lr[s] for s in range(9, 20)] == [pytest.approx(0.01)] * 11
    assert lr[22] == pytest.approx(0.01 * 3 / 6) and lr[25] == 0
    last = state_of(run / "checkpoints" / "step-000025")
    assert last["extension"] == {"from_step": 8, "lr_factor": pytest.approx(0.5), "max_steps": 25}
    assert last["recipe"]["train.max_steps"] == 25
    assert [r["step"] for r in rows(tmp_path, split="valid")] == [0, 4, 8, 10, 15, 20, 25]

    # the same command as a plain resume now: the run is finished with this recipe -> nothing to do, nothing written
    before = snapshot(run)
    code, out = run_training(tmp_path, shards, *SECOND)
    assert code == 0, out[-3000:]
    assert "finished at step 25" in out and "nothing to do" in out
    assert snapshot(run) == before  # metrics.jsonl not appended to, config.yaml not rewritten


# ---- #21 item 3: every outside precondition before the first write


def test_missing_hub_token_refuses_before_overwrite_deletes(tmp_path, shards, finished_run):  # noqa: F811
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    hub = ["hub.push=true", "hub.model_id=speedplm-test/run", "train.resume=none", "train.overwrite=true"]
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}  # no HF_TOKEN, no login cache
    code, out = run_training(tmp_path, shards, *FINISHED, *hub, env=env)
    assert code == 2, out[-3000:]
    assert "hub.push=true: hub push to speedplm-test/run: no Hugging Face token" in out and "Traceback" not in out
    assert snapshot(run) == before  # train.overwrite=true deleted nothing: the check failed first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.fixture
def no_tensorboard(tmp_path_factory):
    """A folder that, first on PYTHONPATH, makes `tensorboard` (and tensorboardX) fail to import, installed or not."""
    shadow = tmp_path_factory.mktemp("shadow")
    for name in ("tensorboard", "tensorboardX"):
        (shadow / name).mkdir()
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} made unimportable by the test')\n")
    return str(shadow)


def test_trackers_refused_before_any_write(tmp_path, shards, no_tensorboard):  # noqa: F811
    env = {"NETRC": str(tmp_path.parent / "no-netrc"), "WANDB_API_KEY": "", "PYTHONPATH": no_tensorboard}
    code, out = run_training(tmp_path, shards, "tracking.wandb=online", "tracking.tensorboard=true", env=env)
    assert code == 2, out[-3000:]
    assert "tracking.wandb=online: no wandb login (neither WANDB_API_KEY nor a netrc entry for api.wandb.ai)" in out
    assert "tracking.tensorboard=true: tensorboard cannot be imported" in out and "Traceback" not in out
    assert list(tmp_path.iterdir()) == []


# ---- #21 item 4: a stop signal at any point saves what can be saved and exits 143


@pytest.mark.parametrize(
    "phase,where,step",
    [
        ("start_eval", "the step-0 evaluation", 0),
        ("final_eval", "the final valid evaluation", 3),
        ("final", "writing final/", 3),
    ],
)
def test_sigterm_outside_the_loop_saves_and_exits_143(tmp_path, shards, phase, where, step):  # noqa: F811
    common = ["train.max_steps=3", "train.save_every=100", "eval.every=2"]
    code, out = run_training(tmp_path, shards, *common, f"train.inject_sigterm_at={phase}")
    assert code == 143, out[-3000:]
    run = tmp_path / "run"
    assert f"SIGTERM during {where}: checkpoint" in out, out[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{step:06d}"]
    assert (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").exists()
    assert not (run / "final").exists() and not (run / ".tmp-final").exists()  # final/ only for a finished run
    # started again: resumes there, finishes; the final evals and final/ once
    code, out = run_training(tmp_path, shards, *common)
    assert code == 0 and "resumed from" in out, out[-3000:]
    assert (run / "final" / "model.safetensors").exists()
    assert [r["step"] for r in rows(tmp_path, split="valid")] == [0, 2, 3]
    assert [r["step"] for r in rows(tmp_path, split="test")] == [3]
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
