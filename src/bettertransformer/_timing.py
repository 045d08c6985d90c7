"""Wall-clock timing for the demo and the command line (the benchmarks/ scripts use CUDA events)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_ms(fn: Callable[[], Any], repeats: int, device: Any) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after one warm-up, synchronising a CUDA device."""
    import torch

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
