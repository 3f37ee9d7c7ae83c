"""Contact prediction from attention (eval/quality/contacts.py) and its data (eval/quality/contacts_data.py).

Real data: tests/fixtures/contacts holds 8 short PDB chains (virtual C-beta coordinates) from Debian promod3-data
3.2.1+ds-6's ProMod3 StructureDB, written by tests/fixtures/make_contact_fixtures.py. The raw-file parser itself needs
the 371 MB .deb, so here it is checked on synthetic headers for its failures only.
"""

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomized_tiny_model

from eval.checkpoints import inspect_model, load_model
from eval.quality import contacts
from eval.quality.contacts_data import (
    ContactsDataError,
    contact_map,
    load_prepared,
    read_structure_db,
    virtual_cb,
)

FIXTURE = Path(__file__).parent / "fixtures" / "contacts"


# ---------------------------------------------------------------------------------------------------- geometry


def test_virtual_cb_hand_geometry():
    # CA at the origin, N at -x, C at +y: b = (1,0,0), c = (0,1,0), a = b x c = (0,0,1).
    cb = virtual_cb(np.array([-1.0, 0, 0]), np.zeros(3), np.array([0.0, 1, 0]))
    np.testing.assert_allclose(cb, [0.56802827, -0.54067466, -0.58273431], atol=1e-8)


def test_virtual_cb_on_a_real_residue_and_ideal_geometry():
    # Crambin (PDB 1CRN, CC0) Thr1: N, CA, C and its real CB.
    n, ca, c = np.array([17.047, 14.099, 3.625]), np.array([16.967, 12.784, 4.338]), np.array([15.685, 12.755, 5.133])
    real = np.array([18.170, 12.703, 5.337])
    cb = virtual_cb(n, ca, c)
    assert np.linalg.norm(cb - real) < 0.25  # measured 0.166 A
    volume = lambda x: np.dot(n - ca, np.cross(c - ca, x - ca))  # noqa: E731 (chirality: L-amino acids are > 0)
    assert volume(real) > 2 and volume(cb) > 2
    # Ideal backbone (N-CA 1.458 A, CA-C 1.525 A, N-CA-C 111 deg): CB at 1.53 A, tetrahedral angles.
    theta = np.deg2rad(111.0)
    n, ca, c = np.array([-1.458, 0, 0]), np.zeros(3), 1.525 * np.array([-np.cos(theta), np.sin(theta), 0])
    cb = virtual_cb(n, ca, c)
    angle = lambda u, v: np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))  # noqa: E731
    assert abs(np.linalg.norm(cb) - 1.5295) < 1e-3
    assert abs(angle(n - ca, cb) - 110.38) < 0.05 and abs(angle(c - ca, cb) - 110.18) < 0.05
    # Rigid motions carry the virtual CB along; a mirror image does not (the formula encodes L chirality).
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rotation *= np.sign(np.linalg.det(rotation))
    shift = np.array([3.0, -2.0, 7.0])
    moved = virtual_cb(n @ rotation.T + shift, ca @ rotation.T + shift, c @ rotation.T + shift)
    np.testing.assert_allclose(moved, cb @ rotation.T + shift, atol=1e-9)
    mirrored = virtual_cb(n * [1, 1, -1], ca, c * [1, 1, -1])
    assert np.linalg.norm(mirrored - cb * [1, 1, -1]) > 2.0


def test_fixture_chains_are_real_backbones():
    chains, manifest = load_prepared(FIXTURE)  # checks file and content sha256 against the manifest
    assert manifest["package"] == "promod3-data" and manifest["version"] == "3.2.1+ds-6"
    assert (manifest["chains"], manifest["residues"]) == (21_119, 4_561_225)
    assert len(chains.indices("train")) == 4 and len(chains.indices("test")) == 4
    assert not {chains.sequences[i] for i in chains.indices("train")} & {
        chains.sequences[i] for i in chains.indices("test")
    }
    long_range = {"train": 0, "test": 0}
    for i, (sequence, cb) in enumerate(zip(chains.sequences, chains.cb)):
        assert 50 <= len(sequence) <= 64 and cb.shape == (len(sequence), 3)
        step = np.linalg.norm(cb[1:] - cb[:-1], axis=1)  # neighbouring C-beta: 3.8 A CA step + side offsets
        assert step.min() > 3.5 and step.max() < 7.2
        contacts_ = contact_map(cb)
        assert contacts_.diagonal().all() and (contacts_ == contacts_.T).all()
        assert np.diagonal(contacts_, 1).all()  # sequence neighbours are always in contact
        long_range["train" if chains.split[i] == 0 else "test"] += int(np.triu(contacts_, 24).sum())
    assert (
        long_range
        == {s: manifest["splits"][s]["long_range_contacts"] for s in long_range}
        == {
            "train": 107,
            "test": 106,
        }
    )


# ---------------------------------------------------------------------------------------------------- ESM's steps


