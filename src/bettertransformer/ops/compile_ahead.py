"""Compiling a step's Triton kernels together, on threads, before it first runs.

A kernel variant Triton has not compiled before costs ~0.3 s to compile and, on Triton releases that build a C
launcher per kernel signature, ~0.4 s more to build that launcher; a decode step meeting ten new variants one after
the other spent ~7 s before its first token (TinyLlama, an empty Triton cache, H200). Most of that time is spent
waiting on subprocesses (ptxas, the C compiler) and in native code, so the variants compile in parallel on threads.

Every launch in ``ops`` goes through ``launch``. Inside ``compiling_ahead()`` a launch does not run: it is recorded,
and at the block's end each recorded variant starts compiling (Triton's asynchronous compile mode, with a thread
pool). Each kernel is loaded (its launcher built) on a second pool as soon as its own compilation ends, and the
block's end waits for every compilation and every load. The code inside the block runs its PyTorch operations on
whatever the skipped kernels would have written, so it is used only on scratch state: the caller restores what the
block wrote (``generation.Runner._compile_ahead``).

Before its first compilation a process pays Triton's own set-up: hashing its library for the cache keys and
building its CUDA driver module (~1.2 s one after the other on an H200 host with an empty cache). ``start_setup``
begins both on threads (``transform`` calls it for a model on a GPU, and every ``compiling_ahead`` block); the
block's Python runs meanwhile, since its launches only record.

Where Triton has no asynchronous compile mode, or ``SWITCHES.compile_ahead`` is off, the block runs nothing ahead,
and kernels compile at their first launch as before.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..switches import SWITCHES

try:
    from triton.runtime._async_compile import AsyncCompileMode

    SUPPORTED = True
except ImportError:  # CPU-only installs, Triton before 3.5
    SUPPORTED = False

_local = threading.local()  # .ahead: this thread's compiling_ahead block (an _Ahead), or None
_setup_lock = threading.Lock()
_setup: list[Future] = []  # Triton's set-up, once started (start_setup)


def _triton_key() -> None:
    """The cache key of Triton itself: a hash of its sources and its ~0.5 GB library, kept for the process."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # Triton before 3.6 keeps it with the compiler
        from triton.compiler.compiler import triton_key
    triton_key()


def _triton_driver() -> None:
    """Triton's CUDA driver module: compiled with the system's C compiler on an empty cache, then loaded."""
    import triton

    triton.runtime.driver.active.utils  # noqa: B018 - the attribute builds and loads the module


def start_setup() -> list[Future]:
    """Start what a process's first Triton compilation would do first, once (later calls return the same futures):
    Triton's cache key and its driver module, independent of each other, on two threads. Empty where kernels are
    not compiled ahead. Failures are left to the first compilation, which repeats the work."""
    global _setup
    with _setup_lock:
        if not _setup and SUPPORTED and SWITCHES.compile_ahead and torch.version.cuda is not None:
            workers = ThreadPoolExecutor(2, thread_name_prefix="bettertransformer-triton-setup")
            _setup = [workers.submit(_triton_key), workers.submit(_triton_driver)]
            workers.shutdown(wait=False)
    return _setup


def _launcher_builder() -> Any:
    """Where Triton builds a C launcher per kernel signature (3.6: ~0.3 s of the C compiler each, when the kernel is
    first loaded), a function that builds the one a variant compiled from an ``ASTSource`` will load, into Triton's
    cache, as its ``CudaLauncher`` would (the launcher depends on the signature and constants only, not on the
    compiled code); None where Triton has no such step."""
    try:
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime.build import compile_module_from_src

        make_launcher = nvidia.make_launcher
        library_dirs, include_dirs, libraries = nvidia.library_dirs, nvidia.include_dirs, nvidia.libraries
    except (ImportError, AttributeError):
        return None

    def build(src: Any) -> None:
        if any(str(kind).startswith("tensordesc") for kind in src.signature.values()):
            return  # its launcher depends on the compiled code's descriptor layouts too: left to the load
        index = {name: (i,) for i, name in enumerate(src.fn.arg_names)}
        constants = {index.get(k, k): v for k, v in getattr(src, "constants", {}).items()}
        code = make_launcher(constants, dict(src.signature), None)
        compile_module_from_src(
            src=code, name="__triton_launcher", library_dirs=library_dirs(), include_dirs=include_dirs,
            libraries=libraries,
        )  # fmt: skip

    return build


class _Compiles(AsyncCompileMode if SUPPORTED else object):  # type: ignore[misc]
    """Triton's asynchronous compile mode that also starts building each new variant's C launcher (``build``,
    given the variant's source) on the same pool, beside its compilation, instead of after it: the launcher was
    the last ~0.3 s of the first call's longest chain (H200, Triton 3.6). A failed build is left to the load, which
    builds the launcher again (and raises)."""

    def __init__(self, executor: ThreadPoolExecutor, build: Any):
        super().__init__(executor)
        self.pool, self.build = executor, build

    def submit(self, key: Any, compile_fn: Any, *rest: Any) -> Any:
        src = _free_variable(compile_fn, "src") if self.build is not None else None
        if src is not None and key not in self.future_kernels:
            self.pool.submit(_quietly, self.build, src)
        return super().submit(key, compile_fn, *rest)


