"""The pieces of a one-token decode step, each one kernel on CUDA (Triton, fp16/bf16) with a PyTorch reference.

At decode time a matrix product is a stream over the weight and every launch costs microseconds, so these fuse
what a layer-by-layer forward splits: the LayerNorm before a matrix product and the bias, GELU and residual add
after it, the q/k norms, rotary embedding and key/value write into the attention over the cache (every fused step's
attention, GPT-2's without rotation), the greedy choice of the next token into the LM head, the token and position
embeddings into one gather (``decode_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decode_kernels
from .decode_kernels import Norm, Part, Pending, RMSNorm, Rotary
from .attention import attention as padded_attention
from .dispatch import use_triton

__all__ = ["Norm", "Part", "Pending", "RMSNorm", "Rotary"]


def _kernel_rows(x: torch.Tensor) -> bool:
    return use_triton(x) and decode_kernels.AVAILABLE and x.shape[0] <= decode_kernels.MAX_ROWS and x.is_contiguous()


def embed(
    tokens: torch.Tensor,
    positions: torch.Tensor | None,
    wte: torch.Tensor,
    wpe: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """wte[tokens] (+ wpe[positions]) (* ``scale``, a Python float: the product in fp32, rounded once, as PyTorch
    multiplies a tensor by a number); tokens, positions (B,) -> (B, E)."""
    if use_triton(wte) and wte.is_contiguous() and (wpe is None or wpe.is_contiguous()):
        return decode_kernels.embed(tokens, positions, wte, wpe, scale)
    x = F.embedding(tokens, wte)
    if wpe is not None and positions is not None:
        x = x + F.embedding(positions, wpe)
    return x * scale if scale != 1.0 else x


def rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """``RMSNorm`` over the last dimension, with the stock modules' operations in their order."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.round_first:
        return norm.weight * h.to(x.dtype)
    return (h * (norm.offset + norm.weight.float())).to(x.dtype)


def _normed(x: torch.Tensor, norm: Norm | RMSNorm | None) -> torch.Tensor:
    if isinstance(norm, RMSNorm):
        if use_triton(x) and decode_kernels.AVAILABLE and x.dim() == 2 and x.stride(-1) == 1:
            return decode_kernels.norm_rows(x, norm)  # one kernel for PyTorch's seven
        return rms_norm(x, norm)
    if norm is not None:
        return F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], norm[2])
    return x


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    w = weight.t() if transposed else weight
    return torch.addmm(bias, x, w) if bias is not None else x @ w


def _activation(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y)
    return y


def _scaled(y: torch.Tensor, scale: float, divide: float) -> torch.Tensor:
    if scale != 1.0:
        y = y * scale
    return y / divide if divide != 1.0 else y


def _softcapped(y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return y if softcap is None else torch.tanh(y / softcap) * softcap


def _reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transposed: bool,
    norm: Norm | RMSNorm | None,
    act: str | None = None,
    parts: tuple[Part, ...] = (),
    up: Part | None = None,
) -> torch.Tensor:
    x = _normed(x, norm)
    y = _product(x, weight, bias, transposed)
    if parts:
        y = torch.cat([y, *(_product(x, w, b, transposed) for w, b in parts)], dim=-1)
    if up is None:
        return _activation(y, act)
    u = _product(x, up[0], up[1], transposed)
    fused = use_triton(y) and decode_kernels.AVAILABLE and y.is_contiguous() and u.is_contiguous()
    if act is not None and fused and u.dtype == y.dtype:
        return decode_kernels.gated(y, u, act)  # one kernel where PyTorch takes two
    return _activation(y, act) * u


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    norm: Norm | RMSNorm | None = None,
    residual: torch.Tensor | None = None,
    gelu_tanh: bool = False,
    act: str | None = None,
    parts: tuple[Part, ...] = (),
    up: Part | None = None,
    softcap: float | None = None,
    scale: float = 1.0,
    divide: float = 1.0,
    out_dtype: torch.dtype | None = None,
    pending: Pending | None = None,
    kernels: bool = True,
) -> torch.Tensor:
    """act(norm(x) @ W + bias); W = ``weight`` (in, out), or ``weight.T`` for an (out, in) ``nn.Linear`` weight.
    ``norm``: LayerNorm (weight, bias, eps) or ``RMSNorm``; ``act``: "gelu_tanh" or "silu"; ``parts``: more
    matrices whose columns follow (separate q, k, v); ``up``: a gated product act(...) * (norm(x) @ U + b);
    ``scale``, ``divide``: y * scale / divide (Granite's multipliers); ``softcap``: softcap * tanh(y / softcap).
    With ``residual`` (N, out): ``residual += `` that, in place, and returns ``residual``. ``pending`` (t, post_norm,
    out): x is a residual stream still owed post_norm(t); the product reads x + post_norm(t) (``add_norm``'s sum),
    written into ``out``. ``kernels=False``: the products on cuBLAS whatever the row count (a norm before them and
    a gated product's act(gate) * up still run as one small kernel each on CUDA, ``_reference``)."""
    act = "gelu_tanh" if gelu_tanh else act
    plain = norm is None and act is None and up is None and not parts and softcap is None and scale == divide == 1.0
    spread = None
    if plain and transposed and bias is None and x.shape[0] > 1 and min(weight.shape) >= 2048:
        # Several rows through a large plain product: cuBLAS was faster (BENCHMARKS.md), except a residual product on
        # our kernel with one program an SM, where the device allows (``decode_kernels.spread_rows``).
        if residual is not None and _kernel_rows(x):
            spread = decode_kernels.spread_rows(x, weight.shape[0])
        kernels = kernels and spread is not None
    if kernels and _kernel_rows(x) and (pending is None or pending[0].is_contiguous()):
        return decode_kernels.linear(
            x, weight, bias, transposed=transposed, norm=norm, residual=residual, act=act, parts=parts, up=up,
            softcap=softcap, scale=scale, divide=divide, out_dtype=out_dtype, pending=pending, config=spread,
        )  # fmt: skip
    if pending is not None:
        t, post_norm, out = pending
        x = torch.add(x, rms_norm(t, post_norm), out=out)
    if residual is not None and plain and bias is None and transposed:
        return residual.addmm_(x, weight.t())  # one cuBLAS kernel, the sum rounded once
    y = _softcapped(_scaled(_reference(x, weight, bias, transposed, norm, act, parts, up), scale, divide), softcap)
    if residual is not None:
        return residual.add_(y)
    return y if out_dtype is None else y.to(out_dtype)


