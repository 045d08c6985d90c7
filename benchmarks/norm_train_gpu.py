"""The training kernels of dropout + residual + LayerNorm (``ops.fused.dropout_add_layer_norm_pair``) at BERT-base's
training shape, over their launch configurations, against PyTorch's composition: microseconds per call, replayed
from a CUDA graph, and the bandwidth each reaches.

Shape: 9,216 tokens of 768 (the canonical training batch's bucket), a bf16 sublayer output, an fp32 residual, the
output in fp32 and bf16, dropout 0.1; the backward takes both outputs' gradients. Prints the best configuration of
each direction last, as JSON.
Run: ``PYTHONPATH=src:benchmarks python benchmarks/norm_train_gpu.py [--tokens 9216] [--width 768]``
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from decode_kernels_gpu import graph_us as graph_us_of

from bettertransformer.ops import triton_kernels as tk


def graph_us(fn) -> float:
    """Microseconds per call of ``fn()``, replayed from a CUDA graph."""
    return graph_us_of(lambda i: fn())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=9216)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--p", type=float, default=0.1)
    args = parser.parse_args()
    t, n, p, dev = args.tokens, args.width, args.p, "cuda"
    torch.manual_seed(0)
    a = torch.randn(t, n, device=dev).to(torch.bfloat16)
    x = torch.randn(t, n, device=dev)
    w, b = torch.randn(n, device=dev) + 1, torch.randn(n, device=dev)
    dy, dy2 = torch.randn(t, n, device=dev), torch.randn(t, n, device=dev).to(torch.bfloat16)
    half = torch.bfloat16
    _, _, h, mean, rstd, seed = tk.dropout_add_layer_norm_forward(a, x, w, b, 1e-12, p, torch.float32, half)
    # bytes each direction must move: forward reads a, x and writes h, y, y2; backward reads dy, dy2, h and writes
    # da, dx (the row statistics and partial sums are small)
    forward_bytes = t * n * (2 + 4 + 4 + 4 + 2)
    backward_bytes = t * n * (4 + 2 + 4 + 2 + 4)

    def torch_forward():
        return F.layer_norm(F.dropout(a, p) + x, (n,), w, b, 1e-12)

    rows = [("PyTorch forward (dropout, add, LayerNorm)", graph_us(torch_forward), forward_bytes - t * n * 6)]
    best: dict[str, tuple] = {}
    for tile, warps in itertools.product((1, 2, 4, 8), (2, 4, 8)):
        config = (tile, 1, warps)

        def forward(config=config):
            return tk.dropout_add_layer_norm_forward(a, x, w, b, 1e-12, p, torch.float32, half, config)

        us = graph_us(forward)
        rows.append((f"forward {config}", us, forward_bytes))
        if us < best.get("forward", (float("inf"),))[0]:
            best["forward"] = (us, config)
    default = tk._dropout_ln_config(n, backward=True)
    for tile, steps, warps in [*itertools.product((1, 2, 4), (4, 8, 16, 32), (4, 8)), default]:
        config = (tile, steps, warps)

        def backward(config=config):
            return tk.dropout_add_layer_norm_backward(
                dy, dy2, h, mean, rstd, w, seed, p, torch.bfloat16, torch.float32, config
            )

        us = graph_us(backward)
        rows.append((f"backward {config}{' (default)' if config == default else ''}", us, backward_bytes))
        if us < best.get("backward", (float("inf"),))[0]:
            best["backward"] = (us, config)
    print(torch.cuda.get_device_name(), torch.__version__, f"{t} x {n}, p={p}")
    for name, us, nbytes in rows:
        print(f"{name:48s} {us:8.2f} us {nbytes / us / 1e6:6.2f} TB/s")
    print(json.dumps({k: v[1] for k, v in best.items()}))


if __name__ == "__main__":
    main()
