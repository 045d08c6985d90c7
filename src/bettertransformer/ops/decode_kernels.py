"""Triton kernels of a one-token decode step (CUDA, fp16/bf16).

At batch 1 a decode step is a chain of small kernels, each waiting on the one before. Its time is the number of
kernels times how long each one waits, not the bytes moved, so these kernels cut both:

- The matrix product takes the LayerNorm before it as a prologue (each program normalises the few input rows itself)
  and the residual add after it as an epilogue. A GPT-2 layer is then five kernels: LN+QKV (writing keys/values into
  the cache), attention, output projection + residual, LN+FFN-in+GELU, FFN-out + residual.
- On Hopper and newer every kernel here is launched with programmatic dependent launch (PDL): it may start while the
  kernel before it still runs, read its slab of the weights, and only then wait (``gdc_wait``) for that kernel's
  results. A kernel lets its successor start (``gdc_launch_dependents``) only after its own wait, so at most two
  kernels are in flight and everything written before the previous kernel is complete when a kernel starts. Reads
  before the wait are therefore limited to weights and to what earlier steps wrote (the attention's older cache
  slots and mask); what the previous kernel writes is read after the wait, and nothing is written before it.
- The greedy choice of the next token happens in the LM head's epilogue (a max per program) and one small reduction.
"""

from __future__ import annotations

import functools

import torch

from ..switches import SWITCHES
from .step_buffers import StepBuffers

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs
    AVAILABLE = False

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # CPU-only installs, Triton before 3.4
    _HAS_GDC = False


@functools.cache
def _device_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _pdl(x: torch.Tensor) -> dict:
    """Launch options for a kernel reading ``x``: ``launch_pdl`` where the device and Triton support it (compute
    capability 9.0+), unless ``SWITCHES.pdl`` is off."""
    on = (
        SWITCHES.pdl
        and _HAS_GDC
        and x.is_cuda  # not under Triton's interpreter, which runs on CPU tensors
        and _device_pdl(x.device.index if x.device.index is not None else torch.cuda.current_device())
    )
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if AVAILABLE and not _HAS_GDC:

    @triton.jit
    def gdc_wait():  # never called: PDL stays off without these intrinsics
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