def add_norm(x: torch.Tensor, t: torch.Tensor, norm: RMSNorm, kernels: bool = True) -> torch.Tensor:
    """x += norm(t), in place (a sublayer's output normalised before its residual add); returns x."""
    if kernels and _kernel_rows(x) and t.is_contiguous():
        return decode_kernels.add_norm(x, t, norm)
    return x.add_(rms_norm(t, norm))


def greedy_head(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    norm: Norm | RMSNorm | None,
    eos_penalty: torch.Tensor | None,
    softcap: float | None = None,
    divide: float = 1.0,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """The greedy next token of each row: argmax of (logits + ``eos_penalty`` (V,)), logits = norm(x) @ W + bias
    (divided by ``divide``, softcapped) rounded to x's dtype as a stock LM head's are; the first index on ties, as ``torch.argmax``.
    ``counters``: the step's int32 zeros (``StepBuffers.counters``) the choice's reduction counts its programs in.
    Returns (N,) int64."""
    if _kernel_rows(x):
        return decode_kernels.linear(
            x, weight, bias, transposed=transposed, norm=norm, eos_penalty=eos_penalty, argmax=True, softcap=softcap,
            divide=divide, counters=counters,
        )  # fmt: skip
    scores = _softcapped(_scaled(_reference(x, weight, bias, transposed, norm), 1.0, divide), softcap).float()
    return (scores if eos_penalty is None else scores + eos_penalty).argmax(-1)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """x (N, H, D) turned by the rotary embedding at ``positions`` (N,): rotate-half (or interleaved) pairs over the
    first ``2 * len(inv_freq)`` features (none for an empty ``inv_freq``), the rest passed through; cos and sin rounded to
    x's dtype, as stock does."""
    rot = 2 * rotary.inv_freq.shape[0]
    if rot == 0:  # a layer without positions (NoPE)
        return x
    freqs = positions.float()[:, None] * rotary.inv_freq.float()[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = (angles.cos() * rotary.scale).to(x.dtype)[:, None, :]
    sin = (angles.sin() * rotary.scale).to(x.dtype)[:, None, :]
    turned, kept = x[..., :rot], x[..., rot:]
    half = rot // 2
    if rotary.interleaved:  # pairs (2i, 2i + 1), angle i
        cos, sin = cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1)
        rotated = torch.stack((-turned[..., 1::2], turned[..., 0::2]), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((-turned[..., half:], turned[..., :half]), dim=-1)
    out = (turned * cos) + (rotated * sin)
    return torch.cat([out, kept], dim=-1) if kept.shape[-1] else out


def split_qkv(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
    positions: torch.Tensor,
    rotary: Rotary,
    qk_norm: tuple[RMSNorm, RMSNorm, bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (N, H, D), k, v (N, Hkv, D) of a rotary decoder from its QKV product (N, (H + 2 Hkv) D): q/k norm
    (per head, or over the whole projection), then the rotary embedding at ``positions`` (N,)."""
    rows = qkv.shape[0]
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    if qk_norm is not None:
        q_norm, k_norm, per_head = qk_norm
        if per_head:
            q, k = rms_norm(q.reshape(rows, heads, dim), q_norm), rms_norm(k.reshape(rows, kv_heads, dim), k_norm)
        else:
            q, k = rms_norm(q, q_norm), rms_norm(k, k_norm)
    q = rotary_embedding(q.reshape(rows, heads, dim), positions, rotary)
    k = rotary_embedding(k.reshape(rows, kv_heads, dim), positions, rotary)
    return q, k, v.reshape(rows, kv_heads, dim)


def rope_into_cache(
    qkv: torch.Tensor,
    kv: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    positions: torch.Tensor,
    *,
    heads: int,
    rotary: Rotary,
    qk_norm: tuple[RMSNorm, RMSNorm, bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prompt's packed tokens from their QKV product (T, (H + 2 Hkv) D): ``split_qkv`` at ``positions`` (T,),
    their keys and values written into ``kv`` (2, B, Hkv, S, D) at (``rows``, ``columns``) (T,). Returns q (T, H, D),
    k, v (T, Hkv, D)."""
    if use_triton(qkv) and decode_kernels.AVAILABLE and qkv.stride(-1) == 1:
        return decode_kernels.rope_into_cache(
            qkv, kv, rows, columns, positions, heads=heads, rotary=rotary, qk_norm=qk_norm
        )  # fmt: skip
    q, k, v = split_qkv(qkv, heads, kv.shape[2], kv.shape[4], positions, rotary, qk_norm)
    kv[0][rows, :, columns] = k
    kv[1][rows, :, columns] = v
    return q, k, v


def rope_attention(
    qkv: torch.Tensor,
    kv: torch.Tensor,
    mask: torch.Tensor,
    slot: torch.Tensor,
    positions: torch.Tensor,
    *,
    heads: int,
    scale: float,
    rotary: Rotary,
    qk_norm: tuple[RMSNorm, RMSNorm, bool] | None = None,
    window: int | None = None,
    softcap: float | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per row of a rotary decoder, from its QKV product ``qkv`` (B, (H + 2 Hkv) D): ``split_qkv``,
    the new key/value written into ``kv`` (2, B, Hkv, S, D) at ``slot`` (1,), attention over the cache slots up to
    ``slot`` (those written so far) with the additive ``mask`` (B, S), a sliding ``window`` (slots > slot - window)
    and a logit ``softcap``. ``counters``: the step's int32 zeros (``StepBuffers.counters``) a kernel split along
    the cache counts its programs in. Returns (B, H * D)."""
    batch = qkv.shape[0]
    kv_heads, slots, dim = kv.shape[2], kv.shape[3], kv.shape[4]
    if _kernel_rows(qkv) and dim <= 256 and positions.is_contiguous():
        block_d = 1 << (dim - 1).bit_length()
        # Tiles of 128 slots (32 at head_dim 256: larger spilled registers, 37 us per call at 16 rows), over two warps
        # at head_dim 64, four at 128. The kernel reads only the slots written so far, tile by tile. H200, 16 rows
        # and 192 slots: TinyLlama (head_dim 64) 8.2 us, against 10.7 in tiles of 64 over four warps and 19.8 as one
        # tile of 256 slots over eight; Qwen3 (128) 11.7 us, against 15.6 in tiles of 64 over eight warps. (One
        # program per key/value head, each tile read once for its query heads with tensor-core products, measured
        # slower: TinyLlama 1,019 against 1,112 tok/s at one row, 10,434 against 11,082 at 16.)
        block_s = max(16, min(1 << (slots - 1).bit_length(), 128 if block_d <= 128 else 32))
        warps = 2 if block_d <= 64 else 4 if block_d <= 128 else 8
        # Split the cache until there are about two programs per SM (132 on an H100/H200), each over >= 1 tile,
        # unless it is two tiles or fewer: two splits of one tile lost more to the merge than they gained (H200,
        # one row, 148 slots in tiles of 128, whole step replayed: TinyLlama 756 us per step unsplit against 795,
        # Qwen3 1.7B 1,240 against 1,306; measured when a second kernel merged). Gemma 2's five tiles of 32 gain
        # from eight splits (2,048 us per step; 2,143 in four).
        splits = 1
        while batch * heads * splits < 256 and slots > block_s * max(splits, 2) and splits < 64:
            splits *= 2
        return decode_kernels.rope_attention(
            qkv, kv, mask, slot, positions, heads=heads, scale=scale, rotary=rotary, qk_norm=qk_norm, window=window,
            softcap=softcap, block_s=block_s, warps=warps, splits=splits, counters=counters,
        )  # fmt: skip
    q, k, v = split_qkv(qkv, heads, kv_heads, dim, positions, rotary, qk_norm)
    kv[0].index_copy_(2, slot, k[:, :, None])
    kv[1].index_copy_(2, slot, v[:, :, None])
    columns = torch.arange(slots, device=mask.device)
    outside = columns > slot  # not written yet
    if window is not None:
        outside |= columns <= slot - window
    mask = mask.masked_fill(outside, float("-inf"))
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)  # query heads sharing a key/value head
    out = padded_attention(grouped, kv[0], kv[1], mask[:, None, None, :].to(q.dtype), scale=scale, softcap=softcap)
    return out.reshape(batch, heads * dim)
