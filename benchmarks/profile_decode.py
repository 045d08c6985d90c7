"""Where a decode step's time goes: the kernels of one fast-generate step (run eagerly under the profiler), and
the time of one CUDA-graph replay. ``--model``: GPT-2, ``llama`` (TinyLlama's shapes in fp16) or a shape of
``llama_decode_gpu.py`` (``gemma2``, ``qwen3``, ...) in its dtype. ``--no-pdl``: programmatic dependent launch off, so
that each kernel's time excludes its wait for the one before.
Run: ``PYTHONPATH=src:benchmarks python benchmarks/profile_decode.py [--model gpt2|llama|gemma2|...] [--batch 16]``
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from decode_step_gpu import graph_replay_us
from decoder_gpu import build, left_padded, llama_1b
from transformers import GPT2Config

from llama_decode_gpu import shapes

from bettertransformer import BetterTransformer
from bettertransformer.switches import SWITCHES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cprofile", action="store_true", help="host-side profile of warm two-token generates")
    parser.add_argument("--no-pdl", action="store_true", help="programmatic dependent launch off")
    args = parser.parse_args()
    SWITCHES.pdl = not args.no_pdl
    if args.model in ("gpt2", "llama"):
        model = build(GPT2Config() if args.model == "gpt2" else llama_1b())
    else:
        config, dtype, attn = shapes()[args.model]
        model = build(config, dtype, attn)
    config = model.config
    model = BetterTransformer.transform(model)
    ids, mask = left_padded([16] * args.batch, config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    model.generate(ids, **kwargs)
    import time

    for new in (1, 1, 2, 2, 64):  # the second call of each is warm
        short = dict(kwargs, max_new_tokens=new, min_new_tokens=new)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **short)
        torch.cuda.synchronize()
        print(f"generate with {new} new tokens: {(time.perf_counter() - start) * 1e3:.2f} ms")
    if args.cprofile:
        import cProfile
        import pstats

        short = dict(kwargs, max_new_tokens=2, min_new_tokens=2)
        model.generate(ids, **short)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(10):
            model.generate(ids, **short)
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    (patch,) = model._bettertransformer_state.patches
    runner = list(patch.generation.runners.values())[-1]  # the 64-token call's

    print(f"graph replay: {graph_replay_us(runner, ids.shape[1]):.1f} us per step")
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runner._decode_step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 5
    print(f"eager step: {len(kernels) / 5:.0f} kernels, {total:.1f} us of kernel time")
    by_name: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for e in kernels:
        by_name[e.name[:90]] += e.device_time / 5
        count[e.name[:90]] += 1 / 5
    for name, us in by_name.most_common(25):
        print(f"{us:8.1f} us {count[name]:5.0f}x  {name}")


if __name__ == "__main__":
    main()
