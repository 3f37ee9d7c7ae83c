"""Classification metrics of protein-level (or residue-level) predictions: accuracy, Matthews correlation, macro F1.

Loaded offline with `evaluate.load("<repo>/eval/metrics/protein_classification")` (Hub metrics cannot load here; a
directory path works when the folder and the file share a name). Like `masked_lm`, it imports installed libraries
only, and never `from evaluate import Metric` (evaluate takes the first EvaluationModule subclass it finds).
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

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
Accuracy, Matthews correlation coefficient (multiclass MCC) and macro-averaged F1 of class predictions, one entry per
protein (sequence classification) or per scored residue (token classification), computed with scikit-learn.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class of each item (argmax of the logits).
    references (`list` of `int`): true class of each item.
Returns:
    n: number of items; accuracy; mcc; f1_macro (over the classes present in references or predictions).
Examples:
    >>> metric = evaluate.load("./eval/metrics/protein_classification")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["accuracy"]
    0.75
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ProteinClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references):
        y_pred, y_true = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
        if y_true.size == 0 or y_pred.shape != y_true.shape:
            raise ValueError(f"need equally long, non-empty predictions and references: {y_pred.shape}, {y_true.shape}")
        return {
            "n": int(y_true.size),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "mcc": float(matthews_corrcoef(y_true, y_pred)),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro")),
        }
