"""One expert's fine-tuning in its own interpreter: ``python -m mergelab.pools.finetune_worker JOB.pkl``.

Started by :func:`mergelab.pools.finetune.get_or_train_experts`; the job file holds the family's
constructor arguments, the training split, the recipe and the cache entry to write. Prints one ``.`` per
step on stdout (the parent's progress bar).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from mergelab.pools.families.text import TextClassifierFamily
    from mergelab.pools.finetune import _train_and_store

    with open(argv[1], "rb") as f:
        job = pickle.load(f)  # noqa: S301  (written by our own parent process)
    family = TextClassifierFamily(*job["spawn_args"])

    def step() -> None:
        sys.stdout.write(".")
        sys.stdout.flush()

    _train_and_store(family, job["train"], job["recipe"], job["key"], Path(job["path"]), progress=False, on_step=step)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
