"""How far PEFT's ``add_weighted_adapter`` is from the merge it names, and how far mergelab is (issue 16).

Builds a small BERT from a config (no downloads) and T LoRA adapters over it with PEFT's ``get_peft_model``
(same targets and rank, different alphas, seeded non-zero B), saved with ``save_pretrained``. Each
adapter's true update on a weight is Delta_t = s_t B_t A_t (Hu et al. 2021, Eq. 3). For each of PEFT's
combination types it combines the adapters with ``add_weighted_adapter``, reads the combined adapter's update
of every weight (``get_delta_weight``), and reports the relative error ||Delta - target||_F / ||target||_F
over all adapted weights against a target written here, on the true updates:

- ``linear``, ``cat``, ``svd``: the weighted sum sum_t w_t Delta_t;
- ``ties``: TIES on the true updates, per weight (Yadav et al. 2023: keep the top ``density`` magnitudes of
  each w_t Delta_t, elect the sign of their sum, average the values that agree);
- ``magnitude_prune``: sum_t w_t trim(Delta_t) (the top ``density`` magnitudes of each update);
- ``dare_linear``, ``dare_ties``: random (DARE drops entries); the target is the weighted sum (DARE's
  expectation for ``dare_linear``), and the mean over ``--draws`` seeds shows whether a method is unbiased.

mergelab's column is ``mergelab merge`` on the same adapter folders (Task Arithmetic for the weighted sum,
TIES with ``scope=tensor`` for ``ties``, DARE for the ``dare`` types; no mergelab method is PEFT's
``magnitude_prune``), its update read as merged - W0 (float32 rounding of W0 + Delta included).

    python benchmarks/lora_vs_peft.py --out runs/lora_vs_peft.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

TYPES = ("linear", "cat", "svd", "ties", "magnitude_prune", "dare_linear", "dare_ties")


def build(root: Path, T: int, hidden: int, rank: int, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(root / "base"))
    paths = {}
    for t in range(T):
        torch.manual_seed(seed + 1 + t)
        pm = get_peft_model(BertModel.from_pretrained(str(root / "base")),
                            LoraConfig(r=rank, lora_alpha=2 * rank * (t + 1), target_modules=["query", "key", "value", "dense"]))
        g = torch.Generator().manual_seed(seed + 100 + t)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        paths[f"t{t}"] = root / f"t{t}"
        pm.save_pretrained(str(paths[f"t{t}"]))
    return root / "base", paths


def lora_layers(model):
    """name -> PEFT LoRA layer (modules with a ``lora_A`` dict), base-model names as in the state dict."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "get_delta_weight") and isinstance(mod.lora_A, torch.nn.ModuleDict):
            out[name.split("base_model.model.", 1)[-1] + ".weight"] = mod
    return out


