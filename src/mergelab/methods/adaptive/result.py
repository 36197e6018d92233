"""What an adaptation produces: the learned coefficients, the (possibly adapted) heads and task layers.

An :class:`AdaptResult` gives the body parameters to evaluate each task with (:meth:`AdaptResult.body`),
saves the coefficients as JSON plus a heatmap PNG (:meth:`AdaptResult.save`), and saves the adapted
model as one Hugging Face directory per task head (:meth:`AdaptResult.save_models`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.core.checkpoint import copy_sidecars
from mergelab.core.errors import InputError
from mergelab.core.io import atomic_write_dir, atomic_write_text, check_output_path
from mergelab.methods.adaptive.coefficients import MergedParams


@dataclass
class Snapshot:
    """The adapted state after ``step`` optimiser steps (``eval_at``): raw coefficients, copies of the heads and
    task layers, and the seconds of optimisation up to that step."""

    step: int
    values: Tensor
    heads: dict[str, nn.Module]
    task_layers: dict[str, dict[str, Tensor]]
    seconds: float


def check_eval_at(eval_at: Sequence[int] | None, steps: int) -> list[int]:
    """``eval_at`` as sorted distinct steps in 1..``steps`` (the steps after which to keep a snapshot)."""
    out = []
    for s in eval_at or ():
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= steps:
            raise InputError(f"eval_at: {s!r} is not a step between 1 and steps ({steps})")
        out.append(s)
    return sorted(set(out))


def take_snapshot(step: int, merged: MergedParams, heads: Mapping[str, nn.Module],
                  task_layers: Mapping[str, Mapping[str, Tensor]], seconds: float) -> Snapshot:
    """Copies of what the optimiser moves, taken inside the loop (a few kilobytes for coefficients and heads)."""
    return Snapshot(step, merged.coefficients.raw.detach().clone(), copy_heads(dict(heads), trainable=False),
                    {t: {k: v.detach().clone() for k, v in layers.items()} for t, layers in task_layers.items()},
                    seconds)


@dataclass
class AdaptResult:
    """The outcome of :func:`~mergelab.methods.adaptive.adamerging` or :func:`~mergelab.methods.adaptive.symerge`.

    ``task_layers[t]``: body tensors kept per task (SyMerge's ``task_layer="last_block"``), which
    replace the merged ones for task ``t``; empty otherwise. ``losses``: the loss of every step.
    ``seconds``: the optimisation loop; ``setup_seconds``: tokenizing and the experts' pseudo-labels.
    """

    method: str
    merged: MergedParams
    heads: dict[str, nn.Linear]
    task_layers: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    setup_seconds: float = 0.0
    steps: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    snapshots: dict[int, Snapshot] = field(default_factory=dict)
    _state: dict[str, Tensor] | None = field(default=None, repr=False)

    @property
    def tasks(self) -> list[str]:
        return self.merged.tasks

    @property
    def coefficients(self):
        return self.merged.coefficients

    def at(self, step: int) -> AdaptResult:
        """The result as it stood after ``step`` optimiser steps: a step listed in ``eval_at``, or the last one.

        One run gives the accuracy-against-steps curve: evaluate ``res.at(s)`` for each ``s`` in ``eval_at``
        (the optimisation is the same as a run of ``s`` steps with the same seed; a test checks it)."""
        if step == self.steps and step not in self.snapshots:
            return self
        if step not in self.snapshots:
            raise InputError(f"no snapshot at step {step}; eval_at kept {sorted(self.snapshots)} "
                             f"(and the last step, {self.steps})")
        snap = self.snapshots[step]
        return replace(self, merged=self.merged.with_values(snap.values), heads=snap.heads,
                       task_layers=snap.task_layers, losses=self.losses[:step], seconds=snap.seconds, steps=step,
                       snapshots={}, _state=None)

    def merged_state(self) -> dict[str, Tensor]:
        """The merged body's state dict at the learned coefficients (computed once, then cached)."""
        if self._state is None:
            self._state = self.merged.state_dict_merged()
        return self._state

    def body(self, task: str) -> dict[str, Tensor]:
        """Body parameters for ``task``: the merged body, with the task's own layers where it keeps any."""
        state = self.merged_state()
        layers = self.task_layers.get(task)
        if not layers:
            return state
        return {**state, **{k: v.detach().to(state[k].dtype) for k, v in layers.items()}}

    def body_fn(self) -> Callable[[str], dict[str, Tensor]]:
        return self.body

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "adapt_seconds": round(self.seconds, 2),
            "setup_seconds": round(self.setup_seconds, 2),
            "seconds_per_step": round(self.seconds / max(1, self.steps), 4),
            **({"eval_at_seconds": {s: round(v.seconds, 2) for s, v in self.snapshots.items()}}
               if self.snapshots else {}),
            "first_loss": round(self.losses[0], 5) if self.losses else None,
            "last_loss": round(sum(self.losses[-10:]) / len(self.losses[-10:]), 5) if self.losses else None,
            "coefficient_mean": {t: round(float(v), 4) for t, v in zip(
                self.tasks, self.coefficients.values().detach().reshape(len(self.tasks), -1).mean(1))},
            **self.params,
        }

    # ------------------------------------------------------------------ saving
    def save(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """``coefficients.json`` (values plus the run's summary) and ``coefficients.png`` in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        files = {
            "json": self.coefficients.save(out / "coefficients.json", method=self.method, summary=summary),
            "png": self.coefficients.heatmap(out / "coefficients.png",
                                             title=f"{self.method}: learned coefficients (task x tensor)"),
        }
        files["heads"] = out / "heads.safetensors"
        from safetensors.torch import save_file

        tmp = out / ".heads.safetensors.tmp"
        save_file({f"{t}.{k}": v.detach().cpu().contiguous() for t, h in self.heads.items()
                   for k, v in h.state_dict().items()}, str(tmp))
        os.replace(tmp, files["heads"])
        return files

    def save_models(self, out_dir: str | os.PathLike[str], family) -> dict[str, Path]:
        """One Hugging Face directory per task: ``<out_dir>/<task>/`` with the (merged) body in
        ``model.safetensors``, the backbone's config and tokenizer files, the task's head in
        ``head.safetensors`` and ``mergelab.json`` (pooling, max length, classes). Each is written atomically.
        """
        from safetensors.torch import save_file

        from mergelab.core.io import _contiguous_unshared

        root = check_output_path(out_dir, [family.model_dir])
        written: dict[str, Path] = {}
        for task in self.tasks:
            state, head = self.body(task), self.heads[task]

            def fill(tmp: Path, state=state, head=head, task=task) -> None:
                save_file(_contiguous_unshared(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
                copy_sidecars(family.model_dir, tmp)
                save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                          str(tmp / "head.safetensors"))
                atomic_write_text(tmp / "mergelab.json", json.dumps({
                    "task": task, "method": self.method, "pooling": family.pooling,
                    "max_length": family.max_length, "n_classes": int(head.out_features),
                }, indent=1) + "\n")

            written[task] = atomic_write_dir(root / task, fill)
        return written


def copy_heads(heads: dict[str, nn.Linear], trainable: bool) -> dict[str, nn.Linear]:
    """Private copies of the heads (the caller's heads are never modified)."""
    out = {}
    for t, h in heads.items():
        if not isinstance(h, nn.Linear):  # e.g. RoBERTa's dense + out_proj classification head
            c = copy.deepcopy(h)
            c.requires_grad_(trainable)
            out[t] = c.eval()
            continue
        c = nn.Linear(h.in_features, h.out_features, bias=h.bias is not None).to(h.weight.device)
        with torch.no_grad():
            c.weight.copy_(h.weight)
            if h.bias is not None:
                c.bias.copy_(h.bias)
        c.requires_grad_(trainable)
        out[t] = c.eval()
    return out
