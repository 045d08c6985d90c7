"""Small fused pieces of a transformer layer, with a plain PyTorch version as the reference.

On CUDA in fp16/bf16, when no gradient is needed, the Triton kernels of ``triton_kernels`` run instead: they
read and write each activation once. Everywhere else (CPU, fp32, training) the PyTorch composition runs, but for
decoders' RMSNorms in training, which take PyTorch's fused op (``rms_norm_with_grad``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..switches import SWITCHES
from . import triton_kernels
from .dispatch import use_triton


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    reuse_x: bool = False,
) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension. x, residual: (T, N).

    ``reuse_x``: x is the caller's own temporary (a sublayer's fresh output), which the sum may overwrite when no
    gradient is needed: on the CPU a fresh (T, N) result costs its page faults (with ``linear_gelu``'s in-place
    GELU, +3% on the CPU ``encode`` of the corpus: BENCHMARKS.md)."""
    if use_triton(x) and weight is not None and bias is not None and weight.dtype == x.dtype:
        return triton_kernels.add_layer_norm(x, residual, weight, bias, eps)
    grad = torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad)
    if reuse_x and not grad and torch.result_type(x, residual) == x.dtype and x.shape == residual.shape:
        return F.layer_norm(x.add_(residual), (x.shape[-1],), weight, bias, eps)
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


# PyTorch's RMSNorm op with a fused CUDA kernel and backward (torch 2.8+), or None.
_FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)


def rms_norm_with_grad(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, round_first: bool = True
) -> torch.Tensor | None:
    """A decoder's RMSNorm for training, through PyTorch's fused op (one kernel forward and a fused backward on
    CUDA, where the stock module's composition is seven kernels forward and more backward). None where that op is
    absent or the form does not fit (the caller runs the stock module).

    The two stock forms: ``weight * round(x * r)`` (Llama's, ``round_first``; fused only when x and the weight share
    a dtype, and then rounded once, not twice: the same up to one unit in the last place in fp16/bf16, equal in
    fp32) and ``round(x * r * (offset + weight))`` computed in fp32 (Gemma's, OLMo 2's), where r = rsqrt(mean(x^2) +
    eps) in fp32."""
    op = _FUSED_RMS_NORM
    if op is None:
        return None
    shape = [x.shape[-1]]
    if round_first:
        if offset or weight.dtype != x.dtype:
            return None
        return op(x, shape, weight, eps)[0]
    scale = weight.float() + offset if offset else weight.float()
    return op(x.float(), shape, scale, eps)[0].to(x.dtype)