def peft_updates(base_dir, adapters, weights, ctype, density, seed):
    from peft import PeftModel
    from transformers import BertModel

    torch.manual_seed(seed)  # PEFT's DARE draws from torch's global generator
    names = list(adapters)
    pm = PeftModel.from_pretrained(BertModel.from_pretrained(str(base_dir)), str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    kw = {"density": density} if ctype not in ("linear", "cat", "svd") else {}
    pm.add_weighted_adapter(names, list(weights), "combined", combination_type=ctype, **kw)
    layers = lora_layers(pm)
    true = {k: {n: m.get_delta_weight(n).detach() for n in names} for k, m in layers.items()}
    combined = {k: m.get_delta_weight("combined").detach() for k, m in layers.items()}
    return true, combined


def trim(x, density):
    k = max(1, int(round(density * x.numel())))
    thr = x.abs().flatten().kthvalue(x.numel() - k + 1).values
    return torch.where(x.abs() >= thr, x, torch.zeros_like(x))


def target(ctype, true, weights, density):
    names = list(next(iter(true.values())))
    out = {}
    for key, ds in true.items():
        if ctype in ("ties",):
            tr = torch.stack([w * trim(ds[n], density) for n, w in zip(names, weights)])
            sign = torch.sign(tr.sum(0))
            agree = (torch.sign(tr) == sign) & (tr != 0)
            out[key] = (tr * agree).sum(0) / agree.sum(0).clamp(min=1)
        elif ctype == "magnitude_prune":
            out[key] = sum(w * trim(ds[n], density) for n, w in zip(names, weights))
        else:
            out[key] = sum(w * ds[n] for n, w in zip(names, weights))
    return out


def rel_error(got, want):
    num = sum(float((got[k] - want[k]).pow(2).sum()) for k in want)
    den = sum(float(want[k].pow(2).sum()) for k in want)
    return (num / den) ** 0.5


def ours(ctype, base_dir, adapters, weights, density, seed):
    import mergelab
    from mergelab.core.io import load_state_dict

    if ctype == "magnitude_prune":
        return None
    base = load_state_dict(base_dir)
    vecs = {t: mergelab.load_lora(p, base) for t, p in adapters.items()}
    scaling = dict(zip(adapters, weights))
    if ctype in ("linear", "cat", "svd"):
        merged = mergelab.merge("task_arithmetic", base, vecs, scaling=scaling)
    elif ctype == "ties":
        # the disjoint mean of w Delta_t is w times the disjoint mean of Delta_t: main passes equal weights here
        merged = mergelab.merge("ties", base, vecs, scaling=weights[0], density=density, scope="tensor")
    elif ctype == "dare_linear":
        merged = mergelab.merge("dare", base, vecs, drop_rate=1 - density, seed=seed, scaling=scaling)
    else:  # dare_ties
        merged = mergelab.merge("dare", base, vecs, drop_rate=1 - density, seed=seed, combine="ties", density=1.0,
                                scaling=weights[0])
    keys = next(iter(vecs.values())).modules
    return {k: merged[k].to(torch.float32) - base[k].to(torch.float32) for k in keys}


def mean(runs):
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=2, help="adapters")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--draws", type=int, default=8, help="seeds averaged for the dare types")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = ap.parse_args(argv)
    lin_w = [0.7, 0.5, 0.3, 0.9][: args.T] + [0.5] * max(0, args.T - 4)
    eq_w = [1.0] * args.T  # TIES-type targets: equal weights, so that PEFT's and mergelab's TIES name the same merge
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, adapters = build(Path(tmp), args.T, args.hidden, args.rank, args.seed)
        for ctype in TYPES:
            w = eq_w if ctype in ("ties", "dare_ties", "magnitude_prune") else lin_w
            draws = args.draws if ctype.startswith("dare") else 1
            peft_runs, our_runs = [], []
            for d in range(draws):
                true, combined = peft_updates(base_dir, adapters, w, ctype, args.density, args.seed + d)
                peft_runs.append(combined)
                our_runs.append(ours(ctype, base_dir, adapters, w, args.density, args.seed + d))
            want = target("ties" if ctype == "dare_ties" else ctype, true, w, 1.0 if ctype == "dare_ties" else args.density)
            row = {"combination_type": ctype, "weights": w,
                   "peft": rel_error(peft_runs[0], want),
                   "mergelab": None if our_runs[0] is None else rel_error(our_runs[0], want)}
            if draws > 1:
                row["peft_mean"] = rel_error(mean(peft_runs), want)
                row["mergelab_mean"] = rel_error(mean(our_runs), want)
            rows.append(row)
    print(f"{args.T} adapters, rank {args.rank}, hidden {args.hidden}, density {args.density} "
          f"({time.perf_counter() - t0:.0f}s)\n")
    print("| combination_type | target | PEFT rel. error | mergelab rel. error | mean of draws: PEFT / mergelab |")
    print("| --- | --- | --- | --- | --- |")
    targets = {"ties": "TIES of the true updates", "magnitude_prune": "sum of trimmed true updates",
               "dare_ties": "TIES (no drop) of the true updates"}
    for r in rows:
        ours_s = "—" if r["mergelab"] is None else f"{r['mergelab']:.2e}"
        means = f"{r['peft_mean']:.2e} / {r['mergelab_mean']:.2e}" if "peft_mean" in r else ""
        print(f"| {r['combination_type']} | {targets.get(r['combination_type'], 'weighted sum of the true updates')} | "
              f"{r['peft']:.2e} | {ours_s} | {means} |")
    if args.out:
        from mergelab.core.io import atomic_write_text

        atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                               indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
