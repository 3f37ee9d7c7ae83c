"""#24: stop at a target validation loss (`train.target_loss`) and continue pretraining from a checkpoint
(`model.init_from`) on one protein family — real `train_accelerate.py` runs in subprocesses, tiny model."""

import json
from pathlib import Path

import pytest
from test_train_e2e import SMALL, rows, run_training, shards  # noqa: F401

from training.config import ConfigError, load_config
from training.metrics import reach

# one xdist worker runs this file: its module fixtures (trained checkpoints) are built once, not per worker
pytestmark = pytest.mark.xdist_group("test_train_continue")


def summary_row(run_dir: Path) -> dict:
    found = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found = [r for r in found if r.get("split") == "summary"]
    assert len(found) == 1, found
    return found[0]


# ---- fast: the interpolation helper and the config checks


def test_reach_interpolates_between_the_bracketing_points():
    points = [{"loss": 3.0, "time": 0.0, "tokens": 0}, {"loss": 2.6, "time": 10.0, "tokens": 4000}]
    points.append({"loss": 2.2, "time": 30.0, "tokens": 8000})
    # 2.4 lies halfway between 2.6 (t=10) and 2.2 (t=30): t=20, tokens 6000
    assert reach(points, 2.4, "time") == pytest.approx(20.0) and reach(points, 2.4, "tokens") == pytest.approx(6000)
    assert reach(points, 2.6, "time") == pytest.approx(10.0)  # exactly at an eval: that eval
    assert reach(points, 3.5, "tokens") == 0.0  # at or below the target at the first point: there
    assert reach(points, 2.0, "time") is None


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.target_loss=0"], "train.target_loss=0: must be > 0"),
        (["train.target_loss=-1.5"], "train.target_loss=-1.5: must be > 0"),
        (["train.target_loss=2.5", "eval.every=0"], "eval.every=0"),
        (["model.init_from=''"], "model.init_from='': must not be empty"),
    ],
)
def test_target_and_init_from_config_errors_name_the_keys(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("+", r"\+")):
        load_config(None, overrides)


def test_init_from_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.init_from=.*no config.json"):
        load_config(None, [f"model.init_from={tmp_path}"])


# ---- slow: real runs

TARGET = ["eval.every=2", "train.save_every=0", "optim.warmup_steps=2"]


@pytest.mark.slow
def test_target_loss_reached_stops_early_with_interpolated_numbers(tmp_path, shards):  # noqa: F811
    target = 3.05
    args = [*TARGET, "train.max_steps=60", f"train.target_loss={target}"]
    code, out = run_training(tmp_path, shards, *args)
    assert code == 0, out[-3000:]
    run = tmp_path / "run"
    valid = rows(tmp_path, split="valid")
    steps = [r["step"] for r in valid]
    last = max(steps)
    assert steps == list(range(0, last + 1, 2)) and last < 60, steps  # stopped at the first eval <= target
    assert valid[-1]["loss"] <= target < valid[-2]["loss"], [r["loss"] for r in valid]
    summary = summary_row(run)
    assert summary["target_reached"] is True and summary["target_loss"] == target and summary["target_step"] == last
    # by hand from the two bracketing eval rows: linear in loss
    before, after = valid[-2], valid[-1]
    frac = (before["loss"] - target) / (before["loss"] - after["loss"])
    assert 0 < frac <= 1
    for key, column in (("time_to_target", "train_seconds"), ("tokens_to_target", "tokens")):
        expected = before[column] + frac * (after[column] - before[column])
        assert summary[key] == pytest.approx(expected, rel=1e-9), key
    assert before["tokens"] < summary["tokens_to_target"] <= after["tokens"]
    assert max(r["step"] for r in rows(tmp_path)) == last  # no training step after the target
    assert rows(tmp_path, split="test")[0]["step"] == last  # the final evals ran
    card = (run / "final" / "README.md").read_text()
    assert f"Target validation loss {target:g} reached" in card and f"stopped at step {last}" in card
    state = json.loads((run / "checkpoints" / f"step-{last:06d}" / "trainer_state.json").read_text())
    assert state["target"]["step"] == last and state["recipe"]["train.target_loss"] == target
    # started again with the same recipe: finished, nothing to do, nothing written
    before_bytes = (run / "metrics.jsonl").read_bytes()
    code, out = run_training(tmp_path, shards, *args)
    assert code == 0 and "nothing to do" in out and "reached" in out, out[-2000:]
    assert (run / "metrics.jsonl").read_bytes() == before_bytes
    # another target is another recipe: refused, naming it
    code, out = run_training(tmp_path, shards, *TARGET, "train.max_steps=60", "train.target_loss=2.5")
    assert code == 2 and f"train.target_loss: {target} -> 2.5" in out, out[-2000:]


