"""Attention over packed variable-length sequences: bidirectional (encoders) or causal (decoder prefill and
packed training), optionally with a sliding window and grouped-query heads.

Four ways to compute the same function, picked per call:

- ``triton``: our Triton kernel on the packed tokens, CUDA, fp16/bf16, power-of-two head sizes, inference
  (no gradient), bidirectional only. Faster than ``varlen`` on short and mixed-length rows (see BENCHMARKS.md).
- ``varlen``: flash attention on the packed tokens (``torch.nn.attention.varlen``; in training, PyTorch's flash
  kernels called directly), CUDA, fp16/bf16, no bias. Computes only real-token pairs.
- ``dense``: lay the packed tokens out left-aligned in a ``(B, max_len)`` grid and call SDPA with a key mask
  (and an optional additive bias). Works everywhere, supports dropout and bias; pads to the longest row only.
- ``loop``: one SDPA call per sequence, no mask. Computes only real-token pairs; on the CPU this is the fastest
  (see BENCHMARKS.md), since the per-call overhead is small next to the work of a sequence.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from ..switches import SWITCHES
from . import triton_kernels
from .padding import PackInfo, dense_layout, from_dense, to_dense

# SDPA's backends whose results repeat from call to call inside a replayed CUDA graph: cuDNN's did not (H200, torch
# 2.11, 64-token prompts left-padded by 4i, 128 new tokens: GPT-2 b16, 1 of 16 rows differed in some identical calls;
# a GPT-NeoX-shaped model's generic steps b16, 9 different outputs of 10 identical calls, one with cuDNN's off).
# Decode-time attention runs with these only.
REPEATABLE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@functools.cache
def _varlen_kernel() -> tuple[Any, frozenset[str]]:
    """PyTorch's ``varlen_attn`` (torch >= 2.10; None if absent) and its parameter names: some releases lack
    sliding windows or grouped-query heads. Imported on first use: the module pulls in torch._dynamo (~1 s)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - older torch
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


class _FlashVarlen(torch.autograd.Function):
    """Flash attention on packed tokens for training, with optional dropout on the attention weights.

    PyTorch's flash kernels called directly on the packed rows, with the flash backward. ``varlen_attn`` takes no
    dropout, and its autograd runs through ``torch.library`` in Python (~0.5 ms of host time a layer's backward, in
    a training step that waits on the host) and, in some releases, takes no grouped-query heads (its key/value
    heads repeated, their gradients summed back). The flash kernels take grouped-query heads as they are. The dropout
    draws come from the CUDA generator's Philox stream, as SDPA's do. q: (T, Hq, D); k, v: (T, Hkv, D), Hkv
    dividing Hq."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len: int, dropout_p: float, causal: bool, scale: float, window: tuple[int, int]):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, dropout_p, causal, False,
            scale=scale, window_size_left=window[0], window_size_right=window[1],
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.options = (max_len, dropout_p, causal, scale, window)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        max_len, dropout_p, causal, scale, window = ctx.options
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, dropout_p, causal, rng, unused,
            scale=scale, window_size_left=window[0], window_size_right=window[1],
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def pick_backend(
    q: torch.Tensor,
    dropout_p: float,
    bias: torch.Tensor | None,
    *,
    causal: bool = False,
    window: int | None = None,
    gqa: bool = False,
    softcap: float | None = None,
) -> str:
    """The fastest backend that computes this call exactly (``SWITCHES.attention_backend`` overrides it)."""
    if softcap is not None:  # only the explicit softmax of ``attention`` applies a logit cap
        return "dense" if q.is_cuda or dropout_p or bias is not None else "loop"
    if q.is_cuda:
        head_dim = q.shape[-1]
        plain = bias is None and dropout_p == 0.0 and q.dtype in (torch.float16, torch.bfloat16)
        if (
            plain
            and triton_kernels.AVAILABLE
            and not causal
            and window is None
            and not gqa
            and head_dim in (16, 32, 64, 128)
            and not (torch.is_grad_enabled() and q.requires_grad)
        ):
            return "triton"
        # Training (with dropout or not) calls PyTorch's flash kernels on the packed rows directly (``_FlashVarlen``).
        flash = bias is None and q.dtype in (torch.float16, torch.bfloat16)
        if (
            flash
            and _varlen_kernel()[0] is not None
            and head_dim % 8 == 0
            and head_dim <= 256
            and (window is None or "window_size" in _varlen_kernel()[1])
        ):
            return "varlen"
        return "dense"
    if dropout_p == 0.0 and bias is None:
        return "loop"
    return "dense"


def _allowed(length: int, device: torch.device, causal: bool, window: int | None) -> torch.Tensor | None:
    """(L, L) bool: may query i attend to key j of the same sequence (positions inside the sequence). A window
    keeps i - j < window (causal) or |i - j| < window (bidirectional); None: every pair."""
    if not causal and window is None:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    if not causal:
        assert window is not None
        return (i - j).abs() < window
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return allowed


@dataclass(frozen=True)
class _Call:
    """One packed attention call: q (T, Hq, D), k/v (T, Hkv, D) laid out as ``info`` says, and its options."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    info: PackInfo
    scale: float
    dropout_p: float
    bias: torch.Tensor | None
    causal: bool
    window: int | None
    softcap: float | None

    @property
    def gqa(self) -> bool:
        return self.q.shape[1] != self.k.shape[1]


