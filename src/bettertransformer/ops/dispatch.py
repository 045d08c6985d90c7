"""When our Triton kernels run instead of PyTorch's: one rule, read by every op that has a kernel."""

from __future__ import annotations

import torch

from ..switches import SWITCHES
from . import triton_kernels


def use_triton(x: torch.Tensor) -> bool:
    """Our kernels take ``x``: Triton is installed and switched on, ``x`` is an fp16/bf16 CUDA tensor (or any
    device's under Triton's interpreter), and no gradient flows through it (the kernels have no backward)."""
    return (
        SWITCHES.triton
        and triton_kernels.AVAILABLE
        and (x.is_cuda or triton_kernels.INTERPRETED)
        and x.dtype in (torch.float16, torch.bfloat16)
        and not (torch.is_grad_enabled() and x.requires_grad)
    )
