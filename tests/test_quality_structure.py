"""Secondary-structure and fold yardsticks on real slices of the sidechainnet data (tests/fixtures/quality, written
by tests/fixtures/make_quality_fixtures.py) and a tiny SpeedPLM checkpoint loaded from disk with trust_remote_code."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import randomized_tiny_model

from eval.quality import fold, secondary_structure, structure_data
from eval.quality.embeddings import EmbedOptions, length_batches, per_residue
from eval.quality.structure_data import StructureDataError

# one xdist worker runs this file: its module fixtures (trained checkpoints) are built once, not per worker
pytestmark = pytest.mark.xdist_group("test_quality_structure")

FIXTURES = Path(__file__).parent / "fixtures" / "quality"
ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def chains():
    return structure_data.load(FIXTURES, "ss_subset.jsonl")


@pytest.fixture(scope="module")
def domains():
    return structure_data.load(FIXTURES, "fold_subset.jsonl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from training.publish.model_folder import write_model_folder

    directory = tmp_path_factory.mktemp("tiny")
    write_model_folder(randomized_tiny_model(seed=5), directory)
    return str(directory)


def test_slices_counts_and_splits(chains, domains):
    assert len(chains) == 40 and sum(c.split == "test" for c in chains) == 12
    assert {c.source for c in chains if c.split == "test"} == {"casp12_validation"}
    assert sum(len(c.sequence) for c in chains) == 4430
    structure_data.check_splits(chains, domains)  # no shared id, sequence, or (domains) superfamily
    assert len(domains) == 60 and len({d.fold for d in domains}) == 4
    train_sf = {d.superfamily for d in domains if d.split == "train"}
    test_sf = {d.superfamily for d in domains if d.split == "test"}
    assert test_sf and not train_sf & test_sf
    assert {d.fold for d in domains if d.split == "test"} == {d.fold for d in domains if d.split == "train"}


def test_q3_mapping_labels_and_unresolved_runs():
    assert structure_data.q3("HGIEBTSL") == "HHHEECCC"
    assert structure_data.label_ids("HGIEBTSL").tolist() == list(range(8))
    assert structure_data.label_ids("HGIEBTSL", "HEC").tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    dssp = "L" * 9 + "HHHH" + "L" * 10 + "EE"
    mask = structure_data.scored_mask(dssp)
    assert mask[:13].all() and not mask[13:23].any() and mask[23:].all()


def test_split_rules_on_the_raw_slice(chains):
    """The wheel's own records of the slice, through the parser, give the prepared splits back."""
    raw = json.loads((FIXTURES / "raw_chains.json").read_text())
    structure_data.check_entries(raw, structure_data.CHAINS_MEMBER)
    flags, rows = structure_data.parse_proteinnet((FIXTURES / "raw_proteinnet.csv").read_text(), "raw_proteinnet.csv")
    assert rows == 50 and set(flags) == set(raw)
    again = {c.id: (c.split, c.source) for c in structure_data.split_chains(raw, flags)}
    assert again == {c.id: (c.split, c.source) for c in chains}
    raw_domains = json.loads((FIXTURES / "raw_domains.json").read_text())
    structure_data.check_entries(raw_domains, structure_data.DOMAINS_MEMBER)
    split, merged = structure_data.split_domains(raw_domains)
    assert merged == 0 and len(split) == 60
    structure_data.check_splits(domains=split)
    for f in {d.fold for d in split}:  # every fold here has >= 2 superfamilies: some held out, some kept
        sides = {d.split for d in split if d.fold == f}
        assert sides == {"train", "test"}, f


