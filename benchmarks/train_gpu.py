"""Training on a GPU, stock against transformed, side by side in one process (issue 16).

- ``bert``: BERT-base sequence classification, batch 32 of ``torch.manual_seed(0); torch.randint(16, 513, (32,))``
  tokens right-padded to the longest, bf16 autocast, AdamW: milliseconds per step (median), peak memory, losses;
  stock, transformed (captured training graphs) and transformed with eager layers (``training_graphs=0``).
  ``--bert-longest N``: rows of ``randint(16, N + 1)`` tokens instead (short-text classification).
- ``llama``: a Llama-shaped ~1B config (TinyLlama's shapes), causal-LM fine-tuning, bf16 autocast, AdamW: stock on
  padded batches (``DataCollatorWithPadding``-style) against transformed on packed rows (``DataCollatorWithFlattening``),
  the same examples in the same order; real tokens per second and peak memory.
- ``compile``: ``torch.compile`` of stock and transformed BERT-base (``--compile-models``), inference on the canonical
  batch (64 rows of ``randint(16, 513)``, fp16) and the ``bert`` training step, each beside the model uncompiled in
  the same process; each error is printed, not raised.
- ``--profile``: the transformed BERT step's longest CUDA kernels.
- ``--breakdown``: for ``bert`` and ``llama``, stock and transformed: host time of the forward, backward and
  optimizer, the step's wall time, its GPU time and kernel launches (``step_breakdown``).

Run: ``PYTHONPATH=src python benchmarks/train_gpu.py [--only bert llama compile] [--profile] [--breakdown] [--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import traceback

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DataCollatorWithFlattening,
    LlamaConfig,
)

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.switches import switched


def _peak_reset() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def bert_batch(batch: int = 32, seed: int = 0, vocab: int = 30522, longest: int = 512) -> dict:
    torch.manual_seed(seed)
    lengths = torch.randint(16, longest + 1, (batch,))
    width = int(lengths.max())
    ids = torch.randint(1000, vocab, (batch, width))
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, 2, (batch,))
    return {k: v.cuda() for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def train_steps(model, batches, steps: int, warmup: int = 3) -> tuple[list[float], list[float], float]:
    """(milliseconds of each timed step, every loss, peak GiB) for AdamW steps under bf16 autocast."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    times, losses = [], []
    _peak_reset()
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
        losses.append(loss.item())
    return times, losses, _gib()


