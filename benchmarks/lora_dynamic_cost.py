"""What SE-Merging's per-sample forward costs over LoRA experts, against the static merged model (issue 16).

Builds a BERT of all-MiniLM-L6-v2's shape (hidden 384, 6 blocks, 12 heads, MLP 1536; random weights: the cost
does not depend on the values) and ``--tasks`` LoRA experts of rank ``--rank`` on the six linears of every block
(attention query/key/value/output, MLP intermediate/output: text5-lora's targets), as factored task vectors
(:class:`mergelab.core.lora.LoraTaskVector`). On one batch of ``--batch`` inputs of ``--length`` tokens it times,
interleaved over ``--repeats`` rounds (the minimum: the least disturbed run on a shared machine), in one run:

- ``static``: the statically merged model (W0 + sum_t lambda_t s_t B_t A_t formed once), one forward;
- ``lora per-sample``: equation (2) of :mod:`mergelab.core.functional` over the factors, in activation space
  (W0 x + sum_t C[b, t] s_t B_t (A_t x); :class:`~mergelab.core.functional.FactoredStack`): SE-Merging's
  per-sample forward over adapters, with random per-sample coefficients C [B, T];
- ``dense per-sample``: the same merge through the materialised task vectors (a per-sample weight per layer:
  the path a full-expert pool takes);
- whole SE-Merging batches over the adapters (routing + per-sample forward): ``se_prototype exact`` (a static
  probe pass to layer 1, the prototype rule, then the per-sample forward), ``se_prototype single-pass`` (the
  static merge up to layer 1, routed there by a hook, per-sample above: one pass) and ``se_merging exact`` (the
  paper's rule: T expert probe passes to layer 1 and the merge's, then the per-sample forward);
- the adaptive step (AdaMerging/SyMerge): forward and backward of one batch through the layer-wise merged model
  with the adapters kept factored (W0 + U diag(lambda) V formed per step) and with the materialised stack.

Every output is checked against the static model or the dense path (equal coefficients / equal merges) before
timing. Prints a table of ratios and writes JSON:

    .venv/bin/python benchmarks/lora_dynamic_cost.py --threads 1 --out runs/lora_dynamic_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from mergelab.core.functional import StackedVectors, per_sample_mixing, run_with
from mergelab.core.lora import LoraModule, LoraTaskVector, merged_state_dict

TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


def build(args, folder: Path):
    """A text family over a random MiniLM-shaped BERT saved in ``folder``, and the LoRA experts."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from mergelab.pools.families.text import TextClassifierFamily

    torch.manual_seed(args.seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(str(folder))
    # the batches are made here (random ids): the tokenizer is never used
    BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
                      ).save_pretrained(str(folder))
    family = TextClassifierFamily(folder, max_length=args.length)
    model = family.body
    pre = family.pretrained_state()
    g = torch.Generator().manual_seed(args.seed)
    adapters = {}
    for t in range(args.tasks):
        mods = {}
        for i in range(cfg.num_hidden_layers):
            for m in TARGETS:
                key = f"encoder.layer.{i}.{m}.weight"
                out, inp = pre[key].shape
                A = torch.randn(args.rank, inp, generator=g) / inp ** 0.5
                B = torch.randn(out, args.rank, generator=g) * 0.02
                mods[key] = LoraModule(key, key[: -len(".weight")], B, A, 2.0)
        adapters[f"t{t}"] = LoraTaskVector(mods, f"random-{t}", {"r": args.rank, "lora_alpha": 2 * args.rank})
    return family, model, pre, adapters


