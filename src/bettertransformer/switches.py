"""The switchboard: every choice a user, a test or a benchmark may flip, in one object.

The defaults are the fastest exact choices measured (BENCHMARKS.md). Benchmarks compare variants with
``switched``, which restores the previous values on exit::

    from bettertransformer.switches import switched
    with switched(triton=False):
        ...  # PyTorch's kernels instead of ours

The switchboard is process-wide (as the kernels it steers are); flip switches between calls, not while another
thread runs a transformed model. It imports neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Switches:
    """What each switch does.

    triton:            our Triton kernels on CUDA in fp16/bf16 inference (LayerNorm+residual, GELU, the decode
                       step's kernels); False runs the PyTorch compositions they replace.
    gelu_epilogue:     GELU inside the cuBLASLt epilogue of the FFN product in fp16/bf16 CUDA inference (the tanh
                       form, within one fp16 ulp of the exact GELU; saves a pass over the FFN activations). False
                       runs the exact GELU.
    attention_backend: force one backend of ``ops.attention.packed_attention`` ("triton", "varlen", "dense",
                       "loop"); None picks the fastest exact one per call.
    pdl:               programmatic dependent launch of the decode-step kernels on Hopper and newer.
    tma:               the decode step's several-row products without an epilogue (a Llama layer's q|k|v) read
                       their weights through TMA descriptors on Hopper and newer; False reads them with pointer loads.
    compile_ahead:     ``generate`` compiles a new shape's Triton kernels together, on threads, before its first call
                       (``ops.compile_ahead``); False compiles each at its first launch.
    generate_devices:  device types on which ``generate`` runs the static-cache loop; elsewhere transformers'
                       generate runs.
    max_graphs:        per transformed model, how many static-cache runners (key/value buffers plus a captured
                       step) ``generate`` keeps; the least recently used is dropped beyond it.
    max_graph_bytes:   per transformed model, the most bytes of key/value buffers those runners may hold
                       together (the least recently used go first; the runner in use is always kept).
    training_graphs:   per transformed encoder, how many padded shapes of its layer stack's training forward and
                       backward are kept as captured CUDA graphs (``adapters.graphed_stack``; the least recently
                       used is dropped beyond it); 0 runs training eagerly.
    """

    triton: bool = True
    gelu_epilogue: bool = True
    attention_backend: str | None = None
    pdl: bool = True
    tma: bool = True
    compile_ahead: bool = True
    generate_devices: frozenset[str] = frozenset({"cuda", "cpu"})
    max_graphs: int = 16
    max_graph_bytes: int = 4 << 30
    training_graphs: int = 8


SWITCHES = Switches()


@contextlib.contextmanager
def switched(**changes: Any) -> Iterator[Switches]:
    """Set switches for the duration of a ``with`` block; the previous values come back on exit."""
    names = {f.name for f in dataclasses.fields(Switches)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"unknown switches {unknown}; the switches are {sorted(names)}")
    previous = {name: getattr(SWITCHES, name) for name in changes}
    for name, value in changes.items():
        setattr(SWITCHES, name, frozenset(value) if name == "generate_devices" else value)
    try:
        yield SWITCHES
    finally:
        for name, value in previous.items():
            setattr(SWITCHES, name, value)
