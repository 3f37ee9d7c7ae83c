"""HubPusher against a real loopback HTTP peer: clean push, 5xx/429/refused retries, 403 fail-fast, background
snapshots, and a canary token that must never leak."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hub_server import HubServer
from huggingface_hub import constants

from training.publish.hub import HubPusher, HubPushError

REPO = "speedplm-test/tiny"
# huggingface_hub's own LFS PUT passes `data=fileobj`, which httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def canary() -> str:
    return "hf_canary" + secrets.token_hex(12)


@pytest.fixture
def hub(canary, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", canary)
    for name in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    # Isolate from any real login on this machine (huggingface_hub froze these paths at import).
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    # CI may run with HF_HUB_OFFLINE=1 (no Hub downloads); the loopback peer is not the Hub.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # The loopback peer speaks LFS, not Xet; setattr restores the library's value after the test.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", constants.HF_HUB_DISABLE_XET)
    with HubServer(canary) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def make_pusher(tmp_path):
    made = []

    def make(**kwargs) -> HubPusher:
        kwargs = {"max_retries": 10, "backoff_s": 0.05, "tmp_dir": tmp_path, **kwargs}
        pusher = HubPusher(REPO, **kwargs)
        made.append(pusher)
        return pusher

    yield make
    for pusher in made:
        pusher.close(cancel=True)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A final/-form folder: config, card, code, tokenizer file, and a ~1 MB binary pushed through LFS."""
    folder = tmp_path / "final"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "speedplm", "hidden_size": 64}\n')
    (folder / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny speedplm\n")
    (folder / "modeling_speedplm.py").write_text("# remote code\n")
    (folder / "tokenizer" / "vocab.txt").write_text("<cls>\n<pad>\n<eos>\n<unk>\nL\nA\n")
    header = b'{"w":{"dtype":"F32","shape":[262144],"data_offsets":[0,1048576]}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + os.urandom(1 << 20))
    return folder


def test_clean_push_is_one_commit_with_identical_files(hub, make_pusher, model_dir, canary):
    expected = _tree(model_dir)
    pusher = make_pusher()
    assert pusher.endpoint == hub.url  # HF_ENDPOINT read now, not when huggingface_hub was imported
    pusher.push_folder(model_dir, "step 100", step=100)
    pusher.wait(timeout=30)

    commits = hub.commits(REPO)
    assert [c.message for c in commits] == ["step 100"]
    assert hub.files(REPO) == expected
    assert commits[0].lfs_paths == ["model.safetensors"]  # LFS batch + PUT + verify path exercised
    status = pusher.status()
    assert (status["done"], status["failed"], status["retries"], status["pending"]) == (1, 0, 0, 0)
    assert status["last_commit"] == commits[0].oid
    for request in hub.requests:
        if request.endpoint == "lfs_upload":  # presigned-style URL: no credentials sent there
            assert "authorization" not in request.headers
        else:
            assert request.headers["authorization"] == f"Bearer {canary}"


def test_503_and_429_are_retried_and_the_push_lands(hub, make_pusher, model_dir):
    hub.fail(503, endpoint="create")  # create_repo and commit are not retried inside huggingface_hub
    hub.fail(503, endpoint="commit")
    hub.fail(429, endpoint="commit", retry_after=1)
    pusher = make_pusher()
    pusher.push_folder(model_dir, "step 1", step=1)
    pusher.wait(timeout=30)

    assert [c.message for c in hub.commits(REPO)] == ["step 1"]
    assert hub.files(REPO) == _tree(model_dir)
    status = pusher.status()
    assert (status["done"], status["failed"], status["retries"]) == (1, 0, 3)
    commit_calls = [r for r in hub.requests if r.endpoint == "commit"]
    assert [r.status for r in commit_calls] == [503, 429, 200]
    assert commit_calls[2].t - commit_calls[1].t >= 1.0  # Retry-After honoured (a lower bound, not a race)


def test_preupload_5xx_is_absorbed_by_huggingface_hub_backoff(hub, make_pusher, model_dir):
    hub.fail(502, endpoint="preupload")
    pusher = make_pusher()
    pusher.push_folder(model_dir, "step 1", step=1)
    pusher.wait(timeout=30)
    assert hub.files(REPO) == _tree(model_dir)
    assert [r.status for r in hub.requests if r.endpoint == "preupload"] == [502, 200]
    assert pusher.status()["retries"] == 0  # the library's inner http_backoff retried, not ours


def test_refused_connections_then_recovery(hub, make_pusher, model_dir):
    hub.refuse_for(1.5)
    pusher = make_pusher(max_retries=20)  # backoff doubling from 0.05 s: retries go on far past the 1.5 s outage
    pusher.push_folder(model_dir, "step 1", step=1)
    pusher.wait(timeout=30)
    assert [c.message for c in hub.commits(REPO)] == ["step 1"]
    assert hub.files(REPO) == _tree(model_dir)
    assert pusher.status()["retries"] >= 1
    assert "ConnectError" in pusher.status()["last_error"]


@pytest.mark.parametrize("endpoint", ["create", "commit"])
def test_403_fails_fast_with_a_clear_message_and_no_token(hub, make_pusher, model_dir, canary, endpoint):
    hub.fail(403, endpoint=endpoint, count=100, echo_auth=True)  # the body echoes "Bearer <token>"
    pusher = make_pusher()
    pusher.push_folder(model_dir, "step 7", step=7)
    with pytest.raises(HubPushError) as excinfo:
        pusher.wait(timeout=30)
    message = str(excinfo.value)
    assert REPO in message and "step 7" in message and "HTTP 403" in message
    assert canary not in message and "<token>" in message  # scrubbed, not merely absent
    assert hub.seen(endpoint) == 1  # no retry on 403
    assert pusher.status()["retries"] == 0 and pusher.status()["failed"] == 1
    with pytest.raises(HubPushError, match="403"):
        pusher.check()  # the loop can stop early instead of training for hours without pushes


def test_gives_up_after_max_retries(hub, make_pusher, model_dir):
    hub.fail(503, endpoint="commit", count=100)
    pusher = make_pusher(max_retries=2)
    pusher.push_folder(model_dir, "step 1", step=1)
    with pytest.raises(HubPushError, match=r"HTTP 503.*gave up after 2 retries"):
        pusher.wait(timeout=30)
    assert hub.seen("commit") == 3
    pusher.check()  # transient exhaustion is not a "fatal" (auth) failure


def test_push_returns_while_upload_is_in_flight_and_newest_pending_wins(hub, make_pusher, model_dir, tmp_path):
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "train_config.yaml").write_text("lr: 0.001\n")
    gate = hub.hold("create")  # the first request of the first push parks in the server
    pusher = make_pusher()

    pusher.push_folder(code_dir, "code + config", step=0)
    _wait_until(lambda: hub.seen("create") == 1)
    # The upload is parked server-side, yet push_folder returned: the caller never waits on the network.
    assert not gate.is_set() and pusher.status()["done"] == 0
    pusher.push_folder(model_dir, "step 10", step=10)
    (model_dir / "config.json").write_text('{"step": 20}\n')
    pusher.push_folder(model_dir, "step 20", step=20)  # supersedes the still-queued step 10
    assert pusher.status()["dropped"] == 1 and pusher.status()["pending"] == 2

    gate.set()
    pusher.wait(timeout=30)
    assert [c.message for c in hub.commits(REPO)] == ["code + config", "step 20"]
    assert hub.files(REPO) == {**_tree(code_dir), **_tree(model_dir)}
    status = pusher.status()
    assert (status["queued"], status["done"], status["dropped"], status["pending"]) == (3, 2, 1, 0)


