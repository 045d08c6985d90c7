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
    def _add_layer_norm_kernel(X, R, W, B, Y, stride, N, eps, STORE_SUM: tl.constexpr, BLOCK: tl.constexpr):
        # Y = LayerNorm(X + R), statistics in fp32. STORE_SUM: also X = X + R, rounded to X's dtype as a separate
        # add would round it, and the LayerNorm reads that rounded sum (the residual stream of a decoder).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride + cols, mask=m, other=0.0).to(tl.float32)
        x += tl.load(R + row * stride + cols, mask=m, other=0.0).to(tl.float32)
        if STORE_SUM:
            rounded = x.to(X.dtype.element_ty)
            tl.store(X + row * stride + cols, rounded, mask=m)
            x = rounded.to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        d = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _skinny_matmul_kernel(
        X, W, B, Y, KV, SLOT, M, N, K, stride_xm, stride_wk, stride_wn, stride_ym,
        split, kv_width, stride_kv_which, stride_kv_b, stride_kv_h, stride_kv_s,
        HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr, KV_WRITE: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Y = act(X @ W + B) for a few rows (M <= BLOCK_M): one program streams a BLOCK_N-wide slab of W.
        # KV_WRITE: columns >= split are keys then values, written into the cache at slot SLOT instead of Y.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K))
            w = tl.load(
                W + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=(ks[:, None] < K) & (cols[None, :] < N)
            )
            acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            acc += tl.load(B + cols, mask=cols < N).to(tl.float32)[None, :]
        if GELU_TANH:
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
        valid = (rows[:, None] < M) & (cols[None, :] < N)
        if KV_WRITE:
            to_y = cols < split
            tl.store(
                Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=valid & to_y[None, :]
            )
            c = tl.where(to_y, 0, cols - split)
            which = c // kv_width
            head = (c % kv_width) // HEAD_DIM
            d = c % HEAD_DIM
            slot = tl.load(SLOT)
            dest = KV + which * stride_kv_which + head * stride_kv_h + slot * stride_kv_s + d
            tl.store(
                dest[None, :] + rows[:, None] * stride_kv_b, acc.to(KV.dtype.element_ty), mask=valid & ~to_y[None, :]
            )
        else:
            tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=valid)

    @triton.jit
    def _embed_kernel(TOK, POS, WTE, WPE, X, E, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < E
        tok = tl.load(TOK + row)
        pos = tl.load(POS + row)
        a = tl.load(WTE + tok * E + cols, mask=m).to(tl.float32)
        b = tl.load(WPE + pos * E + cols, mask=m).to(tl.float32)
        tl.store(X + row * E + cols, (a + b).to(X.dtype.element_ty), mask=m)

    @triton.jit
    def _advance_kernel(
        CHOSEN, UNFINISHED, EOS, PAD, OUT, TOK, POS, STEP, SLOT, VALID, MASK, ACTIVE, PENALTY, BAN, B, stride_out, S,
        NUM_EOS: tl.constexpr, HAS_BAN: tl.constexpr, BLOCK_B: tl.constexpr,
    ):  # fmt: skip
        rows = tl.arange(0, BLOCK_B)
        inb = rows < B
        chosen = tl.load(CHOSEN + rows, mask=inb, other=0)
        unfinished = tl.load(UNFINISHED + rows, mask=inb, other=0).to(tl.int32)
        tl.store(ACTIVE, tl.load(ACTIVE) + tl.max(unfinished, axis=0).to(tl.int64))
        if NUM_EOS > 0:
            chosen = tl.where(unfinished != 0, chosen, tl.load(PAD))
            for e in tl.static_range(NUM_EOS):
                unfinished = tl.where(chosen == tl.load(EOS + e), 0, unfinished)
            tl.store(UNFINISHED + rows, unfinished.to(UNFINISHED.dtype.element_ty), mask=inb)
        step = tl.load(STEP)
        slot = tl.load(SLOT) + 1
        tl.store(OUT + rows * stride_out + step, chosen, mask=inb)
        tl.store(TOK + rows, chosen, mask=inb)
        tl.store(POS + rows, tl.load(POS + rows, mask=inb) + 1, mask=inb)
        tl.store(VALID + rows * S + slot, tl.full((BLOCK_B,), 1, tl.int1), mask=inb & (slot < S))
        tl.store(MASK + rows * S + slot, tl.zeros((BLOCK_B,), MASK.dtype.element_ty), mask=inb & (slot < S))
        tl.store(STEP, step + 1)
        tl.store(SLOT, slot)
        if HAS_BAN:
            if step + 1 >= tl.load(BAN):
                for e in tl.static_range(NUM_EOS):
                    tl.store(PENALTY + tl.load(EOS + e), 0.0)

    @triton.jit
    def _decode_attention_kernel(
        Q, K, V, MASK, OUT, S, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_mb, stride_ob, stride_oh, scale, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # One query token per (row, head) over S cached keys, with an additive (B, S) mask; online softmax.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        kv_h = h // GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        m_i = -1.0e30
        l_i = 0.0
        acc = tl.zeros((D,), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            inside = ss < S
            k = tl.load(
                K + b * stride_kb + kv_h * stride_kh + ss[:, None] * stride_ks + d[None, :],
                mask=inside[:, None],
                other=0.0,
            )
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            scores += tl.load(MASK + b * stride_mb + ss, mask=inside, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(
                V + b * stride_vb + kv_h * stride_vh + ss[:, None] * stride_vs + d[None, :],
                mask=inside[:, None],
                other=0.0,
            )
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        tl.store(OUT + b * stride_ob + h * stride_oh + d, (acc / l_i).to(OUT.dtype.element_ty))

    @triton.jit
    def _attention_block(q, acc, m_i, l_i, k_ptrs, v_ptrs, cols, length, qk_scale, MASKED: tl.constexpr):
        # One BLOCK_N slice of keys/values for a block of queries; online softmax in base 2.
        if MASKED:
            in_seq = cols < length
            k = tl.load(k_ptrs, mask=in_seq[None, :], other=0.0)  # (D, N)
            s = tl.dot(q, k) * qk_scale
            s = tl.where(in_seq[None, :], s, float("-inf"))
        else:
            k = tl.load(k_ptrs)
            s = tl.dot(q, k) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)  # (N, D)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, m_new, l_i

    @triton.jit
    def _varlen_attention_kernel(
        Q,
        K,
        V,
        Out,
        CU,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ot,
        stride_oh,
        qk_scale,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        # One program: BLOCK_M queries of one head of one sequence, streaming that sequence's keys in BLOCK_N
        # blocks (whole blocks unmasked, then one masked tail). Programs past a row's end exit at once.
        start_m = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        seq = tl.program_id(2)
        begin = tl.load(CU + seq).to(tl.int64)
        length = tl.load(CU + seq + 1).to(tl.int64) - begin
        if start_m * BLOCK_M >= length:
            return
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + (begin + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=offs_m[:, None] < length,
            other=0.0,
        )
        k_ptrs = K + head * stride_kh + offs_d[:, None] + (begin + offs_n)[None, :] * stride_kt
        v_ptrs = V + head * stride_vh + offs_d[None, :] + (begin + offs_n)[:, None] * stride_vt
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        whole = (length // BLOCK_N) * BLOCK_N
        for start_n in range(0, whole, BLOCK_N):
            acc, m_i, l_i = _attention_block(
                q,
                acc,
                m_i,
                l_i,
                k_ptrs + start_n * stride_kt,
                v_ptrs + start_n * stride_vt,
                start_n + offs_n,
                length,
                qk_scale,
                MASKED=False,
            )
        if whole < length:
            acc, m_i, l_i = _attention_block(
                q,
                acc,
                m_i,
                l_i,
                k_ptrs + whole * stride_kt,
                v_ptrs + whole * stride_vt,
                whole + offs_n,
                length,
                qk_scale,
                MASKED=True,
            )
        acc = acc / l_i[:, None]
        tl.store(
            Out + (begin + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=offs_m[:, None] < length,
        )

    @triton.jit
    def _gelu_kernel(X, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        tl.store(X + offs, y.to(X.dtype.element_ty), mask=m)


def _layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, store_sum: bool
) -> torch.Tensor:
    rows, n = x.shape
    y = torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(n)
        _add_layer_norm_kernel[(rows,)](
            x, residual, weight, bias, y, x.stride(0), n, eps, STORE_SUM=store_sum, BLOCK=block,
            num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
    return y


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual); x, residual: (T, N), same dtype."""
    return _layer_norm(x.contiguous(), residual.contiguous(), weight, bias, eps, store_sum=False)


def residual_layer_norm_(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x += residual`` in place, then return LayerNorm(x); x, residual: (T, N) contiguous, same dtype."""
    return _layer_norm(x, residual.contiguous(), weight, bias, eps, store_sum=True)


def skinny_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    transposed: bool,
    gelu_tanh: bool = False,
    out_dtype: torch.dtype | None = None,
    kv: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    split: int = 0,
    head_dim: int = 0,
    block_n: int | None = None,
    block_k: int = 128,
    warps: int | None = None,
    stages: int = 4,
) -> torch.Tensor:
    """act(x @ W + bias) for x (M <= 16, K) contiguous; W is ``weight`` (K, N) or, if ``transposed``, ``weight.T``
    of an (N, K) weight (nn.Linear). For decode steps, where a matrix product is a stream over the weight.

    With ``kv`` (2, M, Hkv, S, head_dim) and ``slot`` (1,): only the first ``split`` columns are returned; the
    rest, keys then values, are written into ``kv`` at that slot.
    """
    m, k = x.shape
    n = weight.shape[0] if transposed else weight.shape[1]
    if block_n is None:  # the best of a sweep for GPT-2 shapes, weights streamed from HBM (BENCHMARKS.md)
        block_n, block_k, warps = (8, 256, 2) if n <= 1024 else (64, 128, 4) if n >= 16384 else (32, 128, 2)
        stages = 2 if n >= 16384 else 4
    warps = warps or (2 if m == 1 else 4)
    stride_wk, stride_wn = (weight.stride(1), weight.stride(0)) if transposed else (weight.stride(0), weight.stride(1))
    y = torch.empty(m, split if kv is not None else n, device=x.device, dtype=out_dtype or x.dtype)
    kv_args = (
        (kv, slot, split, kv.shape[2] * head_dim, *kv.stride()[:4]) if kv is not None else (y, y, 0, 1, 0, 0, 0, 0)
    )
    _skinny_matmul_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else x, y, kv_args[0], kv_args[1], m, n, k, x.stride(0), stride_wk,
        stride_wn, y.stride(0), *kv_args[2:], HAS_BIAS=bias is not None, GELU_TANH=gelu_tanh,
        KV_WRITE=kv is not None, HEAD_DIM=max(head_dim, 1), BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def embed(tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """wte[tokens] + wpe[positions]: tokens, positions (B,) int64 -> (B, E)."""
    batch, width = tokens.shape[0], wte.shape[1]
    x = torch.empty(batch, width, device=wte.device, dtype=wte.dtype)
    _embed_kernel[(batch,)](tokens, positions, wte, wpe, x, width, BLOCK=triton.next_power_of_2(width))
    return x


def advance(
    chosen: torch.Tensor,
    unfinished: torch.Tensor,
    eos: torch.Tensor,
    pad: torch.Tensor,
    out: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    step: torch.Tensor,
    slot: torch.Tensor,
    valid: torch.Tensor,
    mask: torch.Tensor,
    active: torch.Tensor,
    eos_penalty: torch.Tensor | None,
    ban_steps: torch.Tensor | None,
) -> None:
    """The bookkeeping of one generated token in one launch (see ``ops.sampling.advance``)."""
    batch = chosen.shape[0]
    has_ban = eos_penalty is not None and ban_steps is not None
    _advance_kernel[(1,)](
        chosen, unfinished, eos, pad, out, tokens, positions, step, slot, valid, mask, active,
        eos_penalty if has_ban else mask, ban_steps if has_ban else step, batch, out.stride(0), valid.shape[1],
        NUM_EOS=eos.numel(), HAS_BAN=has_ban, BLOCK_B=max(16, triton.next_power_of_2(batch)),
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, block_s: int = 64
) -> torch.Tensor:
    """Attention of one new token per row: q (B, H, D) over k, v (B, Hkv, S, D) (last dim contiguous) with an
    additive mask (B, S). Returns (B, H, D)."""
    batch, heads, dim = q.shape
    out = torch.empty_like(q)
    _decode_attention_kernel[(batch, heads)](
        q, k, v, mask, out, k.shape[2], q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), out.stride(0), out.stride(1), scale,
        GROUP=heads // k.shape[1], D=dim, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    return out


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the attention kernel; the first is the default.
# Measured on the canonical workload (H100, BENCHMARKS.md): 64x64 with 4 warps beat 128-row blocks by 25%,
# since most programs cover short rows.
ATTENTION_CONFIGS = [
    (64, 64, 4, 3),
    (64, 64, 4, 2),
    (64, 32, 4, 3),
    (32, 64, 4, 3),
    (64, 128, 4, 3),
    (128, 64, 8, 3),
]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scale: float,
    config: tuple | None = None,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence. q, k, v: (T, H, D), last dim contiguous,
    D a power of two; cu_seqlens: (B + 1,) int32. Returns (T, H, D). Forward only."""
    tokens, heads, dim = q.shape
    out = torch.empty(tokens, heads, dim, device=q.device, dtype=q.dtype)
    batch = cu_seqlens.numel() - 1
    if tokens == 0 or batch == 0:
        return out
    bm, bn, warps, stages = config or ATTENTION_CONFIGS[0]
    grid = (triton.cdiv(max_len, bm), heads, batch)
    _varlen_attention_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        scale * 1.4426950408889634,
        BLOCK_M=bm,
        BLOCK_N=bn,
        HEAD_DIM=dim,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU in place on a contiguous tensor; returns it."""
    n = x.numel()
    if n:
        block = 4096
        _gelu_kernel[(triton.cdiv(n, block),)](x, n, BLOCK=block, num_warps=8)
    return x
