"""Triton kernels for the memory-bound steps of an encoder layer (CUDA, fp16/bf16, inference).

Each kernel makes one pass over its activations: the residual add and LayerNorm read two rows and write one, the RMS
norm reads one and writes one, GELU rewrites its input in place. Statistics are accumulated in fp32.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False

# Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs the kernels on CPU tensors with
# numpy: slow, but it checks their results without a GPU (``make kernel-check``).
INTERPRETED = AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"


if AVAILABLE:

    @triton.jit
    def _add_layer_norm_kernel(X, R, W, B, Y, stride, N, eps, BLOCK: tl.constexpr):
        # Y = LayerNorm(X + R), statistics in fp32.
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
    def _dropout_add_ln_forward(
        A, X, W, B, SEED, Y, Y2, H, MEAN, RSTD, T, N, eps, p, scale,
        DROP: tl.constexpr, HAS_Y2: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # For TILE rows: H = round(dropout(A)) + X in H's dtype, Y = LayerNorm(H) (and Y2 = Y rounded to Y2's dtype,
        # the copy the next product reads); each row's mean and 1/std kept for the backward. Dropout keeps an element
        # where a Philox draw from (*SEED, its flat index) is >= p; the backward draws it again.
        rows = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        cols = tl.arange(0, BLOCK)
        in_rows = rows < T
        m = in_rows[:, None] & (cols < N)[None, :]
        offsets = rows[:, None] * N + cols[None, :]
        a = tl.load(A + offsets, mask=m, other=0.0).to(tl.float32)
        if DROP:
            keep = tl.rand(tl.load(SEED), offsets.to(tl.int32)) >= p
            a = tl.where(keep, (a * scale).to(A.dtype.element_ty).to(tl.float32), 0.0)
        h = (a + tl.load(X + offsets, mask=m, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + offsets, h, mask=m)
        h = h.to(tl.float32)
        mean = tl.sum(h, axis=1) / N
        d = tl.where(m, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
        tl.store(MEAN + rows, mean, mask=in_rows)
        tl.store(RSTD + rows, rstd, mask=in_rows)
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = (d * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty)
        tl.store(Y + offsets, y, mask=m)
        if HAS_Y2:
            tl.store(Y2 + offsets, y.to(Y2.dtype.element_ty), mask=m)

    @triton.jit
    def _dropout_add_ln_backward(
        DY, DY2, H, MEAN, RSTD, W, SEED, DA, DX, DWB, T, N, p, scale,
        DROP: tl.constexpr, HAS_DY2: tl.constexpr, SUM_DA: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        # For ROWS rows, TILE at a time: with dLoss/dY = DY (+ DY2, the gradient of the rounded copy Y2, in fp32),
        # DX = dLoss/dH (the residual's gradient), DA = dropout's backward of DX rounded to A's dtype (as the add's
        # backward rounds it), and this block's partial sums of the weight's and bias's gradients: DWB[block, 0] and
        # DWB[block, 1] (summed over the tile's rows once, at the end); with SUM_DA, DA's too (the gradient of a bias
        # the sublayer added into A), DWB[block, 2].
        block = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        in_cols = cols < N
        w = tl.load(W + cols, mask=in_cols, other=0.0).to(tl.float32)
        dw = tl.zeros([TILE, BLOCK], dtype=tl.float32)
        db = tl.zeros([TILE, BLOCK], dtype=tl.float32)
        da = tl.zeros([TILE, BLOCK], dtype=tl.float32)
        for start in range(0, ROWS, TILE):
            rows = (block * ROWS + start).to(tl.int64) + tl.arange(0, TILE)
            in_rows = rows < T
            m = in_rows[:, None] & in_cols[None, :]
            offsets = rows[:, None] * N + cols[None, :]
            dy = tl.load(DY + offsets, mask=m, other=0.0).to(tl.float32)
            if HAS_DY2:
                dy += tl.load(DY2 + offsets, mask=m, other=0.0).to(tl.float32)
            h = tl.load(H + offsets, mask=m, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=in_rows, other=0.0)
            rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)
            xhat = tl.where(m, (h - mean[:, None]) * rstd[:, None], 0.0)
            wdy = w[None, :] * dy
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            dh = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + offsets, dh.to(DX.dtype.element_ty), mask=m)
            g = dh.to(DA.dtype.element_ty).to(tl.float32)
            if DROP:
                keep = tl.rand(tl.load(SEED), offsets.to(tl.int32)) >= p
                g = tl.where(keep, g * scale, 0.0)
            g = g.to(DA.dtype.element_ty)
            tl.store(DA + offsets, g, mask=m)
            dw += dy * xhat
            db += dy
            if SUM_DA:
                da += g.to(tl.float32)
        sums = 3 if SUM_DA else 2
        tl.store(DWB + block * sums * N + cols, tl.sum(dw, axis=0), mask=in_cols)
        tl.store(DWB + (block * sums + 1) * N + cols, tl.sum(db, axis=0), mask=in_cols)
        if SUM_DA:
            tl.store(DWB + (block * sums + 2) * N + cols, tl.sum(da, axis=0), mask=in_cols)

    @triton.jit
    def _rms_norm_kernel(X, W, Y, stride, N, eps, BLOCK: tl.constexpr):
        # Y = W * round(X * rsqrt(mean(X^2) + eps)), statistics in fp32, rounded to Y's dtype before the scale (as
        # T5's norm rounds to the weight's dtype before multiplying).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * stride + cols, mask=m, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        h = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride + cols, (w * h).to(Y.dtype.element_ty), mask=m)

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


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm(x + residual); x, residual: (T, N), same dtype."""
    x, residual = x.contiguous(), residual.contiguous()
    rows, n = x.shape
    y = torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(n)
        _add_layer_norm_kernel[(rows,)](
            x, residual, weight, bias, y, x.stride(0), n, eps, BLOCK=block, num_warps=4 if block <= 1024 else 8
        )
    return y