def step_breakdown(model, batches, steps: int = 12) -> dict:
    """Where a training step's time goes: host milliseconds of the forward, the backward and the optimizer (each
    step starts synchronised, as ``train_steps``'s do), the step's wall time (medians), and, from a profile of
    ``len(batches)`` steps, the GPU's busy milliseconds and kernel launches per step. A step whose wall time is the
    sum of its host phases waits on the host."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=torch.cuda.is_available())
    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(batch, phases=None):
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        sync()
        if phases is not None:
            phases.append((t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t0))

    for batch in batches:
        step(batch)
    phases: list = []
    for i in range(steps):
        step(batches[i % len(batches)], phases)
    medians = [1e3 * statistics.median(p) for p in zip(*phases, strict=True)]
    out = dict(zip(("forward_host_ms", "backward_host_ms", "optimizer_host_ms", "wall_ms"), medians, strict=True))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
    events = prof.key_averages()
    launches = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
    out["gpu_ms"] = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / len(batches)
    out["launches"] = sum(e.count for e in events if e.key in launches) / len(batches)
    return out


def _print_breakdown(what: str, name: str, row: dict) -> None:
    print(
        f"{what} {name:26s} host: forward {row['forward_host_ms']:.1f} ms, backward {row['backward_host_ms']:.1f}, "
        f"optimizer {row['optimizer_host_ms']:.1f}; wall {row['wall_ms']:.1f} ms; GPU {row['gpu_ms']:.1f} ms, "
        f"{row['launches']:.0f} launches a step",
        flush=True,
    )


def bench_bert(args, results: dict) -> None:
    config = BertConfig(num_labels=2)
    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").cuda()
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    batches = [bert_batch(seed=s, longest=args.bert_longest) for s in range(4)]
    rows = {}
    runs = [("stock", stock, 0), ("transformed", fast, 8), ("transformed, eager layers", fast, 0)]
    for name, model, graphs in runs + [(f"{name} again", model, graphs) for name, model, graphs in runs]:
        state = copy.deepcopy(model.state_dict())
        with switched(training_graphs=graphs):
            times, losses, peak = train_steps(model, batches, args.steps)
        model.load_state_dict(state)  # every run starts from the same weights
        rows[name] = dict(ms=statistics.median(times), peak_gib=peak, losses=losses[:8])
        print(f"bert {name:31s} {rows[name]['ms']:7.1f} ms/step  peak {peak:5.2f} GiB  losses {losses[:4]}", flush=True)
    print("bert fast calls", call_counts(fast))
    if args.breakdown:
        for name, model, graphs in runs:
            state = copy.deepcopy(model.state_dict())
            with switched(training_graphs=graphs):
                rows[f"{name} breakdown"] = step_breakdown(model, batches)
            model.load_state_dict(state)
            _print_breakdown("bert", name, rows[f"{name} breakdown"])
    results["bert"] = rows
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = fast
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for step in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**batches[step]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def llama_examples(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(64, 1025, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def padded(examples: list[list[int]]) -> dict:
    width = max(map(len, examples))
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = 1
    return {
        k: v.cuda()
        for k, v in dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).items()
    }


def flattened(examples: list[list[int]]) -> dict:
    batch = DataCollatorWithFlattening()([{"input_ids": e} for e in examples])
    return {k: v.cuda() for k, v in batch.items()}


def bench_llama(args, results: dict) -> None:
    config = LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    per_batch = 8
    examples = llama_examples(per_batch * 4, config.vocab_size)
    groups = [examples[i : i + per_batch] for i in range(0, len(examples), per_batch)]
    real = [sum(map(len, g)) for g in groups]
    rows = {}
    for name, model, make in (("stock, padded", stock, padded), ("transformed, packed", fast, flattened)) * 2:
        batches = [make(g) for g in groups]
        state = copy.deepcopy(model.state_dict())
        times, losses, peak = train_steps(model, batches, args.steps)
        model.load_state_dict(state)
        tokens = statistics.mean(real[(3 + i) % len(real)] for i in range(args.steps))
        ms = statistics.median(times)
        rows.setdefault(name, []).append(dict(ms=ms, tokens_per_s=tokens / ms * 1e3, peak_gib=peak, losses=losses[:8]))
        print(
            f"llama {name:20s} {ms:7.1f} ms/step {tokens / ms * 1e3:9.0f} tok/s peak {peak:5.1f} GiB losses {losses[:3]}",
            flush=True,
        )
    print("llama fast calls", call_counts(fast))
    if args.breakdown:
        for name, model, make in (("stock, padded", stock, padded), ("transformed, packed", fast, flattened)):
            state = copy.deepcopy(model.state_dict())
            rows[f"{name} breakdown"] = step_breakdown(model, [make(g) for g in groups])
            model.load_state_dict(state)
            _print_breakdown("llama", name, rows[f"{name} breakdown"])
    results["llama"] = rows


def bench_compile(args, results: dict) -> None:
    config = BertConfig(num_labels=2)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").cuda()
    torch.manual_seed(0)
    lengths = torch.randint(16, 513, (64,))
    ids = torch.randint(1000, 30522, (64, 512), device="cuda")
    mask = (torch.arange(512)[None] < lengths[:, None]).long().cuda()
    rows = {}
    for name in args.compile_models:
        model = copy.deepcopy(base).half().eval()
        if name == "transformed":
            model = BetterTransformer.transform(model)
        with torch.inference_mode():
            eager = model(input_ids=ids, attention_mask=mask).logits.float()
        for label, fn in (("eager", model), ("compiled", None)):
            try:
                if fn is None:
                    torch._dynamo.reset()
                    torch._dynamo.utils.counters.clear()
                    fn = torch.compile(model, dynamic=True)
                    start = time.perf_counter()
                    with torch.inference_mode():
                        out = fn(input_ids=ids, attention_mask=mask).logits.float()
                    first = time.perf_counter() - start
                    err = (out - eager).abs().max().item()
                else:
                    first, err = 0.0, 0.0
                with torch.inference_mode():
                    for _ in range(3):
                        fn(input_ids=ids, attention_mask=mask)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(20):
                        fn(input_ids=ids, attention_mask=mask)
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - start) / 20 * 1e3
                breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
                rows[f"{name} {label} inference"] = dict(ms=ms, first_s=first, err=err, graph_breaks=breaks)
                if breaks:
                    print("graph breaks:", dict(torch._dynamo.utils.counters["graph_break"]), flush=True)
                print(
                    f"compile {name:12s} {label:8s} inference {ms:7.2f} ms (first {first:5.1f} s, err {err:.3g})",
                    flush=True,
                )
            except Exception as error:  # noqa: BLE001 - reported, the run goes on
                rows[f"{name} {label} inference"] = dict(error=f"{type(error).__name__}: {str(error)[:300]}")
                print(f"compile {name} {label} inference FAILED", type(error).__name__, str(error)[:2000], flush=True)
                traceback.print_exc(limit=5)
        # training
        model = copy.deepcopy(base)
        if name == "transformed":
            model = BetterTransformer.transform(model)
        batches = [bert_batch(seed=s) for s in range(4)]
        state = copy.deepcopy(model.state_dict())
        times, losses, _ = train_steps(model, batches, args.steps)
        model.load_state_dict(state)  # the compiled run starts from the same weights
        rows[f"{name} uncompiled training"] = dict(ms=statistics.median(times), losses=losses[:4])
        print(f"compile {name:12s} uncompiled training {statistics.median(times):7.1f} ms/step", flush=True)
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=True)
            start = time.perf_counter()
            times, losses, peak = train_steps(compiled, batches, args.steps)
            rows[f"{name} compiled training"] = dict(ms=statistics.median(times), losses=losses[:4], peak_gib=peak)
            print(
                f"compile {name:12s} compiled training {statistics.median(times):7.1f} ms/step (whole run {time.perf_counter() - start:5.1f} s) losses {losses[:4]}",
                flush=True,
            )
        except Exception as error:  # noqa: BLE001
            rows[f"{name} compiled training"] = dict(error=f"{type(error).__name__}: {str(error)[:300]}")
            print(f"compile {name} training FAILED", type(error).__name__, str(error)[:2000], flush=True)
            traceback.print_exc(limit=5)
    results["compile"] = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["bert", "llama", "compile"], choices=["bert", "llama", "compile"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bert-longest", type=int, default=512, help="BERT rows hold randint(16, this + 1) tokens")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--breakdown", action="store_true", help="host time per phase, wall, GPU time and launches per step"
    )
    parser.add_argument(
        "--compile-models", nargs="+", default=["transformed", "stock"], choices=["transformed", "stock"],
        help="with --only compile: the models compiled (stock's compiles take minutes)",
    )  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict = dict(
        card=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip
    print(results, flush=True)
    for part in args.only:
        {"bert": bench_bert, "llama": bench_llama, "compile": bench_compile}[part](args, results)
    if args.out:
        with open(f"{args.out}/train_gpu.json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