if AVAILABLE:

    @triton.jit
    def _wait_for_previous(PDL: tl.constexpr):
        # Everything before this line may only read weights; the previous kernel's results are visible after it.
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _normalize(x, nw, nb, mean, rstd, inside):
        # LayerNorm of rows x (fp32) with their statistics; zero outside the matrix.
        return tl.where(inside, (x - mean[:, None]) * rstd[:, None] * nw[None, :] + nb[None, :], 0.0)

    @triton.jit
    def _input_chunk(x_ptrs, NW, NB, rows, cols, M, K, mean, rstd, NORM: tl.constexpr):
        # Rows of X (at x_ptrs) at columns cols in fp32, LayerNorm-ed when NORM.
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
        if NORM:
            nw = tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
            nb = tl.load(NB + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = _normalize(x, nw, nb, mean, rstd, inside)
        return x

    @triton.jit
    def _accumulate(acc, x, w, BLOCK_M: tl.constexpr):
        if BLOCK_M == 1:  # one row: multiply-add on the CUDA cores (a tensor-core tile would be 15/16 padding)
            return acc + tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        return tl.dot(x, w, acc)

    @triton.jit
    def _linear_kernel(
        X, W, B, Y, R, NW, NB, PEN, KV, SLOT, PV, PI,
        M, N, K, stride_xm, stride_wk, stride_wn, stride_ym, stride_rm, eps,
        split, kv_width, stride_kv_which, stride_kv_b, stride_kv_h, stride_kv_s, stride_pm,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GELU_TANH: tl.constexpr, RESIDUAL: tl.constexpr,
        KV_WRITE: tl.constexpr, ARGMAX: tl.constexpr, HAS_PEN: tl.constexpr, STORE_Y: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ONE_CHUNK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # act(norm(X) @ W + B) for M <= BLOCK_M rows; one program streams a BLOCK_N-wide slab of W, its first
        # BLOCK_K rows (all of it when ONE_CHUNK: K <= BLOCK_K) before waiting on the previous kernel. The product is
        # rounded to W's dtype, as a stock nn.Linear's output is, before GELU, the residual add or the argmax.
        # NORM: LayerNorm (NW, NB, eps) of X's rows first, rounded to W's dtype as the stock LayerNorm's output is.
        # RESIDUAL: R += that, in place (each program owns its columns). KV_WRITE: columns >= split are keys then
        # values, written into the cache at slot SLOT instead of Y. ARGMAX: the max of each row's (product + PEN)
        # over the program's columns and its first index, into PV, PI (M, programs).
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        in_cols = cols < N
        valid = (rows[:, None] < M) & in_cols[None, :]
        dtype = W.dtype.element_ty
        w_ptrs = W + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=(ks[:, None] < K) & in_cols[None, :], other=0.0)
        if HAS_BIAS:
            bias = tl.load(B + cols, mask=in_cols, other=0.0).to(tl.float32)
        if NORM and ONE_CHUNK:
            nw = tl.load(NW + ks, mask=ks < K, other=0.0).to(tl.float32)
            nb = tl.load(NB + ks, mask=ks < K, other=0.0).to(tl.float32)
        _wait_for_previous(PDL)
        x_ptrs = X + rows[:, None] * stride_xm + ks[None, :]
        inside = (rows[:, None] < M) & (ks[None, :] < K)
        if RESIDUAL:  # read early: its latency overlaps the product
            r_ptrs = R + rows[:, None] * stride_rm + cols[None, :]
            r = tl.load(r_ptrs, mask=valid, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if ONE_CHUNK:
            x = tl.load(x_ptrs, mask=inside, other=0.0)
            if NORM:  # statistics in fp32 from the row in registers, variance about the mean
                xf = x.to(tl.float32)
                mean = tl.sum(xf, axis=1) / K
                d = tl.where(inside, xf - mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)
                x = _normalize(xf, nw, nb, mean, rstd, inside)
            acc = _accumulate(acc, x.to(dtype), w, BLOCK_M)
        else:
            mean = tl.zeros((BLOCK_M,), tl.float32)
            rstd = tl.zeros((BLOCK_M,), tl.float32)
            if NORM:  # statistics in fp32 in two passes over the row chunks, variance about the mean
                total = tl.zeros((BLOCK_M,), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    x = tl.load(x_ptrs + k0, mask=inside & ((k0 + ks)[None, :] < K), other=0.0)
                    total += tl.sum(x.to(tl.float32), axis=1)
                mean = total / K
                total = tl.zeros((BLOCK_M,), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    chunk = inside & ((k0 + ks)[None, :] < K)
                    x = tl.load(x_ptrs + k0, mask=chunk, other=0.0)
                    d = tl.where(chunk, x.to(tl.float32) - mean[:, None], 0.0)
                    total += tl.sum(d * d, axis=1)
                rstd = 1.0 / tl.sqrt(total / K + eps)
            x = _input_chunk(x_ptrs, NW, NB, rows, ks, M, K, mean, rstd, NORM)
            acc = _accumulate(acc, x.to(dtype), w, BLOCK_M)
            for k0 in range(BLOCK_K, K, BLOCK_K):  # a loop the compiler pipelines: no branch inside
                w = tl.load(w_ptrs + k0 * stride_wk, mask=((k0 + ks)[:, None] < K) & in_cols[None, :], other=0.0)
                x = _input_chunk(x_ptrs + k0, NW, NB, rows, k0 + ks, M, K, mean, rstd, NORM)
                acc = _accumulate(acc, x.to(dtype), w, BLOCK_M)
        if HAS_BIAS:
            acc += bias[None, :]
        acc = acc.to(dtype).to(tl.float32)
        if GELU_TANH:
            inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
        if RESIDUAL:
            acc += r
            tl.store(r_ptrs, acc.to(R.dtype.element_ty), mask=valid)
        if ARGMAX:
            scores = acc
            if HAS_PEN:
                scores += tl.load(PEN + cols, mask=in_cols, other=0.0)[None, :]
            scores = tl.where(in_cols[None, :], scores, float("-inf"))
            best = tl.max(scores, axis=1)
            first = tl.argmax(scores, axis=1, tie_break_left=True)
            tl.store(PV + rows * stride_pm + pid, best, mask=rows < M)
            tl.store(PI + rows * stride_pm + pid, pid * BLOCK_N + first, mask=rows < M)
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
        elif STORE_Y:
            tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=valid)

    @triton.jit
    def _argmax_rows_kernel(PV, PI, OUT, P, stride_pm, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
        # The first index of each row's maximum, from the per-program maxima of _linear_kernel's ARGMAX.
        row = tl.program_id(0)
        _wait_for_previous(PDL)
        p = tl.arange(0, BLOCK_P)
        values = tl.load(PV + row * stride_pm + p, mask=p < P, other=float("-inf"))
        index = tl.load(PI + row * stride_pm + p, mask=p < P, other=2147483647)
        best = tl.max(values, axis=0)
        tl.store(OUT + row, tl.min(tl.where(values == best, index, 2147483647), axis=0).to(tl.int64))

    @triton.jit
    def _embed_kernel(TOK, POS, WTE, WPE, X, E, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < E
        _wait_for_previous(PDL)
        tok = tl.load(TOK + row)
        pos = tl.load(POS + row)
        a = tl.load(WTE + tok * E + cols, mask=m).to(tl.float32)
        b = tl.load(WPE + pos * E + cols, mask=m).to(tl.float32)
        tl.store(X + row * E + cols, (a + b).to(X.dtype.element_ty), mask=m)

    @triton.jit
    def _advance_kernel(
        CHOSEN, UNFINISHED, EOS, PAD, OUT, TOK, POS, STEP, SLOT, VALID, MASK, ACTIVE, PENALTY, BAN, B, stride_out, S,
        NUM_EOS: tl.constexpr, HAS_BAN: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        rows = tl.arange(0, BLOCK_B)
        inb = rows < B
        _wait_for_previous(PDL)
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
    def _attention_scores(q, k, mask):
        return tl.sum(k.to(tl.float32) * q[None, :], axis=1) + mask.to(tl.float32)

    @triton.jit
    def _decode_attention_kernel(
        Q, K, V, MASK, SLOT, OUT, S, stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
        stride_vs, stride_mb, stride_ob, stride_oh, scale, GROUP: tl.constexpr, D: tl.constexpr,
        BLOCK_S: tl.constexpr, ONE_BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # One query token per (row, head) over S cached keys, with an additive (B, S) mask; online softmax.
        # ONE_BLOCK (S <= BLOCK_S): the cache is read before the wait. Only the slot SLOT was written by the kernel
        # before (this token's key/value); the other slots and the mask date from earlier steps. That slot is read
        # again after the wait.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        kv_h = h // GROUP
        d = tl.arange(0, D)
        k_row = K + b * stride_kb + kv_h * stride_kh
        v_row = V + b * stride_vb + kv_h * stride_vh
        if ONE_BLOCK:
            ss = tl.arange(0, BLOCK_S)
            inside = ss < S
            k = tl.load(k_row + ss[:, None] * stride_ks + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_row + ss[:, None] * stride_vs + d[None, :], mask=inside[:, None], other=0.0)
            mask = tl.load(MASK + b * stride_mb + ss, mask=inside, other=float("-inf"))
            slot = tl.load(SLOT)
            _wait_for_previous(PDL)
            q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
            new = (ss == slot)[:, None]
            k = tl.where(new, tl.load(k_row + slot * stride_ks + d)[None, :], k)
            v = tl.where(new, tl.load(v_row + slot * stride_vs + d)[None, :], v)
            scores = _attention_scores(q, k, mask)
            p = tl.exp(scores - tl.max(scores, axis=0))
            out = tl.sum(p[:, None] * v.to(tl.float32), axis=0) / tl.sum(p, axis=0)
        else:
            _wait_for_previous(PDL)
            q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
            m_i = -1.0e30
            l_i = 0.0
            acc = tl.zeros((D,), tl.float32)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + tl.arange(0, BLOCK_S)
                inside = ss < S
                k = tl.load(k_row + ss[:, None] * stride_ks + d[None, :], mask=inside[:, None], other=0.0)
                v = tl.load(v_row + ss[:, None] * stride_vs + d[None, :], mask=inside[:, None], other=0.0)
                mask = tl.load(MASK + b * stride_mb + ss, mask=inside, other=float("-inf"))
                scores = _attention_scores(q, k, mask)
                m_new = tl.maximum(m_i, tl.max(scores, axis=0))
                p = tl.exp(scores - m_new)
                alpha = tl.exp(m_i - m_new)
                acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                m_i = m_new
            out = acc / l_i
        tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty))


MAX_ROWS = 16  # rows one linear kernel takes (one tensor-core tile)
Norm = tuple[torch.Tensor, torch.Tensor, float]  # LayerNorm (weight, bias, eps)


def linear_config(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (m, k) @ (k, n) product. For one row: a few hundred programs, each
    reading up to 16K weights before the wait (the best of a sweep on the fused GPT-2 step, BENCHMARKS.md)."""
    if m == 1:
        block_n = 8 if n <= 1024 else 16 if n <= 8192 else 32
        return block_n, min(triton.next_power_of_2(k), max(16, 16384 // block_n)), 4
    return (8, 256, 2) if n <= 1024 else (64, 128, 4) if n >= 16384 else (32, 128, 2)


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
    kv: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    split: int = 0,
    head_dim: int = 0,
    eos_penalty: torch.Tensor | None = None,
    argmax: bool = False,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """act(norm(x) @ W + bias) for x (M <= 16, K) contiguous; W is ``weight`` (K, N) or, if ``transposed``,
    ``weight.T`` of an (N, K) weight (nn.Linear). ``norm``: LayerNorm (weight, bias, eps) of x's rows first.

    - ``residual`` (M, N): ``residual += result`` in place; returns ``residual``.
    - ``kv`` (2, M, Hkv, S, head_dim) and ``slot`` (1,): only the first ``split`` columns are returned; the rest,
      keys then values, are written into ``kv`` at that slot.
    - ``argmax``: returns the (M,) int64 first index of each row's maximum of (result + ``eos_penalty``).
    """
    m, k = x.shape
    n = weight.shape[0] if transposed else weight.shape[1]
    block_n, block_k, warps = config or linear_config(m, k, n)
    stride_wk, stride_wn = (weight.stride(1), weight.stride(0)) if transposed else (weight.stride(0), weight.stride(1))
    programs = triton.cdiv(n, block_n)
    store_y = residual is None and not argmax
    y = x.new_empty((m, split if kv is not None else n) if store_y else (1,), dtype=out_dtype or x.dtype)
    r = residual if residual is not None else y
    nw, nb, eps = norm if norm is not None else (x, x, 0.0)
    kv_args = (
        (kv, slot, split, kv.shape[2] * head_dim, *kv.stride()[:4]) if kv is not None else (y, y, 0, 1, 0, 0, 0, 0)
    )
    if argmax:
        partial_values = x.new_empty(m, programs, dtype=torch.float32)
        partial_index = x.new_empty(m, programs, dtype=torch.int32)
    else:
        partial_values = partial_index = y
    pdl = _pdl(x)
    _linear_kernel[(programs,)](
        x, weight, bias if bias is not None else x, y, r, nw, nb, eos_penalty if eos_penalty is not None else x,
        kv_args[0], kv_args[1], partial_values, partial_index, m, n, k, x.stride(0), stride_wk, stride_wn,
        y.stride(0), r.stride(0), eps, *kv_args[2:], programs, HAS_BIAS=bias is not None, NORM=norm is not None,
        GELU_TANH=gelu_tanh, RESIDUAL=residual is not None, KV_WRITE=kv is not None, ARGMAX=argmax,
        HAS_PEN=eos_penalty is not None, STORE_Y=store_y, HEAD_DIM=max(head_dim, 1), BLOCK_M=1 if m == 1 else MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, ONE_CHUNK=k <= block_k, num_warps=warps, num_stages=2 if n >= 16384 else 4,
        **pdl,
    )  # fmt: skip
    if residual is not None:
        return residual
    if not argmax:
        return y
    chosen = x.new_empty(m, dtype=torch.long)
    _argmax_rows_kernel[(m,)](
        partial_values, partial_index, chosen, programs, programs, BLOCK_P=triton.next_power_of_2(programs), **pdl
    )  # fmt: skip
    return chosen


def embed(tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """wte[tokens] + wpe[positions]: tokens, positions (B,) int64 -> (B, E)."""
    batch, width = tokens.shape[0], wte.shape[1]
    x = torch.empty(batch, width, device=wte.device, dtype=wte.dtype)
    _embed_kernel[(batch,)](tokens, positions, wte, wpe, x, width, BLOCK=triton.next_power_of_2(width), **_pdl(wte))
    return x


def advance(chosen: torch.Tensor, buffers: StepBuffers) -> None:
    """The bookkeeping of one generated token in one launch (see ``ops.sampling.advance``)."""
    b = buffers
    batch = chosen.shape[0]
    has_ban = b.eos_penalty is not None
    _advance_kernel[(1,)](
        chosen, b.unfinished, b.eos, b.pad, b.out, b.tokens, b.positions, b.step, b.slot, b.valid, b.mask, b.active,
        b.eos_penalty if b.eos_penalty is not None else b.mask, b.ban_steps, batch, b.out.stride(0), b.valid.shape[1],
        NUM_EOS=b.eos.numel(), HAS_BAN=has_ban, BLOCK_B=max(16, triton.next_power_of_2(batch)), **_pdl(b.mask),
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    slot: torch.Tensor,
    scale: float,
    block_s: int = 64,
    warps: int = 4,
) -> torch.Tensor:
    """Attention of one new token per row: q (B, H, D) over k, v (B, Hkv, S, D) (last dim contiguous) with an
    additive mask (B, S). ``slot`` (1,): the cache slot of this token, whose key/value the kernel before wrote.
    Returns (B, H, D)."""
    batch, heads, dim = q.shape
    out = torch.empty_like(q)
    slots = k.shape[2]
    _decode_attention_kernel[(batch, heads)](
        q, k, v, mask, slot, out, slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), out.stride(0), out.stride(1), scale,
        GROUP=heads // k.shape[1], D=dim, BLOCK_S=block_s, ONE_BLOCK=slots <= block_s, num_warps=warps, **_pdl(q),
    )  # fmt: skip
    return out
