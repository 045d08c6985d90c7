"""A small model on the GPU, where Python and kernel launches, not the GPU, set the pace.

all-MiniLM-L6-v2 (6 layers, hidden 384) in fp16 through sentence-transformers on real sentences (85% padding),
batches of 64 and 256: `encode` end to end and the transformer forward alone, for stock transformers and for
bettertransformer with each of its kernel choices. Median of 30 (CUDA-synchronised wall clock).

Run: ``PYTHONPATH=src python benchmarks/small_model_gpu.py MODEL_DIR`` (a sentence-transformers directory).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from sentence_transformers import SentenceTransformer

from bettertransformer import BetterTransformer
from bettertransformer.switches import switched
from bettertransformer.sentences import sentences


def wall_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(model_dir: str) -> None:
    model = SentenceTransformer(model_dir, device="cuda", model_kwargs={"dtype": torch.float32}).half()
    fast = BetterTransformer.transform(model, keep_original_model=True)
    variants = {
        "default (Triton attention, LN, GELU)": (True, None),
        "torch LN/GELU, Triton attention": (False, None),
        "torch LN/GELU, torch varlen attention": (False, "varlen"),
    }
    print("| batch | what | stock ms | " + " | ".join(variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    for size in (64, 256):
        batch = sentences(size)
        features = {k: v.cuda() for k, v in model.preprocess(batch).items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            for what, run in (
                ("encode", lambda m: m.encode(batch, batch_size=size, convert_to_tensor=True)),
                ("forward", lambda m: m[0].auto_model(**features)),
            ):
                stock_ms = wall_ms(lambda: run(model))
                cells = []
                for use_triton, backend in variants.values():
                    with switched(triton=use_triton, attention_backend=backend):
                        cells.append(f"{wall_ms(lambda: run(fast)):.2f}")
                print(f"| {size} | {what} | {stock_ms:.2f} | " + " | ".join(cells) + " |", flush=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1])
