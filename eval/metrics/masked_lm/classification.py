"""scikit-learn classification metrics of masked-token predictions, shared by the `masked_lm` evaluate module and
`eval.masked_metrics` (which must not import evaluate: `import evaluate` costs 6-8 s).

`masked_lm.py` imports this file relatively; evaluate 0.4.6 copies relative imports from the same folder beside the
script in its modules cache, so this file may import only installed libraries, never our own package.
"""

import numpy as np
from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

# Local copy of modeling_speedplm.configuration_speedplm.ESM2_VOCAB: the copy evaluate imports can't reach our
# package. tests/test_metrics.py asserts the two are equal.
ESM2_VOCAB = (
    "<cls>",
    "<pad>",
    "<eos>",
    "<unk>",
    "L",
    "A",
    "G",
    "V",
    "S",
    "E",
    "R",
    "T",
    "I",
    "D",
    "P",
    "K",
    "Q",
    "N",
    "F",
    "Y",
    "M",
    "H",
    "W",
    "C",
    "X",
    "B",
    "U",
    "Z",
    "O",
    ".",
    "-",
    "<null_1>",
    "<mask>",
)


def classification_metrics(y_true, y_pred, sample_weight=None):
    """Accuracy, P/R/F1 (weighted, macro), MCC, per-class accuracy. `sample_weight`: counts, e.g. of confusion cells."""
    # Classes = ids present in references. Restricting `labels` keeps ids that are only ever predicted (e.g. a
    # special token) from adding an all-zero class to the macro average, while still counting those predictions
    # as misses of their true class.
    labels = np.unique(y_true)
    if labels[0] < 0 or labels[-1] >= len(ESM2_VOCAB):
        raise ValueError(f"references must be ESM2 token ids in [0, {len(ESM2_VOCAB)}), got {labels.tolist()}")
    result = {"accuracy": float(accuracy_score(y_true, y_pred, sample_weight=sample_weight))}
    for average in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, sample_weight=sample_weight, zero_division=0
        )
        result.update({f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)})
    # Weighted recall == accuracy, always: sum_c (n_c / N) * (TP_c / n_c) = sum_c TP_c / N, and the classes cover
    # every reference. It carries no information beyond accuracy; macro recall (mean per-class accuracy) does.
    result["mcc"] = float(matthews_corrcoef(y_true, y_pred, sample_weight=sample_weight))
    _, recall, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, sample_weight=sample_weight, zero_division=0
    )
    result["per_amino_acid_accuracy"] = {ESM2_VOCAB[c]: float(a) for c, a in zip(labels, recall)}
    return result
