"""Output golden: a fixed tiny checkpoint's logits and hidden states on 4 real proteins, loaded as a Hub user loads it.

tests/fixtures/golden/ holds the checkpoint's weights and config (built from a seed by make_golden.py) and
golden.safetensors (its outputs, float32). The checkpoint folder is written from them by the trainer's writer with
THIS tree's remote code and loaded in a fresh process outside the repo with trust_remote_code=True; its outputs padded,
packed and one protein at a time must equal the golden at fp32 CPU tolerance (atol = rtol = 1e-5).

A change that moves outputs -- model code, the tokenizer, torch, transformers -- fails here, and must be acknowledged
by regenerating the golden in the same commit: `python tests/fixtures/golden/make_golden.py`.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

# one xdist worker runs this file: its module fixtures (trained checkpoints) are built once, not per worker
pytestmark = pytest.mark.xdist_group("test_model_golden")

REGENERATE = "if the change is intended, regenerate in the same commit: python tests/fixtures/golden/make_golden.py"


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN / "golden.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The current code's outputs, computed in a fresh process from the checkpoint folder (remote code)."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("golden")
    make_golden.write_checkpoint(tmp / "checkpoint")
    proc = make_golden.outputs_in_fresh_process(tmp / "checkpoint", tmp / "outputs.safetensors", tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(tmp / "outputs.safetensors")


def test_golden_is_small_and_float32(golden):
    tensors, meta = golden
    assert (GOLDEN / "golden.safetensors").stat().st_size + (GOLDEN / "model.safetensors").stat().st_size < 400_000
    assert json.loads(meta["proteins"]) == make_golden.PROTEINS
    lengths = json.loads(meta["lengths"])
    assert lengths == [len(p) + 2 for p in make_golden.PROTEINS]
    n, layers = sum(lengths), json.loads((GOLDEN / "config.json").read_text())["num_hidden_layers"]
    assert tensors["logits"].dtype == tensors["hidden_states"].dtype == torch.float32
    assert tensors["logits"].shape == (n, 33) and tensors["hidden_states"].shape == (layers + 1, n, 32)


def test_same_ids_as_the_golden(golden, outputs):
    assert torch.equal(outputs["input_ids"], golden[0]["input_ids"]), "tokenizer ids moved; " + REGENERATE


@pytest.mark.parametrize("way", ["padded", "packed", "single"])
def test_outputs_equal_the_golden(golden, outputs, way):
    """Padded batch, one packed row (document_ids, trailing padding), each protein alone: all equal the golden."""
    tensors, meta = golden
    versions = f"golden made with torch {meta['torch']}, transformers {meta['transformers']}"
    for kind, key in (("logits", "logits"), ("hidden", "hidden_states")):
        got, want = outputs[f"{way}_{kind}"], tensors[key]
        assert got.shape == want.shape, (kind, got.shape, want.shape)
        torch.testing.assert_close(
            got,
            want,
            atol=make_golden.ATOL,
            rtol=make_golden.RTOL,
            msg=lambda m, kind=kind: f"{way} {kind} moved from the golden ({versions}); {REGENERATE}\n{m}",
        )


def test_padded_packed_single_agree(outputs):
    for kind in ("logits", "hidden"):
        for way in ("packed", "single"):
            torch.testing.assert_close(outputs[f"{way}_{kind}"], outputs[f"padded_{kind}"], atol=1e-5, rtol=1e-5)


def test_golden_separates_changes(golden):
    """The tolerance is far below what a change of the model does: the golden's outputs are O(1), and
    hidden states of consecutive layers differ by orders of magnitude more than the tolerance."""
    tensors, _ = golden
    logits, hidden = tensors["logits"], tensors["hidden_states"]
    assert logits.std() > 0.1 and (hidden[1:] - hidden[:-1]).abs().amax(dim=(1, 2)).min() > 100 * make_golden.ATOL
