"""Decode-step kernels in isolation, as the decode loop runs them: cuBLAS vs our decode linear kernel, SDPA vs
our decode attention, over a sweep of launch configurations.

Each op is captured in a CUDA graph over 24 copies of its weights (more bytes than the L2 cache holds, so every
call streams from HBM as in a real step) and timed by replay. GPT-2 shapes, or with ``--llama`` the products of a
TinyLlama layer (nn.Linear weights; the gate and up products as one gated kernel) and its LM head, with the
fraction of the copy bandwidth each reaches.
Run: ``PYTHONPATH=src python benchmarks/decode_kernels_gpu.py [--llama]``
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
import torch.nn.functional as F

from bettertransformer.ops import decode
from bettertransformer.ops import decode_kernels as dk

COPIES = 24


def graph_us(fn) -> float:
    """Microseconds per call of ``fn(i)`` for i over the weight copies, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(COPIES):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 10 / COPIES


# (name, K, N, gated) of one layer's products and the LM head.
LLAMA_SHAPES = {
    "tinyllama": (("qkv", 2048, 2560, False), ("o", 2048, 2048, False), ("gate|up", 2048, 5632, True),
                  ("down", 5632, 2048, False), ("head", 2048, 32000, False)),
    "llama3-8b": (("qkv", 4096, 6144, False), ("o", 4096, 4096, False), ("gate|up", 4096, 14336, True),
                  ("down", 14336, 4096, False), ("head", 4096, 128256, False)),
    "qwen3": (("qkv", 2048, 4096, False), ("o", 2048, 2048, False), ("gate|up", 2048, 6144, True),
              ("down", 6144, 2048, False), ("head", 2048, 151936, False)),
    "gemma2": (("qkv", 2304, 4096, False), ("o", 2048, 2304, False), ("gate|up", 2304, 9216, True),
               ("down", 9216, 2304, False), ("head", 2304, 256000, False)),
}  # fmt: skip


def best_config(configs, ours, reference, every: list | None = None) -> tuple[float, tuple, float]:
    """(us, config, max error against ``reference(0)``) of the fastest of ``ours(i, config)`` over ``configs``;
    a configuration that does not fit (shared memory) is skipped. ``every`` collects (config, us) of each."""
    best = None
    for config in configs:
        run = functools.partial(ours, config=config)
        try:
            err = (run(0).float() - reference(0).float()).abs().max().item()
            us = graph_us(run)
        except Exception:
            continue
        if every is not None:
            every.append((config, us))
        if best is None or us < best[0]:
            best = (us, config, err)
    assert best is not None, "no configuration ran"
    return best