def test_pushed_content_is_the_snapshot_taken_at_push_time(hub, make_pusher, model_dir):
    expected = _tree(model_dir)
    gate = hub.hold("create")
    pusher = make_pusher()
    pusher.push_folder(model_dir, "step 5", step=5)
    # Training keeps writing into the same folder while the upload is parked.
    (model_dir / "model.safetensors").write_bytes(b"overwritten")
    (model_dir / "config.json").write_text("{}")
    (model_dir / "README.md").unlink()
    (model_dir / "optimizer.pt").write_bytes(b"late file")
    gate.set()
    pusher.wait(timeout=30)
    assert hub.files(REPO) == expected


def test_canary_token_never_leaks(hub, make_pusher, model_dir, canary, caplog, capsys, monkeypatch, tmp_path):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub logs each request as curl
    hub.fail(503, endpoint="commit", echo_auth=True)
    hub.fail(429, endpoint="preupload", retry_after=0, echo_auth=True)
    pusher = make_pusher()
    pusher.push_folder(model_dir, "step 1", step=1)
    pusher.wait(timeout=30)
    hub.fail(403, endpoint="commit", count=100, echo_auth=True)
    (model_dir / "config.json").write_text('{"step": 2}\n')
    pusher.push_folder(model_dir, "step 2", step=2)
    with pytest.raises(HubPushError) as excinfo:
        pusher.wait(timeout=30)
    pusher.close()

    out, err = capsys.readouterr()
    assert any("injected 503" in r.getMessage() for r in caplog.records)  # the echoing errors were logged
    for text in (caplog.text, out, err, str(excinfo.value), repr(pusher), str(pusher.status())):
        assert canary not in text
    assert all(canary.encode() not in data for data in hub.files(REPO).values())
    for request in hub.requests:
        assert canary not in request.path
        assert all(canary not in v for k, v in request.headers.items() if k != "authorization")
    for path in tmp_path.rglob("*"):  # snapshots, run folders: nothing on disk holds the token
        assert path.is_dir() or canary.encode() not in path.read_bytes()


