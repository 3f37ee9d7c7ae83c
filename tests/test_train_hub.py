"""Training with Hub push against the loopback Hub peer: faults don't stop training, pushes land byte-identical,
a failed last push exits non-zero, and the HF_TOKEN canary never leaks."""

import secrets
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from test_train_e2e import rows, run_training, shards, wait_for_step  # noqa: F401  (shards is a fixture)

pytestmark = pytest.mark.slow
REPO = "speedplm-test/run"


@pytest.fixture
def canary():
    return "hf_canary" + secrets.token_hex(12)


def hub_env(server, canary, tmp_path):
    return {
        "HF_TOKEN": canary,
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "WANDB_SILENT": "true",
    }


def every_file_text(directory: Path):
    for path in directory.rglob("*"):
        if path.is_file():
            yield path, path.read_bytes()


def test_push_survives_faults_and_lands_identical(tmp_path, shards, canary):  # noqa: F811
    with HubServer(canary) as server:
        server.fail(503, endpoint="create")
        server.fail(503, endpoint="commit")
        server.fail(429, endpoint="commit", retry_after=1)
        # refuse connections for a while once training is under way (the step-4 push meets a dead server)
        threading.Timer(0.5, server.refuse_for, args=(1.5,)).start()
        code, out = run_training(
            tmp_path,
            shards,
            "train.max_steps=8",
            "eval.every=4",
            "hub.push=true",
            f"hub.model_id={REPO}",
            "hub.push_every=4",
            "hub.backoff_s=0.2",
            "tracking.wandb=offline",
            env=hub_env(server, canary, tmp_path),
        )
        assert code == 0, out[-3000:]
        commits = server.commits(REPO)
        messages = [c.message for c in commits]
        assert messages[0].startswith("speedplm: code, config") and messages[-1] == "speedplm: final model at step 8"
        final = tmp_path / "run" / "final"
        expected = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
        assert server.files(REPO) == expected  # byte-identical, the newest commit holds the final model
        assert "model.safetensors" not in server.files(REPO, revision=commits[0].oid)  # start push: no weights
        retried = [r.status for r in server.requests if r.endpoint in ("create", "commit") and r.status >= 400]
        assert {503, 429} <= set(retried)
        # the refused create is the start check's (write access before the first write), which retries it; each
        # refused commit is retried by the pusher (the library does not retry these POSTs), and the training log
        # counts every one of those retries (refused connections add more)
        creates = [r.status for r in server.requests if r.endpoint == "create"]
        assert creates[0] == 503 and any(status < 400 for status in creates[1:])
        commit_faults = [r.status for r in server.requests if r.endpoint == "commit" and r.status in (429, 503)]
        last = rows(tmp_path)[-1]
        assert last["hub_retries"] >= len(commit_faults) >= 2 and last["hub_failed"] == 0
        for request in server.requests:
            for name, value in request.headers.items():
                assert canary not in value or name == "authorization"
    # the canary appears nowhere: stdout, run dir (metrics, config, checkpoints, wandb offline files), pushed files
    assert canary not in out
    assert (tmp_path / "run" / "wandb").is_dir()
    for path, data in every_file_text(tmp_path / "run"):
        assert canary.encode() not in data, path
    for data in server.files(REPO).values():
        assert canary.encode() not in data


def test_failed_last_push_exits_non_zero(tmp_path, shards, canary):  # noqa: F811
    with HubServer(canary) as server:
        server.fail(403, endpoint="commit", count=100)
        code, out = run_training(
            tmp_path,
            shards,
            "train.max_steps=3",
            "eval.every=0",
            "hub.push=true",
            f"hub.model_id={REPO}",
            "hub.backoff_s=0.1",
            env=hub_env(server, canary, tmp_path),
        )
    assert code != 0
    assert "HubPushError" in out and "403" in out and REPO in out
    assert canary not in out


