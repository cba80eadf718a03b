"""Accuracy as an offline `evaluate` module: `protoquant_hf.metrics.load_metric("accuracy")`.

Takes the same inputs as the Hub's ``evaluate.load("accuracy")`` for top-1 (predicted class ids and
references) and returns the same ``{"accuracy": float}``, without a download. Logits are accepted too,
which gives top-k accuracy through ``compute(..., top_k=5)``. The computation is
`protoquant_hf.metrics.size.accuracy`.
"""

import datasets
import evaluate
import torch

from protoquant_hf.metrics.size import accuracy

_DESCRIPTION = """
Accuracy: the fraction of images whose label is the predicted class (top-1), or among the top_k highest
logits when predictions are logits (ProtoQuant method §7.1 reports top-1 and top-5).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or `list` of `list` of `float`): predicted class ids `(N,)`, or logits `(N, C)`.
    references (`list` of `int`): class ids `(N,)`.
    top_k (`int`, default 1): with logits, count a hit when the label is among the top_k classes.

Returns:
    accuracy (`float`): in [0, 1].

Example:
    >>> from protoquant_hf.metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # First match wins: class ids as the Hub module takes them, else logits.
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
                ),
            ],
        )

    def _compute(self, predictions, references, top_k=1):
        predictions = torch.tensor(predictions)
        if predictions.is_floating_point():  # logits: keep the float64 they were stored in
            predictions = predictions.double()
        return {"accuracy": accuracy(predictions, torch.tensor(references), top_k=top_k)}
