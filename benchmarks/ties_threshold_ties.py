"""How many entries tie with per-tensor TIES' threshold in float32 task vectors.

For each expert and tensor of the GPT-2-shaped files that ``benchmarks/static_merge.py`` builds, forms
the task vector e - p (float32), its k = int(density * n) and its k-th largest magnitude
(``torch.topk``), and counts the entries equal to it: mergekit keeps exactly k of the tensor's entries
(ties broken by sort order), mergelab and the TIES authors' code keep every tied entry, so the count of
entries kept beyond k is where the two can differ.

    python benchmarks/ties_threshold_ties.py --T 8 --out runs/ties_threshold_ties.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from mergelab.methods.streaming.files import SafetensorsModel

CACHE = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--root", type=Path, default=CACHE / "static_merge_bench" / "gpt2")
    ap.add_argument("--out", type=Path, default=Path("runs/ties_threshold_ties.json"))
    args = ap.parse_args(argv)
    if not (args.root / "pretrained").is_dir():
        sys.exit(f"{args.root}: no models; run benchmarks/static_merge.py --T {args.T} first (it builds them)")
    pre = SafetensorsModel(args.root / "pretrained", "pretrained")
    experts = [SafetensorsModel(args.root / f"expert_{i}", f"expert {i}") for i in range(args.T)]
    rows = []
    for key, info in pre.tensors.items():
        if not info.dtype.is_floating_point or info.numel < 2:
            continue
        p = pre.read(key, 0, info.numel, None).clone().float()
        k = max(1, int(args.density * info.numel))
        for i, e in enumerate(experts):
            tau = (e.read(key, 0, info.numel, None).float() - p).abs()
            kth = torch.topk(tau, k).values[-1]
            above, tied = int((tau > kth).sum()), int((tau == kth).sum())
            rows.append({"key": key, "expert": i, "n": info.numel, "k": k, "tied_at_kth": tied,
                         "kept_beyond_k": above + tied - k})
    beyond = [r["kept_beyond_k"] for r in rows]
    summary = {"tensors": len(rows) // args.T, "experts": args.T, "kept_beyond_k_total": sum(beyond),
               "tensor_experts_with_extra": sum(b > 0 for b in beyond), "kept_beyond_k_max": max(beyond)}
    result = {"command": "python benchmarks/ties_threshold_ties.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "density": args.density, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))
    for r in sorted(rows, key=lambda r: -r["kept_beyond_k"])[:5]:
        print(r)
    return result


if __name__ == "__main__":
    main()
