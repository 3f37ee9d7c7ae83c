"""eval.zeroshot (masked-marginal variant scoring, Meier et al. 2021) and eval.quality.dms (the mavenn DMS set), on a
committed real slice of the three assays (tests/fixtures/dms, written by tests/fixtures/make_dms_fixtures.py)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROTEINS, randomized_tiny_model
from scipy.stats import spearmanr

from eval.checkpoints import VocabMap
from eval.quality.dms import DmsFetchError, check_wheel, consensus, derive_mutant
from eval.zeroshot import DmsError, ScoreOptions, main, parse_mutant, position_log_probs, read_dms, score_assay, window
from modeling_speedplm import ESM2_VOCAB, SpeedPLMConfig, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "dms"
ABETA42 = "DAEFRHDSGYEVHHQKLVFFAEDVGSNKGAIIGLMVGGVVIA"  # amyloid beta 1-42 (APP 672-713)
UBIQUITIN = PROTEINS[0]  # 76 residues
CLS, EOS, MASK = 0, 2, 32


def hand_log_probs(model, tokens: list, at: int) -> torch.Tensor:
    """(33,) log-softmax of the model's logits at token index `at`, computed by hand."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens))).logits[0, at]
    logits = logits.double()
    shifted = logits - logits.max()
    return shifted - shifted.exp().sum().log()


def hand_score(model, wt: str, mutations, span=None, masked=True) -> float:
    """Sum over (position0, wt, mut) of log p(mut) - log p(wt), each position in WT[span] (masked there if asked)."""
    total = 0.0
    for position, w, m in mutations:
        start, end = span(position) if span else (0, len(wt))
        tokens = [CLS] + [ESM2_VOCAB.index(c) for c in wt[start:end]] + [EOS]
        if masked:
            tokens[position - start + 1] = MASK
        lp = hand_log_probs(model, tokens, position - start + 1)
        total += float(lp[ESM2_VOCAB.index(m)] - lp[ESM2_VOCAB.index(w)])
    return total


@pytest.fixture(scope="module")
def tiny():
    return randomized_tiny_model(seed=5).eval()


# ---------------------------------------------------------------------------------------------------- scoring


def test_masked_marginal_single_and_double_match_hand_computation(tiny):
    assay = read_dms(FIXTURES / "amyloid.csv")
    assert assay.wt == ABETA42  # the consensus of the real variants is the real wild type
    single = next(i for i, m in enumerate(assay.mutations) if len(m) == 1)
    double = next(i for i, m in enumerate(assay.mutations) if len(m) == 2)
    scores = score_assay(tiny, VocabMap.identity(), assay, ScoreOptions())  # (32,)
    for i in (single, double):
        assert scores[i] == pytest.approx(hand_score(tiny, assay.wt, assay.mutations[i]), abs=1e-4)
    # a double is the sum of its two positions' single-site terms (the additive model of masked marginals)
    (p, w, m), (q, v, n) = assay.mutations[double]
    both = hand_score(tiny, assay.wt, [(p, w, m)]) + hand_score(tiny, assay.wt, [(q, v, n)])
    assert scores[double] == pytest.approx(both, abs=1e-4)
    # batching (one row per forward) does not change a number
    one_per_batch = score_assay(tiny, VocabMap.identity(), assay, ScoreOptions(batch_tokens=1))
    np.testing.assert_allclose(one_per_batch, scores, atol=1e-4)


def test_wt_marginal_matches_hand_computation_and_differs_from_masked(tiny):
    assay = read_dms(FIXTURES / "gb1.csv")
    wt_marginal = score_assay(tiny, VocabMap.identity(), assay, ScoreOptions(scoring="wt-marginal"))
    masked = score_assay(tiny, VocabMap.identity(), assay, ScoreOptions())
    for i in (0, 7):
        assert wt_marginal[i] == pytest.approx(hand_score(tiny, assay.wt, assay.mutations[i], masked=False), abs=1e-4)
    assert np.abs(wt_marginal - masked).max() > 1e-3


def test_window_is_centred_and_clipped():
    width = 30
    assert window(2, 76, width) == (0, 30)  # clipped at the start
    assert window(39, 76, width) == (24, 54)  # centred: position - width // 2
    assert window(75, 76, width) == (46, 76)  # clipped at the end
    assert window(40, 76, 29) == (26, 55)  # odd width: 14 residues before, 14 after
    assert window(10, 20, width) == (0, 20)  # a protein that fits is taken whole


