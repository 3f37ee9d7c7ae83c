"""Fold classification (SCOPe) from mean-pooled frozen embeddings, on superfamilies never seen in training.

    python -m eval.quality.fold --model CKPT [CKPT ...] --data data/quality/sidechainnet --out DIR \\
        [--layers -1] [--seeds 0 1 2] [--train-fraction 0.8] [--max-length 1024] [--batch-tokens 8192]

Data: `fold_subset.jsonl` prepared by `python -m eval.quality.structure_data fetch`: SCOPe 2.07 domains
(Chandonia et al. 2019) from sidechainnet, exact duplicate sequences merged, the 72 folds with >= 10 train and
>= 5 test domains, at most 25 train / 10 test domains per fold (1,682 / 661). Test domains come from superfamilies
held out of training inside folds with >= 2 superfamilies: the remote-homology setting of Hou et al. 2018 (DeepSF)
and TAPE (Rao et al. 2019), where only the fold, not a detectable sequence family, links test to train.

Protocol (identical for every model)
    - features: the hidden states of --layers (default -1, the last = `last_hidden_state`) averaged over residue
      tokens (eval.probes.embed: no <cls>/<eos>/padding, first max_length - 2 residues of a longer domain);
    - label: the SCOPe fold (class.fold, e.g. "b.1"), one of 72;
    - probe: StandardScaler + LogisticRegression (eval.probes.fit_probe), fit on a seeded random --train-fraction of
      the training domains, accuracy on all test domains; per seed in --seeds, mean and sample standard deviation;
    - baselines, same domains and seeds: the training majority fold, and the same probe on amino-acid composition
      (21 letter frequencies: 20 standard + X).
Outputs: fold.csv (every row, per-seed values) and fold.md (table + stamp).
"""

import csv
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import EvalError, inspect_model, load_model
from eval.probes import embed
from eval.quality.embeddings import fit_accuracy, majority_accuracy, mean_std, resolve_layers, train_subsample
from eval.quality.secondary_structure import ONE_HOT_LETTERS, parser
from eval.quality.structure_data import StructureDataError, check_splits, load
from eval.tables import markdown_table, short_name, stamp

TASK = "fold"
SUBSET = "fold_subset.jsonl"
COLUMNS = ("task", "model", "features", "metric", "mean", "std", "n_seeds", "n_train", "n_test", "values")


@dataclass(frozen=True)
class FoldOptions:
    layers: tuple[int, ...] = (-1,)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_fraction: float = 0.8  # of the training domains, drawn per seed
    max_length: int = 1024  # upper bound on tokens per domain (the model's own limit also applies)
    batch_tokens: int = 8192
    subset: str = SUBSET


@dataclass
class FoldTask:
    sequences: list  # (N,) str
    labels: np.ndarray  # (N,) int64 fold index into `folds`
    folds: list  # fold names, sorted
    is_test: np.ndarray  # (N,) bool


def build_task(domains: list) -> FoldTask:
    folds = sorted({d.fold for d in domains})
    index = {f: i for i, f in enumerate(folds)}
    return FoldTask(
        [d.sequence for d in domains],
        np.array([index[d.fold] for d in domains], dtype=np.int64),
        folds,
        np.array([d.split == "test" for d in domains]),
    )


def composition(sequences: list) -> np.ndarray:
    """(N, 21) float32 letter frequencies (ONE_HOT_LETTERS order)."""
    out = np.zeros((len(sequences), len(ONE_HOT_LETTERS)), dtype=np.float32)
    for i, s in enumerate(sequences):
        for j, letter in enumerate(ONE_HOT_LETTERS):
            out[i, j] = s.count(letter) / len(s)
    return out