def test_apc_hand_3x3():
    x = np.array([[0.0, 1, 2], [1, 0, 3], [2, 3, 0]])  # row sums 3, 4, 5; total 12
    expected = np.array([[-0.75, 0, 0.75], [0, -4 / 3, 4 / 3], [0.75, 4 / 3, -25 / 12]])
    np.testing.assert_allclose(contacts.apc(x), expected, atol=1e-12)
    rank_one = np.outer([1.0, 2, 3], [1.0, 2, 3])  # APC removes exactly a product of marginals
    np.testing.assert_allclose(contacts.apc(rank_one), 0, atol=1e-12)
    np.testing.assert_allclose(contacts.symmetrize(np.array([[1.0, 2], [5, 3]])), [[2, 7], [7, 6]])


def test_precision_at_hand_example():
    n = 30
    i, j = contacts.pair_index(n, 6)
    pairs = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(i, j))}
    assert len(pairs) == (n - 6) * (n - 5) // 2 and sum(b - a >= 24 for a, b in pairs) == 21
    scores, truth = np.zeros(len(pairs)), np.zeros(len(pairs), dtype=bool)
    for pair, score, contact in [
        ((0, 6), 5.0, True),  # separation 6: in no range
        ((0, 29), 0.9, True),  # long, rank 1
        ((1, 25), 0.8, False),
        ((0, 24), 0.7, True),  # long, rank 3
        ((1, 26), 0.6, False),
        ((1, 27), 0.55, False),
        ((2, 26), 0.5, False),
        ((2, 27), 0.45, False),
        ((3, 28), 0.1, True),  # long, rank 8
        ((2, 16), 1.0, True),  # medium (14), rank 1; the other medium pairs are non-contacts
    ]:
        scores[pairs[pair]], truth[pairs[pair]] = score, contact
    result = contacts.precision_at(scores, truth, (j - i), n)
    # long: top 6 (L/5) holds 2 contacts; top 15 (L/2) all 3; top 30 (L) asks more than the 21 long pairs: 3/30
    assert result["long"] == {"P@L": 3 / 30, "P@L/2": 3 / 15, "P@L/5": 2 / 6}
    assert result["medium"] == {"P@L": 1 / 30, "P@L/2": 1 / 15, "P@L/5": 1 / 6}


