"""The first ``generate`` of a fresh process with an empty Triton cache (issue 12's first-call target).

Points Triton at a new, empty cache directory, transforms a random-weight model of the shape (TinyLlama's by
default), and times the transform and its first and second ``generate`` (batch 1, 16-token prompt, 128 new tokens).
Run: ``PYTHONPATH=src python benchmarks/first_call_gpu.py [--shape tinyllama]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-empty-")  # before Triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_gpu import wall_ms  # noqa: E402
from llama_decode_gpu import prompts, shapes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tinyllama", choices=sorted(shapes()))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from bettertransformer import BetterTransformer

    config, dtype, _ = shapes()[args.shape]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = BetterTransformer.transform(model, keep_original_model=False)
    transform = time.perf_counter() - start
    ids, mask = prompts(1, 16, 0, config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=128, min_new_tokens=128, pad_token_id=0)
    first, second = (wall_ms(lambda: model.generate(ids, **kwargs)) / 1e3 for _ in range(2))
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.shape}: first generate with an empty "
        f"Triton cache {first:.2f} s (transform before it {transform:.2f} s), second {second:.3f} s"
    )


if __name__ == "__main__":
    main()