def score_features(task: FoldTask, x: np.ndarray | None, options: FoldOptions) -> list[float]:
    """Per-seed test accuracy of the probe on x ((N, dim), or None for the majority fold)."""
    train, test = np.flatnonzero(~task.is_test), np.flatnonzero(task.is_test)
    values = []
    for seed in options.seeds:
        rows = train[train_subsample(len(train), options.train_fraction, seed)]
        y_train, y_test = task.labels[rows], task.labels[test]
        if x is None:
            values.append(majority_accuracy(y_train, y_test))
        else:
            values.append(fit_accuracy(x[rows], y_train, x[test], y_test, seed))
    return values


def row(model: str, features: str, task: FoldTask, values: list[float]) -> dict:
    mean, std = mean_std(values)
    return dict(
        task=TASK,
        model=model,
        features=features,
        metric="accuracy",
        mean=mean,
        std=std,
        n_seeds=len(values),
        n_train=int((~task.is_test).sum()),
        n_test=int(task.is_test.sum()),
        values=" ".join(f"{v:.4f}" for v in values),
    )


def run(model_names: list, data_dir: Path, options: FoldOptions = FoldOptions(), log=print) -> list[dict]:
    """Rows (dicts with COLUMNS): the baselines, then every model x layer."""
    from training.data.validate import encode

    domains = load(Path(data_dir), options.subset)
    check_splits(domains=domains)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = [inspect_model(name) for name in model_names]  # every vocabulary checked before the slow part
    task = build_task(domains)
    start = time.perf_counter()
    rows = [
        row("baseline", "majority fold", task, score_features(task, None, options)),
        row("baseline", "amino-acid composition", task, score_features(task, composition(task.sequences), options)),
    ]
    log(f"{TASK}: baselines on {len(domains)} domains, {len(task.folds)} folds ({time.perf_counter() - start:.1f} s)")
    tokens = [encode(s) for s in task.sequences]
    for spec in specs:
        start = time.perf_counter()
        model = load_model(spec, device)
        pooled = embed(model, spec, tokens, min(options.max_length, spec.max_length), options.batch_tokens, device)
        seconds = time.perf_counter() - start
        for layer in resolve_layers(options.layers, len(pooled)):
            values = score_features(task, pooled[layer], options)
            rows.append(row(spec.name, f"layer {layer}", task, values))
            log(
                f"{short_name(spec.name)} layer {layer}: fold accuracy {np.mean(values):.4f} "
                f"(embedding {seconds:.1f} s, probes {time.perf_counter() - start - seconds:.1f} s)"
            )
        del model
    return rows


def write_outputs(rows: list[dict], out: Path, command: str, seconds: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{TASK}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = [
        dict(
            model=short_name(r["model"]),
            features=r["features"],
            accuracy=f"{r['mean']:.4f} ± {r['std']:.4f}",
            seeds=r["n_seeds"],
            train=r["n_train"],
            test=r["n_test"],
        )
        for r in rows
    ]
    text = [
        "# Fold classification from mean-pooled frozen embeddings (superfamily held out)",
        "",
        markdown_table(table, list(table[0])),
        "",
        "Accuracy on test domains whose SCOPe 2.07 superfamily (Chandonia et al. 2019) never occurs in training "
        "(Hou et al. 2018; TAPE, Rao et al. 2019), mean ± sample std over probe seeds (each seed fits on its own "
        "random share of the training domains). Probe: StandardScaler + LogisticRegression on residue-averaged hidden "
        "states. Baselines: training majority fold; the probe on amino-acid composition.",
        "",
        f"Wall time: {seconds:.1f} s",
        "",
        *stamp(command),
    ]
    path = out / f"{TASK}.md"
    path.write_text("\n".join(text))
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser("python -m eval.quality.fold", __doc__).parse_args(argv)
    options = FoldOptions(
        tuple(args.layers), tuple(args.seeds), args.train_fraction, args.max_length, args.batch_tokens
    )
    start = time.perf_counter()
    try:
        rows = run(args.model, Path(args.data), options)
    except (EvalError, StructureDataError, ValueError) as err:
        print(f"eval.quality.fold: error: {err}", file=sys.stderr)
        return 1
    command = "python -m eval.quality.fold " + shlex.join(argv)
    path = write_outputs(rows, Path(args.out), command, time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
