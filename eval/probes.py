"""Linear probes of every layer's mean-pooled embeddings on labelled protein tasks.

    python -m eval.probes --models runs/default/final facebook/esm2_t6_8M_UR50D \\
        --tasks SEQ_SOLUBLE SEQ_DISULFIDE SEQ_CAPSID --out probes/ [--max-per-task N]

Tasks: the aaanalysis benchmark TSVs of those names (columns sequence, label; found with
training.data.sources.builtin_files(); BSD-3, see training.data.builtin_attribution). All three are binary: SEQ_SOLUBLE
(soluble vs insoluble), SEQ_DISULFIDE (has a disulfide bridge), SEQ_CAPSID (viral capsid protein). SEQ_LOCATION is
not a default task: its sequences are an alphabet-reduced encoding (14 letters, no E F I L P Q), not proteins, and the
validation policy's composition rule rejects them (training/data/validate.py).
NB: the built-in pretraining set holds these sequences (never the labels), so a
model trained on it has seen the unlabelled test proteins; compare models trained on the same data.

Protocol, per task (identical for every model)
    - sequences are validated like training data (training.data.validate.encode: upper-cased, a terminal '*' stripped);
      invalid ones and exact duplicates (first kept) are dropped and counted;
    - --max-per-task N (default 2000; 0 = all): a stratified random subsample of N, seed --seed;
    - held-out split: sklearn train_test_split, stratified, test share --test-fraction (0.2), random_state --seed;
    - a protein longer than the model allows keeps its FIRST max_length - 2 residues, max_length = min(--max-length,
      the model's max_position_embeddings and tokenizer limit);
    - features: every hidden state (`output_hidden_states=True`: the embedding output + one per layer, so
      num_layers + 1 of them), averaged over residue tokens only (not <cls>, <eos> or padding). The last one is the
      model's `last_hidden_state` (after the final norm) for SpeedPLM and ESM2 alike, transformers' convention; it is
      what the "last layer" columns report and what a fine-tuned head pools (eval/finetune.py);
    - probe: StandardScaler + LogisticRegression (lbfgs, C=1, max_iter 2000) fit on the train part, accuracy and
      MCC on the held-out part, per layer.
Outputs: probes.csv (model, task, layer, accuracy, mcc, n_train, n_test, dim), probes.md, probes.png
(layer on x; accuracy and MCC rows; a panel per task; a line per model).
"""

import argparse
import csv
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import EvalError, ModelSpec, inspect_model, load_model
from eval.tables import hardware, markdown_table, short_name

TASKS = ("SEQ_SOLUBLE", "SEQ_DISULFIDE", "SEQ_CAPSID")
MAX_INVALID_SHARE = 0.5  # a task whose sequences the validation policy mostly rejects is refused, with the reason
CSV_COLUMNS = ("model", "task", "layer", "accuracy", "mcc", "n_train", "n_test", "dim")


@dataclass
class Task:
    name: str
    tokens: list  # (n,) uint8 residue ids per protein, ESM2 ids
    labels: np.ndarray  # (N,) int
    train: np.ndarray  # indices into tokens/labels
    test: np.ndarray
    dropped_invalid: int
    dropped_duplicate: int