def test_long_protein_is_scored_in_windows(tiny):
    """A 76-residue protein, a model limited to 32 tokens: each position sees its own 30-residue window."""
    short = randomized_tiny_model(seed=5, max_position_embeddings=32).eval()
    positions = [2, 39, 75]
    options = ScoreOptions(max_length=32)
    table = position_log_probs(short, VocabMap.identity(), UBIQUITIN, positions, options)  # (3, 33)
    spans = [(0, 30), (24, 54), (46, 76)]  # clipped at the start, centred (39 - 15), clipped at the end
    for k, (position, (start, end)) in enumerate(zip(positions, spans)):
        tokens = [CLS] + [ESM2_VOCAB.index(c) for c in UBIQUITIN[start:end]] + [EOS]
        tokens[position - start + 1] = MASK
        torch.testing.assert_close(
            table[k].double(), hand_log_probs(short, tokens, position - start + 1), atol=1e-4, rtol=0
        )
    # the whole protein at once (which the rotary model would accept) gives other numbers: the window was used
    full = position_log_probs(short, VocabMap.identity(), UBIQUITIN, positions, ScoreOptions(max_length=78))
    assert (full - table).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------- input


def test_parse_mutant():
    assert parse_mutant("A24C") == ((23, "A", "C"),)
    assert parse_mutant("A24C:G30T") == ((23, "A", "C"), (29, "G", "T"))
    bad_inputs = {
        "A24": "cannot parse",
        "A0C": "cannot parse",
        "a24c": "cannot parse",
        "A24A": "names no change",
        "A24C:A24D": "named twice",
        "": "empty",
    }
    for bad, reason in bad_inputs.items():
        with pytest.raises(ValueError, match=reason):
            parse_mutant(bad)


