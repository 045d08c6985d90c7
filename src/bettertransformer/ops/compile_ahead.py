"""Compiling a step's Triton kernels together, on threads, before it first runs.

A kernel variant Triton has not compiled before costs ~0.3 s to compile and, on Triton releases that build a C
launcher per kernel signature, ~0.4 s more to build that launcher; a decode step meeting ten new variants one after
the other spent ~7 s before its first token (TinyLlama, an empty Triton cache, H200). Most of that time is spent
waiting on subprocesses (ptxas, the C compiler) and in native code, so the variants compile in parallel on threads.

Every launch in ``ops`` goes through ``launch``. Inside ``compiling_ahead()`` a launch does not run: it starts the
compilation of the variant it would run (Triton's asynchronous compile mode, with a thread pool), and the block's
end waits for every compilation and loads each kernel (building its launcher) on the pool as well. The code inside
the block runs its PyTorch operations on whatever the skipped kernels would have written, so it is used only on
scratch state: the caller restores what the block wrote (``generation.Runner._compile_ahead``).

Where Triton has no asynchronous compile mode, or ``SWITCHES.compile_ahead`` is off, the block runs nothing ahead,
and kernels compile at their first launch as before.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..switches import SWITCHES

try:
    from triton.runtime._async_compile import AsyncCompileMode

    SUPPORTED = True
except ImportError:  # CPU-only installs, Triton before 3.5
    SUPPORTED = False

_local = threading.local()  # .compiled: the kernels started in this thread's compiling_ahead block, or None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or inside ``compiling_ahead`` the start of its compilation only."""
    compiled = getattr(_local, "compiled", None)
    if compiled is None:
        kernel[grid](*args, **kwargs)
    else:
        compiled.append(kernel.warmup(*args, grid=grid, **kwargs))


def _load(kernel: Any, device: torch.device) -> None:
    """Load a compiled kernel onto ``device`` and build its launcher (what its first launch would do)."""
    with torch.cuda.device(device):
        kernel = kernel.result() if hasattr(kernel, "result") else kernel
        init = getattr(kernel, "_init_handles", None)
        if init is not None:
            init()


@contextlib.contextmanager
def compiling_ahead(device: torch.device, threads: int | None = None) -> Iterator[bool]:
    """Launches through ``launch`` in this block compile their kernels on ``threads`` threads instead of running;
    on leaving, every one is compiled and loaded. Yields whether it does (False: launches run as usual)."""
    if (
        not (SUPPORTED and SWITCHES.compile_ahead)
        or device.type != "cuda"
        or getattr(_local, "compiled", None) is not None
    ):
        yield False
        return
    workers = threads or min(16, os.cpu_count() or 1)
    compiled: list[Any] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="bettertransformer-compile") as pool:
        with AsyncCompileMode(pool):  # its end waits for every compilation (and raises the first that failed)
            _local.compiled = compiled
            try:
                yield True
            finally:
                _local.compiled = None
        # Reached when the block and every compilation succeeded: load the kernels in parallel too, each once (two
        # threads loading one kernel would both build its launcher).
        unique = list({id(kernel): kernel for kernel in compiled if kernel is not None}.values())
        for future in [pool.submit(_load, kernel, device) for kernel in unique]:
            future.result()
