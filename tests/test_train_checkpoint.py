"""Checkpoint ownership (#13 item 1): the pruner keeps the newest N verified checkpoints of the current run and deletes
only checkpoints of that run it has read to be older; metrics.jsonl with a torn last line (#13 item 9)."""

import json

import pytest
from accelerate import Accelerator

from training.checkpoint import CHECKPOINT_MANIFEST, COMPLETE, CheckpointManager, TrainerState, sha256_file
from training.tracking import MetricsLog


def fake_checkpoint(root, step, run_id, corrupt=False):
    """A finished checkpoint directory as CheckpointManager.save lays it out (state, manifest, COMPLETE)."""
    directory = root / f"step-{step:06d}"
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(bytes([step % 256]) * 64)
    TrainerState(run_id, world_size=1, step=step).write(directory)
    manifest = {p.name: sha256_file(p) for p in directory.iterdir()}
    (directory / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest))
    (directory / COMPLETE).write_text(str(step))
    if corrupt:
        (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    return directory


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def names(root):
    return sorted(p.name for p in root.iterdir())


def test_prune_keeps_newest_verified_of_this_run(tmp_path, accelerator):
    """The issue's case: corrupt checkpoints with higher step numbers (another run's, or unverifiable) survive, the
    current run's newest verified ones are kept, and only this run's older ones go."""
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=2, accelerator=accelerator)
    fake_checkpoint(root, 1, "new")  # this run, older than the kept ones: deleted
    for step in (4, 8):
        assert manager.verify(fake_checkpoint(root, step, "new")) is None
    fake_checkpoint(root, 12, "old", corrupt=True)  # another run's, corrupt, higher steps
    fake_checkpoint(root, 16, "old", corrupt=True)
    fake_checkpoint(root, 10, "new", corrupt=True)  # this run, newer than the kept ones, not verified: kept
    (root / "step-000002").mkdir()  # unreadable (no state): never deleted
    deleted = manager.prune("new")
    assert [d.name for d in deleted] == ["step-000001"]
    assert names(root) == ["step-000002", "step-000004", "step-000008", "step-000010", "step-000012", "step-000016"]
    assert manager.verify(root / "step-000010").endswith("is corrupt (sha256 mismatch)")


def test_prune_waits_for_enough_verified_checkpoints(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=3, accelerator=accelerator)
    for step in (1, 2, 3):
        fake_checkpoint(root, step, "run")
    assert manager.verify(fake_checkpoint(root, 4, "run")) is None
    assert manager.prune("run") == []  # one verified checkpoint of 3 to keep: nothing is known to be older
    assert manager.verify(root / "step-000003") is None and manager.verify(root / "step-000002") is None
    assert [d.name for d in manager.prune("run")] == ["step-000001"]


def test_step_order_is_numeric(tmp_path, accelerator):
    root = tmp_path / "checkpoints"
    for step in (999_999, 1_000_000, 20):
        fake_checkpoint(root, step, "run")
    assert [d.name for d in CheckpointManager(root, 1, accelerator).step_dirs()] == [
        "step-000020",
        "step-999999",
        "step-1000000",
    ]


def test_metrics_torn_last_line_is_reported_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, True, "abc")
    log.write({"step": 1, "loss": 2.5})
    log.write({"step": 2, "loss": float("nan")})
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 2.')  # a write cut short
    rows, torn = MetricsLog.read(path)
    assert rows == [{"step": 1, "loss": 2.5, "run_id": "abc"}, {"step": 2, "loss": None, "run_id": "abc"}]
    assert torn == 3


def test_metrics_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not a metrics row"):
        MetricsLog.read(path)


def test_torn_checkpoint_directories_are_skipped_and_cleaned(tmp_path, accelerator):
    """A save cut short leaves `.tmp-step-*` (never listed, removed by the next prune) or, if a directory was copied
    half-way, a step directory without COMPLETE or with a missing file: skipped by resume, naming the file."""
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep=1, accelerator=accelerator)
    good = fake_checkpoint(root, 2, "run")
    (fake_checkpoint(root, 4, "run") / COMPLETE).unlink()
    (fake_checkpoint(root, 6, "run") / "model.safetensors").unlink()
    (root / ".tmp-step-000008").mkdir()
    newest, problems = manager.newest_valid()
    assert newest == good
    assert problems == [
        f"step-000006: {root / 'step-000006' / 'model.safetensors'} missing",
        f"step-000004: {root / 'step-000004' / COMPLETE} missing (save did not finish)",
    ]
    manager.prune("run")
    assert not (root / ".tmp-step-000008").exists()
    assert names(root) == ["step-000002", "step-000004", "step-000006"]  # newer than the kept one: not deleted
