"""Metrics of a ProtoQuant classifier (or any model with the same outputs, like the free-prototype baseline).

Per-concept statistics over images (usage, nearest training patches, the grounding score) come from
`protoquant_hf.concepts.ConceptStats` and are not re-implemented here.

``size``              pure functions of presence scores `(N, K)` and weights `(C, K)`: accuracy and explanation size
                      (concepts per class: non-zero and 95 %-of-weight sizes, the paper's local size; PIP-Net's
                      global size, sparsity, ANZ, SimANZCC; the top-k curve); they never run the model
``stability``         perturbation benchmarks that run the model on images: masked PGD and the spatial-misalignment
                      metrics (PAC, PRC, PLC, AC), Gaussian-noise stability, Huang et al.'s consistency
``purity``            PIP-Net's part purity on part-annotated images
``evaluation``        all of them for a model on a dataset: `evaluate_model`, `evaluate_folder` (`protoquant evaluate`)
``evaluate_modules``  the size metrics as offline `evaluate` modules: ``load_metric("explanation_size")``
"""

from .evaluate_modules import available_metrics, evaluate_module_path, load_metric
from .evaluation import EvaluationReport, EvaluationSettings, evaluate_folder, evaluate_model
from .purity import PurityResult, part_purity
from .size import (
    ExplanationSize,
    LocalSizeSummary,
    TopKPoint,
    accuracy,
    accuracy_vs_top_k,
    anz,
    explanation_size,
    global_size,
    local_size,
    local_size_summary,
    nonzero_size,
    pipnet_presence,
    sim_anz_cc,
    sparsity_ratio,
    weight_mass_size,
)
from .stability import (
    ConsistencyResult,
    NoiseStabilityResult,
    SpatialMisalignmentResult,
    consistency,
    masked_pgd,
    noise_stability,
    spatial_misalignment,
)

__all__ = [
    "ConsistencyResult",
    "EvaluationReport",
    "EvaluationSettings",
    "ExplanationSize",
    "LocalSizeSummary",
    "NoiseStabilityResult",
    "PurityResult",
    "SpatialMisalignmentResult",
    "TopKPoint",
    "accuracy",
    "accuracy_vs_top_k",
    "anz",
    "available_metrics",
    "consistency",
    "evaluate_folder",
    "evaluate_model",
    "evaluate_module_path",
    "explanation_size",
    "global_size",
    "load_metric",
    "local_size",
    "local_size_summary",
    "masked_pgd",
    "noise_stability",
    "nonzero_size",
    "part_purity",
    "pipnet_presence",
    "sim_anz_cc",
    "sparsity_ratio",
    "spatial_misalignment",
    "weight_mass_size",
]