def test_token_from_login_cache(hub, make_pusher, model_dir, canary, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    token_file = Path(constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True)
    token_file.write_text(canary)
    pusher = make_pusher()
    pusher.push_folder(model_dir, "step 1", step=1)
    pusher.wait(timeout=30)
    assert hub.files(REPO) == _tree(model_dir)
    assert {r.headers.get("authorization") for r in hub.requests if r.endpoint == "commit"} == {f"Bearer {canary}"}


def test_missing_token_is_a_clear_error(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError, match="HF_TOKEN"):
        HubPusher(REPO)


def test_offline_mode_is_a_clear_error(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        HubPusher(REPO)


def test_push_built_writes_in_the_worker_thread_and_frees_its_inputs(hub, make_pusher, tmp_path):
    """push_built returns before its folder exists; a superseded job never builds; discard runs for every job."""
    gate = hub.hold("create")
    pusher = make_pusher()
    built, discarded = [], []

    def job(name: str):
        def build(folder: Path) -> None:
            built.append((name, threading.current_thread().name))
            (folder / "weights.txt").write_text(name)

        return dict(build=build, discard=lambda: discarded.append(name))

    pusher.push_built(commit_message="start", step=0, key="start", **job("start"))
    _wait_until(lambda: hub.seen("create") == 1)
    for step in (2, 4):  # step 2 is still queued behind the parked start push when step 4 arrives
        pusher.push_built(commit_message=f"step {step}", step=step, key="model", **job(f"step {step}"))
    assert pusher.status()["dropped"] == 1 and discarded == ["step 2"]
    gate.set()
    pusher.wait(timeout=30)
    assert [c.message for c in hub.commits(REPO)] == ["start", "step 4"]
    assert [name for name, _ in built] == ["start", "step 4"]
    assert all(thread.startswith("speedplm-hub-push") for _, thread in built)  # never the caller's thread
    assert sorted(discarded) == ["start", "step 2", "step 4"]
    assert hub.files(REPO) == {"weights.txt": b"step 4"}


def test_publisher_pushes_a_sharded_model_from_its_checkpoint(hub, tmp_path):
    """Start push: code, config, tokenizer, card and no weights (none written). Periodic push: staged by the pusher's
    thread from the checkpoint's weights, sharded into several safetensors files; it loads from a fresh process."""
    from accelerate import Accelerator
    from conftest import randomized_tiny_model

    from training.checkpoint import CheckpointManager, TrainerState
    from training.publish.config import HubSection
    from training.publish.publisher import ModelPublisher

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(randomized_tiny_model(seed=3))
    checkpoint = CheckpointManager(tmp_path / "checkpoints", 2, accelerator).save(
        model, {}, TrainerState("r", world_size=1, step=7)
    )
    gate = hub.hold("commit")  # the start commit parks: the publisher has written nothing yet on this thread
    staging = tmp_path / "run" / "hub_staging"
    hub_config = HubSection(push=True, model_id=REPO, max_retries=3, backoff_s=0.05)
    publisher = ModelPublisher(hub_config, staging, accelerator, model, max_shard_size="40KB")
    publisher.push_checkpoint(7, checkpoint, "a test run")
    gate.set()
    publisher.finish()
    start, pushed = hub.commits(REPO)
    assert start.message.startswith("speedplm: code, config") and pushed.message == "speedplm: model at step 7"
    assert "config.json" in start.files and "tokenizer_config.json" in start.files and "README.md" in start.files
    assert not [f for f in start.files if f.endswith(".safetensors") or "index" in f]
    shards = sorted(f for f in pushed.files if f.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in pushed.files, sorted(pushed.files)
    assert not staging.exists() or not list(staging.rglob("*.safetensors"))  # links and folders removed

    folder = tmp_path / "downloaded"
    for name, data in pushed.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    load = (
        "import sys, hashlib, torch; from transformers import AutoModelForMaskedLM;"
        "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True);"
        "sd = m.state_dict(); print(hashlib.sha256(b''.join(sd[k].float().numpy().tobytes() for k in sorted(sd)))"
        ".hexdigest())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")} | {"HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", load, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sd = accelerator.unwrap_model(model).state_dict()
    expected = hashlib.sha256(b"".join(sd[k].float().numpy().tobytes() for k in sorted(sd))).hexdigest()
    assert out.stdout.split()[-1] == expected  # the checkpoint's weights, bit for bit
