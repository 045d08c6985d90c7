"""What a first generate costs on a machine whose Triton cache is empty: run with a fresh ``TRITON_CACHE_DIR``.

Prints the first and second call of GPT-2 fp16 generate at batch 1 and batch 16, and the slowest kernel compiles.
Run: ``TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=src:benchmarks python benchmarks/compile_gpu.py``
"""

from __future__ import annotations

import argparse
import time

import torch
from decoder_gpu import build, left_padded
from transformers import GPT2Config

from bettertransformer import BetterTransformer
from bettertransformer.ops import decode_kernels


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    launches: dict[str, float] = {}
    kernels = [decode_kernels._linear_kernel, decode_kernels._rope_attention_kernel, decode_kernels._embed_kernel]
    kernels += [decode_kernels._advance_kernel, decode_kernels._argmax_rows_kernel]
    for kernel in kernels:
        original = kernel.run

        def timed(*a, original=original, name=kernel.__name__, **k):
            start = time.perf_counter()
            out = original(*a, **k)
            key = name + " " + " ".join(f"{n}={v}" for n, v in k.items() if n.isupper() and n not in ("PDL",))
            launches[key] = max(launches.get(key, 0.0), time.perf_counter() - start)
            return out

        kernel.run = timed
    model = BetterTransformer.transform(build(GPT2Config()))
    for batch in (1, 16):
        prompt = 16 if batch == 1 else 64
        ids, mask = left_padded([prompt - (4 * i if batch > 1 else 0) for i in range(batch)], 50257)
        kwargs = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
        for call in ("first", "second", "third"):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            print(f"b{batch} {call} call: {(time.perf_counter() - start) * 1e3:.0f} ms", flush=True)
    print("slowest first launches (compiles):")
    for key, seconds in sorted(launches.items(), key=lambda kv: -kv[1])[:14]:
        print(f"{seconds * 1e3:8.0f} ms  {key[:150]}")


if __name__ == "__main__":
    main()
