"""Triton kernels for the memory-bound steps of an encoder layer (CUDA, fp16/bf16, inference).

Each kernel makes one pass over its activations: the residual add and LayerNorm read two rows and write one,
GELU rewrites its input in place. Statistics are accumulated in fp32.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False


if AVAILABLE:

    @triton.jit
    def _add_layer_norm_kernel(X, R, W, B, Y, stride, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride + cols, mask=m, other=0.0).to(tl.float32)
        x += tl.load(R + row * stride + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        d = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _gelu_kernel(X, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        tl.store(X + offs, y.to(X.dtype.element_ty), mask=m)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual); x, residual: (T, N) contiguous, same dtype."""
    x = x.contiguous()
    residual = residual.contiguous()
    rows, n = x.shape
    y = torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(n)
        warps = 4 if block <= 1024 else 8
        _add_layer_norm_kernel[(rows,)](x, residual, weight, bias, y, x.stride(0), n, eps, BLOCK=block, num_warps=warps)
    return y


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU in place on a contiguous tensor; returns it."""
    n = x.numel()
    if n:
        block = 4096
        _gelu_kernel[(triton.cdiv(n, block),)](x, n, BLOCK=block, num_warps=8)
    return x
