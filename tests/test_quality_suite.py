"""`python -m eval.quality`: the whole suite on a checkpoint and its random-init twin, run as the user runs it (a
subprocess outside the repo) on the committed real slices of every yardstick's data."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomized_tiny_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A data/quality folder as `python -m eval.quality fetch` lays it out, from the committed slices."""
    root = tmp_path_factory.mktemp("quality")
    (root / "dms").mkdir()
    for name in ("gb1", "tdp43", "amyloid"):
        shutil.copy(FIXTURES / "dms" / f"{name}.csv", root / "dms")
    assays = {n: {"file": f"{n}.csv"} for n in ("gb1", "tdp43", "amyloid")}
    (root / "dms" / "manifest.json").write_text(json.dumps({"assays": assays}))
    shutil.copytree(FIXTURES / "quality", root / "sidechainnet")
    shutil.copytree(FIXTURES / "contacts", root / "promod3")
    return root


def run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "eval.quality", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_sequences_lists_every_protein_the_yardsticks_use(data, tmp_path):
    from eval.quality.suite import sequences

    found = sequences(data)
    kinds = [key.split("|")[0] for key in found]
    ss = sum(1 for line in (data / "sidechainnet" / "ss_subset.jsonl").read_text().splitlines() if line.strip())
    fold = sum(1 for line in (data / "sidechainnet" / "fold_subset.jsonl").read_text().splitlines() if line.strip())
    assert kinds.count("dms") == 3 and kinds.count("ss") == ss and kinds.count("fold") == fold
    assert kinds.count("contacts") == 8  # the slice's 4 training-pool + 4 test chains
    assert all(set(seq) <= set("ACDEFGHIKLMNPQRSTVWYXBUZO") and seq for seq in found.values())
    proc = run(["sequences", "--data", data, "--out", tmp_path / "eval.fasta"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "eval.fasta").read_text().count(">") == len(found)


@pytest.mark.slow
def test_suite_on_a_checkpoint_and_its_twin(data, tmp_path):
    from training.publish.model_folder import write_model_folder

    checkpoint = tmp_path / "ckpt"
    write_model_folder(randomized_tiny_model(seed=3).eval(), checkpoint)
    out = tmp_path / "out"
    proc = run(["run", "--model", checkpoint, "--data", data, "--out", out, "--contacts-train-chains", 4], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out / "quality.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    yardsticks = {r["yardstick"] for r in rows}
    assert yardsticks == {"variant effects (DMS)", "secondary structure", "fold", "contacts (long range)"}
    assert all(r["model"] and r["twin"] for r in rows), rows  # every yardstick scored both
    # The twin is a fresh initialisation of the checkpoint's config, not its weights: SpeedPLM zeroes every residual
    # output projection at init (the randomised checkpoint has none zero), and the models score differently.
    from safetensors.torch import load_file

    twin, trained = load_file(out / "twin" / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    outputs = [k for k in twin if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert outputs and all(twin[k].abs().max() == 0 for k in outputs)
    assert all(trained[k].abs().max() > 0 for k in outputs) and twin.keys() == trained.keys()
    q3 = next(r for r in rows if r["metric"].startswith("Q3"))
    assert float(q3["model"]) != pytest.approx(float(q3["twin"]), abs=1e-6)
    text = (out / "quality.md").read_text()
    assert "| yardstick | metric | model | twin | model - twin | baselines |" in text and "Commit: `" in text
    for folder in ("zeroshot", "ss", "fold", "contacts", "twin"):
        assert any((out / folder).iterdir()), folder


def test_missing_data_is_refused_naming_the_fetch(tmp_path):
    proc = run(
        ["run", "--model", tmp_path, "--data", tmp_path / "none", "--out", tmp_path / "o", "--twin", "none"], tmp_path
    )
    assert proc.returncode == 2
    assert "not prepared" in proc.stderr and "python -m eval.quality fetch" in proc.stderr


def _quality_csv(folder: Path, models: list, twins: list, std: str = "") -> None:
    folder.mkdir(parents=True)
    columns = ["yardstick", "metric", "model", "twin", "baselines", "diff", "model_std", "twin_std"]
    with open(folder / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for metric, m, t in zip(("Q3 (last layer)", "P@L/5"), models, twins):
            row = dict(yardstick="ss", metric=metric, model=m, twin=t, baselines="one-hot 0.5", diff="")
            writer.writerow({**row, "model_std": std, "twin_std": std if t != "" else ""})


def test_compare_puts_several_runs_in_one_table_and_refuses_unlike_ones(tmp_path):
    _quality_csv(tmp_path / "swissprot", [0.61, 0.08], [0.50, 0.03], std="0.004")  # spread over probe seeds
    _quality_csv(tmp_path / "builtin", [0.55, 0.05], ["", ""])  # run with --twin none
    out = tmp_path / "table.md"
    for name, losses in (("sp", [3.4, 2.9, 2.7]), ("bi", [3.4, 3.0, 2.8])):  # two training runs' metrics.jsonl
        (tmp_path / name).mkdir()
        rows = [{"step": 100 * i, "tokens": 800_000 * i, "split": "valid", "loss": v} for i, v in enumerate(losses)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["compare", tmp_path / "swissprot", tmp_path / "builtin", "--names", "Swiss-Prot", "built-in", "--out", out]
    proc = run([*args, "--curves", tmp_path / "sp", tmp_path / "bi"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.read_text()
    assert "| yardstick | metric | Swiss-Prot | built-in | twin | baselines |" in text
    assert "| ss | Q3 (last layer) | 0.6100 ± 0.0040 | 0.5500 | 0.5000 ± 0.0040 | one-hot 0.5 |" in text
    assert "P@L/5 | 0.0800 ± 0.0040 | 0.0500 | 0.0300 ± 0.0040 |" in text and "Commit: `" in text
    _quality_csv(tmp_path / "other", [0.6, 0.07], [0.45, 0.03])  # another config: its twin scores differently
    proc = run(["compare", tmp_path / "swissprot", tmp_path / "other", "--out", tmp_path / "x.md"], tmp_path)
    assert proc.returncode == 2 and "twins score differently" in proc.stderr
    assert not (tmp_path / "x.md").exists()
