"""A saved checkpoint is self-contained: loaded in a fresh process outside the repo, offline, even without triton."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import PROTEINS, randomized_tiny_model

LOADER = textwrap.dedent(
    """
    import json, sys
    if "--no-triton" in sys.argv:  # make `import triton` fail, as on a machine without it
        class BlockTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, BlockTriton())
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, pipeline
    ckpt, proteins = sys.argv[1], json.loads(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
    mlm = AutoModelForMaskedLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    batch = tokenizer(proteins, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = mlm(**batch).logits
        hidden = base(**batch, output_hidden_states=True)
    masked = proteins[0][:10] + tokenizer.mask_token + proteins[0][11:]
    fill = pipeline("fill-mask", model=ckpt, trust_remote_code=True, top_k=5)(masked)
    torch.save({"logits": logits, "hidden": hidden.last_hidden_state, "n_hidden": len(hidden.hidden_states),
                "fill": [p["token_str"] for p in fill], "classes": [type(mlm).__name__, type(base).__name__,
                type(tokenizer).__name__], "triton_loaded": "triton" in sys.modules}, sys.argv[3])
    """
)


def briefly_trained(model, tokenizer, steps=60):
    """A few masked-LM steps on real proteins, so that predictions at a masked position are amino acids."""
    batch = tokenizer(PROTEINS, padding=True, return_tensors="pt")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        scored = (torch.rand(batch["input_ids"].shape, generator=generator) < 0.15) & (batch["input_ids"] > 3)
        labels = batch["input_ids"].masked_fill(~scored, -100)
        inputs = batch["input_ids"].masked_fill(scored, tokenizer.mask_token_id)
        loss = model(inputs, attention_mask=batch["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from modeling_speedplm import build_tokenizer
    from training.publish.model_folder import write_model_folder

    model = briefly_trained(randomized_tiny_model(seed=3), build_tokenizer())
    directory = tmp_path_factory.mktemp("ckpt")
    write_model_folder(model, directory)  # what the trainer writes beside final/ and each Hub push
    return model, directory


def test_checkpoint_folder_contents(checkpoint):
    _, directory = checkpoint
    files = {p.name for p in directory.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "vocab.txt",
        "tokenizer_config.json",
        "README.md",
        "modeling_speedplm.py",
        "configuration_speedplm.py",
        "attention_speedplm.py",
        "tokenization_speedplm.py",
    } <= files
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_speedplm.SpeedPLMConfig",
        "AutoModel": "modeling_speedplm.SpeedPLMModel",
        "AutoModelForMaskedLM": "modeling_speedplm.SpeedPLMForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_speedplm.SpeedPLMForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_speedplm.SpeedPLMForTokenClassification",
    }
    tokenizer_map = json.loads((directory / "tokenizer_config.json").read_text())["auto_map"]
    assert tokenizer_map == {"AutoTokenizer": ["tokenization_speedplm.SpeedPLMTokenizer", None]}
    card = (directory / "README.md").read_text()
    assert f"{checkpoint[0].num_parameters():,}" in card
    # every from_pretrained line of the card's example says trust_remote_code=True (AutoTokenizer included)
    loads = [line for line in card.splitlines() if ".from_pretrained(" in line]
    assert len(loads) >= 2 and all("trust_remote_code=True" in line for line in loads), loads


@pytest.mark.parametrize("block_triton", [False, True], ids=["plain", "no-triton"])
def test_round_trip_in_fresh_process(checkpoint, tmp_path, tokenizer, block_triton):
    model, directory = checkpoint
    out = tmp_path / "out.pt"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    args = [sys.executable, "-c", LOADER, str(directory), json.dumps(PROTEINS), str(out)]
    result = subprocess.run(
        args + (["--no-triton"] if block_triton else []),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out)
    batch = tokenizer(PROTEINS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch)
        hidden = model.model(**batch).last_hidden_state
    torch.testing.assert_close(loaded["logits"], expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded["hidden"], hidden, atol=1e-6, rtol=0)
    assert loaded["n_hidden"] == model.config.num_hidden_layers + 1
    assert loaded["classes"] == ["SpeedPLMForMaskedLM", "SpeedPLMModel", "SpeedPLMTokenizer"]
    amino_acids = set("LAGVSERTIDPKQNFYMHWCXBUZO")
    assert len(loaded["fill"]) == 5 and set(loaded["fill"]) <= amino_acids | {".", "-"}
    if block_triton:
        assert not loaded["triton_loaded"]


def test_auto_classes_in_process(tmp_path, tokenizer):
    """Each Auto class builds our class from a SpeedPLMConfig in-process, saves, and loads back the same weights
    (same outputs) through the same Auto class; the saved auto_map names every class, whichever one was saved."""
    from transformers import (
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    import modeling_speedplm as M

    config = M.SpeedPLMConfig.from_preset("tiny", num_labels=3)
    batch = tokenizer(PROTEINS[:2], padding=True, return_tensors="pt")
    expected = {
        AutoModel: (M.SpeedPLMModel, "last_hidden_state", (2, batch["input_ids"].shape[1], 64)),
        AutoModelForMaskedLM: (M.SpeedPLMForMaskedLM, "logits", (*batch["input_ids"].shape, 33)),
        AutoModelForSequenceClassification: (M.SpeedPLMForSequenceClassification, "logits", (2, 3)),
        AutoModelForTokenClassification: (M.SpeedPLMForTokenClassification, "logits", (*batch["input_ids"].shape, 3)),
    }
    for auto, (cls, field, shape) in expected.items():
        torch.manual_seed(0)
        model = auto.from_config(config).eval()
        assert type(model) is cls
        directory = tmp_path / cls.__name__
        model.save_pretrained(directory)
        reloaded = auto.from_pretrained(directory).eval()
        assert type(reloaded) is cls
        with torch.no_grad():
            out, again = getattr(model(**batch), field), getattr(reloaded(**batch), field)
        assert out.shape == shape
        torch.testing.assert_close(again, out, atol=0, rtol=0)
        auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
        assert {auto_map[a.__name__].split(".")[-1] for a in expected} == {c.__name__ for c, _, _ in expected.values()}