def _dropout_ln_config(n: int, backward: bool) -> tuple[int, int, int]:
    """(TILE, STEPS, num_warps) of the dropout+residual+LayerNorm kernels for rows of n: TILE rows at once, STEPS
    tiles per backward program (the rows its partial weight/bias gradients cover). From a sweep at BERT-base's
    9,216 x 768 on an H200 (``benchmarks/norm_train_gpu.py``): a row at a time, over 2 warps forward (41 us, 2.7
    TB/s) and 8 backward, 8 rows per backward program (63 us; tiles of 2-8 rows were slower either way)."""
    block = triton.next_power_of_2(n)
    if backward:
        return 1, 8, 8 if block >= 1024 else 4
    return 1, 1, min(8, max(1, block // 512))


def dropout_add_layer_norm_forward(
    a: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, p: float,
    out_dtype: torch.dtype, half: torch.dtype | None = None, config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """y = LayerNorm(dropout(a) + x); a, x: (T, N) contiguous. Returns (y, y rounded to ``half`` or None, h =
    dropout(a) + x, mean, 1/std, the dropout's seed tensor or None). ``config``: (TILE, STEPS, num_warps) instead of
    ``_dropout_ln_config``'s (benchmarks)."""
    rows, n = a.shape
    h = torch.empty(rows, n, dtype=torch.promote_types(a.dtype, x.dtype), device=a.device)
    y = torch.empty(rows, n, dtype=out_dtype, device=a.device)
    y2 = None if half is None else torch.empty(rows, n, dtype=half, device=a.device)
    mean = torch.empty(rows, dtype=torch.float32, device=a.device)
    rstd = torch.empty_like(mean)
    # A fresh seed from the device's generator each call: also in a replayed CUDA graph, where a Python int would be
    # baked in (the generator's draws advance from replay to replay).
    seed = torch.randint(0, 2**31 - 1, (1,), device=a.device) if p else None
    if rows:
        tile, _, warps = config or _dropout_ln_config(n, backward=False)
        _dropout_add_ln_forward[(triton.cdiv(rows, tile),)](
            a, x, weight, bias, seed if seed is not None else mean, y, y2 if y2 is not None else y, h, mean, rstd,
            rows, n, eps, p, 1.0 / (1.0 - p), DROP=bool(p), HAS_Y2=y2 is not None, TILE=tile,
            BLOCK=triton.next_power_of_2(n), num_warps=warps,
        )  # fmt: skip
    return y, y2, h, mean, rstd, seed


def dropout_add_layer_norm_backward(
    dy: torch.Tensor | None, dy2: torch.Tensor | None, h: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor, seed: torch.Tensor | None, p: float, a_dtype: torch.dtype, x_dtype: torch.dtype,
    config: tuple[int, int, int] | None = None, sum_da: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The gradients (da, dx, dweight, dbias) of ``dropout_add_layer_norm_forward`` given those of y (``dy``) and
    of its rounded copy (``dy2``), either of them None for none, and with ``sum_da`` da's column sums (else None);
    dweight, dbias and the sums in fp32."""
    rows, n = h.shape
    if dy is None:
        dy, dy2 = dy2, None
    assert dy is not None, "a backward without a gradient"
    dy = dy.contiguous()
    dy2 = None if dy2 is None else dy2.contiguous()
    da = torch.empty(rows, n, dtype=a_dtype, device=h.device)
    dx = torch.empty(rows, n, dtype=x_dtype, device=h.device)
    tile, steps, warps = config or _dropout_ln_config(n, backward=True)
    blocks = max(1, triton.cdiv(rows, tile * steps))
    # Every program writes its partial sums: no zero fill (but of an empty call's).
    partial = (torch.empty if rows else torch.zeros)(
        blocks, 3 if sum_da else 2, n, dtype=torch.float32, device=h.device
    )
    if rows:
        _dropout_add_ln_backward[(blocks,)](
            dy, dy2 if dy2 is not None else dy, h, mean, rstd, weight, seed if seed is not None else mean, da, dx,
            partial, rows, n, p, 1.0 / (1.0 - p), DROP=bool(p), HAS_DY2=dy2 is not None, SUM_DA=sum_da,
            ROWS=tile * steps, TILE=tile, BLOCK=triton.next_power_of_2(n), num_warps=warps,
        )  # fmt: skip
    dw, db, *sums = partial.sum(0)
    return da, dx, dw, db, sums[0] if sum_da else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dimension, rounded to x's dtype before the scale; x: (..., N)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight, y, x2.stride(0), n, eps, BLOCK=block, num_warps=4 if block <= 1024 else 8
        )
    return y.view(x.shape)


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