def conv1d_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    chunk_bytes: int = 1 << 30,
) -> torch.Tensor:
    """conv1d(x, weight, bias, stride, padding, groups) (zero padding, no dilation) as batched matrix products.

    x: (B, C, T) -> (B, O, T'), returned as a transposed view of a (B, T', O) tensor. Each output frame of a group
    reads K consecutive input frames of its C / groups channels: the windows are gathered into a (groups, rows,
    K * C / groups) matrix, ``chunk_bytes`` at most at a time (batch rows at a time), for cuBLAS's tensor-core
    products. cuDNN runs wav2vec2's positional convolution (kernel 128, 16 groups, 768 channels) in fp16 with
    implicit-GEMM kernels that took 42 of the model's 56 ms of kernel time on the H200."""
    batch, channels, length = x.shape
    out_channels, group_channels, kernel = weight.shape
    group_out = out_channels // groups
    padded = length + 2 * padding
    frames = (padded - kernel) // stride + 1
    xp = x.new_zeros(batch, padded, channels)
    xp[:, padding : padding + length] = x.transpose(1, 2)  # (B, T + 2p, C), channels last
    # (G, K * C/G, O/G): output channel o of group g reads window element (k, c) at row k * C/G + c.
    w = weight.view(groups, group_out, group_channels, kernel).permute(0, 3, 2, 1).reshape(groups, -1, group_out)
    out = x.new_empty(batch, frames, out_channels)
    step = max(1, chunk_bytes // max(1, frames * kernel * channels * x.element_size()))
    for start in range(0, batch, step):
        part = xp[start : start + step]
        rows = part.shape[0]
        windows = part.as_strided(
            (rows, frames, kernel, groups, group_channels), (padded * channels, stride * channels, channels, group_channels, 1)
        )  # fmt: skip
        windows = windows.permute(3, 0, 1, 2, 4).reshape(groups, rows * frames, kernel * group_channels)
        y = torch.bmm(windows, w)  # (G, rows * T', O/G)
        out[start : start + rows] = (
            y.view(groups, rows, frames, group_out).permute(1, 2, 0, 3).reshape(rows, frames, -1)
        )
    if bias is not None:
        out += bias
    return out.transpose(1, 2)


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
    if not (torch.is_grad_enabled() and y.requires_grad):
        return torch.ops.aten.gelu_(y)  # in place on our own product: no fresh (T, N) buffer (see add_layer_norm)
    return F.gelu(y)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b returned in ``dtype``: on CUDA, fp16/bf16 operands to fp32 straight out of cuBLAS (``out_dtype``)."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a, b).to(dtype)


class _HalfLinear(torch.autograd.Function):
    """x @ weight.T + bias computed in ``dtype`` (fp16/bf16) whatever the dtypes of x and the parameters, as autocast
    computes it, with a backward written for the GPU: the weight's gradient comes out of cuBLAS in the weight's own
    dtype (no half-precision rounding and cast pass for fp32 master weights) and the bias's as a product with a ones
    row (one pass, where a column sum over the tokens reads the gradient at a fraction of the bandwidth). x: (T, K).

    The weight may come as several matrices stacked along the output (q, k, v: their gradients are views of one
    product's), and with its copy in ``dtype`` made beforehand (``half_weight``, ``half_bias``: a whole stack's
    parameters cast at once instead of one cast per matrix)."""

    @staticmethod
    def forward(ctx, x, half_weight, half_bias, dtype, bias_grad, count, *params):  # type: ignore[override]
        weights, biases = params[:count], params[count:]
        if half_weight is None:
            half_weight = (weights[0] if count == 1 else torch.cat(weights)).to(dtype)
        if half_bias is None and biases:
            half_bias = (biases[0] if count == 1 else torch.cat(biases)).to(dtype)
        xh = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xh, half_weight, half_bias)
        ctx.save_for_backward(xh, half_weight)
        ctx.meta = (x.dtype, weights[0].dtype, biases[0].dtype if biases else None, [w.shape[0] for w in weights])
        ctx.biases = len(biases)
        ctx.bias_grad = bias_grad
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xh, wh = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype, rows = ctx.meta
        count = len(rows)
        grad = grad.contiguous()
        dx = None
        dws = (None,) * count
        dbs = (None,) * ctx.biases
        if ctx.needs_input_grad[0]:
            dx = torch.mm(grad, wh).to(x_dtype)
        if any(ctx.needs_input_grad[6 : 6 + count]):
            dws = _mm(grad.t(), xh, weight_dtype).split(rows)
        if ctx.bias_grad and any(ctx.needs_input_grad[6 + count :]):
            dbs = _mm(grad.new_ones(1, grad.shape[0]), grad, bias_dtype).view(-1).split(rows)
        return dx, None, None, None, None, None, *dws, *dbs


Weights = torch.Tensor | tuple[torch.Tensor, ...]


def half_linear(
    x: torch.Tensor,
    weight: Weights,
    bias: Weights | None,
    dtype: torch.dtype,
    half_weight: torch.Tensor | None = None,
    half_bias: torch.Tensor | None = None,
    bias_grad: bool = True,
) -> torch.Tensor:
    """F.linear(x, weight, bias) in ``dtype`` for training, as autocast to ``dtype`` computes it (``_HalfLinear``).
    x: (T, K) -> (T, N). ``weight`` (and ``bias``) may be a tuple of matrices (vectors) of one dtype stacked along
    the output; ``half_weight`` / ``half_bias``: their stacked copies in ``dtype`` when the caller made them.
    ``bias_grad=False``: the bias's gradient is left to a later operation on the output (``dropout_add_layer_norm_pair``'s
    ``a_bias``)."""
    weights = weight if isinstance(weight, tuple) else (weight,)
    biases = () if bias is None else bias if isinstance(bias, tuple) else (bias,)
    if biases and len(biases) != len(weights):
        raise ValueError("a bias for every stacked weight, or none")
    if len({w.dtype for w in weights}) > 1 or len({b.dtype for b in biases}) > 1:
        raise ValueError("stacked weights (biases) of one dtype")
    return _HalfLinear.apply(x, half_weight, half_bias, dtype, bias_grad, len(weights), *weights, *biases)


