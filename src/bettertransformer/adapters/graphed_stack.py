"""A packed encoder's layer stack in training, replayed from two captured CUDA graphs (forward and backward).

A BERT-base fine-tuning step on an H200 waits on the host: 25-45 ms of Python, autocast and autograd bookkeeping
for ~20 ms of GPU work (~850 kernel launches, BENCHMARKS.md). Captured, the stack's forward and backward are one
replay each, whatever the number of layers.

A graph runs fixed shapes, so each call's packed tokens are padded up to a bucket (``token_bucket``: at most 1/8
more tokens, 16 sizes per doubling) by dummy sequences of at most ``DUMMY_LENGTH`` tokens, and the row offsets up
to a multiple of ``ROW_STEP`` sequences by empty ones. A dummy token attends only to its own dummy sequence, and
every operation of a layer but attention works token by token, so real tokens' outputs are what they are without
the padding; the dummy rows' outputs are dropped and their output gradients are zero, so every gradient they add
to a parameter is zero. The graphs of one stack share a memory pool, which is safe because one captured call at a
time is in flight: a forward while another's backward is pending runs eagerly, and a backward whose activations a
later replay overwrote raises instead of returning wrong gradients.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ops.padding import PackInfo
from .capture import capture

logger = logging.getLogger("bettertransformer")

DUMMY_LENGTH = 64  # tokens per dummy sequence (their attention is a 64 x 64 block each)
ROW_STEP = 16  # row-offset capacity grows in steps of this many sequences
LENGTH_STEP = 128  # the longest sequence a graph admits grows in steps of this many tokens
MIN_TOKENS = 128

Stack = Callable[[torch.Tensor, PackInfo], torch.Tensor]

# While a stack is warmed up and captured: the half dtype its products run in. The layers then take the products
# whose backward is written for the GPU (``ops.fused.half_linear``): their Python costs nothing once captured.
_CAPTURING: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "bettertransformer_capturing", default=None
)


def capture_dtype() -> torch.dtype | None:
    """The half dtype of the products of a stack being captured, else None."""
    return _CAPTURING.get()


@contextlib.contextmanager
def _capturing(dtype: torch.dtype):
    token = _CAPTURING.set(dtype)
    try:
        yield
    finally:
        _CAPTURING.reset(token)


BUCKET_BITS = 4  # 2**BUCKET_BITS token buckets per doubling


def _bucket_step(tokens: int) -> int:
    return 1 << max(0, tokens.bit_length() - 1 - BUCKET_BITS)


def token_bucket(tokens: int) -> int:
    """The token count a graph runs for ``tokens`` real ones: the next multiple of 1/16 of the power of two below
    it (at most 1/8 more), and at least ``MIN_TOKENS``."""
    return MIN_TOKENS if tokens <= MIN_TOKENS else _round_up(tokens, _bucket_step(tokens))


def _most_extra(bucket: int) -> int:
    """An upper bound on the padding tokens of any count ``token_bucket`` maps to ``bucket``."""
    return MIN_TOKENS if bucket <= MIN_TOKENS else _bucket_step(bucket)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


@dataclass(frozen=True)
class Padded:
    """A call's layout padded to its graph's shapes: ``tokens`` rows, ``rows`` sequences (real ones first, then
    dummies, then empty ones), the longest ``max_len`` long."""

    lengths: torch.Tensor  # (rows,) int64 on the CPU
    tokens: int
    rows: int
    max_len: int

    @staticmethod
    def of(host_lengths: torch.Tensor) -> Padded:
        real = host_lengths.to(torch.int64)
        total = int(real.sum())
        tokens = token_bucket(total)
        extra = tokens - total
        dummies = [DUMMY_LENGTH] * (extra // DUMMY_LENGTH) + ([extra % DUMMY_LENGTH] if extra % DUMMY_LENGTH else [])
        used = real.numel() + len(dummies)
        # Room for the most dummies of this token bucket, so that the row count depends on the batch size only.
        most = -(-_most_extra(tokens) // DUMMY_LENGTH)
        rows = _round_up(max(used, real.numel() + most) + 1, ROW_STEP) - 1  # rows + 1 offsets: a multiple of ROW_STEP
        lengths = torch.cat(
            [real, torch.tensor(dummies, dtype=torch.int64), torch.zeros(rows - used, dtype=torch.int64)]
        )
        longest = max(int(real.max()) if real.numel() else 0, DUMMY_LENGTH)
        return Padded(lengths, tokens, rows, _round_up(longest, LENGTH_STEP))

    def offsets(self) -> torch.Tensor:
        """(rows + 1,) int32 on the CPU: where each sequence starts."""
        offsets = torch.zeros(self.rows + 1, dtype=torch.int32)
        offsets[1:] = self.lengths.cumsum(0)
        return offsets

    def info(self, cu_seqlens: torch.Tensor) -> PackInfo:
        """The padded layout as a ``PackInfo`` over the offsets ``cu_seqlens``: a (rows, max_len) grid whose rows
        hold the sequences left-aligned. (A graph's attention reads the offsets and ``max_len`` only: the offsets
        are rewritten before each replay.)"""
        starts = torch.arange(self.rows, dtype=torch.int64) * self.max_len
        indices = torch.repeat_interleave(starts, self.lengths) + torch.cat(
            [torch.arange(int(n), dtype=torch.int64) for n in self.lengths]
        )
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
        host = self.lengths.to(torch.int32)
        return PackInfo(indices.to(cu_seqlens.device), cu_seqlens, lengths, host, self.max_len, self.rows, self.max_len)


def run_padded(stack: Stack, x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """``stack`` on ``x`` padded as a graph would run it, eagerly; the real tokens' rows. (What a graph replays,
    for checking on any device that the padding changes nothing.)"""
    padded = Padded.of(info.host_lengths)
    tokens = x.shape[0]
    full = torch.cat([x, x.new_zeros(padded.tokens - tokens, *x.shape[1:])])
    return stack(full, padded.info(padded.offsets().to(x.device)))[:tokens]


@contextlib.contextmanager
def _aliased(slots: Sequence[tuple[nn.Module, str]]):
    """Each parameter in ``slots`` replaced, for the block, by a new leaf on the same storage (what a captured graph
    reads is the parameter itself), whose gradient node is made on the capturing stream: differentiating the
    parameters' own leaves joins their gradient nodes' stream, the default one when DDP keeps them (a capture
    error). Yields the aliases in slot order."""
    made: dict[int, nn.Parameter] = {}
    saved = []
    try:
        for module, name in slots:
            param = module._parameters[name]
            assert param is not None
            alias = made.setdefault(id(param), nn.Parameter(param.detach(), requires_grad=param.requires_grad))
            saved.append((module, name, param))
            module._parameters[name] = alias
        yield [made[id(param)] for _, _, param in saved]
    finally:
        for module, name, param in saved:
            module._parameters[name] = param


def _views(flat: dict[torch.dtype, torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One view per parameter, shaped like it, into the flat buffer of its dtype, in order (the sinks' layout)."""
    views = []
    filled = collections.Counter[torch.dtype]()
    for p in params:
        start = filled[p.dtype]
        views.append(flat[p.dtype][start : start + p.numel()].view_as(p))
        filled[p.dtype] += p.numel()
    return views


