"""A checkpoint in a user's hands: loaded from disk in a fresh process outside the repository (trust_remote_code=True,
HF_HUB_OFFLINE=1, no PYTHONPATH to the repo), so every class comes from the checkpoint's own files.

Two subprocesses (tests/scripts/checkpoint_use.py, checkpoint_finetune.py) measure everything once; each test below
asserts on one behaviour. Tiny model, real proteins (conftest.PROTEINS; the built-in aaanalysis set for the toy tasks).
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROTEINS, randomized_tiny_model

SCRIPTS = Path(__file__).parent / "scripts"
HYDROPHOBIC = set("AVILMFWC")

# one xdist worker runs this file: its module fixtures (trained checkpoints) are built once, not per worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_model_use")]


def run_outside_repo(script: str, tmp: Path, *args) -> dict:
    """Copy `script` to `tmp` and run it there with a bare environment; returns the JSON it writes."""
    (tmp / "work").mkdir()
    local = tmp / script
    local.write_text((SCRIPTS / script).read_text())
    out = tmp / "out.json"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    proc = subprocess.run(
        [sys.executable, str(local), *map(str, args), str(tmp / "work"), str(out)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A masked-LM checkpoint as the trainer writes final/: save_pretrained + tokenizer + card."""
    from training.publish.model_folder import write_model_folder

    model = randomized_tiny_model(seed=1)  # every projection non-zero, so every path affects the outputs
    directory = tmp_path_factory.mktemp("ckpt")
    write_model_folder(model, directory)
    return directory