def _triton(c: _Call) -> torch.Tensor:
    """Our kernel: bidirectional, one key/value head per query head, no bias, dropout or softcap."""
    if c.causal or c.gqa or c.bias is not None or c.dropout_p or c.softcap is not None:
        raise ValueError("the triton backend is bidirectional, with one k/v head per query head and no extras")
    return triton_kernels.varlen_attention(c.q, c.k, c.v, c.info.cu_seqlens, c.info.max_len, c.scale)


def _varlen(c: _Call) -> torch.Tensor:
    """PyTorch's flash attention on the packed tokens (CUDA, fp16/bf16, with a backward); no bias or softcap."""
    varlen_attn, params = _varlen_kernel()
    if varlen_attn is None:
        raise RuntimeError("torch.nn.attention.varlen is not available in this PyTorch")
    if c.bias is not None or c.softcap is not None:
        raise ValueError("the varlen backend takes no bias or softcap")
    k, v = c.k, c.v
    extra: dict[str, Any] = {}
    reach = c.window - 1 if c.window is not None else -1  # flash's windows are inclusive
    window = (reach, 0) if c.causal else (reach, reach)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (c.q, k, v))
    if c.dropout_p or training or (c.gqa and "enable_gqa" not in params):
        # PyTorch's flash kernels directly: also grouped-query heads where this torch's varlen_attn wants one
        # key/value head per query head (no copies of k and v with their heads repeated)
        info = c.info
        return _FlashVarlen.apply(c.q, k, v, info.cu_seqlens, info.max_len, c.dropout_p, c.causal, c.scale, window)
    if c.causal or c.window is not None:
        extra["window_size"] = window
    if c.gqa:
        extra["enable_gqa"] = True
    cu, length = c.info.cu_seqlens, c.info.max_len
    return varlen_attn(c.q, k, v, cu, cu, length, length, scale=c.scale, **extra)