class _InFlight:
    """Held by the autograd node of a replayed forward: alive while its backward may still come."""


class _Graphs:
    """One shape's captured forward and backward, with the static tensors they read and write."""

    def __init__(
        self,
        stack: Stack,
        slots: Sequence[tuple[nn.Module, str]],
        params: Sequence[torch.Tensor],
        x: torch.Tensor,
        padded: Padded,
        pool: Any,
        sinks: dict[torch.dtype, torch.Tensor],
        autocast: tuple[bool, torch.dtype],
    ):
        device = x.device
        self.tokens = padded.tokens
        self.grad_params = [p for p in params if p.requires_grad]
        self.wants_x = x.requires_grad
        self.static_x = torch.zeros(padded.tokens, *x.shape[1:], dtype=x.dtype, device=device)
        self.static_x[: x.shape[0]].copy_(x.detach())
        self.static_x.requires_grad_(self.wants_x)
        self.cu = padded.offsets().to(device)
        info = padded.info(self.cu)
        enabled, dtype = autocast

        half = dtype if enabled else x.dtype

        def forward() -> torch.Tensor:
            with torch.enable_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                with _capturing(half):
                    return stack(self.static_x, info)

        with _aliased(slots) as aliases:
            inputs = ([self.static_x] if self.wants_x else []) + [a for a in aliases if a.requires_grad]
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: cuBLAS handles and workspaces, lazily loaded kernels
                    out = forward()
                    torch.autograd.grad(out, inputs, torch.zeros_like(out), allow_unused=True)
                del out
            torch.cuda.current_stream(device).wait_stream(side)

            self.forward_graph = torch.cuda.CUDAGraph()
            with capture(self.forward_graph, pool):
                self.static_out = forward()
            self.static_grad = torch.zeros_like(self.static_out)
            # The parameters' gradients are written into the stack's sinks (one flat buffer per dtype, shared by its
            # graphs), from which each backward hands out a fresh copy.
            self.sink_views = _views(sinks, self.grad_params)
            self.backward_graph = torch.cuda.CUDAGraph()
            with capture(self.backward_graph, pool):
                grads = torch.autograd.grad(self.static_out, inputs, self.static_grad, allow_unused=True)
                self.static_grad_x = grads[0] if self.wants_x else None
                param_grads = grads[1:] if self.wants_x else grads
                pairs = list(zip(self.sink_views, param_grads, strict=True))
                for view, grad in pairs:
                    if grad is None:
                        view.zero_()
                written = [(view, grad) for view, grad in pairs if grad is not None]
                if written:  # one multi-tensor copy, not one copy per parameter (~200 for BERT-base: 0.66 ms)
                    torch._foreach_copy_([view for view, _ in written], [grad for _, grad in written])
            del grads, param_grads

    def run_forward(self, x: torch.Tensor, padded: Padded) -> torch.Tensor:
        tokens = x.shape[0]
        self.static_x.detach()[:tokens].copy_(x)
        self.static_x.detach()[tokens:].zero_()  # another graph of the pool may have written here
        self.cu.copy_(padded.offsets())
        self.forward_graph.replay()
        return self.static_out[:tokens].clone()

    def run_backward(
        self, grad: torch.Tensor, sinks: dict[torch.dtype, torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        tokens = grad.shape[0]
        self.static_grad[:tokens].copy_(grad)
        self.static_grad[tokens:].zero_()
        self.backward_graph.replay()
        grad_x = None if self.static_grad_x is None else self.static_grad_x[:tokens].clone()
        return grad_x, _views({dtype: sink.clone() for dtype, sink in sinks.items()}, self.grad_params)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, owner: GraphedStack, graphs: _Graphs, padded: Padded, x: torch.Tensor, *params: Any):
        ctx.owner, ctx.graphs = owner, graphs
        ctx.in_flight = _InFlight()
        owner.generation += 1
        ctx.generation = owner.generation
        owner.in_flight = weakref.ref(ctx.in_flight)
        return graphs.run_forward(x, padded)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        owner, graphs = ctx.owner, ctx.graphs
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a captured training stack has no double backward (create_graph=True); turn the graphs off with "
                "bettertransformer.switches.switched(training_graphs=0)"
            )
        if ctx.in_flight is None or owner.generation != ctx.generation:
            raise RuntimeError(
                "this backward's saved activations were overwritten by a later forward of the same captured stack "
                "(backward twice, or a backward after another forward's); turn the graphs off with "
                "bettertransformer.switches.switched(training_graphs=0)"
            )
        ctx.in_flight = None
        owner.in_flight = None
        grad_x, grads = graphs.run_backward(grad.contiguous(), owner.sinks)
        wanted = iter(grads)
        param_grads = [next(wanted) if p.requires_grad else None for p in owner.params]
        return (None, None, None, grad_x, *param_grads)