@pytest.fixture(scope="module")
def used(checkpoint, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("use")
    (tmp / "proteins.json").write_text(json.dumps(PROTEINS))
    result = run_outside_repo("checkpoint_use.py", tmp, checkpoint, tmp / "proteins.json")
    assert result["modules"]["mlm"].startswith("transformers_modules.")  # remote code, not the repo's package
    assert result["modules"]["tokenizer"].startswith("transformers_modules.")
    return result


def toy_tasks(n_train: int = 96, n_test: int = 32, length: int = 32) -> dict:
    """Real protein fragments (aaanalysis SEQ_CAPSID), toy labels: per protein, hydrophobic fraction above the median;
    per residue, hydrophobic (AVILMFWC) or not."""
    from training.data.sources import builtin_files

    path = next(p for p in builtin_files() if p.stem == "SEQ_CAPSID")
    fragments = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            fragment = row["sequence"][:length]
            if len(fragment) == length and set(fragment) <= set("LAGVSERTIDPKQNFYMHWC"):
                fragments.append(fragment)
            if len(fragments) == n_train + n_test:
                break
    fractions = [sum(c in HYDROPHOBIC for c in s) / length for s in fragments]
    median = sorted(fractions)[len(fractions) // 2]
    items = [[s, int(x > median), [int(c in HYDROPHOBIC) for c in s]] for s, x in zip(fragments, fractions)]
    return {"train": items[:n_train], "test": items[n_train:]}


@pytest.fixture(scope="module")
def finetuned(checkpoint, tmp_path_factory) -> dict:
    pytest.importorskip("peft", reason="peft is the optional extra (requirements-dev.txt)")
    tmp = tmp_path_factory.mktemp("finetune")
    (tmp / "data.json").write_text(json.dumps(toy_tasks()))
    return run_outside_repo("checkpoint_finetune.py", tmp, checkpoint, tmp / "data.json")


ALL_AUTO = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
]


def test_resave_of_a_loaded_checkpoint(used):
    assert used["resave_logits_diff"] == 0.0
    assert sorted(used["resave_auto_map"]) == ALL_AUTO


def test_return_dict_false_gives_tuples(used):
    assert used["tuple_types"] == ["tuple", "tuple"]
    assert used["tuple_logits_diff"] == 0.0


def test_last_hidden_state_is_the_last_hidden_state(used):
    assert used["n_hidden_states"] == 4 + 1  # tiny: 4 blocks, plus the embedding output
    assert used["last_hidden_diff"] == 0.0


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_output_attentions(used, implementation):
    """Eager returns the probabilities; sdpa falls back to eager for that call instead of returning None."""
    attentions = used[f"attentions_{implementation}"]
    assert attentions["count"] == 4
    assert attentions["shape"] == [len(PROTEINS), 4, max(map(len, PROTEINS)) + 2, max(map(len, PROTEINS)) + 2]
    assert attentions["row_sum_error"] < 1e-5
    assert attentions["mass_on_padding"] == 0.0


def test_set_attn_implementation_switches_the_backend(used):
    (eager_calls, eager_diff), (sdpa_calls, sdpa_diff) = used["sdpa_calls"]["eager"], used["sdpa_calls"]["sdpa"]
    assert eager_calls == 0 and sdpa_calls == 4  # one SDPA call per block, none on eager
    assert eager_diff < 1e-5 and sdpa_diff == 0.0


def test_inputs_embeds_equal_input_ids(used):
    assert used["inputs_embeds_diff"] == 0.0
    assert "value-embedding tables" in used["inputs_embeds_alone"] and "input_ids" in used["inputs_embeds_alone"]


def test_gradient_checkpointing_gives_the_same_gradients(used):
    assert used["checkpointing_flags"] == [True] * 4
    assert used["checkpointing_grad_diff"] <= 1e-5
    assert used["checkpointing_zero_grads"] == 0


def test_train_mode_keeps_full_logits(used):
    assert used["train_logits_shape"] == [len(PROTEINS), max(map(len, PROTEINS)) + 2, 33]


def test_compile_fullgraph(used):
    assert used["compile_diff"] < 1e-5


def test_export(used):
    """transformers' DynamoExporter (torch.export with dynamic shapes; the ONNX exporter's first stage), run on another
    batch shape; no cummax in the graph (ONNX has no lowering for it)."""
    assert used["export_diff"] < 1e-5
    assert used["export_graph_has_cummax"] is False


def test_resized_embeddings_accept_new_ids(used):
    assert used["resized_logits_shape"] == [len(PROTEINS), max(map(len, PROTEINS)) + 2, 40]
    assert used["resized_tables"] == [40, 40, 40]  # both value-embedding tables and the config


def test_tokenizer_applies_the_prepare_policy(used):
    tok = used["tokenizer"]
    assert tok["lower_equals_upper"] and tok["stop_stripped"] and tok["mask_id"]
    expected = {
        "MKTJ12AYI": "'J' at position 4",
        "MKT2AYI": "'2' at position 4",
        "MKT AYI": "' ' at position 4",
        "MK-TAYI": "'-' at position 3",
        "MK*TAYI": "'*' at position 3",
    }
    for text, where in expected.items():
        assert tok["errors"][text] is not None and where in tok["errors"][text], (text, tok["errors"][text])
    assert f"exceed the model's {tok['model_max_length']} positions" in tok["too_long"]
    assert "truncation=True" in tok["too_long"]
    assert tok["cropped_length"] == tok["model_max_length"]


def test_trainer_checkpoints_reload_and_resave(finetuned):
    assert finetuned["sequence_checkpoints"] == ["checkpoint-12", "checkpoint-24"]  # save_steps on
    assert finetuned["sequence_reload_diff"] == 0.0
    assert finetuned["sequence_resave_diff"] == 0.0
    assert finetuned["sequence_resave_auto_map"] == ALL_AUTO
    assert finetuned["sequence_tokenizer_saved"] == "SpeedPLMTokenizer"


@pytest.mark.parametrize("task", ["sequence", "token"])
def test_task_heads_load_from_mlm_and_learn(finetuned, task):
    assert finetuned[f"{task}_new_head_warning"]  # transformers' "newly initialized" warning names the head
    # above chance: the held-out majority class is 0.5-0.6 of these toy tasks
    assert finetuned[f"{task}_accuracy"] >= max(0.75, finetuned[f"{task}_majority"] + 0.15), finetuned


def test_token_classification_reload(finetuned):
    assert finetuned["token_reload_diff"] == 0.0


def test_lora_train_save_reload_merge(finetuned):
    assert 0 < finetuned["lora_trainable_fraction"] < 0.2
    assert finetuned["lora_untrained_matrices"] == []  # every LoRA layer is in the graph (none bypassed)
    assert finetuned["lora_accuracy"] >= max(0.75, finetuned["sequence_majority"] + 0.15), finetuned
    assert finetuned["lora_reload_diff"] == 0.0
    assert finetuned["lora_merged_diff"] < 1e-5
    assert finetuned["lora_merged_class"] == "SpeedPLMForSequenceClassification"


def test_readme_use_a_checkpoint_snippets_run(checkpoint, tmp_path):
    """The README's "Use a checkpoint" Python blocks, as written (on this checkpoint), in a fresh process."""
    pytest.importorskip("peft", reason="one block uses peft, the optional extra")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("## Use a checkpoint")
    section = readme[
        start : readme.index("\n### Embeddings of many proteins", start)
    ]  # eval.embed: tests/test_embed.py
    blocks = section.split("```python\n")[1:]
    assert len(blocks) == 3
    code = [block.split("```")[0].replace("runs/default/final", str(checkpoint)) for block in blocks]
    checks = [
        "assert embeddings.shape == (2, model.config.hidden_size) and torch.isfinite(embeddings).all()",
        "assert any(p.requires_grad for n, p in model.named_parameters() if 'lora_' in n)",
        "n = batch['input_ids'].shape[1] - 2\nassert contacts.shape == (n, n) and torch.isfinite(contacts).all()",
    ]
    script = tmp_path / "readme.py"
    script.write_text("\n".join(f"{c}\n{check}" for c, check in zip(code, checks)))
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