def _loop(c: _Call) -> torch.Tensor:
    """One SDPA call per sequence (one batched call when nothing is padded); no bias, no dropout."""
    if c.bias is not None or c.dropout_p:
        raise ValueError("the loop backend takes no bias and no dropout")
    q, k, v, info = c.q, c.k, c.v, c.info
    if info.indices is None and info.batch:
        # No padding: every row has the same length, so one batched call computes exactly the same thing.
        qb, kb, vb = (t.view(info.batch, info.seqlen, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        mask = _allowed(info.seqlen, q.device, c.causal, c.window) if c.window is not None else None
        out = attention(qb, kb, vb, mask, scale=c.scale, causal=c.causal and mask is None, softcap=c.softcap)
        return out.transpose(1, 2).reshape(q.shape)
    outs = []
    start = 0
    # Consecutive sequences of one length go through one batched call: a batch sorted by length (as
    # sentence-transformers' encode sorts it) then takes a few calls per layer instead of one per sentence.
    # (Empty sequences hold no tokens: they do not break a run.)
    for length, run in itertools.groupby(n for n in info.host_lengths.tolist() if n):
        count = len(list(run))
        end = start + count * length
        # (n, H, L, D) views of n sequences of L tokens; SDPA without a mask takes its fastest kernel.
        qs, ks, vs = (t[start:end].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        mask = _allowed(length, q.device, c.causal, c.window) if c.window is not None else None
        out = attention(qs, ks, vs, mask, scale=c.scale, causal=c.causal and mask is None, softcap=c.softcap)
        outs.append(out.transpose(1, 2).flatten(0, 1))  # (n L, H, D)
        start = end
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def _dense(c: _Call) -> torch.Tensor:
    """The packed tokens laid out left-aligned in a (B, max_len) grid, one SDPA call with a key mask; anything."""
    info = c.info
    index, valid = dense_layout(info)
    # A row with no real token would give a softmax over nothing (NaN, also in the backward pass): let it
    # attend to its empty slots, whose results are dropped anyway.
    key_valid = valid | (info.lengths == 0)[:, None]  # (B, L)
    qd, kd, vd = (to_dense(t, info, index, valid).transpose(1, 2) for t in (c.q, c.k, c.v))  # (B, H, L, D)
    mask = key_valid[:, None, None, :]  # (B, 1, 1, L)
    allowed = _allowed(info.max_len, c.q.device, c.causal, c.window)
    if allowed is not None:
        # Slots are positions inside each sequence, so the causal band applies as is; every query keeps at
        # least its own key (the diagonal), so no row of the softmax is empty.
        mask = mask & allowed[None, None]  # (B, 1, L, L)
    if c.bias is not None:
        mask = c.bias.to(c.q.dtype).masked_fill(~mask, float("-inf"))
    out = attention(qd, kd, vd, mask, scale=c.scale, dropout_p=c.dropout_p, softcap=c.softcap)
    return from_dense(out.transpose(1, 2), info)  # (T, H, D)


BACKENDS: dict[str, Callable[[_Call], torch.Tensor]] = {
    "triton": _triton,
    "varlen": _varlen,
    "dense": _dense,
    "loop": _loop,
}


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    info: PackInfo,
    *,
    scale: float,
    dropout_p: float = 0.0,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of every real token over the real tokens of its own sequence.

    q:       (T, Hq, D); k, v: (T, Hkv, D) with Hq a multiple of Hkv (grouped-query heads share k/v).
             Rows packed as described by ``info`` (each row's tokens contiguous, in order).
    bias:    optional (1 or B, Hq, max_len, max_len) additive bias, indexed by position inside the row.
    causal:  token i sees tokens j <= i of its sequence only; ``window`` further limits it to i - j < window
             (transformers' sliding-window convention); without ``causal``, a window keeps |i - j| < window.
    softcap: cap the logits at +-softcap with ``softcap * tanh(logits / softcap)`` (Gemma 2), before the mask.
    backend: one of ``BACKENDS``; by default ``SWITCHES.attention_backend``, else ``pick_backend``'s choice.
    Returns (T, Hq, D).
    """
    call = _Call(q, k, v, info, scale, dropout_p, bias, causal, window, softcap)
    name = (
        backend
        or SWITCHES.attention_backend
        or pick_backend(q, dropout_p, bias, causal=causal, window=window, gqa=call.gqa, softcap=softcap)
    )
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {tuple(BACKENDS)}")
    return BACKENDS[name](call)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    causal: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """Padded attention, (B, Hq, Lq, D) x (B, Hkv, Lk, D) -> (B, Hq, Lq, D), Hq a multiple of Hkv.

    mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk); ``causal`` (with no mask)
    aligns the causal band to the top left: query i sees keys j <= i. SDPA computes it, unless a logit
    ``softcap`` needs the explicit softmax of ``attention_with_weights``.
    """
    if softcap is not None:
        return attention_with_weights(q, k, v, mask, scale=scale, dropout_p=dropout_p, causal=causal, softcap=softcap)[
            0
        ]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def attention_with_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    causal: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention`` with an explicit softmax (logits in fp32): returns ``(out, weights (B, Hq, Lq, Lk))``."""
    if q.shape[1] != k.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if causal and mask is None:
        mask = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        # A query that may see no key (a pad position of a left-padded row, or one past the sliding window of a
        # right-padded row) gets zero weights, as PyTorch's SDPA gives it. A softmax over nothing is NaN, and the
        # next layer would spread it to the row's real tokens through 0 * NaN.
        probs = probs.masked_fill(torch.isneginf(logits).all(dim=-1, keepdim=True), 0.0)
    probs = probs.to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v), probs
