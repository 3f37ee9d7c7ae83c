"""Per-residue secondary structure (Q3, Q8) from frozen embeddings: a linear probe on held-out PDB chains.

    python -m eval.quality.secondary_structure --model CKPT [CKPT ...] --data data/quality/sidechainnet --out DIR \\
        [--layers -1] [--seeds 0 1 2] [--train-fraction 0.8] [--max-length 1024] [--batch-tokens 8192]

Data: `ss_subset.jsonl` prepared by `python -m eval.quality.structure_data fetch` (600 train / 196 test chains; the
test chains are ProteinNet CASP12 validation chains, train and test share no chain and no identical sequence; DSSP
8-state labels of sidechainnet / ProteinNet; see eval/quality/structure_data.py for sources and licences).

Protocol (identical for every model)
    - features: the hidden states of --layers (default -1, the last = `last_hidden_state`) at every residue
      (eval.quality.embeddings.per_residue: <cls>/<eos> dropped, first max_length - 2 residues of a longer chain);
    - labels: DSSP 8 states HGIEBTSL (Q8, Kabsch & Sander 1983) and Q3 by the standard mapping H,G,I -> H;
      E,B -> E; T,S,L -> C. Residues in runs of >= 10 'L' (probably unresolved; structure_data.scored_mask) are
      neither trained on nor scored;
    - probe: StandardScaler + LogisticRegression (eval.probes.fit_probe), one for Q8 and one for Q3, fit on the
      residues of a seeded random --train-fraction of the training chains, accuracy over every scored residue of the
      test chains; per seed in --seeds, reported as mean and sample standard deviation;
    - baselines beside the model rows, same chains and seeds: the training majority class, and the same probe on a
      one-hot code of the residue's amino acid (21 letters: 20 standard + X): what a model must beat to show it
      learned more than residue identity.
Outputs: secondary_structure.csv (every row, per-seed values) and secondary_structure.md (table + stamp).
"""

import argparse
import csv
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.checkpoints import EvalError, inspect_model, load_model
from eval.quality.embeddings import (
    EmbedOptions,
    fit_accuracy,
    majority_accuracy,
    mean_std,
    per_residue,
    train_subsample,
)
from eval.quality.structure_data import DSSP8, Q3, StructureDataError, check_splits, label_ids, load, scored_mask
from eval.tables import markdown_table, short_name, stamp

TASK = "secondary_structure"
SUBSET = "ss_subset.jsonl"
METRICS = (("Q3", Q3), ("Q8", DSSP8))
ONE_HOT_LETTERS = "ACDEFGHIKLMNPQRSTVWYX"
COLUMNS = ("task", "model", "features", "metric", "mean", "std", "n_seeds", "n_train", "n_test", "values")


@dataclass(frozen=True)
class SSOptions:
    layers: tuple[int, ...] = (-1,)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_fraction: float = 0.8  # of the training chains, drawn per seed
    max_length: int = 1024  # upper bound on tokens per chain (the model's own limit also applies)
    batch_tokens: int = 8192
    subset: str = SUBSET


@dataclass
class ResidueTask:
    """Chains of one prepared file and their residues, cropped to `lengths` (what the model saw)."""

    sequences: list  # (N,) str
    is_test: np.ndarray  # (N,) bool
    lengths: np.ndarray  # (N,) residues kept per chain
    labels: dict  # metric name -> (R,) int64 class ids, chains concatenated
    scored: np.ndarray  # (R,) bool
    chain_of: np.ndarray  # (R,) chain index of each residue


def build_task(chains: list, max_residues: int) -> ResidueTask:
    """Labels of each chain's first min(len, max_residues) residues."""
    lengths = np.array([min(len(c.sequence), max_residues) for c in chains], dtype=np.int64)
    labels = {name: np.concatenate([label_ids(c.dssp8[:n], s) for c, n in zip(chains, lengths)]) for name, s in METRICS}
    scored = np.concatenate([scored_mask(c.dssp8)[:n] for c, n in zip(chains, lengths)])
    chain_of = np.repeat(np.arange(len(chains)), lengths)
    is_test = np.array([c.split == "test" for c in chains])
    return ResidueTask([c.sequence for c in chains], is_test, lengths, labels, scored, chain_of)


def one_hot(task: ResidueTask) -> np.ndarray:
    """(R, 21) float32 amino-acid identity of every kept residue."""
    table = np.zeros(256, dtype=np.int64)
    for i, c in enumerate(ONE_HOT_LETTERS):
        table[ord(c)] = i
    text = "".join(s[:n] for s, n in zip(task.sequences, task.lengths))
    return np.eye(len(ONE_HOT_LETTERS), dtype=np.float32)[table[np.frombuffer(text.encode(), dtype=np.uint8)]]


def score_features(task: ResidueTask, x: np.ndarray | None, options: SSOptions) -> dict:
    """metric -> per-seed accuracies of the probe on x ((R, dim), or None for the majority class)."""
    train_chains = np.flatnonzero(~task.is_test)
    test_rows = task.is_test[task.chain_of] & task.scored
    out = {name: [] for name, _ in METRICS}
    for seed in options.seeds:
        chosen = np.zeros(len(task.is_test), dtype=bool)
        chosen[train_chains[train_subsample(len(train_chains), options.train_fraction, seed)]] = True
        train_rows = chosen[task.chain_of] & task.scored
        for name, _ in METRICS:
            y = task.labels[name]
            if x is None:
                out[name].append(majority_accuracy(y[train_rows], y[test_rows]))
            else:
                out[name].append(fit_accuracy(x[train_rows], y[train_rows], x[test_rows], y[test_rows], seed))
    return out