@pytest.mark.slow
def test_target_loss_not_reached_exits_0_and_says_so(tmp_path, shards):  # noqa: F811
    code, out = run_training(tmp_path, shards, *TARGET, "train.max_steps=4", "train.target_loss=0.5")
    assert code == 0, out[-3000:]
    summary = summary_row(tmp_path / "run")
    assert summary["target_reached"] is False and summary["time_to_target"] is None
    assert summary["tokens_to_target"] is None and summary["step"] == 4
    valid = rows(tmp_path, split="valid")
    assert [r["step"] for r in valid] == [0, 2, 4] and summary["best_valid_loss"] == min(r["loss"] for r in valid)
    assert "not reached" in out
    assert "Target validation loss 0.5 not reached" in (tmp_path / "run" / "final" / "README.md").read_text()


# ---- model.init_from: a source run on the built-in subset, then one protein family


@pytest.fixture(scope="module")
def capsid(tmp_path_factory):
    """Capsid proteins (SEQ_CAPSID.tsv label 1, rows the `shards` source never saw) prepared 90/5/5."""
    from training.data.prepare import PrepareOptions, prepare
    from training.data.sources import builtin_files

    out = tmp_path_factory.mktemp("capsid")
    path = next(p for p in builtin_files() if p.name == "SEQ_CAPSID.tsv")
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    seq, label = header.index("sequence"), header.index("label")
    records = [line.split("\t") for line in lines[400:]]
    records = [r for r in records if r[label] == "1"][:900]
    fasta = out / "capsid.fasta"
    fasta.write_text("".join(f">capsid_{i}\n{r[seq]}\n" for i, r in enumerate(records)))
    options = PrepareOptions(split_fractions=(80, 10, 10), dedup=True, max_length=128)
    prepare([fasta], out / "prepared", options, log=lambda *a: None)
    return out / "prepared"


@pytest.fixture(scope="module")
def source(tmp_path_factory, shards):  # noqa: F811
    tmp = tmp_path_factory.mktemp("source")
    code, out = run_training(tmp, shards, "train.max_steps=16", "eval.every=0", name="src")
    assert code == 0, out[-3000:]
    return tmp / "src" / "final"


@pytest.mark.slow
def test_init_from_continues_on_a_family_and_beats_the_source(tmp_path, shards, capsid, source):  # noqa: F811
    args = [f"model.init_from={source}", "train.max_steps=14", "eval.every=7", "optim.warmup_steps=2"]
    args += ["train.save_every=7"]
    # the run is stopped (SIGTERM) as its final evals begin, then started again: it resumes its own checkpoint
    code, out = run_training(tmp_path, capsid, *args, "train.inject_sigterm_at=final_eval", name="cont")
    assert code == 143, out[-3000:]
    run = tmp_path / "cont"
    config_text = (run / "config.yaml").read_text()
    assert f"init_from: {source}" in config_text and f"continued from {source}" in config_text.splitlines()[0]
    code, out = run_training(tmp_path, capsid, *args, name="cont")
    assert code == 0 and "resuming run" in out, out[-3000:]
    valid = rows(tmp_path, "cont", split="valid")
    assert [r["step"] for r in valid] == [0, 7, 14]
    # step 0 is the source model on the family's held-out (valid) proteins: the continued model beats it
    assert valid[-1]["loss"] < valid[0]["loss"] - 0.02, [r["loss"] for r in valid]  # measured: 2.818 -> 2.763
    # the source's weights were loaded (a random init scores about ln(33) = 3.50 here)
    assert valid[0]["loss"] < 3.3, valid[0]
    card = (run / "final" / "README.md").read_text()
    assert f"Continued from {source}" in card
    for checkpoint in ("step-000007", "step-000014"):
        state = json.loads((run / "checkpoints" / checkpoint / "trainer_state.json").read_text())
        assert state["recipe"]["model.init_from"] == str(source)
    src_id = (source.parent / "config.yaml").read_text().split()[2].rstrip(":")
    assert state["run_id"] != src_id  # its own run id


@pytest.mark.slow
def test_init_from_refuses_a_shape_override(tmp_path, shards, source):  # noqa: F811
    code, out = run_training(
        tmp_path, shards, f"model.init_from={source}", "model.hidden_size=96", "model.kernels=torch"
    )
    assert code == 2, out[-3000:]
    assert "model.hidden_size sets hidden_size=96, the checkpoint has 64" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()  # nothing written
