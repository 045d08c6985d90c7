"""Small fused pieces of a transformer layer, with a plain PyTorch version as the reference.

On CUDA in fp16/bf16, when no gradient is needed, the Triton kernels of ``triton_kernels`` run instead: they
read and write each activation once. Everywhere else (CPU, fp32, training) the PyTorch composition runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_kernels


# Benchmarks switch this off to measure what the kernels buy.
USE_TRITON = True
# In fp16/bf16 inference on CUDA, GELU runs inside the cuBLASLt matmul epilogue, which computes the tanh
# approximation: it differs from the exact GELU by at most 4.7e-4 (at x = 2.7), at most one fp16 ulp of the output,
# and saves a pass over the FFN activations (0.6 ms of 7.8 on the canonical encoder workload; the error against
# fp32 measured 1.14e-2, stock fp16 1.31e-2, see BENCHMARKS.md). Set False for the exact GELU (a Triton kernel).
GELU_EPILOGUE = True


def _use_triton(x: torch.Tensor) -> bool:
    return (
        USE_TRITON
        and triton_kernels.AVAILABLE
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension. x, residual: (T, N)."""
    if _use_triton(x) and weight is not None and bias is not None and weight.dtype == x.dtype:
        return triton_kernels.add_layer_norm(x, residual, weight, bias, eps)
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu(x @ weight.T + bias), the exact (erf) GELU, or its tanh approximation in fp16/bf16 CUDA inference
    (see ``GELU_EPILOGUE``). x: (T, K) -> (T, N)."""
    if GELU_EPILOGUE and bias is not None and _use_triton(x):
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    y = F.linear(x, weight, bias)
    if _use_triton(y):
        return triton_kernels.gelu_(y)
    return F.gelu(y)