def _free_variable(function: Any, name: str) -> Any:
    """The value of a closure's free variable ``name``, or None."""
    names = getattr(getattr(function, "__code__", None), "co_freevars", ())
    if name not in names or not function.__closure__:
        return None
    return function.__closure__[names.index(name)].cell_contents


def _quietly(function: Any, *args: Any) -> None:
    with contextlib.suppress(Exception):
        function(*args)


def _likeness(value: Any) -> Any:
    """What of a launch argument can select another kernel variant: a tensor's dtype and whether its data is
    16-byte aligned (Triton specialises pointers on that), a TMA descriptor's dtype and block, any other value
    itself."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if hasattr(value, "block_shape") and hasattr(value, "base"):  # a host-side TMA descriptor
        return ("descriptor", value.base.dtype, tuple(value.block_shape), value.padding)
    return value


class _Ahead:
    """The kernels one ``compiling_ahead`` block started: each is loaded (its launcher built) on ``loader`` as soon
    as its compilation ends, so launcher builds overlap the compilations still running."""

    def __init__(self, device: torch.device, loader: ThreadPoolExecutor):
        self.device, self.loader = device, loader
        self.seen: set[int] = set()
        self.loads: list[Future] = []
        # The first launch of each kind: the same kernel with arguments alike in what Triton specialises on. A
        # step's layers repeat the same ~5 launches; keeping one of each bounds the tensors held (a long prompt's
        # activations, layer after layer) and the ``warmup`` calls, each costing the main thread milliseconds.
        self.kinds: dict[Any, tuple[Any, tuple[int, ...], tuple, dict]] = {}

    def record(self, kernel: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        kind: Any = (id(kernel), tuple(map(_likeness, args)), tuple((k, _likeness(v)) for k, v in kwargs.items()))
        try:
            hash(kind)
        except TypeError:  # an argument Triton does not hash either: a kind of its own
            kind = object()
        self.kinds.setdefault(kind, (kernel, grid, args, kwargs))

    def compile_recorded(self) -> None:
        """Start the compilation of each recorded kind's variant. The arguments are the recorded objects, so the
        specialisation is the one the launch would have had; two launches taken for one kind that Triton would
        tell apart leave the second variant to compile at its first launch."""
        kinds, self.kinds = self.kinds, {}
        for kernel, grid, args, kwargs in kinds.values():
            self.started(kernel.warmup(*args, grid=grid, **kwargs))

    def started(self, kernel: Any) -> None:
        # A FutureKernel's own compile future (taken now: its result() clears it once finalised), or the kernel
        # itself when Triton had it compiled already.
        target = getattr(kernel, "future", None) or kernel
        if kernel is not None and id(target) not in self.seen:
            self.seen.add(id(target))
            self.loads.append(self.loader.submit(_load, target, self.device))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or inside ``compiling_ahead`` a record of it, compiled at the block's end."""
    ahead = getattr(_local, "ahead", None)
    if ahead is None:
        kernel[grid](*args, **kwargs)
    else:
        ahead.record(kernel, grid, args, kwargs)


def _load(target: Any, device: torch.device) -> None:
    """Wait for a kernel's compilation (``target``: its compile future, or the compiled kernel), then load it onto
    ``device`` and build its launcher, as its first launch would."""
    kernel = target.result() if isinstance(target, Future) else target
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        with torch.cuda.device(device):
            init()


@contextlib.contextmanager
def compiling_ahead(device: torch.device, threads: int | None = None) -> Iterator[bool]:
    """Launches through ``launch`` in this block compile their kernels on ``threads`` threads instead of running;
    each kernel is loaded as its compilation ends, and on leaving every one is compiled and loaded. Yields whether
    it does (False: launches run as usual)."""
    if (
        not (SUPPORTED and SWITCHES.compile_ahead)
        or device.type != "cuda"
        or getattr(_local, "ahead", None) is not None
    ):
        yield False
        return
    setup = start_setup()
    workers = threads or min(16, os.cpu_count() or 1)
    # Two pools: a load waits on its compilation, so loads sharing the compilers' threads could hold every one.
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="bettertransformer-compile") as compilers,
        ThreadPoolExecutor(workers, thread_name_prefix="bettertransformer-load") as loader,
    ):
        ahead = _Ahead(device, loader)
        # The mode's end waits for every compilation (and raises the first that failed).
        with _Compiles(compilers, _launcher_builder()):
            _local.ahead = ahead
            try:
                yield True
            finally:
                _local.ahead = None
            for part in setup:
                with contextlib.suppress(Exception):  # a failed set-up is repeated (and raised) by the compilations
                    part.result()
            ahead.compile_recorded()
        for load in ahead.loads:
            load.result()
