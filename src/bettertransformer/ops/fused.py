"""Small fused pieces of a transformer layer, with a plain PyTorch version as the reference.

On CUDA in fp16/bf16, when no gradient is needed, the Triton kernels of ``triton_kernels`` run instead: they
read and write each activation once. Everywhere else (CPU, fp32, training) the PyTorch composition runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..switches import SWITCHES
from . import triton_kernels
from .dispatch import use_triton


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension. x, residual: (T, N)."""
    if use_triton(x) and weight is not None and bias is not None and weight.dtype == x.dtype:
        return triton_kernels.add_layer_norm(x, residual, weight, bias, eps)
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's RMS norm over the last dimension: x * rsqrt(mean(x^2) + eps) in fp32, rounded to the weight's dtype when
    that is fp16/bf16, times the weight. One Triton kernel on CUDA in fp16/bf16 inference (the PyTorch composition
    is eight kernels)."""
    if use_triton(x) and weight.dtype == x.dtype:
        return triton_kernels.rms_norm(x, weight, eps)
    h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return weight * h


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu(x @ weight.T + bias), the exact (erf) GELU, or its tanh approximation in fp16/bf16 CUDA inference.
    x: (T, K) -> (T, N).

    In fp16/bf16 inference on CUDA, GELU runs inside the cuBLASLt matmul epilogue (``SWITCHES.gelu_epilogue``),
    which computes the tanh approximation: it differs from the exact GELU by at most 4.7e-4 (at x = 2.7), at most
    one fp16 ulp of the output, and saves a pass over the FFN activations (0.6 ms of 7.8 on the canonical encoder
    workload; the error against fp32 measured 1.14e-2, stock fp16 1.31e-2, see BENCHMARKS.md)."""
    if SWITCHES.gelu_epilogue and bias is not None and use_triton(x):
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    y = F.linear(x, weight, bias)
    if use_triton(y):
        return triton_kernels.gelu_(y)
    return F.gelu(y)