def test_parser_errors_name_the_place(tmp_path):
    raw = json.loads((FIXTURES / "raw_chains.json").read_text())
    key = sorted(raw)[0]
    raw[key] = {**raw[key], "DSSP": raw[key]["DSSP"][:-1]}
    with pytest.raises(StructureDataError, match=rf"{key}.*key 'DSSP'"):
        structure_data.check_entries(raw, structure_data.CHAINS_MEMBER)
    with pytest.raises(StructureDataError, match=r"chains = 40, expected 159,026"):
        structure_data._check("chains", 40, structure_data.CHAINS_MEMBER)
    copy = tmp_path / "data"
    shutil.copytree(FIXTURES, copy)
    lines = (copy / "ss_subset.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"split":"train"', '"split":"valid"')
    (copy / "ss_subset.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(StructureDataError, match=r"ss_subset.jsonl: sha256 differs"):
        structure_data.load(copy, "ss_subset.jsonl")
    with pytest.raises(StructureDataError, match=r"ss_subset.jsonl:3: key 'split' = 'valid'"):
        structure_data.read_jsonl(copy / "ss_subset.jsonl", structure_data.Chain)


def test_probes_recover_an_informative_feature_and_baselines_order(chains):
    task = secondary_structure.build_task(chains, 1022)
    options = secondary_structure.SSOptions(seeds=SEEDS)
    noise = np.random.default_rng(0).normal(0, 0.2, (len(task.scored), 8))
    informative = np.eye(8)[task.labels["Q8"]] + noise  # the true state plus noise: a perfect-feature check
    scores = secondary_structure.score_features(task, informative, options)
    assert min(scores["Q3"]) > 0.98 and min(scores["Q8"]) > 0.99
    majority = secondary_structure.score_features(task, None, options)
    residue = secondary_structure.score_features(task, secondary_structure.one_hot(task), options)
    assert 0.3 < np.mean(majority["Q3"]) < 0.5
    assert np.mean(residue["Q3"]) > np.mean(majority["Q3"]) + 0.03
    assert np.mean(residue["Q8"]) > np.mean(majority["Q8"])


def test_per_residue_embeddings_match_a_single_protein_forward(checkpoint, chains):
    import torch

    from eval.checkpoints import inspect_model, load_model
    from training.data.validate import encode

    spec = inspect_model(checkpoint)
    model = load_model(spec, torch.device("cpu"))
    assert spec.max_length == 256 and not model.training  # the tiny preset's limit, read from the saved config
    tokens = [encode(c.sequence) for c in chains[:6]]
    batched = per_residue(model, spec, tokens, EmbedOptions(layers=(0, -1), max_length=128, batch_tokens=600))
    assert batched.layers == (0, 4) and batched.lengths.tolist() == [min(len(t), 126) for t in tokens]
    assert len(length_batches(batched.lengths, 600)) > 1  # padding across proteins of different lengths was used
    one = per_residue(model, spec, tokens[3:4], EmbedOptions(layers=(-1,), max_length=128, batch_tokens=600))
    start = int(batched.lengths[:3].sum())
    np.testing.assert_allclose(one.features[0], batched.features[1, start : start + one.lengths[0]], atol=1e-4)


def test_secondary_structure_and_fold_runs_on_a_checkpoint(checkpoint):
    ss = secondary_structure.run(
        [checkpoint], FIXTURES, secondary_structure.SSOptions(layers=(0, -1)), log=lambda *a: None
    )
    by = {(r["model"], r["features"], r["metric"]): r for r in ss}
    assert len(ss) == 8 and all(r["n_seeds"] == 3 and r["n_test"] == 1121 for r in ss)
    assert list(secondary_structure.wide(ss)[0])[:4] == ["model", "features", "Q3", "Q8"]
    for metric in ("Q3", "Q8"):
        assert by[(checkpoint, "layer 4", metric)]["mean"] > by[("baseline", "majority class", metric)]["mean"]
    folds = fold.run([checkpoint], FIXTURES, fold.FoldOptions(), log=lambda *a: None)
    assert [r["features"] for r in folds] == ["majority fold", "amino-acid composition", "layer 4"]
    assert folds[0]["mean"] == 0.25 and all(r["n_test"] == 20 for r in folds)
    assert all(0 <= r["mean"] <= 1 and len(r["values"].split()) == 3 for r in folds)


def test_cli_writes_a_stamped_table_and_fails_loudly(checkpoint, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=ROOT, capture_output=True, text=True)
    done = run(
        "eval.quality.fold", "--model", checkpoint, "--data", str(FIXTURES), "--out", str(tmp_path), "--seeds", "0"
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "fold.md").read_text()
    assert "| baseline | amino-acid composition |" in text and "Commit: `" in text and "Machine: CPU" in text
    assert f"Command: `python -m eval.quality.fold --model {checkpoint} --data {FIXTURES}" in text
    bad = run(
        "eval.quality.secondary_structure", "--model", checkpoint, "--data", str(tmp_path), "--out", str(tmp_path)
    )
    assert bad.returncode == 1 and "manifest.json: no manifest" in bad.stderr
