"""Llama-family generate against the memory-bandwidth floor (issue 12), side by side in one process.

Shapes (random weights): TinyLlama 1.1B (fp16), Qwen3 1.7B (bf16, tied embeddings), Gemma 2 2B (bf16, eager
attention for stock: its softcap), Llama 3 8B (bf16, llama3 rotary scaling). Greedy, ``min_new_tokens`` =
``max_new_tokens`` = 128. Batch 1: a 16-token prompt; batch 16: 64-token prompts, row i left-padded by 4*i.
``--long``: batch 1 with 2,048- and 8,192-token prompts (ours and stock).

The floor of a batch-1 step is the bytes of weights it must read (every parameter except an untied input
embedding, which is a gather) over the copy bandwidth measured in the same run. Columns: stock ``generate``;
transformers' static cache (``cache_implementation="static"``, which compiles the forward on first use; ``--static``)
with its first call's time; the transformed model, with its first call's time (Triton kernels compiled then unless
the Triton cache holds them).

Run: ``PYTHONPATH=src python benchmarks/llama_decode_gpu.py [--shapes tinyllama,qwen3,gemma2,llama3-8b] [--static]
[--long] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen3Config

from bettertransformer import BetterTransformer, cache_info, call_counts

NEW = 128


def shapes() -> dict[str, tuple]:
    llama3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)  # fmt: skip
    return {
        "tinyllama": (LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, max_position_embeddings=16384), torch.float16, "sdpa"),
        "qwen3": (Qwen3Config(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=16384),
            torch.bfloat16, "sdpa"),
        "gemma2": (Gemma2Config(
            vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
            max_position_embeddings=16384), torch.bfloat16, "eager"),
        "llama3-8b": (LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=16384, rope_parameters=llama3), torch.bfloat16, "sdpa"),
    }  # fmt: skip


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write)."""
    x = torch.empty(2**30, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * x.element_size() * 10 / (time.perf_counter() - start)


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter, except an input embedding the LM head does not share."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


def prompts(batch: int, length: int, pad_step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : row * pad_step] = 0
    return ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


def seconds(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def tokens_per_s(model, ids, mask, repeats: int, **extra) -> tuple[float, float]:
    """(tokens/s over the best of ``repeats`` timed calls, seconds of the first call)."""
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    first = seconds(lambda: model.generate(ids, **kwargs, **extra))
    best = min(seconds(lambda: model.generate(ids, **kwargs, **extra)) for _ in range(repeats))
    return ids.shape[0] * NEW / best, first


def run_shape(name: str, args, bandwidth: float, rows: list) -> None:
    config, dtype, attn = shapes()[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        stock = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()
    stock.generation_config.eos_token_id = None
    floor = bandwidth / weight_bytes(stock)
    workloads = [("b1", 1, 16, 0), ("b16", 16, 64, 4)]
    if args.long:
        workloads += [("b1 2k prompt", 1, 2048, 0), ("b1 8k prompt", 1, 8192, 0)]
    results: dict[str, dict] = {}
    for label, batch, length, pad in workloads:
        ids, mask = prompts(batch, length, pad, config.vocab_size)
        results[label] = {"stock": tokens_per_s(stock, ids, mask, 1)[0]}
        if args.static and label == "b1":
            results[label]["static+compile"], results[label]["static first s"] = tokens_per_s(
                stock, ids, mask, 2, cache_implementation="static"
            )
        print(name, label, results[label], flush=True)
    model = BetterTransformer.transform(stock, keep_original_model=False)
    for label, batch, length, pad in workloads:
        ids, mask = prompts(batch, length, pad, config.vocab_size)
        ours, first = tokens_per_s(model, ids, mask, 3)
        results[label].update(ours=ours, **{"ours first s": first}, graphs=cache_info(model)["graphs"])
        print(name, label, results[label], flush=True)
    counts = call_counts(model)
    for label, r in results.items():
        rows.append(dict(
            shape=name, dtype=str(dtype).removeprefix("torch."), workload=label, floor=floor if label == "b1" else None,
            fused_steps=counts["fused steps"], **r,
        ))  # fmt: skip
    del model, stock
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tinyllama,qwen3,gemma2,llama3-8b")
    parser.add_argument("--static", action="store_true", help="also transformers' static cache + compile at batch 1")
    parser.add_argument("--long", action="store_true", help="also 2,048- and 8,192-token prompts at batch 1")
    parser.add_argument("--out", default=None, help="directory for results.json")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows: list[dict] = []
    for name in args.shapes.split(","):
        run_shape(name, args, bandwidth, rows)
    meta = dict(
        card=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), date=time.strftime("%Y-%m-%d"), copy_bandwidth_tb_s=bandwidth / 1e12,
    )  # fmt: skip
    print(json.dumps(meta))
    print(
        "| shape | dtype | workload | floor tok/s | stock | static+compile (first call s) | ours (first call s) | of floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        static = f"{r['static+compile']:,.0f} ({r['static first s']:.1f})" if "static+compile" in r else "-"
        floor = f"{r['floor']:,.0f}" if r["floor"] else "-"
        share = f"{r['ours'] / r['floor']:.0%}" if r["floor"] else "-"
        print(
            f"| {r['shape']} | {r['dtype']} | {r['workload']} | {floor} | {r['stock']:,.0f} | {static} | "
            f"{r['ours']:,.0f} ({r['ours first s']:.1f}) | {share} |"
        )
    if args.out:
        with open(f"{args.out}/results.json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
