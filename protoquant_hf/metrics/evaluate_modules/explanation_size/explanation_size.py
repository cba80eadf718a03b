"""Explanation size as an offline `evaluate` module: `protoquant_hf.metrics.load_metric("explanation_size")`.

Collects per-image presence scores (and optionally labels) batch by batch, then returns
`protoquant_hf.metrics.size.explanation_size(...).to_dict()` for the model's concept→class weights.
"""

import datasets
import evaluate
import torch

from protoquant_hf.metrics.size import explanation_size

_DESCRIPTION = """
The explanation size of a ProtoQuant classifier (method §7.2): concepts per class with a non-zero weight (the
headline, scale-invariant) and the fewest concepts holding 95 % of each class's weight (mean/min/max), the paper's
local size (concepts per class with ReLU(W) > 0.1, a secondary figure that rescaling W changes), PIP-Net's global
size, sparsity ratio, ANZ and SimANZCC (threshold 1e-3), the top-1 accuracy when references are given, and the
top-k accuracy curve when `ks` is given too.
"""

_KWARGS_DESCRIPTION = """
Args:
    concept_scores (`list` of `list` of `float`): presence scores `(N, K)`, one row per image
        (`outputs.concept_scores`).
    references (`list` of `int`, *optional*): class ids `(N,)`, for every image or for none.
    weight (`torch.Tensor` `(C, K)`): the concept→class weights, `model.classifier.weight`.
    ks (`list` of `int`, *optional*): k values of the top-k curve (needs references).

Returns:
    The fields of `protoquant_hf.metrics.ExplanationSize` as a dict.

Example:
    >>> metric = load_metric("explanation_size")
    >>> for batch in loader:
    ...     outputs = model(**batch)
    ...     metric.add_batch(concept_scores=outputs.concept_scores, references=batch["labels"])
    >>> metric.compute(weight=model.classifier.weight, ks=[5, 10])
"""


# evaluate names a module after its class (snake case), so this class matches load_metric("explanation_size").
class ExplanationSize(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"concept_scores": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def add_batch(self, *, concept_scores=None, references=None, **kwargs):
        """Add a batch of presence scores `(B, K)` and, optionally, their references `(B,)`."""
        # evaluate needs a value per input column (and appends the inputs description to this docstring);
        # unlabelled images store null references.
        if references is None and concept_scores is not None:
            references = [None] * len(concept_scores)
        super().add_batch(concept_scores=concept_scores, references=references, **kwargs)

    def _compute(self, concept_scores, references, weight=None, ks=()):
        if weight is None:
            raise ValueError("Pass the concept→class weights: compute(..., weight=model.classifier.weight).")
        labelled = [reference is not None for reference in references]
        if any(labelled) and not all(labelled):
            raise ValueError("Give references for every image or for none.")
        labels = torch.tensor(references) if all(labelled) else None
        scores = torch.tensor(concept_scores, dtype=torch.float64)
        return explanation_size(scores, weight, labels, ks=ks).to_dict()
