"""Unsupervised contact prediction from attention maps (Rao et al. 2021), on real PDB chains (ProMod3 StructureDB).

    python -m eval.quality.contacts --model CKPT [--model CKPT2 ...] --data data/quality/promod3 --out DIR
        [--seeds 0 1 2] [--train-chains 20] [--C 0.15] [--max-length 1024] [--device cpu]

Prepare the data first: `python -m eval.quality.contacts_data fetch --out data/quality/promod3` (real PDB chains
with virtual C-beta coordinates; contact = CB-CB < 8 A; see eval/quality/contacts_data.py).

Method: Rao, Meier, Sercu, Ovchinnikov, Rives (2021), "Transformer protein language models are unsupervised
structure learners", ICLR; the same computation as fair-esm's `ContactPredictionHead` (esm/modules.py):
    1. one forward per protein, <cls> + residues + <eos>, with `output_attentions=True`: every layer's and head's
       attention probabilities (SpeedPLM switches to eager attention for that call by itself; transformers' ESM is
       switched to eager here, its SDPA returns none);
    2. drop the <cls> and <eos> rows and columns (after the softmax, as ESM does), symmetrize (A + A^T), then APC,
       the average product correction A_ij - A_i. A_.j / A_.. (per layer and head), giving layers x heads
       features per residue pair;
    3. an L1-regularised logistic regression (sklearn LogisticRegression, liblinear, l1_ratio=1, C=0.15 as in the
       paper) fitted on every pair |i-j| >= 6 of `--train-chains` (20, as in the paper) training chains, drawn per
       seed from the prepared training pool;
    4. on the held-out test chains: per protein, the pairs of a range ranked by predicted probability; precision of
       the top L, L/2, L/5 (L = the protein's length, k = floor(L/d)), averaged over proteins; long range
       |i-j| >= 24, medium 12 <= |i-j| < 24 (fair-esm's `compute_precisions` / `evaluate_prediction`).
Each seed draws another training subset (the test set stays); the table reports mean and standard deviation over
seeds. A protein longer than the model allows keeps its first max_length - 2 residues (max_length = min(--max-length,
the model's max_position_embeddings and tokenizer limit)); contacts are cropped with it and L is the cropped length.

Baselines beside every model (no model needed): "separation" ranks the pairs of a range by 1 / |i-j| (nearest in
sequence first; deterministic), "random" ranks them at random (one draw per seed). A model's random-init twin is
the fair floor for a trained model; pass it as another --model.

Outputs: contacts.md (markdown table stamped with commit, date, machine and the exact command) and contacts.csv.
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

from eval.checkpoints import EvalError, ModelSpec, inspect_model, load_model
from eval.quality.contacts_data import Chains, ContactsDataError, contact_map, load_prepared
from eval.tables import markdown_table, stamp

RANGES = {"long": (24, None), "medium": (12, 24)}  # min <= j - i < max
DIVISORS = (1, 2, 5)  # P@L, P@L/2, P@L/5
FIT_MIN_SEPARATION = 6
METRICS = tuple(f"P@L/{d}" if d > 1 else "P@L" for d in DIVISORS)
CSV_COLUMNS = (
    ("model", "method", "range", "seeds", "train_chains", "test_chains", "features", "crop_residues")
    + tuple(f"{m} {s}" for m in METRICS for s in ("mean", "std"))
    + ("nonzero_weights", "forward_s")
)


@dataclass(frozen=True)
class ProbeOptions:
    seeds: tuple = (0, 1, 2)
    train_chains: int = 20
    C: float = 0.15
    max_length: int = 1024  # tokens per protein (<cls> and <eos> included), upper bound on the model's own limit
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------------- features


def symmetrize(x: np.ndarray) -> np.ndarray:
    """x + x^T over the last two axes (fair-esm `symmetrize`)."""
    return x + np.swapaxes(x, -1, -2)


def apc(x: np.ndarray) -> np.ndarray:
    """Average product correction over the last two axes: x_ij - (sum_j x_ij)(sum_i x_ij) / sum_ij x_ij."""
    row = x.sum(-1, keepdims=True)
    column = x.sum(-2, keepdims=True)
    total = x.sum((-1, -2), keepdims=True)
    return x - row * column / total


def crop_length(length: int, max_length: int) -> int:
    """Residues kept (the first ones) of a protein of `length` residues for a model of max_length tokens."""
    return min(length, max_length - 2)


def prepare_attention_model(model) -> None:
    """Make `output_attentions=True` return probabilities: SpeedPLM does it per call; other transformers models
    (EsmForMaskedLM defaults to SDPA, which returns none) are switched to eager attention."""
    if getattr(model.config, "model_type", None) == "speedplm":
        return
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")


@torch.no_grad()
def attention_features(model, spec: ModelSpec, sequence: str, max_length: int) -> np.ndarray:
    """(F, n, n) float32 APC-corrected symmetrized attention maps, F = layers x heads, n = cropped length."""
    from training.data.validate import CLS, EOS, encode

    n = crop_length(len(sequence), max_length)
    residues = torch.from_numpy(encode(sequence[:n]).astype(np.int64))
    ids = torch.cat([torch.tensor([CLS]), residues, torch.tensor([EOS])])[None]  # (1, n + 2), ESM2 ids
    device = next(model.parameters()).device
    out = model(
        input_ids=spec.vocab.model_ids(ids).to(device),
        attention_mask=torch.ones_like(ids).to(device),
        output_attentions=True,
    )
    if not out.attentions or any(a is None for a in out.attentions):
        raise EvalError(f"model {spec.name}: output_attentions=True returned no attention probabilities")
    maps = torch.stack([a[0].float() for a in out.attentions])  # (layers, heads, n + 2, n + 2)
    maps = maps[..., 1:-1, 1:-1].reshape(-1, n, n).cpu().numpy().astype(np.float64)  # drop <cls>, <eos>
    return apc(symmetrize(maps)).astype(np.float32)


def pair_index(n: int, low: int, high: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of the upper-triangle pairs with low <= j - i < high (no upper bound when high is None)."""
    i, j = np.triu_indices(n, k=low)
    if high is not None:
        keep = (j - i) < high
        i, j = i[keep], j[keep]
    return i, j


