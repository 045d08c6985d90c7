"""The prefill's rotary kernel alone (``decode_kernels.rope_into_cache``): heads a program x warps, at prefill token
counts, for TinyLlama, Qwen3 1.7B and Gemma 2 2B head shapes; us a call, replayed from a CUDA graph
(``decode_kernels_gpu.graph_us``). Every configuration's output is checked against one head a program over four warps
(the kernel before the twentieth session).

Run: ``PYTHONPATH=src python benchmarks/prefill_rotary_gpu.py``
"""

from __future__ import annotations

import torch
from decode_kernels_gpu import graph_us

from bettertransformer.ops import decode, decode_kernels

SHAPES = {  # query heads, key/value heads, head dim, q/k norms, dtype
    "tinyllama": (32, 4, 64, False, torch.float16),
    "qwen3": (16, 8, 128, True, torch.bfloat16),
    "gemma2": (8, 4, 256, False, torch.bfloat16),
}
CONFIGS = ((1, 4), (1, 1), (2, 1), (4, 1), (4, 2), (8, 1), (8, 2), (16, 1), (16, 2), (None, None))


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name, (heads, kv_heads, dim, qk, dtype) in SHAPES.items():
        for tokens in (544, 2048, 8192):
            qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=dtype)
            batch = 16 if tokens == 544 else 1
            kv = torch.zeros(2, batch, kv_heads, tokens // batch + 256, dim, device="cuda", dtype=dtype)
            rows = torch.arange(tokens, device="cuda") % batch
            columns = torch.arange(tokens, device="cuda") // batch
            inv_freq = 1.0 / 10000 ** (torch.arange(0, dim // 2, device="cuda") / (dim // 2))
            ones = torch.ones(dim, device="cuda", dtype=dtype)
            norms = (decode.RMSNorm(ones, 1e-6), decode.RMSNorm(ones, 1e-6), True) if qk else None
            cells, reference = [], None
            for group, warps in CONFIGS:

                def run(group=group, warps=warps):
                    return decode_kernels.rope_into_cache(
                        qkv, kv, rows, columns, columns, heads=heads, rotary=decode.Rotary(inv_freq),
                        qk_norm=norms, group=group, warps=warps,
                    )  # fmt: skip

                out = [*run(), kv.clone()]
                if reference is None:
                    reference = out
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, reference, strict=True))
                assert diff < 0.05, (name, tokens, group, warps, diff)
                label = "default" if group is None else f"{group}x{warps}"
                cells.append(f"{label} {graph_us(lambda i, run=run: run()):.1f}")
            print(f"{name} T={tokens}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