def load_task(name: str, max_per_task: int | None = 2000, test_fraction: float = 0.2, seed: int = 0) -> Task:
    from sklearn.model_selection import train_test_split

    from training.data.sources import builtin_files
    from training.data.validate import encode

    files = {p.stem: p for p in builtin_files()}
    if name not in files:
        raise EvalError(f"task {name!r}: no such aaanalysis TSV; available: {sorted(files)}")
    tokens, labels, seen, invalid, duplicate, reasons = [], [], set(), 0, 0, []
    with open(files[name], encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            try:
                ids = encode(row["sequence"].strip())
            except ValueError as err:
                invalid += 1
                reasons.append(f"{row.get('entry', '?')}: {err}")
                continue
            key = ids.tobytes()
            if key in seen:
                duplicate += 1
                continue
            seen.add(key)
            tokens.append(ids)
            labels.append(int(row["label"]))
    if invalid > MAX_INVALID_SHARE * (invalid + duplicate + len(tokens)):
        raise EvalError(
            f"task {name!r}: the validation policy rejects {invalid} of its {invalid + duplicate + len(tokens)} "
            f"sequences (first: {reasons[0]})"
        )
    labels = np.asarray(labels)
    keep = np.arange(len(tokens))
    if max_per_task and len(keep) > max_per_task:
        keep, _ = train_test_split(keep, train_size=max_per_task, stratify=labels, random_state=seed)
        keep = np.sort(keep)
    tokens, labels = [tokens[i] for i in keep], labels[keep]
    train, test = train_test_split(np.arange(len(tokens)), test_size=test_fraction, stratify=labels, random_state=seed)
    return Task(name, tokens, labels, np.sort(train), np.sort(test), invalid, duplicate)


@torch.no_grad()
def embed(model, spec: ModelSpec, tokens: list, max_length: int, batch_tokens: int, device) -> np.ndarray:
    """(num_layers + 1, N, hidden) mean over residue tokens of every hidden state; first max_length-2 residues."""
    from training.data.validate import CLS, EOS, PAD

    lengths = np.array([min(len(t), max_length - 2) for t in tokens])
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: little padding
    out = None
    start = 0
    while start < len(order):
        stop = start + 1  # grow the batch while rows x longest stays within batch_tokens
        while stop < len(order) and (stop + 1 - start) * (lengths[order[stop]] + 2) <= batch_tokens:
            stop += 1
        idx = order[start:stop]
        L = int(lengths[idx].max()) + 2
        ids = torch.full((len(idx), L), PAD, dtype=torch.long)  # (B, L)
        residues = torch.zeros((len(idx), L), dtype=torch.bool)  # (B, L): True on residue tokens only
        for r, i in enumerate(idx):
            n = int(lengths[i])
            ids[r, 0], ids[r, n + 1] = CLS, EOS
            ids[r, 1 : n + 1] = torch.from_numpy(tokens[i][:n].astype(np.int64))
            residues[r, 1 : n + 1] = True
        attention = (ids != PAD).long()
        hidden = model(
            input_ids=spec.vocab.model_ids(ids).to(device),
            attention_mask=attention.to(device),
            output_hidden_states=True,
        ).hidden_states  # (layers + 1) x (B, L, H)
        weights = residues.to(device).unsqueeze(-1).float()  # (B, L, 1)
        pooled = torch.stack([(h.float() * weights).sum(1) / weights.sum(1) for h in hidden])  # (layers + 1, B, H)
        if out is None:
            out = np.zeros((pooled.shape[0], len(tokens), pooled.shape[2]), dtype=np.float32)
        out[:, idx] = pooled.cpu().numpy()
        start = stop
    return out


def fit_probe(x_train, y_train, seed: int = 0):
    """StandardScaler + LogisticRegression fit on (N, dim) features; `.predict(x)` gives classes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(x_train, y_train)
    return classifier


def probe(x_train, y_train, x_test, y_test, seed: int = 0) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    predicted = fit_probe(x_train, y_train, seed).predict(x_test)
    return float(accuracy_score(y_test, predicted)), float(matthews_corrcoef(y_test, predicted))


@dataclass(frozen=True, kw_only=True)
class ProbeOptions:
    """The protocol (the same for every model; see the module docstring) and the padded tokens per forward."""

    max_per_task: int = 2000  # stratified subsample per task (0 = all)
    test_fraction: float = 0.2
    seed: int = 0
    max_length: int = 1024  # upper bound on tokens per protein
    batch_tokens: int = 8192


def run(model_names, task_names, options: ProbeOptions = ProbeOptions(), *, log=print) -> tuple[list[dict], list[Task]]:
    max_per_task, test_fraction, seed = options.max_per_task, options.test_fraction, options.seed
    max_length, batch_tokens = options.max_length, options.batch_tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = [inspect_model(name) for name in model_names]  # check every vocabulary before the slow part
    tasks = [load_task(name, max_per_task, test_fraction, seed) for name in task_names]
    rows = []
    for spec in specs:
        model = load_model(spec, device)
        length = min(max_length, spec.max_length)
        for task in tasks:
            start = time.perf_counter()
            features = embed(model, spec, task.tokens, length, batch_tokens, device)  # (layers + 1, N, H)
            for layer, x in enumerate(features):
                acc, mcc = probe(x[task.train], task.labels[task.train], x[task.test], task.labels[task.test], seed)
                rows.append(
                    dict(
                        model=spec.name,
                        task=task.name,
                        layer=layer,
                        accuracy=acc,
                        mcc=mcc,
                        n_train=len(task.train),
                        n_test=len(task.test),
                        dim=x.shape[1],
                    )
                )
            best = max(r["accuracy"] for r in rows[-len(features) :])
            log(
                f"{short_name(spec.name)} {task.name}: {len(features)} hidden states, best accuracy {best:.3f} "
                f"({time.perf_counter() - start:.1f} s)"
            )
        del model
    return rows, tasks


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.2), squeeze=False, sharex="col")
    for j, task in enumerate(tasks):
        for k, (metric, label) in enumerate([("accuracy", "accuracy"), ("mcc", "MCC")]):
            ax = axes[k][j]
            for i, name in enumerate(models):
                mine = [r for r in rows if r["task"] == task and r["model"] == name]
                ax.plot(
                    [r["layer"] for r in mine],
                    [r[metric] for r in mine],
                    marker="o",
                    ms=3,
                    color=f"C{i}",
                    label=short_name(name),
                )
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if k == 0:
                ax.set_title(task, fontsize=9)
            else:
                ax.set_xlabel("hidden state (0 = embedding)")
            if j == 0:
                ax.set_ylabel(f"held-out {label}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(rows: list[dict], tasks: list[Task], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "probes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    best = []
    for task in tasks:
        for name in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["task"] == task.name and r["model"] == name]
            top = max(mine, key=lambda r: r["accuracy"])
            best.append(
                dict(
                    task=task.name,
                    model=name,
                    best_layer=top["layer"],
                    accuracy=top["accuracy"],
                    mcc=top["mcc"],
                    last_layer_accuracy=mine[-1]["accuracy"],
                    n_train=top["n_train"],
                    n_test=top["n_test"],
                )
            )
    data = "; ".join(
        f"{t.name}: {len(t.labels)} proteins ({len(t.train)} train / {len(t.test)} test, "
        f"{t.dropped_invalid} invalid and {t.dropped_duplicate} duplicates dropped)"
        for t in tasks
    )
    text = [
        "# Linear probes of mean-pooled hidden states",
        "",
        "## Best layer per model and task",
        "",
        markdown_table(best, list(best[0])),
        "",
        "## Every layer",
        "",
        markdown_table(rows, ["model", "task", "layer", "accuracy", "mcc"]),
        "",
        "Features: mean over residue tokens (no <cls>/<eos>/padding) of each hidden state (layer 0 = embedding "
        "output); proteins longer than the model allows keep their first max_length - 2 residues. Probe: "
        "StandardScaler + LogisticRegression, stratified held-out split.",
        "",
        f"Data: {data}.",
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {hardware()}",
        "",
    ]
    (out / "probes.md").write_text("\n".join(text))
    plot(rows, out / "probes.png")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m eval.probes",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--models", nargs="+", required=True, metavar="M")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="T")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--max-per-task", type=int, default=2000, help="stratified subsample per task (0 = all)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=1024, help="upper bound on tokens per protein")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward")
    args = p.parse_args(argv)
    try:
        options = ProbeOptions(
            max_per_task=args.max_per_task,
            test_fraction=args.test_fraction,
            seed=args.seed,
            max_length=args.max_length,
            batch_tokens=args.batch_tokens,
        )
        rows, tasks = run(args.models, args.tasks, options)
    except (EvalError, ValueError) as err:
        print(f"eval.probes: error: {err}", file=sys.stderr)
        return 1
    write_outputs(rows, tasks, Path(args.out), "python -m eval.probes " + shlex.join(argv))
    print(f"wrote {Path(args.out) / 'probes.csv'}, probes.md, probes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
