"""Soak: many ``generate`` requests of random shapes from several threads against one transformed model (issue 15).

GPT-2 124M config, random weights, fp16, greedy. Each request: batch 1-16, prompts of 4-300 tokens (a third of the
rows left-padded by a random amount), 4-96 new tokens. Every request first runs alone (its reference output), then
all of them run from ``--threads`` threads at once; every output must equal its reference. Reports throughput (new
tokens per second), p50/p99 latency (submit to result, queueing included), reserved GPU memory every 100 requests,
and the same load on stock ``generate`` for the first ``--stock`` requests (stock is ~20x slower per call).

In fp16 a request's tokens can differ between runs at near-ties (two candidates within fp16 rounding of each
other): every output that differs from its reference is checked against an fp32 copy of the model, and the
largest fp32 logit gap between a chosen token and the best one is reported beside stock fp16's own logit error
on the same sequences. A gap within that error is a near-tie, not a wrong token.

Run: ``PYTHONPATH=src python benchmarks/concurrency_gpu.py [--requests 1000] [--threads 8] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config

from bettertransformer import BetterTransformer, cache_info, call_counts


def requests(count: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        batch, width, new = rng.randint(1, 16), rng.randint(4, 300), rng.randint(4, 96)
        ids = torch.randint(3, vocab, (batch, width), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(batch):
            if rng.random() < 1 / 3:
                mask[row, : rng.randint(1, width - 1)] = 0
        out.append(dict(ids=ids.masked_fill(mask == 0, 0).cuda(), mask=mask.cuda(), new=new))
    return out


def run(model, request: dict) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = model.generate(
        request["ids"], attention_mask=request["mask"], max_new_tokens=request["new"], min_new_tokens=request["new"],
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def under_load(model, items: list[dict], threads: int, memory: list | None = None) -> dict:
    """All ``items`` from ``threads`` threads; latency is submit-to-result (queueing included)."""
    done = []

    def task(item):
        submitted = time.perf_counter()
        out, _ = run(model, item)
        done.append(1)
        if memory is not None and len(done) % 100 == 0:
            memory.append((len(done), torch.cuda.memory_reserved() / 2**30))
        return out, time.perf_counter() - submitted

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(task, items))
    wall = time.perf_counter() - start
    latencies = sorted(t for _, t in results)
    tokens = sum(r["ids"].shape[0] * r["new"] for r in items)
    return dict(
        outputs=[o for o, _ in results], wall_s=wall, tok_s=tokens / wall,
        p50_ms=latencies[len(latencies) // 2] * 1e3, p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
    )  # fmt: skip


def near_tie_check(stock, items: list[dict], pairs: list[tuple[int, torch.Tensor, torch.Tensor]]) -> dict:
    """For each differing (index, reference, output): the worst fp32 gap between a chosen token's logit and the best
    logit, over both sequences, and stock fp16's worst logit error against fp32 on the same sequences."""
    ref = AutoModelForCausalLM.from_config(stock.config, dtype=torch.float32).cuda().eval()
    ref.load_state_dict({k: v.float() for k, v in stock.state_dict().items()})
    worst_gap, worst_error = 0.0, 0.0
    for index, *sequences in pairs:
        item = items[index]
        width = item["ids"].shape[1]
        for seq in sequences:
            full = torch.cat([item["mask"], torch.ones_like(seq[:, width:])], 1)
            positions = (full.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                exact = ref(seq, attention_mask=full, position_ids=positions).logits.double()
                half = stock(seq, attention_mask=full, position_ids=positions).logits.double()
            worst_error = max(worst_error, ((half - exact).abs() * full[:, :, None]).max().item())
            predicting = exact[:, width - 1 : -1]
            chosen = seq[:, width:]
            gap = predicting.max(-1).values - predicting.gather(-1, chosen[..., None])[..., 0]
            worst_gap = max(worst_gap, gap.max().item())
    del ref
    torch.cuda.empty_cache()
    return dict(worst_chosen_gap=worst_gap, stock_fp16_logit_error=worst_error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--stock", type=int, default=48, help="requests of the stock comparison")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config()
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float16).cuda().eval()
    model = BetterTransformer.transform(stock, keep_original_model=True)
    items = requests(args.requests, config.vocab_size)

    start = time.perf_counter()
    alone = [run(model, item)[0] for item in items]  # references; also captures every shape bucket once
    alone_s = time.perf_counter() - start
    memory: list = []
    load = under_load(model, items, args.threads, memory)
    second = under_load(model, items, args.threads)  # warm: every bucket seen
    pairs = [
        (i, a, b)
        for run_ in (load, second)
        for i, (a, b) in enumerate(zip(alone, run_["outputs"], strict=True))
        if not torch.equal(a, b)
    ]
    wrong = [i for i, _, _ in pairs]
    ties = near_tie_check(stock, items, pairs)

    subset = items[: args.stock]
    ours_subset = under_load(model, subset, args.threads)
    stock_subset = under_load(stock, subset, args.threads)
    meta = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), date=time.strftime("%Y-%m-%d"), requests=args.requests,
        threads=args.threads,
    )  # fmt: skip
    summary = dict(
        meta=meta,
        mismatches=len(wrong),
        near_ties=ties,
        alone_s=alone_s,
        first_load={k: v for k, v in load.items() if k != "outputs"},
        warm_load={k: v for k, v in second.items() if k != "outputs"},
        reserved_gib_every_100=memory,
        cache_info=cache_info(model),
        counts=call_counts(model),
        subset={
            "requests": len(subset),
            "ours": {k: v for k, v in ours_subset.items() if k != "outputs"},
            "stock": {k: v for k, v in stock_subset.items() if k != "outputs"},
        },
        median_request_tokens=statistics.median(r["ids"].shape[0] * r["new"] for r in items),
    )
    if args.out:
        with open(f"{args.out}/concurrency_gpu.json", "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(meta))
    print(f"outputs differing from the same request alone: {len(wrong)} of {2 * len(items)}; {ties}")
    print(f"alone, sequential: {alone_s:.1f} s; cache {summary['cache_info']}")
    for name, row in (("first load", load), ("warm load", second)):
        print(f"{name}: {row['tok_s']:.0f} new tok/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms")
    print("reserved GiB every 100 requests (first load):", [round(m, 3) for _, m in memory])
    print(f"| {len(subset)} requests, {args.threads} threads | tok/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, row in (("stock generate", stock_subset), ("bettertransformer", ours_subset)):
        print(f"| {name} | {row['tok_s']:.0f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |")


if __name__ == "__main__":
    main()
