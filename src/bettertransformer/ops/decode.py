"""The pieces of a one-token decode step, each one kernel on CUDA (Triton, fp16/bf16) with a PyTorch reference.

At decode time a matrix product is a stream over the weight and every launch costs microseconds, so these fuse
what a layer-by-layer forward splits: the LayerNorm before a matrix product and the bias, GELU and residual add
after it, the key/value write into the QKV projection, the greedy choice of the next token into the LM head, the
token and position embeddings into one gather (``decode_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decode_kernels
from .decode_kernels import Norm
from .dispatch import use_triton

# Decode attention runs our kernel while rows x cache slots stays under this; beyond it SDPA's kernels were faster
# (H200, GPT-2 heads: ours 3.6 vs 4.6 us at 1 x 128, 5.0 vs 6.9 at 1 x 256, 6.6 vs 7.3 at 16 x 128, but 10.2 vs
# 7.7 at 16 x 256; see BENCHMARKS.md).
MAX_TRITON_ROW_SLOTS = 2048


def _kernel_rows(x: torch.Tensor) -> bool:
    return use_triton(x) and decode_kernels.AVAILABLE and x.shape[0] <= decode_kernels.MAX_ROWS and x.is_contiguous()


def embed(tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """wte[tokens] + wpe[positions]; tokens, positions (B,) -> (B, E)."""
    if use_triton(wte) and wte.is_contiguous() and wpe.is_contiguous():
        return decode_kernels.embed(tokens, positions, wte, wpe)
    return F.embedding(tokens, wte) + F.embedding(positions, wpe)


def _reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transposed: bool,
    norm: Norm | None,
) -> torch.Tensor:
    if norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], norm[2])
    w = weight.t() if transposed else weight
    return torch.addmm(bias, x, w) if bias is not None else x @ w


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    norm: Norm | None = None,
    residual: torch.Tensor | None = None,
    gelu_tanh: bool = False,
    out_dtype: torch.dtype | None = None,
    kernels: bool = True,
) -> torch.Tensor:
    """act(norm(x) @ W + bias); W = ``weight`` (in, out), or ``weight.T`` for an (out, in) ``nn.Linear`` weight.
    With ``residual`` (N, out): ``residual += `` that, in place, and returns ``residual``. ``kernels=False``: PyTorch's
    kernels (cuBLAS) whatever the row count."""
    if kernels and _kernel_rows(x):
        return decode_kernels.linear(
            x, weight, bias, transposed=transposed, norm=norm, residual=residual, gelu_tanh=gelu_tanh,
            out_dtype=out_dtype,
        )  # fmt: skip
    y = _reference(x, weight, bias, transposed, norm)
    if gelu_tanh:
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        return residual.add_(y)
    return y if out_dtype is None else y.to(out_dtype)


def greedy_head(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    norm: Norm | None,
    eos_penalty: torch.Tensor | None,
) -> torch.Tensor:
    """The greedy next token of each row: argmax of (logits + ``eos_penalty`` (V,)), logits = norm(x) @ W + bias
    rounded to x's dtype as a stock LM head's are; the first index on ties, as ``torch.argmax``. Returns (N,) int64."""
    if _kernel_rows(x):
        return decode_kernels.linear(
            x, weight, bias, transposed=transposed, norm=norm, eos_penalty=eos_penalty, argmax=True
        )  # fmt: skip
    scores = _reference(x, weight, bias, transposed, norm).float()
    return (scores if eos_penalty is None else scores + eos_penalty).argmax(-1)


def qkv_into_cache(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    kv: torch.Tensor,
    slot: torch.Tensor,
    heads: int,
    norm: Norm | None = None,
) -> torch.Tensor:
    """The fused QKV projection of one token per row (of norm(x) when ``norm`` is given): returns q (B, H, D);
    writes k and v into ``kv`` (2, B, Hkv, S, D) at ``slot`` (1,). Columns are laid out q | k | v, heads
    contiguous within each."""
    batch = x.shape[0]
    head_dim = kv.shape[-1]
    width = heads * head_dim
    if _kernel_rows(x):
        q = decode_kernels.linear(
            x, weight, bias, transposed=transposed, norm=norm, kv=kv, slot=slot, split=width, head_dim=head_dim
        )
        return q.view(batch, heads, head_dim)
    qkv = _reference(x, weight, bias, transposed, norm)
    new = qkv[:, width:].view(batch, 2, kv.shape[2], 1, head_dim).transpose(0, 1)  # (2, B, Hkv, 1, D)
    kv.index_copy_(3, slot, new)
    return qkv[:, :width].view(batch, heads, head_dim)


def attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scale: float, slot: torch.Tensor) -> torch.Tensor:
    """q (B, H, D) over the cache kv (2, B, Hkv, S, D) with an additive mask (B, S) -> (B, H, D). ``slot`` (1,) is
    the slot of the token being decoded, whose key/value this step's QKV projection has just written."""
    slots = kv.shape[3]
    if use_triton(q) and q.shape[0] * slots <= MAX_TRITON_ROW_SLOTS and q.shape[-1] in (16, 32, 64, 128):
        block_s = min(256, max(16, 1 << (slots - 1).bit_length()))
        warps = 8 if block_s * q.shape[-1] >= 8192 else 4
        return decode_kernels.decode_attention(q, kv[0], kv[1], mask, slot, scale, block_s=block_s, warps=warps)
    batch, heads, dim = q.shape
    grouped = q.reshape(batch, kv.shape[2], heads // kv.shape[2], dim)  # query heads sharing a key/value head
    out = F.scaled_dot_product_attention(grouped, kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(batch, heads, dim)
