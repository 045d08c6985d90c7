"""The first ``generate`` of a fresh process with an empty Triton cache (issue 12's first-call target).

Points Triton at a new, empty cache directory, transforms a random-weight model of the shape (TinyLlama's by
default), and times the transform and its first and second ``generate`` (batch 1, 16-token prompt, 128 new tokens).
``--timeline``: also print when, from ``transform`` on, Triton's set-up parts ended, the compile-ahead block started
its compilations, and each kernel was loaded (its compilation done); the longest chain is the first call's floor.
Run: ``PYTHONPATH=src python benchmarks/first_call_gpu.py [--shape tinyllama] [--timeline]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-empty-")  # before Triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder_gpu import wall_ms  # noqa: E402
from llama_decode_gpu import prompts, shapes  # noqa: E402


def timed(marks: list, start: list, owner: object, name: str, label: str | Callable[[tuple], str]) -> None:
    """Wrap ``owner.name`` so that its end is appended to ``marks`` as (seconds since ``start[0]``, label)."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        finally:
            marks.append((time.perf_counter() - start[0], label(args) if callable(label) else label))

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tinyllama", choices=sorted(shapes()))
    parser.add_argument("--timeline", action="store_true", help="when each set-up part, compilation and load ended")
    args = parser.parse_args()
    marks: list = []
    start = [0.0]
    if args.timeline:
        from bettertransformer.ops import compile_ahead

        timed(marks, start, compile_ahead, "_triton_key", "Triton's cache key")
        timed(marks, start, compile_ahead, "_triton_driver", "Triton's driver module")
        timed(marks, start, compile_ahead._Ahead, "compile_recorded", "every compilation started")

        def loaded(args: tuple) -> str:
            target = args[0].result() if hasattr(args[0], "result") else args[0]
            name = getattr(getattr(target, "src", None), "name", None) or getattr(target, "name", "?")
            return f"compiled and loaded: {name}"

        timed(marks, start, compile_ahead, "_load", loaded)
    from transformers import AutoModelForCausalLM

    from bettertransformer import BetterTransformer

    config, dtype, _ = shapes()[args.shape]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    torch.cuda.synchronize()
    start[0] = time.perf_counter()
    model = BetterTransformer.transform(model, keep_original_model=False)
    transform = time.perf_counter() - start[0]
    ids, mask = prompts(1, 16, 0, config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=128, min_new_tokens=128, pad_token_id=0)
    first, second = (wall_ms(lambda: model.generate(ids, **kwargs)) / 1e3 for _ in range(2))
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.shape}: first generate with an empty "
        f"Triton cache {first:.2f} s (transform before it {transform:.2f} s), second {second:.3f} s"
    )
    for seconds, what in sorted(marks):
        print(f"  {seconds:6.3f} s  {what}")


if __name__ == "__main__":
    main()