@dataclass(frozen=True)
class ChainFeatures:
    """One chain's pairs j - i >= 6: features (P, F), contact labels (P,), separations (P,), and length n."""

    x: np.ndarray
    y: np.ndarray
    separation: np.ndarray
    n: int


def chain_features(maps: np.ndarray, cb: np.ndarray) -> ChainFeatures:
    n = maps.shape[-1]
    i, j = pair_index(n, FIT_MIN_SEPARATION)
    contacts = contact_map(cb[:n])
    return ChainFeatures(maps[:, i, j].T.copy(), contacts[i, j], (j - i).astype(np.int32), n)


# ---------------------------------------------------------------------------------------------------- metrics


def precision_at(scores, contacts, separation, n: int, tiebreak=None) -> dict:
    """{range: {P@L: .., P@L/2: .., P@L/5: ..}} for one protein from per-pair arrays (scores, contact labels,
    separations j - i): the pairs of each range sorted by score, descending, ties ordered by `tiebreak` (ascending;
    default: pair order), precision of the top floor(n / d) pairs (at least 1; missing pairs count as wrong)."""
    result = {}
    tiebreak = np.arange(len(scores)) if tiebreak is None else tiebreak
    for name, (low, high) in RANGES.items():
        keep = (separation >= low) & (separation < (high if high is not None else np.inf))
        ranked = contacts[keep][np.lexsort((tiebreak[keep], -scores[keep]))]
        result[name] = {}
        for metric, d in zip(METRICS, DIVISORS):
            k = max(1, n // d)
            result[name][metric] = float(ranked[:k].sum()) / k
    return result


def mean_precision(per_protein: list) -> dict:
    """Average over proteins of `precision_at` results."""
    return {name: {m: float(np.mean([p[name][m] for p in per_protein])) for m in METRICS} for name in per_protein[0]}


def fit_regression(train: list, C: float, seed: int):
    """L1 logistic regression (Rao et al. 2021) on every pair j - i >= 6 of the training chains."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([c.x for c in train])
    y = np.concatenate([c.y for c in train])
    if y.all() or not y.any():
        raise ValueError(f"training chains hold {int(y.sum())} contacts in {len(y)} pairs: need both classes")
    return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=seed).fit(x, y)


def score_chains(method: str, test: list, regression, seed: int) -> dict:
    """Mean precision over the test chains for one method: "attention" (fitted regression), "separation", "random".
    Ties (equal scores: every pair at one separation, or a regression whose L1 penalty zeroed every weight) are broken
    at random (seeded), so a constant predictor scores like the random baseline rather than like pair order."""
    rng = np.random.default_rng(seed)
    per_protein = []
    for chain in test:
        tiebreak = rng.random(len(chain.y))
        if method == "attention":
            scores = regression.predict_proba(chain.x)[:, 1]
        elif method == "separation":
            scores = 1.0 / chain.separation
        else:
            scores = rng.random(len(chain.y))
        per_protein.append(precision_at(scores, chain.y, chain.separation, chain.n, tiebreak))
    return mean_precision(per_protein)


# ---------------------------------------------------------------------------------------------------- run


def summary_rows(name: str, method: str, per_seed: list, info: dict) -> list:
    """One row per range: mean and (population) standard deviation over seeds of each metric."""
    rows = []
    for range_name in RANGES:
        row = dict(model=name, method=method, range=range_name, **info)
        for metric in METRICS:
            values = [s[range_name][metric] for s in per_seed]
            row[f"{metric} mean"] = float(np.mean(values))
            row[f"{metric} std"] = float(np.std(values))
        rows.append(row)
    return rows


def train_subsets(chains: Chains, options: ProbeOptions) -> dict:
    """{seed: indices into chains of the training chains}, drawn from the training pool."""
    pool = chains.indices("train")
    if len(pool) < options.train_chains:
        raise ValueError(f"--train-chains {options.train_chains}: the training pool has {len(pool)} chains")
    return {
        seed: sorted(np.random.default_rng(seed).choice(pool, options.train_chains, replace=False).tolist())
        for seed in options.seeds
    }


def probe_model(name: str, chains: Chains, subsets: dict, options: ProbeOptions) -> list:
    """Attention features of every chain used, one regression per seed, rows for the model."""
    spec = inspect_model(name)
    model = load_model(spec, options.device)
    prepare_attention_model(model)
    max_length = min(options.max_length, spec.max_length)
    wanted = sorted(set().union(*subsets.values()) | set(chains.indices("test")))
    start = time.perf_counter()
    features = {}
    for i in wanted:
        maps = attention_features(model, spec, chains.sequences[i], max_length)
        features[i] = chain_features(maps, chains.cb[i])
    forward_s = time.perf_counter() - start
    test = [features[i] for i in chains.indices("test")]
    per_seed, nonzero = [], []
    for seed, subset in subsets.items():
        regression = fit_regression([features[i] for i in subset], options.C, seed)
        nonzero.append(int((regression.coef_ != 0).sum()))
        per_seed.append(score_chains("attention", test, regression, seed))
    info = dict(
        seeds=len(per_seed),
        train_chains=options.train_chains,
        test_chains=len(test),
        features=int(test[0].x.shape[1]),
        crop_residues=max_length - 2,
        nonzero_weights=float(np.mean(nonzero)),
        forward_s=round(forward_s, 2),
    )
    return summary_rows(name, "attention APC + L1 logistic", per_seed, info)


def baseline_rows(chains: Chains, options: ProbeOptions) -> list:
    """The separation and random baselines on the test chains, cropped like a model of options.max_length."""
    test = []
    for i in chains.indices("test"):
        n = crop_length(len(chains.sequences[i]), options.max_length)
        a, b = pair_index(n, FIT_MIN_SEPARATION)
        contacts = contact_map(chains.cb[i][:n])
        test.append(ChainFeatures(np.zeros((len(a), 0), np.float32), contacts[a, b], (b - a).astype(np.int32), n))
    info = dict(
        seeds=len(options.seeds),
        train_chains=0,
        test_chains=len(test),
        features=0,
        crop_residues=options.max_length - 2,
    )
    rows = []
    for method in ("separation", "random"):
        per_seed = [score_chains(method, test, None, seed) for seed in options.seeds]
        rows += summary_rows("(no model)", f"{method} baseline", per_seed, info)
    return rows


def run(models: list, data: Path, options: ProbeOptions = ProbeOptions()) -> list:
    """Rows (dicts, CSV_COLUMNS and more) for every model, then the two baselines; the suite runner's entry."""
    chains, _ = load_prepared(Path(data))
    subsets = train_subsets(chains, options)
    rows = []
    for name in models:
        rows += probe_model(name, chains, subsets, options)
    crop = min([r["crop_residues"] + 2 for r in rows] or [options.max_length])
    no_crop_beyond = ProbeOptions(options.seeds, options.train_chains, options.C, crop, options.device)
    return rows + baseline_rows(chains, no_crop_beyond)


# ---------------------------------------------------------------------------------------------------- outputs


def write_outputs(rows: list, out: Path, manifest: dict, command: str) -> str:
    """contacts.csv + contacts.md; returns the markdown text."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "contacts.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = []
    for r in rows:
        row = {k: r[k] for k in ("model", "method", "range")}
        for metric in METRICS:
            row[metric] = f"{r[metric + ' mean']:.4f} ± {r[metric + ' std']:.4f}"
        shown.append(row)
    splits = manifest.get("splits", {})
    test, pool = splits.get("test", {}), splits.get("train", {})
    first = rows[0]
    train_chains = max(r["train_chains"] for r in rows)
    text = [
        "# Unsupervised contact prediction from attention (Rao et al. 2021)",
        "",
        markdown_table(shown, list(shown[0])),
        "",
        f"Mean ± standard deviation over {first['seeds']} seeds (each seed: another {train_chains} "
        f"training chains drawn from a pool of {pool.get('chains', '?')}); precision of the top L, L/2, L/5 pairs of "
        "each range per test protein, averaged over proteins; long: |i-j| >= 24, medium: 12 <= |i-j| < 24. "
        "Features: every layer x head attention map, <cls>/<eos> dropped, symmetrized, APC; L1 logistic regression "
        "(liblinear, C as in the command) on pairs |i-j| >= 6. Baselines: separation = rank by 1/|i-j|, random = "
        f"random ranking. Proteins longer than the model allows keep their first {first['crop_residues']} residues.",
        "",
        "Model details: "
        + "; ".join(
            f"{r['model']}: {r['features']} features, {r['nonzero_weights']:.1f} nonzero weights, "
            f"attention forwards {r['forward_s']} s"
            for r in rows
            if r["method"].startswith("attention") and r["range"] == "long"
        ),
        "",
        f"Data: {test.get('chains', '?')} test chains ({test.get('residues', '?')} residues, lengths "
        f"{test.get('min_length', '?')}-{test.get('max_length', '?')}) from {manifest.get('package')} "
        f"{manifest.get('version')} (ProMod3 StructureDB, PDB chains; Apache-2.0, PDB data CC0), prepared file sha256 "
        f"`{manifest.get('file_sha256')}`; contact = {manifest.get('contact_definition')}.",
        "",
        *stamp(command),
    ]
    markdown = "\n".join(text)
    (out / "contacts.md").write_text(markdown)
    return markdown


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m eval.quality.contacts",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    defaults = ProbeOptions()
    p.add_argument(
        "--model", nargs="+", action="extend", required=True, metavar="CKPT", help="model folders or Hub ids"
    )
    p.add_argument("--data", required=True, type=Path, help="prepared folder (eval.quality.contacts_data fetch)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    p.add_argument("--train-chains", type=int, default=defaults.train_chains)
    p.add_argument("--C", type=float, default=defaults.C, help="inverse L1 strength (Rao et al.: 0.15)")
    p.add_argument("--max-length", type=int, default=defaults.max_length, help="upper bound on tokens per protein")
    p.add_argument("--device", default=defaults.device)
    args = p.parse_args(argv)
    options = ProbeOptions(tuple(args.seeds), args.train_chains, args.C, args.max_length, args.device)
    start = time.perf_counter()
    try:
        rows = run(args.model, args.data, options)
        _, manifest = load_prepared(args.data)
    except (EvalError, ContactsDataError, ValueError) as err:
        print(f"eval.quality.contacts: error: {err}", file=sys.stderr)
        return 1
    command = "python -m eval.quality.contacts " + shlex.join(argv)
    markdown = write_outputs(rows, args.out, manifest, command)
    print(markdown)
    print(f"wrote {args.out / 'contacts.md'} and contacts.csv in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
