"""Test-time adaptive merging: AdaMerging (task-wise, layer-wise, ++) and SyMerge.

Coefficients are tensors with gradients (:mod:`.coefficients`), learned on unlabeled test inputs
(:mod:`.inputs` refuses labeled data): by entropy minimisation (:mod:`.adamerging`, Yang et al.,
ICLR 2024) or jointly with one task-specific layer against the experts' pseudo-labels
(:mod:`.symerge`, Jung et al., arXiv 2412.19098). The benchmark rows, the SyMerge paper's cross-task
analysis and ``mergelab adapt`` live in the experiment layer (:mod:`mergelab.experiment`).
"""

from mergelab.methods.adaptive.adamerging import DEFAULT_ADAMERGING_STEPS, adamerging, entropy, ties_vectors
from mergelab.methods.adaptive.coefficients import Coefficients, MergedParams
from mergelab.methods.adaptive.inputs import TokenCache, check_texts
from mergelab.methods.adaptive.result import AdaptResult
from mergelab.methods.adaptive.run import AdaMergingParams, SyMergeParams  # registers the adaptive methods
from mergelab.methods.adaptive.symerge import (
    DEFAULT_SYMERGE_STEPS,
    PseudoLabels,
    expert_pseudo_labels,
    select_samples,
    selflabel_loss,
    symerge,
)

__all__ = [
    "AdaMergingParams", "AdaptResult", "SyMergeParams", "Coefficients", "MergedParams", "PseudoLabels", "TokenCache",
    "DEFAULT_ADAMERGING_STEPS", "DEFAULT_SYMERGE_STEPS",
    "adamerging", "check_texts", "entropy", "expert_pseudo_labels",
    "select_samples", "selflabel_loss", "symerge", "ties_vectors",
]