def test_regression_on_an_oracle_feature_ranks_every_contact_first():
    # Pipeline check on the real fixture chains: one feature = the contact label itself, so the fitted regression's
    # ranking puts every contact first and P@L (long) = min(contacts, L) / L per protein, averaged.
    chains, _ = load_prepared(FIXTURE)
    feats = {}
    for k in range(len(chains.ids)):
        n = len(chains.sequences[k])
        i, j = contacts.pair_index(n, 6)
        y = contact_map(chains.cb[k])[i, j]
        feats[k] = contacts.ChainFeatures(y[:, None].astype(np.float32), y, (j - i).astype(np.int32), n)
    regression = contacts.fit_regression([feats[k] for k in chains.indices("train")], C=0.15, seed=0)
    assert regression.coef_[0, 0] > 0
    test = [feats[k] for k in chains.indices("test")]
    expected = []
    for k in chains.indices("test"):
        cb, n = chains.cb[k], len(chains.sequences[k])
        count = sum(np.linalg.norm(cb[a] - cb[b]) < 8 for a in range(n) for b in range(a + 24, n))
        expected.append(min(count, n) / n)
    result = contacts.score_chains("attention", test, regression, seed=0)
    assert result["long"]["P@L"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert 0.2 < result["long"]["P@L"] < 1.0  # 106 long-range contacts over 4 chains of 50-58 residues


# ---------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from training.publish.model_folder import write_model_folder

    model = randomized_tiny_model(seed=5).eval()
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_model_folder(model, directory)
    return model, directory


REMOTE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from transformers import AutoModelForMaskedLM
    ckpt, sequence, out, repo = sys.argv[1:5]
    model = AutoModelForMaskedLM.from_pretrained(ckpt, trust_remote_code=True).eval()  # before the repo is importable
    sys.path.insert(0, repo)
    from eval.checkpoints import inspect_model
    from eval.quality.contacts import attention_features
    np.save(out, attention_features(model, inspect_model(ckpt), sequence, 42))
    print(type(model).__module__)
    """
)


def test_attention_features_from_a_saved_checkpoint(checkpoint, tmp_path):
    model, directory = checkpoint
    spec = inspect_model(str(directory))
    loaded = load_model(spec, "cpu")  # AutoModelForMaskedLM.from_pretrained(dir, trust_remote_code=True)
    chains, _ = load_prepared(FIXTURE)
    sequence = chains.sequences[chains.indices("test")[0]]
    assert len(sequence) > 40
    features = contacts.attention_features(loaded, spec, sequence, max_length=42)  # crop: first 40 residues
    # The checkpoint's own remote code (a fresh process outside the repo, offline) gives the same features.
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    args = [str(directory), sequence, str(tmp_path / "f.npy"), str(Path(__file__).resolve().parents[1])]
    done = subprocess.run(
        [sys.executable, "-c", REMOTE, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("transformers_modules")
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), features, atol=1e-6)
    assert features.shape == (4 * 4, 40, 40)
    np.testing.assert_allclose(features, np.swapaxes(features, 1, 2), atol=1e-6)
    np.testing.assert_allclose(features.sum(-1), 0, atol=1e-5)  # APC over the residues only: zero row sums
    # By hand, from the in-memory model: ESM2 ids, eager attention of layer 2 head 3, <cls>/<eos> cut, A + A^T, APC.
    from modeling_speedplm import ESM2_VOCAB

    ids = torch.tensor([[0] + [ESM2_VOCAB.index(a) for a in sequence[:40]] + [2]])
    with torch.no_grad():
        attention = model(input_ids=ids, output_attentions=True).attentions[2][0, 3].double().numpy()
    a = attention[1:-1, 1:-1] + attention[1:-1, 1:-1].T
    hand = np.array([[a[r, s] - a[r].sum() * a[:, s].sum() / a.sum() for s in range(40)] for r in range(40)])
    np.testing.assert_allclose(features[2 * 4 + 3], hand, atol=1e-5)
    assert np.abs(hand).max() > 1e-3  # a randomised model's attention is not uniform, so this compares something


def test_cli_end_to_end_on_a_saved_checkpoint(checkpoint, tmp_path):
    _, directory = checkpoint
    argv = ["--model", str(directory), "--data", str(FIXTURE), "--out", str(tmp_path / "o")]
    argv += ["--seeds", "0", "1", "2", "--train-chains", "3", "--max-length", "42"]
    assert contacts.main(argv) == 0
    with open(tmp_path / "o" / "contacts.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["range"]) for r in rows] == [
        (m, r)
        for m in ("attention APC + L1 logistic", "separation baseline", "random baseline")
        for r in ("long", "medium")
    ]
    model_rows = rows[:2]
    assert {
        (r["features"], r["crop_residues"], r["seeds"], r["train_chains"], r["test_chains"]) for r in model_rows
    } == {("16", "40", "3", "3", "4")}
    assert {r["crop_residues"] for r in rows} == {"40"}  # baselines on the same cropped chains
    values = [float(r[f"{m} {s}"]) for r in rows for m in contacts.METRICS for s in ("mean", "std")]
    assert all(0 <= v <= 1 for v in values)
    assert max(float(r["P@L std"]) for r in rows[4:]) > 0  # the random baseline differs between seeds
    # `run` is deterministic: the rows it returns again equal the CSV.
    again = contacts.run([str(directory)], FIXTURE, contacts.ProbeOptions((0, 1, 2), 3, 0.15, 42))
    assert [round(r["P@L/5 mean"], 6) for r in again] == [round(float(r["P@L/5 mean"]), 6) for r in rows]
    markdown = (tmp_path / "o" / "contacts.md").read_text()
    assert "| model | method | range | P@L | P@L/2 | P@L/5 |" in markdown
    assert "Commit: " in markdown and "Machine: " in markdown and "Command: `" in markdown
    assert f"Command: `python -m eval.quality.contacts --model {directory}" in markdown


def test_esm_checkpoint_returns_attention_features(tmp_path):
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    from modeling_speedplm import ESM2_VOCAB

    (tmp_path / "vocab.txt").write_text("\n".join(ESM2_VOCAB) + "\n")
    torch.manual_seed(0)
    config = EsmConfig(
        vocab_size=33,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        position_embedding_type="rotary",
        pad_token_id=1,
        mask_token_id=32,
    )
    EsmForMaskedLM(config).save_pretrained(tmp_path / "esm")
    EsmTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "esm")
    spec = inspect_model(str(tmp_path / "esm"))
    model = load_model(spec, "cpu")
    assert model.config._attn_implementation != "eager"  # SDPA by default: no attention probabilities
    contacts.prepare_attention_model(model)
    features = contacts.attention_features(model, spec, "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEG", spec.max_length)
    assert features.shape == (2 * 4, 35, 35)
    np.testing.assert_allclose(features.sum(-1), 0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- failures


def test_prepared_data_tampering_fails_naming_file_and_key(tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["file_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ContactsDataError, match="contacts.npz: sha256 .* key file_sha256"):
        load_prepared(copy)
    assert contacts.main(["--model", "unused", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    assert "manifest.json: missing" in capsys.readouterr().err


def test_raw_parser_fails_loudly_on_a_wrong_layout(tmp_path):
    bad = tmp_path / "structure_db.dat"
    bad.write_bytes(b"\x00" * 200)
    with pytest.raises(ContactsDataError, match="structure_db.dat: magic 0 at byte 0, expected 1234"):
        read_structure_db(bad)
    header = bytearray(200)
    header[0:4] = (1234).to_bytes(4, "little")
    header[0x4D : 0x4D + 8] = (5).to_bytes(8, "little")
    bad.write_bytes(bytes(header))
    with pytest.raises(ContactsDataError, match="chain count 5 at byte 77, expected 21119"):
        read_structure_db(bad)
