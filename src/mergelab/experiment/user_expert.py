"""``mergelab finetune``: fine-tune an expert on a user's task file and save it as a Hugging Face directory.

The training is :func:`mergelab.pools.finetune.train_expert` (full body plus a fresh linear head;
cached like the benchmark's experts, keyed by recipe, backbone and data). The output folder::

    config.json, tokenizer files   copied from the backbone
    model.safetensors              the fine-tuned body (loads with transformers' AutoModel, and as a pool expert)
    head.safetensors               the task's linear head: ``weight`` [n_classes, hidden], ``bias`` [n_classes]
    expert.json                    task, label names, recipe, backbone, held-out accuracy, training time

With ``holdout`` h > 0 the file is split (seeded, stratified) into train, validation (h/2) and test (h),
and the expert's accuracy on the two held-out parts is reported and stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelab.core.checkpoint import copy_sidecars
from mergelab.core.errors import InputError
from mergelab.pools.benchmarks import MINILM, resolve_backbone
from mergelab.pools.finetune import FinetuneRecipe, get_or_train_expert, train_expert


def backbone_dir(backbone: str) -> Path:
    """The packaged all-MiniLM-L6-v2 for its name, a local model folder, or a hub id (online only)."""
    if backbone == MINILM:
        return resolve_backbone(backbone)
    from mergelab.core import io

    path = io.resolve_model_path(backbone)
    if not (path / "config.json").is_file():
        raise InputError(f"--backbone {backbone}: not a model folder (no config.json)")
    return path


def finetune_user_task(
    task_path: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    backbone: str = MINILM,
    recipe: FinetuneRecipe | None = None,
    max_length: int = 64,
    pooling: str = "mean",
    holdout: float = 0.2,
    text_field: str = "text",
    label_field: str = "label",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    console=None,
) -> dict[str, Any]:
    """Fine-tune on ``task_path`` and write the expert folder ``out`` atomically; return its ``expert.json``."""
    from safetensors.torch import save_file

    from mergelab.core import io
    from mergelab.pools.data.loaders import load_user_task
    from mergelab.pools.data.tasks import split_task
    from mergelab.pools.evaluate import evaluate_tasks
    from mergelab.pools.families.text import TextClassifierFamily

    if not 0 <= holdout < 1:
        raise InputError(f"--holdout {holdout}: expected a fraction in [0, 1)")
    recipe = recipe or FinetuneRecipe()
    model_dir = backbone_dir(backbone)
    io.check_output_path(out, [task_path, model_dir])
    task = load_user_task(task_path, name=name, text_field=text_field, label_field=label_field)
    task.validate()
    if holdout > 0:
        n = len(task)
        n_test, n_val = max(1, round(n * holdout)), max(1, round(n * holdout / 2))
        if n - n_test - n_val < 2:
            raise InputError(f"{task_path}: {n} examples are too few to hold out {holdout:.0%}; use --holdout 0")
        splits = split_task(task, recipe.seed, n - n_test - n_val, n_val, n_test)
        train = splits["train"]
    else:
        splits, train = {}, task
    family = TextClassifierFamily(model_dir, max_length=max_length, pooling=pooling)
    if console is not None:
        console.print(f"fine-tuning [bold]{task.name}[/] ({len(train)} training examples, {task.n_classes} classes) "
                      f"on {backbone}: {recipe.steps} steps", highlight=False)
    if use_cache:
        expert = get_or_train_expert(family, train, recipe, cache_dir=cache_dir, progress=progress)
    else:
        expert = train_expert(family, train, recipe, progress=progress)
    held_out = {}
    for split in ("validation", "test"):
        if split in splits:
            held_out[split] = evaluate_tasks(family, expert.body_state, {task.name: expert.head},
                                             {task.name: splits[split]})[task.name]
    meta = {
        "task": task.name, "label_names": list(task.label_names), "n_classes": task.n_classes,
        "task_file": str(task_path), "text_field": text_field, "label_field": label_field,
        "backbone": backbone, "max_length": max_length, "pooling": pooling, "recipe": recipe.to_dict(),
        "sizes": {"train": len(train), **{s: len(v) for s, v in splits.items() if s != "train"}},
        "accuracy": held_out, "train_seconds": expert.meta.get("train_seconds"),
        "cache_hit": bool(expert.meta.get("cache_hit")), "final_loss": expert.meta.get("final_loss"),
    }
    body = dict(expert.body_state)
    for key, value in io.load_state_dict(model_dir).items():
        # integer buffers the module leaves out of its state dict (position ids) but the backbone's file
        # holds: copied so that the expert has the backbone's keys and merges with it as the pretrained model
        if key not in body and not value.is_floating_point():
            body[key] = value
    body = io._contiguous_unshared(body)
    head = {"weight": expert.head.weight.detach().cpu().contiguous(), "bias": expert.head.bias.detach().cpu().contiguous()}

    def fill(tmp: Path) -> None:
        save_file(body, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(head, str(tmp / "head.safetensors"))
        copy_sidecars(model_dir, tmp)
        (tmp / "expert.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    io.atomic_write_dir(Path(out), fill)
    return meta