def rows_for(model: str, features: str, task: ResidueTask, scores: dict) -> list[dict]:
    train_rows = int((~task.is_test[task.chain_of] & task.scored).sum())
    test_rows = int((task.is_test[task.chain_of] & task.scored).sum())
    rows = []
    for name, values in scores.items():
        mean, std = mean_std(values)
        rows.append(
            dict(
                task=TASK,
                model=model,
                features=features,
                metric=name,
                mean=mean,
                std=std,
                n_seeds=len(values),
                n_train=train_rows,
                n_test=test_rows,
                values=" ".join(f"{v:.4f}" for v in values),
            )
        )
    return rows


def run(model_names: list, data_dir: Path, options: SSOptions = SSOptions(), log=print) -> list[dict]:
    """Rows (dicts with COLUMNS) for the baselines, then every model x layer; n_train/n_test count scored residues
    (n_train: all training chains; each seed fits on its --train-fraction of them)."""
    from training.data.validate import encode

    chains = load(Path(data_dir), options.subset)
    check_splits(chains=chains)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs = [inspect_model(name) for name in model_names]  # every vocabulary checked before the slow part
    start = time.perf_counter()
    base = build_task(chains, min([options.max_length, *(s.max_length for s in specs)]) - 2)
    rows = rows_for("baseline", "majority class", base, score_features(base, None, options))
    rows += rows_for("baseline", "one-hot amino acid", base, score_features(base, one_hot(base), options))
    log(f"{TASK}: baselines on {len(chains)} chains ({time.perf_counter() - start:.1f} s)")
    for spec in specs:
        start = time.perf_counter()
        model = load_model(spec, device)
        embed = EmbedOptions(options.layers, min(options.max_length, spec.max_length), options.batch_tokens)
        task = build_task(chains, embed.max_length - 2)
        got = per_residue(model, spec, [encode(c.sequence) for c in chains], embed)
        if not np.array_equal(got.lengths, task.lengths):
            raise EvalError(f"model {spec.name}: embedded lengths differ from the labels' (cropping mismatch)")
        seconds = time.perf_counter() - start
        for k, layer in enumerate(got.layers):
            scores = score_features(task, got.features[k], options)
            rows += rows_for(spec.name, f"layer {layer}", task, scores)
            log(
                f"{short_name(spec.name)} layer {layer}: Q3 {np.mean(scores['Q3']):.4f} Q8 {np.mean(scores['Q8']):.4f}"
                f" (embedding {seconds:.1f} s, probes {time.perf_counter() - start - seconds:.1f} s)"
            )
        del model
    return rows


def wide(rows: list[dict]) -> list[dict]:
    """One line per (model, features): Q3 and Q8 as 'mean ± std'."""
    out = {}
    for r in rows:
        blank = dict(model=short_name(r["model"]), features=r["features"], Q3="", Q8="")
        line = out.setdefault((r["model"], r["features"]), blank)
        line[r["metric"]] = f"{r['mean']:.4f} ± {r['std']:.4f}"
        line["seeds"], line["train residues"], line["test residues"] = r["n_seeds"], r["n_train"], r["n_test"]
    return list(out.values())


def write_outputs(rows: list[dict], out: Path, command: str, seconds: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{TASK}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = wide(rows)
    text = [
        "# Secondary structure from frozen per-residue embeddings (linear probe)",
        "",
        markdown_table(table, list(table[0])),
        "",
        "Q3 / Q8: accuracy over the scored residues of the held-out chains (ProteinNet CASP12 validation chains, no "
        "chain or identical sequence in train), mean ± sample std over probe seeds (each seed fits on its own random "
        "share of the training chains). Probe: StandardScaler + LogisticRegression. Labels: DSSP (Kabsch & Sander "
        "1983) via sidechainnet / ProteinNet (AlQuraishi 2019); Q3 maps H,G,I->H, E,B->E, rest->C; runs of >= 10 'L' "
        "(probably unresolved) are not scored. Baselines: training majority class; the probe on one-hot amino acid.",
        "",
        f"Wall time: {seconds:.1f} s",
        "",
        *stamp(command),
    ]
    path = out / f"{TASK}.md"
    path.write_text("\n".join(text))
    return path


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The CLI the quality probes share (secondary structure and fold)."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc
    )
    p.add_argument(
        "--model", nargs="+", action="extend", required=True, metavar="CKPT", help="model folders or Hub ids"
    )
    p.add_argument("--data", required=True, metavar="DIR", help="prepared by eval.quality.structure_data fetch")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--layers", nargs="+", type=int, default=[-1], help="hidden states (0 = embedding, -1 = last)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-fraction", type=float, default=0.8, help="share of the training set each seed fits on")
    p.add_argument("--max-length", type=int, default=1024, help="upper bound on tokens per protein")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser("python -m eval.quality.secondary_structure", __doc__).parse_args(argv)
    options = SSOptions(tuple(args.layers), tuple(args.seeds), args.train_fraction, args.max_length, args.batch_tokens)
    start = time.perf_counter()
    try:
        rows = run(args.model, Path(args.data), options)
    except (EvalError, StructureDataError, ValueError) as err:
        print(f"eval.quality.secondary_structure: error: {err}", file=sys.stderr)
        return 1
    command = "python -m eval.quality.secondary_structure " + shlex.join(argv)
    path = write_outputs(rows, Path(args.out), command, time.perf_counter() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
