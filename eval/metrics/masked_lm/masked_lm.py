"""Masked-LM metrics over scored (masked) positions: loss, perplexity, accuracy, P/R/F1, MCC, per-amino-acid accuracy.

Loaded offline with `evaluate.load("<repo>/eval/metrics/masked_lm")` (a directory path works when the folder and the
file share a name). evaluate 0.4.6 parses the top-level imports line by line and checks that each library import
can be imported; it copies this script into HF_MODULES_CACHE/evaluate_modules/metrics/masked_lm/<content hash>/ and
imports it from there. The metrics themselves are training.metrics.classification_metrics (one home, shared with the
training loop's eval), so the project must be importable (run from the repository root, as every eval tool is). It
takes the first EvaluationModule subclass in the namespace as the metric, so never `from evaluate import Metric` here.
"""

import datasets
import evaluate
import numpy as np

from training.metrics import classification_metrics

_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_DESCRIPTION = """\
Metrics of a protein masked language model over the scored (masked) positions, one entry per scored token:
token-weighted cross-entropy and perplexity (from per-position losses), accuracy, precision / recall / F1
(weighted and macro), multiclass Matthews correlation and per-amino-acid accuracy, all computed with scikit-learn.
Class set for precision / recall / F1: the token ids present in `references` (predicted-only ids count as errors for
their true class but add no class to the averages, so macro is the mean over the residues actually scored).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted token id (argmax) at each scored position.
    references (`list` of `int`): true token id at each scored position (ESM2 vocabulary ids).
    losses (`list` of `float`, optional): cross-entropy at each scored position. With the default config it is a
        compute-time argument; load with config name "with_losses" to pass it to `add_batch` as well (it is then
        stored, and gathered across processes, beside predictions and references).
Returns:
    tokens: number of scored positions.
    loss, perplexity: mean per-token cross-entropy and exp(loss); only when losses are given.
    accuracy: fraction of positions predicted correctly.
    precision_weighted, recall_weighted, f1_weighted, precision_macro, recall_macro, f1_macro.
    mcc: multiclass Matthews correlation coefficient.
    per_amino_acid_accuracy: dict token -> accuracy (recall) over the positions whose true token is that one.
Examples:
    >>> metric = evaluate.load("./eval/metrics/masked_lm")
    >>> metric.compute(predictions=[4, 5, 5], references=[4, 5, 6], losses=[0.1, 0.2, 2.0])["accuracy"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskedLM(evaluate.Metric):
    def _info(self):
        features = {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
        # evaluate requires every input declared as a feature to be passed, so an optional column needs its own config.
        if self.config_name == "with_losses":
            features["losses"] = datasets.Value("float64")
        elif self.config_name != "default":
            raise ValueError(f"unknown config {self.config_name!r}: use 'default' or 'with_losses'")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references, losses=None):
        y_pred = np.asarray(predictions, dtype=np.int64)
        y_true = np.asarray(references, dtype=np.int64)
        if y_true.size == 0 or y_pred.shape != y_true.shape:
            raise ValueError(f"need equally long, non-empty predictions and references: {y_pred.shape}, {y_true.shape}")
        result = {"tokens": int(y_true.size)}
        if losses is not None:
            losses = np.asarray(losses, dtype=np.float64)
            if losses.shape != y_true.shape:
                raise ValueError(f"losses has shape {losses.shape}, references {y_true.shape}")
            # One entry per scored token, so the plain mean IS the token-weighted mean. Averaging per-batch means
            # instead would over-weight batches with few masked tokens.
            result["loss"] = float(losses.mean())
            result["perplexity"] = float(np.exp(result["loss"]))
        result.update(classification_metrics(y_true, y_pred))
        return result