class GraphedStack:
    """A packed layer stack's captured training graphs, one pair per padded shape (the least recently used dropped
    beyond ``limit``)."""

    def __init__(self, stack: Stack, modules: Sequence[nn.Module]):
        self.stack = stack
        # (module, name) of each parameter the stack reads, once each.
        seen: dict[int, tuple[nn.Module, str]] = {}
        for module in modules:
            for owner in module.modules():
                for name, p in owner._parameters.items():
                    if p is not None:
                        seen.setdefault(id(p), (owner, name))
        self.slots = list(seen.values())
        self.params: list[torch.Tensor] = [getattr(owner, name) for owner, name in self.slots]
        self.graphs: collections.OrderedDict[tuple, _Graphs] = collections.OrderedDict()
        self.pool: Any = None
        self.sinks: dict[torch.dtype, torch.Tensor] = {}
        self._sink_layout: tuple = ()
        self.generation = 0
        self.in_flight: Callable[[], Any] | None = None

    def busy(self) -> bool:
        """A replayed forward's backward may still come: another forward must not overwrite its activations."""
        return self.in_flight is not None and self.in_flight() is not None

    def clear(self) -> None:
        self.graphs.clear()
        self.sinks = {}
        self._sink_layout = ()
        self.pool = None

    def __call__(self, x: torch.Tensor, info: PackInfo, limit: int, state: tuple = ()) -> torch.Tensor | None:
        """The stack's output on ``x`` (T, hidden), replayed (captured first for a new shape, ``state`` or
        parameter set); None when a capture failed (logged). The caller checks ``busy`` first."""
        padded = Padded.of(info.host_lengths)
        enabled = torch.is_autocast_enabled("cuda")
        autocast = (enabled, torch.get_autocast_dtype("cuda"))
        params = self.params
        key = (
            padded.tokens, padded.rows, padded.max_len, x.dtype, x.shape[1:], x.device, x.requires_grad, autocast, state,
            tuple((p.data_ptr(), p.dtype, p.requires_grad) for p in params),
        )  # fmt: skip
        graphs = self.graphs.get(key)
        if graphs is None:
            graphs = self._capture(key, x, padded, autocast, limit)
            if graphs is None:
                return None
        else:
            self.graphs.move_to_end(key)
        return _Replay.apply(self, graphs, padded, x, *params)

    def _capture(self, key: tuple, x: torch.Tensor, padded: Padded, autocast: tuple, limit: int) -> _Graphs | None:
        while len(self.graphs) >= max(1, limit):
            self.graphs.popitem(last=False)
        layout = tuple((p.dtype, p.numel()) for p in self.params if p.requires_grad)
        if layout != self._sink_layout or any(s.device != x.device for s in self.sinks.values()):
            sizes = collections.Counter[torch.dtype]()
            for dtype, numel in layout:
                sizes[dtype] += numel
            self.sinks = {dtype: torch.empty(n, dtype=dtype, device=x.device) for dtype, n in sizes.items()}
            self._sink_layout = layout
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graphs = _Graphs(self.stack, self.slots, self.params, x, padded, self.pool, self.sinks, autocast)
        except Exception as error:  # noqa: BLE001 - the stack trains eagerly instead, and says why
            logger.warning("capturing the encoder's training graphs failed, training eagerly: %s", error)
            self.clear()
            return None
        self.graphs[key] = graphs
        return graphs
