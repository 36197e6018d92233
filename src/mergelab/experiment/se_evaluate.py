"""Per-task accuracy of SE-Merging, with the routing it made (the standard protocol: each task's head).

The features come from :func:`mergelab.methods.dynamic.se_features` (the one per-sample loop, which reads
the inputs only); this module scores them with each task's head and labels.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from mergelab.methods.dynamic.run import se_features
from mergelab.methods.dynamic.se_merging import SEMerging
from mergelab.pools.data.tasks import TaskData
from mergelab.pools.families.text import accuracy


def evaluate_se(
    se: SEMerging,
    heads: Mapping[str, nn.Module],
    splits: Mapping[str, TaskData],
    *,
    mode: str = "exact",
    batch_size: int = 64,
    progress: bool = False,
    label: str = "se_merging",
    features_out: dict[str, Tensor] | None = None,
) -> tuple[dict[str, float], dict]:
    """``(accuracy per task, routing summary)`` (:func:`~mergelab.methods.dynamic.se_features`).
    ``features_out``, if given, receives each task's pooled features ``[N, F]`` in input order (to score
    other heads without a second pass)."""
    feats, routing = se_features(se, {t: s.texts for t, s in splits.items()}, mode=mode, batch_size=batch_size,
                                 progress=progress, label=label)
    acc = {t: accuracy(se.family, s.texts, s.labels, heads[t], features=feats[t]) for t, s in splits.items()}
    if features_out is not None:
        features_out.update(feats)
    return acc, routing