class _DropoutAddLayerNorm(torch.autograd.Function):
    """LayerNorm(dropout(a) + x) in one Triton kernel each way (``triton_kernels``), for training on CUDA; with
    ``half``, also the output rounded to that dtype (what the next product reads), whose gradient the backward adds
    to the output's in fp32 (autograd's accumulation of the two, and the cast's backward, in the same kernel)."""

    @staticmethod
    def forward(ctx, a, x, weight, bias, eps, p, out_dtype, half=None, a_bias=None):  # type: ignore[override]
        y, y2, h, mean, rstd, seed = triton_kernels.dropout_add_layer_norm_forward(
            a.contiguous(), x.contiguous(), weight, bias, eps, p, out_dtype, half
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, mean, rstd, weight, seed)
        ctx.meta = (p, a.dtype, x.dtype, weight.dtype, bias.dtype, None if a_bias is None else a_bias.dtype)
        return y if y2 is None else (y, y2)

    @staticmethod
    def backward(ctx, dy, dy2=None):  # type: ignore[override]
        if dy is None and dy2 is None:
            return (None,) * 9
        h, mean, rstd, weight, seed = ctx.saved_tensors
        p, a_dtype, x_dtype, weight_dtype, bias_dtype, a_bias_dtype = ctx.meta
        da, dx, dw, db, da_sum = triton_kernels.dropout_add_layer_norm_backward(
            dy, dy2, h, mean, rstd, weight, seed, p, a_dtype, x_dtype, sum_da=a_bias_dtype is not None
        )
        d_bias = None if da_sum is None else da_sum.to(a_bias_dtype)
        return da, dx, dw.to(weight_dtype), db.to(bias_dtype), None, None, None, None, d_bias


class _BiasGradient(torch.autograd.Function):
    """a, unchanged, whose backward also gives ``bias`` (added into a upstream) the column sums of a's gradient."""

    @staticmethod
    def forward(ctx, a, bias):  # type: ignore[override]
        ctx.bias_dtype = bias.dtype
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)


def _fused_dropout_norm(a: torch.Tensor, x: torch.Tensor, weight: Any, bias: Any, p: float) -> bool:
    """Whether ``_DropoutAddLayerNorm``'s kernels run for these operands."""
    return (
        a.is_cuda
        and SWITCHES.triton
        and triton_kernels.AVAILABLE
        and weight is not None
        and bias is not None
        and 0.0 <= p < 1.0
        and a.dtype in (torch.float16, torch.bfloat16)
        and a.shape == x.shape
        and a.dim() == 2
        and a.numel() < 2**31
    )


def _norm_dtype(a: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    """The dtype of LayerNorm(a + x) as the stock modules give it: fp32 under autocast, else the promoted one."""
    return torch.float32 if torch.is_autocast_enabled(a.device.type) else torch.promote_types(a.dtype, x.dtype)


def dropout_add_layer_norm_pair(
    a: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    p: float,
    half: torch.dtype,
    a_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, y rounded to ``half``) for y = LayerNorm(dropout(a, p) + x) over the last dimension, in training: a
    post-norm layer's sublayer output ``a`` and residual ``x``, (T, N); the residual add computed in the promoted
    dtype of the two, LayerNorm in fp32 under autocast, as the stock modules compute them. y is what the layer hands
    on as the next residual, its rounded copy what the next product reads (the cast autocast would make there).

    On CUDA with our kernels, one Triton kernel forward (dropout's mask drawn in the kernel from a seed on the
    device, not stored; both outputs written) and one backward (which draws the mask again, and takes both outputs'
    gradients, adding them in fp32) replace PyTorch's five to eight each way, the cast and autograd's sum of the two
    gradients; elsewhere the PyTorch composition runs.

    ``a_bias``: the bias the sublayer's last product added into ``a``, whose gradient (the column sums of a's) this
    function gives, summed in the backward kernel (the product then computes none: ``half_linear(bias_grad=False)``).
    """
    if _fused_dropout_norm(a, x, weight, bias, p):
        out_dtype = _norm_dtype(a, x)
        if out_dtype == half:
            y = _DropoutAddLayerNorm.apply(a, x, weight, bias, eps, p, out_dtype, None, a_bias)
            return y, y
        return _DropoutAddLayerNorm.apply(a, x, weight, bias, eps, p, out_dtype, half, a_bias)
    if a_bias is not None:
        a = _BiasGradient.apply(a, a_bias)
    y = F.layer_norm(F.dropout(a, p, training=p > 0) + x, (x.shape[-1],), weight, bias, eps)
    return y, y.to(half)
