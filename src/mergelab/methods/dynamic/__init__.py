"""Dynamic (per-sample) merging: SE-Merging's router and per-sample merged forward."""

from mergelab.methods.dynamic.router import (
    NORMALISATIONS,
    RouterConfig,
    coefficients,
    entropy,
    rescale,
    routing_weights,
    scores,
)
from mergelab.methods.dynamic.run import SEParams, run_se, se_features  # registers the SE-Merging rules
from mergelab.methods.dynamic.se_merging import MODES, Routing, SEMerging

__all__ = [
    "MODES", "NORMALISATIONS", "RouterConfig", "Routing", "SEMerging", "coefficients", "entropy", "rescale",
    "routing_weights", "scores", "SEParams", "run_se", "se_features",
]