def llama(args) -> None:
    """A Llama-family model's products at each batch: cuBLAS against our kernel's best configuration, in us and
    TB/s."""
    torch.manual_seed(0)
    dev, dt = "cuda", torch.float16
    source = torch.empty(2**28, device=dev, dtype=dt)
    target = torch.empty_like(source)
    bandwidth = 2 * source.numel() * 2 / (graph_us(lambda i: target.copy_(source)) * 1e-6)
    rows = []
    for m in args.batches:
        for name, k, n, gated in LLAMA_SHAPES[args.llama]:
            a = torch.randn(m, k, device=dev, dtype=dt)
            copies = 4 if n > 10000 else COPIES
            ws = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(copies * (2 if gated else 1))]
            nbytes = n * k * 2 * (2 if gated else 1)

            # --norm: the RMSNorm before q|k|v and gate|up computed in the product, as the fused step does
            norm = dk.RMSNorm(torch.rand(k, device=dev, dtype=dt) + 0.5, 1e-6) if args.norm and name != "o" else None
            if name in ("down", "head"):
                norm = None

            def cublas(i, a=a, ws=ws, gated=gated, copies=copies, norm=norm):
                x = a if norm is None else F.rms_norm(a, (a.shape[1],), norm.weight, norm.eps)
                if gated:
                    return F.silu(F.linear(x, ws[2 * (i % copies)])) * F.linear(x, ws[2 * (i % copies) + 1])
                return F.linear(x, ws[i % copies])

            def ours(i, config, a=a, ws=ws, gated=gated, copies=copies, norm=norm):
                if gated:
                    j = 2 * (i % copies)
                    return dk.linear(
                        a, ws[j], None, transposed=True, act="silu", up=(ws[j + 1], None), norm=norm, config=config
                    )  # fmt: skip
                return dk.linear(a, ws[i % copies], None, transposed=True, norm=norm, config=config)

            configs = itertools.product(args.block_n, args.block_k, args.warps)
            default = graph_us(functools.partial(ours, config=dk.linear_config(m, k, n, gated=gated)))
            every: list = []
            best = best_config(configs, ours, cublas, every)
            rows.append((f"m={m} {name} {k}->{n}", graph_us(cublas), default, best, nbytes))
            if args.every:
                print(f"m={m} {name} {k}->{n}: " + ", ".join(f"{c}: {us:.2f}" for c, us in every))
    print(torch.cuda.get_device_name(), torch.__version__, f"copy {bandwidth / 1e12:.2f} TB/s")
    print(f"{'op':28s} {'cuBLAS us':>9s} {'default us':>10s} {'best us':>8s} {'best TB/s':>9s}  best config, max err")
    for name, base, default, (us, config, err), nbytes in rows:
        print(f"{name:28s} {base:9.2f} {default:10.2f} {us:8.2f} {nbytes / us / 1e6:9.2f}  {config}, {err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--block-n", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--block-k", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-lm-head", action="store_true")
    parser.add_argument("--every", action="store_true", help="with --llama: print every configuration's time")
    parser.add_argument("--norm", action="store_true", help="with --llama: q|k|v and gate|up normalised in the product")
    parser.add_argument("--llama", choices=sorted(LLAMA_SHAPES), help="a Llama-family model's products, not GPT-2's")
    args = parser.parse_args()
    if args.llama:
        llama(args)
        return
    torch.manual_seed(0)
    dev, dt = "cuda", torch.float16
    rows = []
    for m in args.batches:
        shapes = ((768, 2304, False, False), (768, 768, False, False), (768, 3072, True, False))
        shapes += ((3072, 768, False, False),) + (() if args.no_lm_head else ((768, 50257, False, True),))
        for k, n, gelu, transposed in shapes:
            x = torch.randn(m, k, device=dev, dtype=dt)
            copies = 4 if n > 10000 else COPIES
            ws = [
                torch.randn(*((n, k) if transposed else (k, n)), device=dev, dtype=dt) / k**0.5 for _ in range(copies)
            ]
            b = torch.randn(n, device=dev, dtype=dt)

            def cublas(i, x=x, ws=ws, b=b, gelu=gelu, transposed=transposed, copies=copies):
                w = ws[i % copies]
                y = F.linear(x, w) if transposed else torch.addmm(b, x, w)
                return F.gelu(y, approximate="tanh") if gelu else y

            def ours(i, config, x=x, ws=ws, b=b, gelu=gelu, transposed=transposed, copies=copies):
                bias = None if transposed else b
                return dk.linear(x, ws[i % copies], bias, transposed=transposed, gelu_tanh=gelu, config=config)

            configs = itertools.product(args.block_n, args.block_k, args.warps)
            best = best_config(configs, ours, cublas)
            rows.append((f"matmul m={m} {k}->{n}{' +gelu' if gelu else ''}", graph_us(cublas), best))
        for s in (128, 256):
            # GPT-2's step attention: the rotary decode kernel without rotation, over the QKV product, as
            # ``decode.rope_attention`` launches it (its tiles and cache splits), against SDPA over the same cache
            qkv = torch.randn(m, 3 * 768, device=dev, dtype=dt)
            q = qkv[:, :768].view(m, 12, 1, 64)
            kvs = [torch.randn(2, m, 12, s, 64, device=dev, dtype=dt) for _ in range(COPIES)]
            valid = torch.rand(m, s, device=dev) < 0.8
            valid[:, 0] = valid[:, s - 1] = True
            mask = torch.where(valid, 0.0, float("-inf")).to(dt)
            slot = torch.tensor([s - 1], device=dev)
            positions = torch.full((m,), s - 1, device=dev)
            no_rotation = decode.Rotary(torch.zeros(1, device=dev)[:0])

            def sdpa(i, q=q, kvs=kvs, mask=mask):
                kv = kvs[i]
                return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=0.125)

            def ours(i, qkv=qkv, kvs=kvs, mask=mask, slot=slot, positions=positions, rotary=no_rotation):
                return decode.rope_attention(qkv, kvs[i], mask, slot, positions, heads=12, scale=0.125, rotary=rotary)

            base = graph_us(sdpa)
            us = graph_us(ours)
            err = (ours(0).float() - sdpa(0)[:, :, 0].reshape(m, -1).float()).abs().max().item()  # after ours wrote
            best = (us, "decode.rope_attention", err)
            rows.append((f"attention m={m} S={s}", base, best))
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"{'op':36s} {'torch us':>9s} {'ours us':>8s}  best config, max err")
    for name, base, (us, config, err) in rows:
        print(f"{name:36s} {base:9.2f} {us:8.2f}  {config}, {err:.1e}")


if __name__ == "__main__":
    main()
