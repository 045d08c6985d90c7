"""Capturing CUDA graphs safely in a process that does other things: one capture at a time, in CUDA's thread-local
mode (other threads' work, a DataLoader's pinned copies say, neither disturbs a capture nor fails because of it),
with Python's cycle collector paused, and a failed capture's leftovers cleaned up. The fast ``generate``'s steps
and the encoders' training graphs both capture through ``capture``."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from typing import Any

import torch

# One capture at a time in this process: entering a capture synchronizes the device, which another thread's
# capture in progress would not survive.
_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def capture(graph: Any, pool: Any = None) -> Iterator[None]:
    """``torch.cuda.graph(graph, pool)`` in thread-local mode, under the process's capture lock, with the cycle
    collector paused: a collection may free an unreachable model's CUDA graph (a transformed model is a reference
    cycle), and destroying a graph while a capture runs invalidates the capture. A capture that fails is cleaned
    up (``_end_failed_capture``) and its error raised."""
    with _CAPTURE_LOCK:
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                yield
        except Exception:
            torch.cuda.synchronize()
            _end_failed_capture(pool)
            raise
        finally:
            if enabled:
                gc.enable()


def _end_failed_capture(pool: Any) -> None:
    """Close the allocator's recording into ``pool`` that a failed capture left open.

    A capture that fails inside its body makes ``capture_end`` raise before it tells the caching allocator that the
    capture is over: the pool stays "being recorded to", so every later capture into it (the model's other graphs)
    fails with "already recording to mempool_id", and the failed capture's hold on the pool is never released.
    Ending the recording (and, only when it was still open, dropping that hold) undoes both; if the capture failed
    before the recording began, there is nothing to end and nothing is released. (The runner also moves later
    captures to a fresh pool: the pinned host allocator keeps its own mark on this one.)"""
    _close_generator_capture()
    if pool is None:
        return
    device = torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(device, pool)
    except Exception:  # not recording to it: the capture failed before the recording began, or after it ended
        return
    torch._C._cuda_releasePool(device, pool)


def _close_generator_capture() -> None:
    """Take the device's random generator out of capture mode, where a failed capture leaves it.

    ``capture_end`` raises before it tells the generator that the capture is over, and from then on every random
    draw outside a graph (``torch.randn``, sampling in ``generate``) raises "Offset increment outside graph capture
    encountered unexpectedly". A tiny capture that ends normally runs the generator's capture epilogue."""
    graph = torch.cuda.CUDAGraph()
    scratch = torch.zeros(1, device="cuda")
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        scratch.add_(1)
