"""Kernel-level measurements behind the encoder's choices, on the canonical workload's shapes (CUDA).

1. Attention over the packed canonical batch: flash varlen vs cuDNN ragged attention (time, max difference).
2. FFN-in with GELU: cuBLAS linear + a GELU pass.
3. Where the fast encoder forward leaves the GPU idle: gaps between kernels in a profiler trace.

Run: ``PYTHONPATH=src python benchmarks/kernels_gpu.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bettertransformer.ops import triton_kernels
from bettertransformer.ops.padding import pack_info

from encoder_gpu import bench  # noqa: E402  (same folder)


def attention_kernels(rows: list) -> None:
    torch.manual_seed(0)
    lengths = torch.randint(16, 513, (64,))
    mask = (torch.arange(512)[None, :] < lengths[:, None]).cuda()
    info = pack_info(mask, 64, 512, torch.device("cuda"))
    t = info.total
    q, k, v = (torch.randn(t, 12, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    qkv = torch.randn(t, 3, 12, 64, device="cuda", dtype=torch.float16)
    cu, m = info.cu_seqlens, info.max_len
    from torch.nn.attention.varlen import varlen_attn

    flops = 4 * 12 * 64 * float((lengths.double() ** 2).sum())
    ref = varlen_attn(q, k, v, cu, cu, m, m, scale=0.125)
    variants = {
        "flash varlen (contiguous q,k,v)": lambda: varlen_attn(q, k, v, cu, cu, m, m, scale=0.125),
        "flash varlen (strided views of qkv)": lambda: varlen_attn(
            qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, m, m, scale=0.125
        ),
    }
    # cuDNN's ragged attention (torch.ops.aten._cudnn_attention_forward with cu_seqlens) measured 44.9 ms here
    # on torch 2.11 / H100 (2026-11-25), 300x slower than flash: left out.
    for cfg in triton_kernels.ATTENTION_CONFIGS:
        variants[f"triton {cfg} (strided views of qkv)"] = lambda cfg=cfg: triton_kernels.varlen_attention(
            qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, m, 0.125, cfg
        )
    for name, fn in variants.items():
        try:
            with torch.inference_mode():
                out = fn()
                ms = bench(fn)
            ref_here = varlen_attn(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, m, m, scale=0.125) if "qkv" in name else ref
            diff = (out.float() - ref_here.float()).abs().max().item()
            rows.append(
                {"kernel": "attention", "variant": name, "ms": ms, "tflops": flops / ms / 1e9, "max_diff": diff}
            )
        except Exception as exc:  # a kernel this torch lacks
            rows.append({"kernel": "attention", "variant": name, "error": repr(exc)[:200]})
        print(rows[-1], flush=True)


def ffn_in_kernels(rows: list) -> None:
    torch.manual_seed(0)
    x = torch.randn(15615, 768, device="cuda", dtype=torch.float16)
    w = torch.randn(3072, 768, device="cuda", dtype=torch.float16) * 0.03
    b = torch.randn(3072, device="cuda", dtype=torch.float16) * 0.1
    flops = 2 * 15615 * 768 * 3072
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()))
    variants = {
        "cuBLAS linear only": lambda: F.linear(x, w, b),
        "cuBLAS linear + Triton gelu_": lambda: triton_kernels.gelu_(F.linear(x, w, b)),
        "cuBLAS linear + torch gelu": lambda: F.gelu(F.linear(x, w, b)),
    }
    for name, fn in variants.items():
        try:
            with torch.inference_mode():
                out = fn()
                ms = bench(fn, iters=50)
            err = (out.float() - ref).abs().max().item() if "only" not in name else float("nan")
            rows.append({"kernel": "ffn_in", "variant": name, "ms": ms, "tflops": flops / ms / 1e9, "max_err": err})
        except Exception as exc:
            rows.append({"kernel": "ffn_in", "variant": name, "error": repr(exc)[:300]})
        print(rows[-1], flush=True)


def gaps(rows: list, out_dir: str | None) -> None:
    """Idle time between kernels in one fast forward of the canonical workload."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import BertConfig, BertModel

    from bettertransformer import BetterTransformer

    torch.manual_seed(0)
    lengths = torch.randint(16, 513, (64,))
    mask = (torch.arange(512)[None, :] < lengths[:, None]).long().cuda()
    ids = torch.randint(1000, 30000, (64, 512)).cuda() * mask
    model = BetterTransformer.transform(BertModel(BertConfig(), add_pooling_layer=False).cuda().eval().half())
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, attention_mask=mask)
            torch.cuda.synchronize()
    path = f"{out_dir or '/tmp'}/trace_fast.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
        key=lambda e: e["ts"],
    )
    busy = sum(e["dur"] for e in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    holes = []
    for prev, nxt in zip(kernels, kernels[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap > 10:
            holes.append((gap, prev["name"][:60], nxt["name"][:60]))
    holes.sort(reverse=True)
    rows.append({"kernel": "forward gaps", "busy_us": busy, "span_us": span, "largest_gaps": holes[:12]})
    print(json.dumps(rows[-1], indent=1), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows: list = []
    attention_kernels(rows)
    ffn_in_kernels(rows)
    gaps(rows, args.out)
    if args.out:
        with open(f"{args.out}/kernels_gpu.json", "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| kernel | variant | ms | TFLOP/s | note |\n|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            note = r.get("max_diff", r.get("max_err", ""))
            print(f"| {r['kernel']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {note} |")
        elif "error" in r:
            print(f"| {r['kernel']} | {r['variant']} | - | - | {r['error'][:80]} |")


if __name__ == "__main__":
    main()
