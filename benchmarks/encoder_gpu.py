"""The canonical encoder workload (shared/DESIGN.md) on a CUDA GPU, side by side in one process.

BERT-base config, random weights, fp16, batch 64, lengths ``torch.manual_seed(0); torch.randint(16, 513, (64,))``
right-padded to 512, attention_mask given. Compares:

- stock transformers (sdpa), and stock eager;
- bettertransformer (its default choices, plus variants that switch one choice off);
- PyTorch's own BetterTransformer fast path: ``nn.TransformerEncoder`` with nested tensors, loaded with the same
  weights and fed the same embeddings.

Reports the median time (CUDA events), the speedup over stock sdpa, and the max error on real tokens against the
fp32 stock model. Run: ``PYTHONPATH=src python benchmarks/encoder_gpu.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.switches import switched


def bench(fn, warmup: int = 5, iters: int = 30) -> float:
    """Median milliseconds of ``fn()`` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def host_ms(fn, iters: int = 20) -> float:
    """Median milliseconds the host spends issuing ``fn()`` (from an idle GPU; syncs inside count)."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]


def matmul_tflops(dtype=torch.float16, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    ms = bench(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / ms / 1e9


def torch_nested_encoder(bert: BertModel) -> nn.TransformerEncoder:
    """nn.TransformerEncoder carrying ``bert``'s encoder weights (post-LN, exact GELU)."""
    cfg = bert.config
    layer = nn.TransformerEncoderLayer(
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        dropout=0.0,
        activation="gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        batch_first=True,
        norm_first=False,
    )
    enc = nn.TransformerEncoder(layer, cfg.num_hidden_layers, enable_nested_tensor=True)
    for ours, theirs in zip(enc.layers, bert.encoder.layer):
        att = theirs.attention
        with torch.no_grad():
            ours.self_attn.in_proj_weight.copy_(
                torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight])
            )
            ours.self_attn.in_proj_bias.copy_(torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias]))
            ours.self_attn.out_proj.weight.copy_(att.output.dense.weight)
            ours.self_attn.out_proj.bias.copy_(att.output.dense.bias)
            ours.norm1.load_state_dict(att.output.LayerNorm.state_dict())
            ours.linear1.load_state_dict(theirs.intermediate.dense.state_dict())
            ours.linear2.load_state_dict(theirs.output.dense.state_dict())
            ours.norm2.load_state_dict(theirs.output.LayerNorm.state_dict())
    return enc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="directory for the JSON results")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="also write a kernel profile of each model")
    args = parser.parse_args()

    torch.manual_seed(0)
    lengths = torch.randint(16, 513, (64,))
    batch, seq = 64, 512
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long().cuda()
    torch.manual_seed(1)
    ids = torch.randint(1000, 30000, (batch, seq)).cuda() * mask
    real_tokens = int(mask.sum())

    torch.manual_seed(2)
    reference = BertModel(BertConfig(), add_pooling_layer=False).cuda().eval()  # fp32, sdpa
    with torch.no_grad():
        ref_out = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()

    def err(out):
        return (out.float() - ref_out)[keep].abs().max().item()

    stock = copy.deepcopy(reference).half()
    eager = copy.deepcopy(stock)
    eager.set_attn_implementation("eager")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    nested = torch_nested_encoder(stock).cuda().eval().half()

    rows = []

    def run(name, fn, out_fn=None):
        with torch.inference_mode():
            out = (out_fn or fn)()
            ms = bench(fn, iters=args.iters)
            host = host_ms(fn)
        rows.append({"variant": name, "ms": ms, "host_ms": host, "max_err": err(out)})
        print(f"{name:48s} {ms:8.2f} ms (host {host:.2f} ms)  err {rows[-1]['max_err']:.2e}", flush=True)

    def hf(model):
        return lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state

    def torch_fast_path():
        emb = stock.embeddings(input_ids=ids)
        out = nested(emb, src_key_padding_mask=~keep)
        return out  # nested output is re-padded with zeros

    run("stock transformers sdpa", hf(stock))
    run("stock transformers eager", hf(eager))
    run("torch nn.TransformerEncoder nested fast path", torch_fast_path)
    run("bettertransformer", hf(fast))
    assert call_counts(fast)["stock"] == 0
    with switched(triton=False):
        run("bettertransformer, no Triton fusion", hf(fast))
    with switched(gelu_epilogue=False):
        run("bettertransformer, exact GELU (Triton kernel, no epilogue)", hf(fast))
    with switched(attention_backend="dense"):
        run("bettertransformer, dense (padded) attention", hf(fast))

    # The same models on a batch with no padding at all (64 x 512 real tokens): packing must not cost.
    full = torch.ones_like(mask)
    no_pad = []
    for name, model in (("stock transformers sdpa", stock), ("bettertransformer", fast)):
        with torch.inference_mode():
            no_pad.append(
                (name, bench(lambda: model(input_ids=ids + 1000 * (1 - mask), attention_mask=full), iters=args.iters))
            )

    if args.profile and args.out:
        from torch.profiler import ProfilerActivity, profile

        for name, model in (("stock", stock), ("fast", fast)):
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    hf(model)()
                torch.cuda.synchronize()
            with open(f"{args.out}/profile_{name}.txt", "w") as f:
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
            prof.export_chrome_trace(f"{args.out}/trace_{name}.json")

    tflops = matmul_tflops()
    cfg = stock.config
    gemm_flops = (
        real_tokens * cfg.num_hidden_layers * 2 * (4 * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.intermediate_size)
    )
    attn_flops = cfg.num_hidden_layers * 4 * cfg.hidden_size * float((lengths.double() ** 2).sum())
    floor_ms = (gemm_flops + attn_flops) / (tflops * 1e12) * 1e3

    base = rows[0]["ms"]
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "real_tokens": real_tokens,
        "padding_fraction": 1 - real_tokens / (batch * seq),
        "fp16_matmul_tflops": tflops,
        "floor_ms": floor_ms,
        "rows": rows,
    }
    info["no_padding"] = no_pad
    if args.out:
        with open(f"{args.out}/encoder_gpu.json", "w") as f:
            json.dump(info, f, indent=2)
    print(f"\n{info['device']}, torch {torch.__version__}, transformers {transformers.__version__}, {info['date']}")
    print(
        f"{real_tokens} real tokens of {batch * seq} ({info['padding_fraction']:.0%} padding); "
        f"fp16 matmul {tflops:.0f} TFLOP/s; floor {floor_ms:.2f} ms"
    )
    print("| variant | ms | speedup vs stock sdpa | host ms to issue | max err vs fp32 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['ms']:.2f} | {base / row['ms']:.2f}x | {row['host_ms']:.2f} | "
            f"{row['max_err']:.2e} |"
        )
    print("\nNo padding (64 x 512 real tokens):")
    for name, ms in no_pad:
        print(f"| {name} | {ms:.2f} ms | {no_pad[0][1] / ms:.2f}x |")


if __name__ == "__main__":
    main()