def test_steps_go_on_while_a_push_is_held_and_the_push_is_its_checkpoint(tmp_path, shards, canary):  # noqa: F811
    """The loopback Hub parks every commit until the trainer has logged 6 steps (pushes are due every 2): the steps
    go on meanwhile; then each pushed model is, tensor for tensor, the checkpoint of its step."""
    from safetensors.torch import load, load_file

    with HubServer(canary) as server:
        gate = server.hold("commit", count=2)  # the start commit, and whichever is next
        proc = run_training(
            tmp_path,
            shards,
            "train.max_steps=10",
            "eval.every=0",
            "train.save_every=100",
            "train.keep_checkpoints=10",
            "hub.push=true",
            f"hub.model_id={REPO}",
            "hub.push_every=2",
            "hub.backoff_s=0.2",
            env=hub_env(server, canary, tmp_path),
            wait=False,
        )
        wait_for_step(tmp_path, "run", 6, proc)
        assert not gate.is_set() and server.commits(REPO) == []  # 3 pushes due, none landed: nobody waited
        gate.set()
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        commits = server.commits(REPO)
        messages = [c.message for c in commits]
        assert messages[0].startswith("speedplm: code, config") and messages[-1] == "speedplm: final model at step 10"
        assert server.files(REPO) == {p.name: p.read_bytes() for p in (tmp_path / "run" / "final").iterdir()}
        middle = commits[1:-1]
        assert middle and all(c.message.startswith("speedplm: model at step ") for c in middle), messages
        for commit in middle:
            step = int(commit.message.rsplit(" ", 1)[1])
            pushed = load(commit.files["model.safetensors"])
            saved = load_file(tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "model.safetensors")
            assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved), step
    assert rows(tmp_path)[-1]["hub_failed"] == 0


def test_push_refused_mid_run_saves_a_checkpoint_then_exits_naming_the_push(tmp_path, shards, canary):  # noqa: F811
    """The token expires mid-run: the start push lands, then every commit answers 401. The run saves a checkpoint
    at the step it learns it, and exits 1 naming the push."""
    with HubServer(canary) as server:
        proc = run_training(
            tmp_path,
            shards,
            "train.max_steps=40",
            "eval.every=0",
            "train.save_every=100",
            "train.keep_checkpoints=10",
            "hub.push=true",
            f"hub.model_id={REPO}",
            "hub.push_every=2",
            "hub.backoff_s=0.1",
            env=hub_env(server, canary, tmp_path),
            wait=False,
        )

        def landed() -> int:
            try:
                return len(server.commits(REPO))
            except KeyError:  # the repo is not created yet
                return 0

        deadline = time.monotonic() + 120
        while not landed() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert len(server.commits(REPO)) == 1  # the start push landed with the valid token
        server.fail(401, endpoint="commit", count=1000)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert f"HubPushError: hub push to {REPO} (step " in out and ": HTTP 401" in out, out[-3000:]
    assert "training stopped during the training loop (step" in out and "Traceback" not in out
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    stopped_at = max(r["step"] for r in rows(tmp_path))
    assert stopped_at < 40 and checkpoints[-1].name == f"step-{stopped_at:06d}"  # saved at the step it stopped
    assert (checkpoints[-1] / "COMPLETE").exists() and not (tmp_path / "run" / "final").exists()
    assert canary not in out


def test_hub_write_access_checked_before_anything_is_written(tmp_path, shards, canary):  # noqa: F811
    with HubServer(canary) as server:
        server.fail(403, endpoint="create", count=100)
        code, out = run_training(
            tmp_path, shards, "hub.push=true", f"hub.model_id={REPO}", env=hub_env(server, canary, tmp_path)
        )
        assert server.seen("commit") == 0
    assert code == 2, out[-3000:]
    assert f"hub.push=true: hub access check for {REPO} at {server.url}: HTTP 403" in out, out[-3000:]
    assert "Traceback" not in out and canary not in out
    assert not (tmp_path / "run").exists()  # no run directory, no config.yaml


def test_sigterm_while_awaiting_the_last_push_exits_143(tmp_path, shards, canary):  # noqa: F811
    with HubServer(canary) as server:
        server.hold("commit", count=5)  # no commit lands: the start push holds the final one behind it
        proc = run_training(
            tmp_path,
            shards,
            "train.max_steps=3",
            "eval.every=0",
            "hub.push=true",
            f"hub.model_id={REPO}",
            env=hub_env(server, canary, tmp_path),
            wait=False,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "awaiting the last Hub push" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM during the last Hub push: checkpoint" in out
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003"]
    assert not (run / "final").exists() and not (run / ".tmp-final").exists()
