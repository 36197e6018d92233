"""The LoRA factors' learning rate of text5-lora, chosen on validation data (issue 16).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_lr.py --lr 3e-4 1e-3 3e-3 --out runs/lora_lr.json

For each learning rate: text5-lora's five adapters trained with that rate (everything else text5-lora's recipe:
rank 16, alpha 32, the same steps, batches, seed and head learning rate; cached under the cache's
``experts-lora/`` like the benchmark's own, so the benchmark's rate costs nothing if its adapters are cached), then
each expert (its body W0 + s B A and its head) evaluated on its task's **validation** split. The test split is not
read. Written to ``--out`` atomically after each rate: per-task validation accuracy, the mean, training seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default="runs/lora_lr.json")
    args = ap.parse_args(argv)

    from mergelab.core.io import atomic_write_text
    from mergelab.experiment.runner import load_context
    from mergelab.pools.benchmarks import get_benchmark
    from mergelab.pools.evaluate import evaluate_tasks, mean

    base = get_benchmark("text5-lora")
    path = Path(args.out)
    store = json.loads(path.read_text()) if path.is_file() else {}
    store["benchmark"] = {"name": base.name, "recipe": base.recipe.to_dict(), "lora": asdict(base.lora)}
    store.setdefault("runs", {})
    for lr in args.lr:
        spec = replace(base, name=f"text5-lora-lr{lr:g}", recipe=base.recipe.replace(body_lr=lr))
        ctx = load_context(spec, cache_dir=args.cache, progress=False)
        val = {t: s["validation"] for t, s in ctx.splits.items()}
        acc = evaluate_tasks(ctx.family, ctx.experts.__getitem__, ctx.heads, val, progress=False, label=f"lr {lr:g}")
        store["runs"][f"{lr:g}"] = {
            "lr": lr, "validation": acc, "mean": mean(list(acc.values())),
            "sizes": {t: len(s) for t, s in val.items()},
            "train_seconds": {t: m.get("train_seconds") for t, m in ctx.expert_meta.items()},
            "cached": {t: bool(m.get("cache_hit")) for t, m in ctx.expert_meta.items()},
            "final_loss": {t: m.get("final_loss") for t, m in ctx.expert_meta.items()},
        }
        atomic_write_text(path, json.dumps(store, indent=1) + "\n")
        print(f"lr {lr:g}: mean validation accuracy {100 * store['runs'][f'{lr:g}']['mean']:.1f} "
              + " ".join(f"{t} {100 * a:.1f}" for t, a in acc.items()), flush=True)
    return store


if __name__ == "__main__":
    main()
