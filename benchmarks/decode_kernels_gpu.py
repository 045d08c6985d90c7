"""Decode-step kernels in isolation: cuBLAS vs our skinny Triton matmul, SDPA vs our decode attention.

Each op is captured 20 times in a CUDA graph and timed by replay, as the decode loop runs it. GPT-2 shapes.
Run: ``PYTHONPATH=src python benchmarks/decode_kernels_gpu.py``
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from bettertransformer.ops import triton_kernels as tk


def graph_us(fn, repeats: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 10 / repeats


def main() -> None:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.float16
    rows = []
    for m in (1, 16):
        for k, n, gelu in ((768, 2304, False), (768, 768, False), (768, 3072, True), (3072, 768, False)):
            x = torch.randn(m, k, device=dev, dtype=dt)
            w = torch.randn(k, n, device=dev, dtype=dt) / k**0.5
            b = torch.randn(n, device=dev, dtype=dt)
            ref = torch.addmm(b, x, w)
            ref = F.gelu(ref, approximate="tanh") if gelu else ref
            cublas = graph_us(lambda: F.gelu(torch.addmm(b, x, w), approximate="tanh") if gelu else torch.addmm(b, x, w))
            best = None
            for bn, bk, warps, stages in itertools.product((16, 32, 64), (64, 128, 256), (2, 4), (3, 4)):
                fn = lambda: tk.skinny_matmul(  # noqa: E731
                    x, w, b, transposed=False, gelu_tanh=gelu, block_n=bn, block_k=bk, warps=warps, stages=stages
                )
                try:
                    err = (fn().float() - ref.float()).abs().max().item()
                    us = graph_us(fn)
                except Exception as exc:  # a config that does not compile (shared memory)
                    print("skip", bn, bk, warps, stages, type(exc).__name__)
                    continue
                if best is None or us < best[0]:
                    best = (us, (bn, bk, warps, stages), err)
            rows.append((f"matmul m={m} {k}->{n}{' +gelu' if gelu else ''}", cublas, best))
        # lm_head: (V, E) weight, nn.Linear layout
        x = torch.randn(m, 768, device=dev, dtype=dt)
        w = torch.randn(50257, 768, device=dev, dtype=dt) / 768**0.5
        lin = graph_us(lambda: F.linear(x, w))
        mm = graph_us(lambda: torch.matmul(w, x.t()).t())
        best = None
        for bn, bk in itertools.product((32, 64, 128), (64, 128)):
            fn = lambda: tk.skinny_matmul(x, w, None, transposed=True, block_n=bn, block_k=bk)  # noqa: E731
            us = graph_us(fn)
            if best is None or us < best[0]:
                best = (us, (bn, bk), (fn().float() - F.linear(x, w).float()).abs().max().item())
        rows.append((f"lm_head m={m} (F.linear; W@x.T {mm:.1f})", lin, best))
        for s in (128, 256):
            q = torch.randn(m, 12, 1, 64, device=dev, dtype=dt)
            kv = torch.randn(2, m, 12, s, 64, device=dev, dtype=dt)
            valid = torch.rand(m, s, device=dev) < 0.8
            valid[:, 0] = True
            mask = torch.where(valid, 0.0, float("-inf")).to(dt)
            ref = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=0.125)
            sdpa = graph_us(
                lambda: F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=0.125)
            )
            best = None
            for bs in (32, 64, 128):
                fn = lambda: tk.decode_attention(q[:, :, 0], kv[0], kv[1], mask, 0.125, block_s=bs)  # noqa: E731
                us = graph_us(fn)
                err = (fn().float() - ref[:, :, 0].float()).abs().max().item()
                if best is None or us < best[0]:
                    best = (us, bs, err)
            rows.append((f"attention m={m} S={s}", sdpa, best))
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"{'op':45s} {'torch us':>9s} {'ours us':>8s}  config, max err")
    for name, base, (us, config, err) in rows:
        print(f"{name:45s} {base:9.2f} {us:8.2f}  {config}, {err:.1e}")


if __name__ == "__main__":
    main()
