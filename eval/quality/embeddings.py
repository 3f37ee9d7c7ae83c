"""Per-residue hidden states of a masked-LM encoder, and the helpers the quality probes share.

    per_residue(model, spec, tokens, EmbedOptions(layers=(-1,), max_length=1024, batch_tokens=8192))
        -> ResidueFeatures(layers, features (n_layers, residues, hidden) float32, lengths (N,))

Conventions are those of eval.probes.embed (which mean-pools the same hidden states; it should later batch with
`length_batches` and pool `per_residue`'s output instead of its own loop): a protein is `<cls>` + residues +
`<eos>`, ESM2 ids mapped to the model's through `spec.vocab`; a protein longer than the model allows keeps its FIRST
max_length - 2 residues; hidden states come from `output_hidden_states=True` (index 0 = embedding output, the last
= the model's `last_hidden_state`, after the final norm), and only residue positions are kept (no <cls>/<eos>/pad).

Also here, shared by eval.quality.secondary_structure and eval.quality.fold: `fit_accuracy` (the scikit-learn probe
of eval.probes.fit_probe, scored by accuracy), `mean_std`, `resolve_layers` and `stamp` (the commit / date /
machine / command lines every quality table ends with).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class EmbedOptions:
    layers: tuple[int, ...] = (-1,)  # hidden-state indices (0 = embedding output; negative count from the end)
    max_length: int = 1024  # tokens per protein, <cls> and <eos> included
    batch_tokens: int = 8192  # padded tokens per forward


@dataclass
class ResidueFeatures:
    layers: tuple[int, ...]  # resolved, non-negative hidden-state indices
    features: np.ndarray  # (n_layers, sum(lengths), hidden) float32; proteins concatenated in input order
    lengths: np.ndarray  # (N,) residues kept per protein (the first max_length - 2)


def resolve_layers(layers: tuple[int, ...], num_hidden_states: int) -> tuple[int, ...]:
    """Negative indices counted from the end; ValueError naming the bad index."""
    out = []
    for layer in layers:
        index = layer + num_hidden_states if layer < 0 else layer
        if not 0 <= index < num_hidden_states:
            raise ValueError(f"layer {layer}: the model has hidden states 0..{num_hidden_states - 1}")
        out.append(index)
    return tuple(dict.fromkeys(out))


def length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Protein indices in batches of similar length: rows x (longest + 2) <= batch_tokens (one protein at least)."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * (lengths[order[stop]] + 2) <= batch_tokens:
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


@torch.no_grad()
def per_residue(model, spec, tokens: list, options: EmbedOptions = EmbedOptions()) -> ResidueFeatures:
    """Hidden states at every residue of every protein (tokens: (n,) ESM2 residue ids each, as
    training.data.validate.encode returns), for the layers asked; see the module docstring for cropping and special
    tokens."""
    from training.data.validate import CLS, EOS, PAD

    device = next(model.parameters()).device
    lengths = np.array([min(len(t), options.max_length - 2) for t in tokens], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    features, layers = None, None
    for idx in length_batches(lengths, options.batch_tokens):
        width = int(lengths[idx].max()) + 2
        ids = torch.full((len(idx), width), PAD, dtype=torch.long)  # (B, L)
        for row, i in enumerate(idx):
            n = int(lengths[i])
            ids[row, 0], ids[row, n + 1] = CLS, EOS
            ids[row, 1 : n + 1] = torch.from_numpy(tokens[i][:n].astype(np.int64))
        hidden = model(
            input_ids=spec.vocab.model_ids(ids).to(device),
            attention_mask=(ids != PAD).long().to(device),
            output_hidden_states=True,
        ).hidden_states  # (layers + 1) x (B, L, H)
        if features is None:
            layers = resolve_layers(options.layers, len(hidden))
            features = np.zeros((len(layers), int(starts[-1]), hidden[0].shape[-1]), dtype=np.float32)
        for k, layer in enumerate(layers):
            h = hidden[layer].float().cpu().numpy()  # (B, L, H)
            for row, i in enumerate(idx):
                features[k, starts[i] : starts[i + 1]] = h[row, 1 : lengths[i] + 1]
    if features is None:
        raise ValueError("per_residue: no proteins given")
    return ResidueFeatures(layers, features, lengths)


# ------------------------------------------------------------------------------------------------ shared helpers


def fit_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> float:
    """Accuracy on the test rows of eval.probes.fit_probe (StandardScaler + LogisticRegression, lbfgs, C=1)."""
    from eval.probes import fit_probe

    if len(np.unique(y_train)) < 2:  # LogisticRegression needs two classes; a constant prediction is the probe
        return float(np.mean(y_test == y_train[0]))
    return float(np.mean(fit_probe(x_train, y_train, seed).predict(x_test) == y_test))


def majority_accuracy(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent training class (ties: the smallest id)."""
    return float(np.mean(y_test == np.bincount(y_train).argmax()))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def train_subsample(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n) of n items drawn without replacement (all when fraction >= 1)."""
    if fraction >= 1:
        return np.arange(n)
    k = max(1, round(fraction * n))
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
