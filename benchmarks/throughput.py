"""Texts per second against this CPU's limit: inference and fine-tuning of text5's backbone.

The bound: a text of L tokens costs the body's matmul FLOPs, 2 * P * L for the P weights of its linear
layers (the embeddings are a lookup) plus attention's 4 * L^2 * d per layer; fine-tuning costs about 3
times a forward (the backward pass computes two matmuls per forward matmul). The matmul rate is measured
here, in the same run, on the shapes the model runs ([B * L, 384] x [384, 1536]); the bound is that rate
divided by the FLOPs per text. The measured rates use text5's own texts (test split for inference, train
split for fine-tuning; the lengths the benchmark sees), the family's batching (length-sorted batches of
64 for inference; batches of 16 as the recipe draws them for fine-tuning), one and two threads.

    python benchmarks/throughput.py --out runs/throughput.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def matmul_rate(threads: int, rows: int = 1024, seconds: float = 2.0) -> float:
    """GFLOP/s of float32 [rows, 384] x [384, 1536] and [rows, 1536] x [1536, 384] on ``threads`` threads."""
    torch.set_num_threads(threads)
    a, w1 = torch.randn(rows, 384), torch.randn(1536, 384)
    b, w2 = torch.randn(rows, 1536), torch.randn(384, 1536)
    for _ in range(5):
        a @ w1.T
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ w1.T
        b @ w2.T
        n += 1
    return 2 * 2 * rows * 384 * 1536 * n / (time.perf_counter() - t0) / 1e9


def flops_per_text(body: torch.nn.Module, tokens: float) -> float:
    """Forward matmul FLOPs of one text of ``tokens`` tokens (linear layers and attention scores)."""
    linear = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))
    cfg = body.config
    return 2 * linear * tokens + 4 * tokens**2 * cfg.hidden_size * cfg.num_hidden_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--train-steps", type=int, default=20, help="fine-tuning steps timed per task")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from mergelab.core.batching import iter_batches
    from mergelab.pools.benchmarks import TEXT5
    from mergelab.pools.finetune import batch_schedule

    spec = TEXT5
    splits = spec.load_splits()
    family = spec.family()
    tok = family.tokenizer
    padding = []  # tokens a fine-tuning step computes (batch x its longest text), random vs bucketed batches
    for task, s in splits.items():
        train = s["train"]
        ntok = [len(x) for x in tok(list(train.texts), truncation=True, max_length=spec.max_length)["input_ids"]]
        row = {"task": task, "tokens_per_text": round(sum(ntok) / len(ntok), 1)}
        for batching in ("random", "bucketed"):
            recipe = spec.recipe.replace(batching=batching)
            sched = batch_schedule([len(x) for x in train.texts], recipe, torch.Generator().manual_seed(recipe.seed))
            padded = sum(max(ntok[i] for i in next(sched)) * recipe.batch_size for _ in range(recipe.steps))
            row[f"{batching}_tokens_per_step"] = round(padded / recipe.steps, 1)
        padding.append(row)
        print(json.dumps(row), flush=True)
    rows = []
    for threads in args.threads:
        rate = matmul_rate(threads)
        for task, s in splits.items():
            texts = list(s["test"].texts)
            lengths = [len(x) for x in tok(texts, truncation=True, max_length=spec.max_length)["input_ids"]]
            mean_tokens = sum(lengths) / len(lengths)
            torch.set_num_threads(threads)
            body = family.body.eval()
            with torch.inference_mode():
                t0 = time.perf_counter()
                padded = 0
                for idx in iter_batches(texts, 64):
                    batch = family.tokenize([texts[i] for i in idx])
                    padded += batch["input_ids"].numel()
                    body(**batch)
                infer = len(texts) / (time.perf_counter() - t0)
            bound = rate * 1e9 / flops_per_text(body, mean_tokens)
            # fine-tuning: the recipe's batches (bucketed), forward + backward + AdamW, as train_expert does
            train = s["train"]
            model = copy.deepcopy(body).train()
            params = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
            for n, p in model.named_parameters():
                p.requires_grad_(not n.startswith("embeddings."))
            head = torch.nn.Linear(family.hidden_size, train.n_classes)
            opt = torch.optim.AdamW([*params, *head.parameters()], lr=1e-5)
            labels = torch.tensor(train.labels)
            sched = batch_schedule([len(x) for x in train.texts], spec.recipe, torch.Generator().manual_seed(0))
            train_tokens, t0 = 0, None
            for step in range(args.train_steps + 2):
                if step == 2:  # two warm-up steps
                    t0, train_tokens = time.perf_counter(), 0
                idx = next(sched)
                batch = family.tokenize([train.texts[i] for i in idx])
                train_tokens += int(batch["attention_mask"].sum())
                out = model(**batch).last_hidden_state
                loss = torch.nn.functional.cross_entropy(head(family.pool(out, batch["attention_mask"])), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            train_rate = args.train_steps * spec.recipe.batch_size / (time.perf_counter() - t0)
            train_mean = train_tokens / (args.train_steps * spec.recipe.batch_size)
            train_bound = rate * 1e9 / (3 * flops_per_text(body, train_mean))
            row = {"threads": threads, "task": task, "matmul_gflops": round(rate, 1), "tokens_per_text": round(mean_tokens, 1),
                   "padding_overhead": round(padded / sum(lengths), 3),
                   "infer_texts_per_s": round(infer, 1), "infer_bound": round(bound, 1), "infer_fraction": round(infer / bound, 3),
                   "train_texts_per_s": round(train_rate, 1), "train_bound": round(train_bound, 1),
                   "train_fraction": round(train_rate / train_bound, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| threads | task | tokens/text | inference texts/s | bound | fraction | fine-tuning texts/s | bound | fraction |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['task']} | {r['tokens_per_text']} | {r['infer_texts_per_s']} | {r['infer_bound']} | "
              f"{r['infer_fraction']:.2f} | {r['train_texts_per_s']} | {r['train_bound']} | {r['train_fraction']:.2f} |")
    print("\n| task | tokens/text | tokens/step, random batches | bucketed | bucketed / random |\n|---|---:|---:|---:|---:|")
    for r in padding:
        print(f"| {r['task']} | {r['tokens_per_text']} | {r['random_tokens_per_step']} | {r['bucketed_tokens_per_step']} | "
              f"{r['bucketed_tokens_per_step'] / r['random_tokens_per_step']:.2f} |")
    if args.out:
        from mergelab.core.atomic import atomic_write_bytes

        atomic_write_bytes(args.out, json.dumps({"padding": padding, "rows": rows}, indent=1).encode())


if __name__ == "__main__":
    main()