def _rows():
    with open(FIXTURES / "amyloid.csv", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _mutate(row: dict, position0: int, letter: str) -> str:
    seq = row["mutated_sequence"]
    return seq[:position0] + letter + seq[position0 + 1 :]


def _other(mutant: str) -> str:
    """A letter that is neither the wild-type nor the mutant letter of a single mutant."""
    return next(c for c in "WYC" if c not in (mutant[0], mutant[-1]))


# each case: how row 4 (line 5) is spoiled -> the reason the error must give
BAD_ROWS = {
    "unparsable": (lambda r: {**r, "mutant": "D1"}, "cannot parse 'D1'"),
    "wt_disagrees": (
        lambda r: {**r, "mutant": _other(r["mutant"]) + r["mutant"][1:]},
        "disagrees with the inferred WT",
    ),
    "mut_not_in_sequence": (
        lambda r: {**r, "mutated_sequence": _mutate(r, int(r["mutant"][1:-1]) - 1, "W")},
        "the mutant says",
    ),
    "beyond_sequence": (lambda r: {**r, "mutant": "A99C"}, "position 99 is beyond the mutated_sequence's 42"),
    "unnamed_change": (lambda r: {**r, "mutated_sequence": _mutate(r, 41, "W")}, "the mutant names no change"),
    "score": (lambda r: {**r, "DMS_score": "n/a"}, "DMS_score 'n/a' is not a finite number"),
    "letter_J": (lambda r: {**r, "mutated_sequence": _mutate(r, 41, "J")}, "letter_J"),
    "length": (lambda r: {**r, "mutated_sequence": r["mutated_sequence"] + "A"}, "has 43 residues, line 2's has 42"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_line_and_reason(tmp_path, case):
    rows = _rows()
    assert len(rows[3]["mutant"].split(":")) == 1 and rows[3]["mutant"][1:-1] != "42"  # a single, not at 42
    spoil, reason = BAD_ROWS[case]
    rows[3] = spoil(rows[3])
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DmsError) as err:
        read_dms(path)
    assert str(err.value).startswith(f"{path}:5: mutant ")
    assert reason in str(err.value)


def test_missing_column_and_cli_exit_2_writes_nothing(tmp_path, capsys):
    path = tmp_path / "no_score.csv"
    lines = (FIXTURES / "gb1.csv").read_text().splitlines()
    path.write_text("\n".join(",".join(line.split(",")[:2]) for line in lines) + "\n")
    with pytest.raises(DmsError, match=rf"^{path}:1: missing column\(s\) \['DMS_score'\]"):
        read_dms(path)
    out = tmp_path / "out"
    assert main(["--model", "no-such-model", "--dms", str(FIXTURES / "gb1.csv"), str(path), "--out", str(out)]) == 2
    assert f"{path}:1: missing column" in capsys.readouterr().err
    assert not out.exists()


def test_dms_helpers(tmp_path):
    assert derive_mutant("ACDE", "AKDF") == "C2K:E4F"
    assert consensus(["ACD", "AKD", "WCD"]) == "ACD"
    fake = tmp_path / "mavenn-1.1.4-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(DmsFetchError, match=r"sha256 .* expected b54077ee"):
        check_wheel(fake)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny SpeedPLM with a 48-token context (GB1 and TDP-43 need windows) and a tiny random EsmForMaskedLM saved
    with a stock EsmTokenizer; the in-memory models are returned for hand computations."""
    from transformers import EsmTokenizer

    from eval.checkpoints import esm_twin

    root = tmp_path_factory.mktemp("ckpt")
    speedplm = randomized_tiny_model(seed=7, max_position_embeddings=48).eval()
    speedplm.save_pretrained(root / "speedplm")
    build_tokenizer().save_pretrained(root / "speedplm")
    torch.manual_seed(8)
    esm = esm_twin(SpeedPLMConfig.from_preset("tiny")).eval()
    esm.save_pretrained(root / "esm")
    (root / "vocab.txt").write_text("\n".join(ESM2_VOCAB) + "\n")
    EsmTokenizer(str(root / "vocab.txt")).save_pretrained(root / "esm")
    return {"speedplm": (root / "speedplm", speedplm), "esm": (root / "esm", esm)}


@pytest.mark.slow
def test_cli_speedplm_and_esm_on_fixture_slice(tmp_path, checkpoints):
    builtin = tmp_path / "builtin"  # a prepared --builtin folder (manifest + CSVs), as eval.quality.dms writes it
    builtin.mkdir()
    for name in ("gb1", "tdp43"):
        shutil.copy(FIXTURES / f"{name}.csv", builtin)
    assays = {n: {"file": f"{n}.csv"} for n in ("gb1", "tdp43")}
    (builtin / "manifest.json").write_text(json.dumps({"assays": assays}))
    out, cwd = tmp_path / "out", tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--model", checkpoints["speedplm"][0], checkpoints["esm"][0], "--dms", FIXTURES / "amyloid.csv"]
    args += ["--builtin", "--builtin-dir", builtin, "--out", out]
    proc = subprocess.run(
        [sys.executable, "-m", "eval.zeroshot", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    with open(out / "zeroshot.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "scores.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    models = [str(checkpoints[k][0]) for k in ("speedplm", "esm")]
    assert [(r["model"], r["assay"]) for r in rows] == [(m, a) for m in models for a in ("amyloid", "gb1", "tdp43")]
    assert {r["variants"] for r in rows} == {"32"} and len(scores) == 96
    windowed = {(r["model"], r["assay"]): r["windowed"] for r in rows}
    assert windowed[models[0], "gb1"] == windowed[models[0], "tdp43"] == "True"  # 57 and 86 tokens > 48
    assert windowed[models[0], "amyloid"] == "False" and windowed[models[1], "tdp43"] == "False"
    for r in rows:  # the reported Spearman is that of the written per-variant scores
        mine = [s for s in scores if s["assay"] == r["assay"]]
        rho = spearmanr([float(s[r["model"]]) for s in mine], [float(s["DMS_score"]) for s in mine]).statistic
        assert float(r["spearman"]) == pytest.approx(rho, abs=1e-9)

    # one windowed TDP-43 double (SpeedPLM, 46-residue windows) and one Abeta42 variant (ESM) by hand
    tdp43 = read_dms(FIXTURES / "tdp43.csv")
    i = next(k for k, m in enumerate(tdp43.mutations) if len(m) == 2 and m[1][0] > 46)
    expected = hand_score(checkpoints["speedplm"][1], tdp43.wt, tdp43.mutations[i], lambda p: window(p, 84, 46))
    row = next(s for s in scores if s["assay"] == "tdp43" and s["mutant"] == tdp43.mutants[i])
    assert float(row[models[0]]) == pytest.approx(expected, abs=1e-4)
    abeta = read_dms(FIXTURES / "amyloid.csv")
    expected = hand_score(checkpoints["esm"][1], abeta.wt, abeta.mutations[3])
    row = next(s for s in scores if s["assay"] == "amyloid" and s["mutant"] == abeta.mutants[3])
    assert float(row[models[1]]) == pytest.approx(expected, abs=1e-4)

    text = (out / "zeroshot.md").read_text()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert f"Commit: `{head.strip()}" in text and "Date: 20" in text and "Machine: CPU" in text
    assert f"Command: `python -m eval.zeroshot --model {models[0]} {models[1]} --dms" in text
    positions = len({p for m in abeta.mutations for p, *_ in m})
    assert f"| amyloid | 32 | {positions} |" in text
