"""Do merges and fine-tuning give the same bits with another number of CPU threads?

Builds a tiny BERT and two experts in a temporary folder, merges them with DARE (then TIES), fine-tunes
one expert (dropout on), and prints a SHA-256 of each result and the thread count. Run it with
different thread counts and compare the lines (docs/reliability.md):

    for t in 1 2; do OMP_NUM_THREADS=$t .venv/bin/python benchmarks/determinism_threads.py; done
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny_models import VOCAB, save_tiny_bert  # noqa: E402

from mergelab import merge  # noqa: E402
from mergelab.core import io  # noqa: E402
from mergelab.pools import finetune as ft  # noqa: E402
from mergelab.pools.data.tasks import TextTask  # noqa: E402
from mergelab.pools.families.text import TextClassifierFamily, accuracy  # noqa: E402


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pre = save_tiny_bert(root / "pre", seed=0)
        experts = {n: io.load_state_dict(save_tiny_bert(root / n, seed=s, perturb=0.02, base=pre))
                   for n, s in (("a", 1), ("b", 2))}
        merged = merge("dare", io.load_state_dict(pre), experts, drop_rate=0.5, seed=3, combine="ties")
        family = TextClassifierFamily(pre, max_length=16)
        words = VOCAB[5:]
        texts = [f"{words[i % 7]} {words[7 + (i * 3) % 9]} {words[(i * 5) % 20]}" for i in range(64)]
        task = TextTask("t", texts, [i % 2 for i in range(64)], label_names=["n", "p"])
        expert = ft.train_expert(family, task, ft.FinetuneRecipe(steps=20, batch_size=16, body_lr=1e-3, head_lr=1e-2),
                                 progress=False)
        acc = accuracy(family, texts, task.labels, expert.head, expert.body_state)
        print(f"threads {torch.get_num_threads()}: merge {digest(merged)}  fine-tuned body {digest(expert.body_state)}"
              f"  train accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
