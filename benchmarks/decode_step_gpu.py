"""The fused GPT-2 decode step as ``generate`` replays it, under variants of its launch settings: microseconds per
CUDA-graph replay, kernels per step, and the warm ``generate`` time of the canonical batch-1 workload.

Variants: the defaults; programmatic dependent launch off; other (BLOCK_N, num_warps) rules for one-row products.
Run: ``PYTHONPATH=src:benchmarks python benchmarks/decode_step_gpu.py [--batch 1]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from decoder_gpu import build, left_padded
from transformers import GPT2Config

from bettertransformer import BetterTransformer
from bettertransformer.ops import decode_kernels
from bettertransformer.switches import switched

DEFAULT_CONFIG = decode_kernels.linear_config


def row_config(block_ns: tuple[int, int, int], block_k: int, warps: int, one_row: bool = True):
    """A ``linear_config`` for one row (``one_row``) or several: BLOCK_N for N <= 1024, <= 8192 and beyond. For one
    row ``block_k`` is the slab (weights per chunk), for several the chunk's rows."""

    def config(m: int, k: int, n: int) -> tuple[int, int, int]:
        if (m == 1) != one_row:
            return DEFAULT_CONFIG(m, k, n)
        block_n = block_ns[0] if n <= 1024 else block_ns[1] if n <= 8192 else block_ns[2]
        if one_row:
            return block_n, min(1 << (k - 1).bit_length(), max(16, block_k // block_n)), warps
        return block_n, block_k, warps

    return config


@contextlib.contextmanager
def variant(pdl: bool = True, config=None):
    decode_kernels.linear_config = config or DEFAULT_CONFIG
    try:
        with switched(pdl=pdl):
            yield
    finally:
        decode_kernels.linear_config = DEFAULT_CONFIG


def rewind(runner, prompt: int) -> None:
    """Back to the first decode step of a ``prompt``-token call, so replayed steps stay inside the buffers."""
    runner.buffers.slot.fill_(prompt)
    runner.buffers.step.fill_(1)


def graph_replay_us(runner, prompt: int, replays: int = 64) -> float:
    """Microseconds per replay of the runner's captured step; leaves it rewound."""
    rewind(runner, prompt)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        runner.graph.replay()
    end.record()
    torch.cuda.synchronize()
    rewind(runner, prompt)
    return start.elapsed_time(end) / replays * 1e3


def measure(model, ids, kwargs, prompt: int) -> dict:
    (patch,) = model._bettertransformer_state.patches
    patch.generation.runners.clear()
    model.generate(ids, **kwargs)  # compiles, captures
    runner = list(patch.generation.runners.values())[-1]
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    replay_us = graph_replay_us(runner, prompt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    sequence = [(e.name[:40], round(e.device_time, 2)) for e in kernels]
    new = kwargs["max_new_tokens"]
    best = min(times)
    return dict(
        replay_us=replay_us, kernels=len(kernels), generate_ms=best * 1e3, tok_s=ids.shape[0] * new / best,
        overhead_ms=(best - (new - 1) * replay_us * 1e-6) * 1e3, sequence=sequence,
    )  # fmt: skip


def host_phases(model, ids, kwargs) -> dict:
    """Milliseconds per warm generate call in each host-side phase (synchronised around each)."""
    from bettertransformer.adapters import generation

    spent: dict[str, float] = {}

    def timed(owner, name):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                torch.cuda.synchronize()
                spent[name] = spent.get(name, 0.0) + (time.perf_counter() - start) * 1e3

        setattr(owner, name, wrapper)
        return original

    targets = [(generation.FastGenerate, "_plan"), (generation.Runner, "_prefill"), (generation.Runner, "_select")]
    targets += [(generation.Runner, "run"), (generation.FastGenerate, "generate")]
    originals = [(owner, name, timed(owner, name)) for owner, name in targets]
    try:
        for _ in range(5):
            model.generate(ids, **kwargs)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return {name: round(ms / 5, 3) for name, ms in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="defaults and PDL off only")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config()
    prompt = 16 if args.batch == 1 else 64
    ids, mask = left_padded([prompt - (4 * i if args.batch > 1 else 0) for i in range(args.batch)], config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    model = BetterTransformer.transform(build(config))
    variants = {"default": {}, "pdl off": dict(pdl=False)}
    if not args.quick and args.batch > 1:
        for block_ns, block_k, warps in (
            ((16, 32, 64), 128, 4), ((8, 16, 64), 128, 2), ((8, 32, 64), 256, 2), ((16, 64, 128), 128, 4),
            ((8, 32, 64), 64, 2),
        ):  # fmt: skip
            variants[f"n {block_ns} k {block_k} w{warps}"] = dict(config=row_config(block_ns, block_k, warps, False))
    elif not args.quick:
        for block_ns, slab, warps in (
            ((8, 16, 16), 16384, 4), ((8, 16, 32), 16384, 8), ((8, 16, 16), 32768, 8), ((4, 16, 32), 16384, 4),
        ):  # fmt: skip
            variants[f"n {block_ns} slab {slab // 1024}K w{warps}"] = dict(config=row_config(block_ns, slab, warps))
    rows = {}
    for name, settings in variants.items():
        with variant(**settings):
            try:
                rows[name] = measure(model, ids, kwargs, prompt)
            except Exception as problem:  # e.g. out of registers / shared memory
                rows[name] = dict(error=repr(problem)[:200])
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "sequence"}), flush=True)
    print("kernels of one replay (default):", rows["default"].get("sequence"))
    print("host phases, ms per warm call:", host_phases(model, ids, kwargs))
    print(torch.cuda.get_device_name(), torch.__version__, time.strftime("%Y-%m-%d"))
    print(f"{'variant':28s} {'us/step':>8s} {'kernels':>8s} {'generate ms':>12s} {'tok/s':>8s} {'overhead ms':>12s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:28s} {r['error']}")
            continue
        print(
            f"{name:28s} {r['replay_us']:8.1f} {r['kernels']:8d} {r['generate_ms']:12.2f} {r['tok_s']:8.0f} "
            f"{r['overhead_ms']:12.2f}"
        )


if __name__ == "__main__":
    main()
