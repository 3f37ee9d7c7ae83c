"""Run by tests/test_model_use.py in a fresh process outside the repository: fine-tuning a masked-LM checkpoint the
way a Hub user does (trust_remote_code=True, HF_HUB_OFFLINE=1): transformers.Trainer with checkpoint saves, task
heads loaded from the MLM checkpoint, PEFT LoRA. It writes the numbers to a JSON file; the test asserts on them.

    python checkpoint_finetune.py CKPT DATA_JSON WORK_DIR OUT_JSON

DATA_JSON: {"train": [[sequence, label, [residue labels]], ...], "test": [...]}.
"""

import io
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

warnings.simplefilter("ignore")
ckpt, data, work, out_path = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), sys.argv[3], sys.argv[4]
result = {}
log = io.StringIO()  # transformers' own messages, e.g. the "newly initialized" warning of a new head
logging.getLogger("transformers").addHandler(logging.StreamHandler(log))
tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)


def rows(split: str, per_residue: bool) -> list[dict]:
    out = []
    for sequence, label, residue_labels in data[split]:
        row = dict(tokenizer(sequence))
        row["labels"] = [-100, *residue_labels, -100] if per_residue else label  # <cls>, <eos> are not scored
        out.append(row)
    return out


def arguments(name: str, steps: int, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=f"{work}/{name}",
        max_steps=steps,
        save_steps=steps // 2,  # two checkpoint saves during training
        per_device_train_batch_size=16,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=steps,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


@torch.no_grad()
def predict(model, split: str, per_residue: bool):
    collator = DataCollatorForTokenClassification(tokenizer) if per_residue else DataCollatorWithPadding(tokenizer)
    batch = collator(rows(split, per_residue))
    labels = batch.pop("labels")
    logits = model.eval()(**batch).logits
    scored = labels != -100
    accuracy = (logits.argmax(-1)[scored] == labels[scored]).float().mean().item()
    return logits, accuracy


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def majority(split: str, per_residue: bool) -> float:
    """Accuracy of always predicting the most frequent class: the bar a trained head must clear."""
    labels = [y for _, label, residues in data[split] for y in (residues if per_residue else [label])]
    return max(labels.count(0), labels.count(1)) / len(labels)


# 1. sequence classification: a new head on the MLM checkpoint, Trainer with save_steps, reload, re-save, reload
torch.manual_seed(0)  # the new head's initialisation
model = AutoModelForSequenceClassification.from_pretrained(ckpt, trust_remote_code=True, num_labels=2)
result["sequence_new_head_warning"] = "newly initialized" in log.getvalue() and "classifier" in log.getvalue()
result["sequence_majority"] = majority("test", False)
trainer = Trainer(
    model=model,
    args=arguments("sequence", 24, 3e-3),
    train_dataset=rows("train", False),
    data_collator=DataCollatorWithPadding(tokenizer),
    processing_class=tokenizer,
)
trainer.train()
logits, result["sequence_accuracy"] = predict(model, "test", False)
result["sequence_checkpoints"] = sorted(p.name for p in Path(f"{work}/sequence").iterdir())
reloaded = AutoModelForSequenceClassification.from_pretrained(f"{work}/sequence/checkpoint-24", trust_remote_code=True)
result["sequence_reload_diff"] = max_diff(predict(reloaded, "test", False)[0], logits)
reloaded.save_pretrained(f"{work}/sequence-resaved")
again = AutoModelForSequenceClassification.from_pretrained(f"{work}/sequence-resaved", trust_remote_code=True)
result["sequence_resave_diff"] = max_diff(predict(again, "test", False)[0], logits)
result["sequence_resave_auto_map"] = sorted(
    json.loads(Path(f"{work}/sequence-resaved/config.json").read_text())["auto_map"]
)
result["sequence_tokenizer_saved"] = type(
    AutoTokenizer.from_pretrained(f"{work}/sequence/checkpoint-24", trust_remote_code=True)
).__name__

# 2. token classification: a per-residue head, -100 ignored
log.truncate(0)
torch.manual_seed(0)
model = AutoModelForTokenClassification.from_pretrained(ckpt, trust_remote_code=True, num_labels=2)
result["token_new_head_warning"] = "newly initialized" in log.getvalue() and "classifier" in log.getvalue()
result["token_majority"] = majority("test", True)
Trainer(
    model=model,
    args=arguments("token", 12, 5e-3),
    train_dataset=rows("train", True),
    data_collator=DataCollatorForTokenClassification(tokenizer),
    processing_class=tokenizer,
).train()
logits, result["token_accuracy"] = predict(model, "test", True)
reloaded = AutoModelForTokenClassification.from_pretrained(f"{work}/token/checkpoint-12", trust_remote_code=True)
result["token_reload_diff"] = max_diff(predict(reloaded, "test", True)[0], logits)

# 3. PEFT LoRA: train, save the adapter, reload it, merge, save, reload
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

LORA_TARGETS = ["qkv_proj", "o_proj", "up_proj", "down_proj"]
torch.manual_seed(0)
base = AutoModelForSequenceClassification.from_pretrained(ckpt, trust_remote_code=True, num_labels=2)
lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=LORA_TARGETS))
trainable, total = lora.get_nb_trainable_parameters()
result["lora_trainable_fraction"] = trainable / total
Trainer(
    model=lora,
    args=arguments("lora", 16, 5e-3),
    train_dataset=rows("train", False),
    data_collator=DataCollatorWithPadding(tokenizer),
).train()
# every LoRA matrix moved from its initialisation (lora_B starts at zero): none is bypassed by a fused kernel
result["lora_untrained_matrices"] = [n for n, p in lora.named_parameters() if "lora_B" in n and p.abs().sum() == 0]
logits, result["lora_accuracy"] = predict(lora, "test", False)
lora.save_pretrained(f"{work}/adapter")
base = AutoModelForSequenceClassification.from_pretrained(ckpt, trust_remote_code=True, num_labels=2)
reloaded = PeftModel.from_pretrained(base, f"{work}/adapter")
result["lora_reload_diff"] = max_diff(predict(reloaded, "test", False)[0], logits)
merged = reloaded.merge_and_unload()
merged.save_pretrained(f"{work}/merged")
again = AutoModelForSequenceClassification.from_pretrained(f"{work}/merged", trust_remote_code=True)
result["lora_merged_diff"] = max_diff(predict(again, "test", False)[0], logits)
result["lora_merged_class"] = type(again).__name__

with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