def timed(fns: dict, repeats: int) -> dict[str, float]:
    for f in fns.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64, help="tokens per input (text5's max_length)")
    ap.add_argument("--adapt-batch", type=int, default=16, help="inputs per adaptive step")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/lora_dynamic_cost.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mergelab.methods import plan as make_plan
    from mergelab.methods.adaptive.coefficients import MergedParams

    tmp = tempfile.TemporaryDirectory()
    family, model, pre, adapters = build(args, Path(tmp.name))
    tasks = list(adapters)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1000, 30000, (args.batch, args.length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    coeffs = torch.rand(args.batch, len(tasks), generator=g) * 0.6
    plan = make_plan("task_arithmetic", pre, adapters, scaling=0.3)
    static = plan.apply(pre)
    lora_stack = StackedVectors.from_vectors(plan.vectors)
    dense_stack = StackedVectors.from_vectors({t: v.dense() for t, v in adapters.items()})

    @torch.no_grad()
    def run_static():
        return run_with(model, static, **batch).last_hidden_state

    @torch.no_grad()
    def run_mixed(stack, c=coeffs):
        with per_sample_mixing(model, pre, stack, c):
            return run_with(model, pre, **batch).last_hidden_state

    # checks before timing: equal coefficients give the static model; the factored and dense paths agree
    same = torch.full((args.batch, len(tasks)), 0.3)
    checks = {"lora_equal_coefficients_vs_static": rel(run_mixed(lora_stack, same), run_static()),
              "lora_vs_dense_per_sample": rel(run_mixed(lora_stack), run_mixed(dense_stack))}
    assert max(checks.values()) < 1e-5, checks

    # whole SE-Merging batches over the adapters (probe layer 1)
    from mergelab.methods.dynamic import RouterConfig, SEMerging

    experts = {t: merged_state_dict(pre, v) for t, v in adapters.items()}  # W0 + s B A: the probes' bodies
    se = {rule: SEMerging(family, pre, plan, experts, RouterConfig(layer=1, normalisation=rule))
          for rule in ("prototype", "raw")}
    with torch.no_grad():  # prototypes: the static merge's probe representations of a few inputs per task
        probe = family.probe(batch, static, [1])[1]
    se["prototype"].prototypes, se["prototype"]._prototype_layer = probe[: len(tasks)].clone(), 1

    @torch.no_grad()
    def run_se(rule, mode):
        return se[rule].features(batch, mode)[0]

    infer = timed({"static": run_static, "lora per-sample": lambda: run_mixed(lora_stack),
                   "dense per-sample": lambda: run_mixed(dense_stack),
                   "se_prototype exact (lora)": lambda: run_se("prototype", "exact"),
                   "se_prototype single-pass (lora)": lambda: run_se("prototype", "single-pass"),
                   "se_merging exact (lora)": lambda: run_se("raw", "exact")},
                  args.repeats)

    # the adaptive step: forward + backward through W0 + sum_t lambda_{t,l} tau_t, factored or dense
    ab = {k: v[: args.adapt_batch] for k, v in batch.items()}
    merged = {"factored": MergedParams(pre, adapters, "layer", factored=True),
              "dense stack": MergedParams(pre, adapters, "layer", factored=False)}

    def step(mp):
        mp.coefficients.raw.grad = None
        out = run_with(model, mp(), **ab).last_hidden_state
        out.square().mean().backward()
        return out

    for p in model.parameters():
        p.requires_grad_(False)
    assert rel(step(merged["factored"]), step(merged["dense stack"]).detach()) < 1e-5
    adapt = timed({k: (lambda mp=mp: step(mp)) for k, mp in merged.items()}, args.repeats)

    base = infer["static"]
    result = {
        "shape": {"hidden": 384, "layers": 6, "heads": 12, "mlp": 1536, "tasks": args.tasks, "rank": args.rank,
                  "adapted_linears_per_block": len(TARGETS), "batch": args.batch, "length": args.length,
                  "adapt_batch": args.adapt_batch},
        "seconds": infer, "ratio_to_static": {k: v / base for k, v in infer.items()},
        "adaptive_step_seconds": adapt,
        "adaptive_factored_over_dense": adapt["factored"] / adapt["dense stack"],
        "checks_relative_error": checks, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "torch": torch.__version__, "platform": platform.platform(),
    }
    print(f"{args.tasks} LoRA experts of rank {args.rank}, batch {args.batch} x {args.length} tokens, "
          f"{torch.get_num_threads()} thread(s), min of {args.repeats} rounds")
    for k, v in infer.items():
        print(f"  {k:28s} {1000 * v:8.1f} ms   {v / base:5.2f}x static")
    for k, v in adapt.items():
        print(f"  adaptive step, {k:14s} {1000 * v:8.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
