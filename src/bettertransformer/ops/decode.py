"""The pieces of a one-token decode step, each one kernel on CUDA (Triton, fp16/bf16) with a PyTorch reference.

At decode time a matrix product is a stream over the weight and every launch costs microseconds, so these fuse
what a layer-by-layer forward splits: bias and GELU into the matrix product, the key/value write into the QKV
projection, the token and position embeddings into one gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_kernels
from .fused import _use_triton

# Decode attention runs our kernel while rows x cache slots stays under this; beyond it SDPA's kernels were faster
# (H200, GPT-2 heads: ours 3.6 vs 4.6 us at 1 x 128, 5.0 vs 6.9 at 1 x 256, 6.6 vs 7.3 at 16 x 128, but 10.2 vs
# 7.7 at 16 x 256; see BENCHMARKS.md).
MAX_TRITON_ROW_SLOTS = 2048


def embed(tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """wte[tokens] + wpe[positions]; tokens, positions (B,) -> (B, E)."""
    if _use_triton(wte) and wte.is_contiguous() and wpe.is_contiguous():
        return triton_kernels.embed(tokens, positions, wte, wpe)
    return F.embedding(tokens, wte) + F.embedding(positions, wpe)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    gelu_tanh: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """act(x @ W + bias); W = ``weight`` (in, out), or ``weight.T`` for an (out, in) ``nn.Linear`` weight."""
    if _use_triton(x) and x.shape[0] <= 16 and x.is_contiguous():
        return triton_kernels.skinny_matmul(
            x, weight, bias, transposed=transposed, gelu_tanh=gelu_tanh, out_dtype=out_dtype
        )
    w = weight.t() if transposed else weight
    y = torch.addmm(bias, x, w) if bias is not None else x @ w
    if gelu_tanh:
        y = F.gelu(y, approximate="tanh")
    return y if out_dtype is None else y.to(out_dtype)


def qkv_into_cache(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    kv: torch.Tensor,
    slot: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """The fused QKV projection of one token per row: returns q (B, H, D); writes k and v into ``kv``
    (2, B, Hkv, S, D) at ``slot`` (1,). Columns are laid out q | k | v, heads contiguous within each."""
    batch = x.shape[0]
    head_dim = kv.shape[-1]
    width = heads * head_dim
    if _use_triton(x) and batch <= 16 and x.is_contiguous():
        q = triton_kernels.skinny_matmul(
            x, weight, bias, transposed=transposed, kv=kv, slot=slot, split=width, head_dim=head_dim
        )
        return q.view(batch, heads, head_dim)
    qkv = linear(x, weight, bias, transposed=transposed)
    new = qkv[:, width:].view(batch, 2, kv.shape[2], 1, head_dim).transpose(0, 1)  # (2, B, Hkv, 1, D)
    kv.index_copy_(3, slot, new)
    return qkv[:, :width].view(batch, heads, head_dim)


def attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, H, D) over the cache kv (2, B, Hkv, S, D) with an additive mask (B, S) -> (B, H, D)."""
    slots = kv.shape[3]
    if _use_triton(q) and q.shape[0] * slots <= MAX_TRITON_ROW_SLOTS and q.shape[-1] in (16, 32, 64, 128):
        return triton_kernels.decode_attention(
            q, kv[0], kv[1], mask, scale, block_s=min(256, max(16, 1 << (slots - 1).bit_length()))
        )
    batch, heads, dim = q.shape
    grouped = q.reshape(batch, kv.shape[2], heads // kv.shape[2], dim)  # query heads sharing a key/value head
    out = F.scaled_dot_product_attention(grouped, kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(batch, heads, dim)
