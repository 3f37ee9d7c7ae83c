"""`python -m eval.results`: one command regenerates the README's Results blocks and docs/results/, each stamped;
run as the user runs it (a subprocess), on a copy of the README."""

import os
import subprocess
import sys
from pathlib import Path

from eval.results import SECTIONS, replace_block, tables_in

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "eval.results", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_every_section_has_its_block_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in SECTIONS:
        assert readme.count(f"<!-- results:{name} -->") == 1 and readme.count(f"<!-- /results:{name} -->") == 1, name
        replace_block(readme, name, "x")  # the markers pair up


def test_tables_in_keeps_tables_and_their_captions_only():
    text = "log line\ntrain step, CPU\n| a | b |\n|---|---|\n| 1 | 2 |\nwrote x.md\n\n| c |\n|---|\n"
    assert tables_in(text) == "train step, CPU\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|"


def test_a_section_replaces_its_block_and_writes_its_stamped_file(tmp_path):
    readme = tmp_path / "README.md"
    before = "# r\n\n<!-- results:speedrun -->\nold numbers\n<!-- /results:speedrun -->\n\nafter\n"
    readme.write_text(before)
    out, work = tmp_path / "docs", tmp_path / "runs" / "results"
    proc = run(["--only", "speedrun", "--readme", readme, "--out", out, "--work", work], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("<!-- /results:speedrun -->\n\nafter\n")
    # no campaign ran on this machine: the block says so and names the command that makes the runs
    assert "no runs in " in text and "ablations-cpu on this machine" in text
    assert "python -m eval.speedrun --campaign eval/speedrun/campaigns/confirm-len30-cpu.yaml" in text
    doc = (out / "speedrun.md").read_text()
    assert "Commit: `" in doc and "Command: `python -m eval.results --only speedrun`" in doc and "Machine: " in doc


def test_a_missing_block_is_refused_before_anything_runs(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no blocks\n")
    proc = run(["--only", "quickstart", "--readme", readme, "--out", tmp_path / "docs"], tmp_path)
    assert proc.returncode == 1 and "README has no block <!-- results:quickstart -->" in proc.stderr
    assert not (tmp_path / "docs").exists() and not (tmp_path / "runs").exists()
