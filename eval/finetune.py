"""Fine-tune a checkpoint on a labelled protein task with transformers.Trainer (full or PEFT LoRA), and compare it with
a linear probe of the same checkpoint and with the same recipe from random weights.

    python -m eval.finetune --model runs/default/final --task SEQ_CAPSID --out finetune/ [--lora]
        [--max-per-task 2000] [--epochs 3] [--lr LR] [--batch-size 16] [--save-steps 50] [--max-length 1024] [--seed 0]

Tasks: the aaanalysis protein-level sets of eval.probes (SEQ_SOLUBLE, SEQ_DISULFIDE, SEQ_CAPSID), with
its protocol: sequences validated like training data, duplicates dropped, a stratified subsample of --max-per-task,
a stratified held-out split (--test-fraction, seed --seed). Proteins longer than the model keep their first
max_length - 2 residues (the tokenizer's explicit `truncation=True` crop).

Arms (same split, same metrics):
    fine-tuned    AutoModelForSequenceClassification.from_pretrained(--model, num_labels=k): the checkpoint's encoder
                  and a new head (residue mean -> dense -> tanh -> classes), every weight trained; with --lora, PEFT
                  LoRA (r 8) on the attention and MLP matrices, the head trained in full (`pip install peft`: the
                  optional extra). transformers.Trainer, checkpoints every --save-steps under OUT/fine-tuned/.
    random init   the same architecture and recipe from random weights: what pretraining adds.
    linear probe  the frozen checkpoint's last hidden state, mean over residues, StandardScaler + logistic regression
                  (eval.probes).
Metrics: accuracy, MCC and macro F1 on the held-out proteins, through `evaluate` with the local module
eval/metrics/protein_classification (Hub metrics cannot load offline). Outputs: OUT/finetune.md, OUT/finetune.csv.
"""

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import EvalError, inspect_model, load_model
from eval.probes import TASKS, Task, embed, fit_probe, load_task
from eval.tables import hardware, markdown_table

METRIC = Path(__file__).parent / "metrics" / "protein_classification"
LORA_TARGETS = ["qkv_proj", "o_proj", "up_proj", "down_proj"]  # SpeedPLM's matrices; "all-linear" for other models
COLUMNS = ("arm", "accuracy", "mcc", "f1_macro", "n_train", "n_test", "trainable_params", "train_seconds")


def tokenized(tokenizer, task: Task, indices, max_length: int) -> list[dict]:
    from training.data.validate import decode

    rows = []
    for i in indices:
        row = dict(tokenizer(decode(task.tokens[i]), truncation=True, max_length=max_length))
        row["labels"] = int(task.labels[i])
        rows.append(row)
    return rows


def train_arm(name: str, model, tokenizer, task: Task, args, max_length: int) -> tuple[np.ndarray, dict]:
    """Train `model` with transformers.Trainer on the train split; (test predictions, trainable params, seconds)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    training_args = TrainingArguments(
        output_dir=str(Path(args.out) / name),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr or (1e-3 if args.lora else 1e-4),
        warmup_steps=0.1,  # a float below 1: a fraction of the steps
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=max(1, args.save_steps // 2),
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized(tokenizer, task, task.train, max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logits = trainer.predict(tokenized(tokenizer, task, task.test, max_length)).predictions
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return np.asarray(logits).argmax(-1), {"trainable_params": trainable, "train_seconds": seconds}


def with_lora(model, model_type: str):
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS if model_type == "speedplm" else "all-linear"
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=targets))


def run(args, log=print) -> list[dict]:
    import evaluate
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    spec = inspect_model(args.model)  # config + tokenizer: a bad --model fails before any training
    task = load_task(args.task, args.max_per_task, args.test_fraction, args.seed)
    num_labels = int(task.labels.max()) + 1
    max_length = min(args.max_length, spec.max_length)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    metric = evaluate.load(str(METRIC))
    recipe = "LoRA" if args.lora else "full"
    log(f"{args.task}: {len(task.train)} train / {len(task.test)} test proteins, {num_labels} classes, {recipe}")

    arms = []
    set_seed(args.seed)
    pretrained = AutoModelForSequenceClassification.from_pretrained(
        args.model, trust_remote_code=True, num_labels=num_labels
    )
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True, num_labels=num_labels)
    set_seed(args.seed)
    scratch = AutoModelForSequenceClassification.from_config(config, trust_remote_code=True)
    for name, model in ((f"fine-tuned ({recipe})", pretrained), (f"random init ({recipe})", scratch)):
        model = with_lora(model, config.model_type) if args.lora else model
        predicted, extra = train_arm(name.split(" (")[0].replace(" ", "-"), model, tokenizer, task, args, max_length)
        arms.append((name, predicted, extra))
        log(f"{name}: trained in {extra['train_seconds']:.1f} s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    features = embed(load_model(spec, device), spec, task.tokens, max_length, args.batch_tokens, device)[-1]
    classifier = fit_probe(features[task.train], task.labels[task.train], args.seed)
    probe_extra = {"trainable_params": features.shape[1] * num_labels, "train_seconds": time.perf_counter() - start}
    arms.append(("linear probe (last hidden state)", classifier.predict(features[task.test]), probe_extra))

    rows = []
    for name, predicted, extra in arms:
        scores = metric.compute(predictions=predicted.tolist(), references=task.labels[task.test].tolist())
        rows.append({"arm": name, **scores, "n_train": len(task.train), "n_test": len(task.test), **extra})
    return rows


def write_outputs(rows: list[dict], out: Path, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "finetune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, list(COLUMNS))
    text = [
        "# Fine-tuning vs linear probe vs random init",
        "",
        table,
        "",
        "Held-out proteins of the task (stratified split, eval.probes protocol); metrics from the local evaluate "
        "module eval/metrics/protein_classification.",
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {hardware()}",
        "",
    ]
    (out / "finetune.md").write_text("\n".join(text))
    return table


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m eval.finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--model", required=True, help="checkpoint directory or Hub id (a masked-LM checkpoint)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--lora", action="store_true", help="PEFT LoRA instead of full fine-tuning (pip install peft)")
    p.add_argument("--max-per-task", type=int, default=2000, help="stratified subsample (0 = all)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 full, 1e-3 LoRA")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--save-steps", type=int, default=50, help="Trainer checkpoint every N steps")
    p.add_argument("--max-length", type=int, default=1024, help="upper bound on tokens per protein")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward (linear probe)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("eval.finetune: error: --lora needs peft, the optional extra: pip install peft", file=sys.stderr)
            return 1
    for name in ("epochs", "batch_size", "save_steps"):
        if getattr(args, name) <= 0:
            print(f"eval.finetune: error: --{name.replace('_', '-')} must be > 0", file=sys.stderr)
            return 1
    try:
        rows = run(args)
    except (EvalError, ValueError) as err:
        print(f"eval.finetune: error: {err}", file=sys.stderr)
        return 1
    print(write_outputs(rows, Path(args.out), "python -m eval.finetune " + shlex.join(argv)))
    print(f"wrote {Path(args.out) / 'finetune.md'}, finetune.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
