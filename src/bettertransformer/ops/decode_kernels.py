"""Triton kernels of a one-token decode step (CUDA, fp16/bf16).

At batch 1 a decode step is a chain of small kernels, each waiting on the one before. Its time is the number of
kernels times how long each one waits, not the bytes moved, so these kernels cut both:

- The matrix product takes the LayerNorm before it as a prologue (each program normalises the few input rows itself)
  and the residual add after it as an epilogue. A GPT-2 layer is then five kernels: LN+QKV, attention (writing the
  new key/value into the cache; the rotary kernel without rotation), output projection + residual,
  LN+FFN-in+GELU, FFN-out + residual.
- On Hopper and newer every kernel here is launched with programmatic dependent launch (PDL): it may start while the
  kernel before it still runs, read its slab of the weights, and only then wait (``gdc_wait``) for that kernel's
  results. A kernel lets its successor start (``gdc_launch_dependents``) only after its own wait, so at most two
  kernels are in flight and everything written before the previous kernel is complete when a kernel starts. Reads
  before the wait are therefore limited to weights and to what earlier steps wrote (the attention's older cache
  slots and mask); what the previous kernel writes is read after the wait, and nothing is written before it.
- The greedy choice of the next token happens in the LM head's epilogue (a max per program) and one small reduction.
- Over several rows (a batch), a product without an epilogue streams its weights through TMA descriptors on Hopper
  (``_rows_tma_kernel``), its first tile requested before the wait as the other kernels do; one with a residual add
  (the output and down projections) takes enough shared memory that one program fills an SM (``spread_rows``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from ..switches import SWITCHES
from .compile_ahead import launch
from .step_buffers import StepBuffers
from .triton_kernels import INTERPRETED

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
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_index(x: torch.Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def _on_hopper(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on a CUDA device of compute capability 9.0+ (PDL, TMA); False off CUDA."""
    return x.is_cuda and _hopper_or_newer(_device_index(x))


def _pdl(x: torch.Tensor) -> dict:
    """Launch options for a kernel reading ``x``: ``launch_pdl`` where the device and Triton support it (compute
    capability 9.0+), unless ``SWITCHES.pdl`` is off."""
    on = (
        SWITCHES.pdl and _HAS_GDC and _on_hopper(x)  # not under Triton's interpreter, which runs on CPU tensors
    )
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


try:  # host-side TMA descriptors (Triton 3.4+)
    from triton.tools.tensor_descriptor import TensorDescriptor

    _HAS_TMA = True
except ImportError:
    _HAS_TMA = False


try:  # accurate cos/sin (positions in the thousands turn angles far past 2 pi); Triton's interpreter uses numpy's
    from triton.language.extra import libdevice

    _HAS_LIBDEVICE = os.environ.get("TRITON_INTERPRET") != "1"
except ImportError:
    _HAS_LIBDEVICE = False

if AVAILABLE and not _HAS_GDC:

    @triton.jit
    def gdc_wait():  # never called: PDL stays off without these intrinsics
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


if AVAILABLE:
    if _HAS_LIBDEVICE:

        @triton.jit
        def _cos(x):
            return libdevice.cos(x)

        @triton.jit
        def _sin(x):
            return libdevice.sin(x)

    else:

        @triton.jit
        def _cos(x):
            return tl.cos(x)

        @triton.jit
        def _sin(x):
            return tl.sin(x)

    @triton.jit
    def _wait_for_previous(PDL: tl.constexpr):
        # Everything before this line may only read weights; the previous kernel's results are visible after it.
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _normalize(x, nw, nb, mean, rstd, inside, offset, NORM: tl.constexpr, ROUND_FIRST: tl.constexpr, DTYPE):
        # Rows x (fp32) normalised with their statistics (mean 0 for RMSNorm), times the weight (+ ``offset``, Gemma's
        # 1 + w), plus the bias (LayerNorm); zero outside the matrix. ROUND_FIRST: the normalised row is rounded to
        # DTYPE before the weight multiplies it (Llama's RMSNorm; Gemma's and OLMo 2's multiply in fp32).
        y = (x - mean[:, None]) * rstd[:, None]
        if ROUND_FIRST:
            y = y.to(DTYPE).to(tl.float32)
        y = y * (nw[None, :] + offset)
        if NORM == 1:
            y += nb[None, :]
        return tl.where(inside, y, 0.0)

    @triton.jit
    def _normalize_whole(x, nw, nb, inside, K, eps, offset, NORM: tl.constexpr, ROUND_FIRST: tl.constexpr, DTYPE,
                         ROWS: tl.constexpr):  # fmt: skip
        # ``_normalize`` of ROWS rows held whole (all K columns) in x (fp32), their statistics computed from x: mean 0
        # unless NORM == 1 (LayerNorm), variance about the mean.
        mean = tl.zeros((ROWS,), tl.float32)
        if NORM == 1:
            mean = tl.sum(x, axis=1) / K
        d = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)
        return _normalize(x, nw, nb, mean, rstd, inside, offset, NORM, ROUND_FIRST, DTYPE)

    @triton.jit
    def _normalize_split(x, x2, nw, nb, nw2, nb2, inside, inside2, K, eps, offset, NORM: tl.constexpr,
                         ROUND_FIRST: tl.constexpr, DTYPE, ROWS: tl.constexpr):  # fmt: skip
        # ``_normalize_whole`` of rows held whole in two pieces (x: the first columns, x2: the rest; fp32).
        mean = tl.zeros((ROWS,), tl.float32)
        if NORM == 1:
            mean = (tl.sum(x, axis=1) + tl.sum(x2, axis=1)) / K
        d = tl.where(inside, x - mean[:, None], 0.0)
        d2 = tl.where(inside2, x2 - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(d * d, axis=1) + tl.sum(d2 * d2, axis=1)) / K + eps)
        y = _normalize(x, nw, nb, mean, rstd, inside, offset, NORM, ROUND_FIRST, DTYPE)
        y2 = _normalize(x2, nw2, nb2, mean, rstd, inside2, offset, NORM, ROUND_FIRST, DTYPE)
        return y, y2

    @triton.jit
    def _settle(x, t, pw, t_rstd, p_offset, P_ROUND_FIRST: tl.constexpr, DTYPE):
        # x + RMSNorm(t) (fp32 in and out, t's 1/rms given): a residual add after a post-sublayer norm, each operation
        # rounded to DTYPE as the stock norm's output and the stock add are.
        y = t * t_rstd[:, None]
        if P_ROUND_FIRST:
            y = y.to(DTYPE).to(tl.float32)
        y = (y * (pw[None, :] + p_offset)).to(DTYPE).to(tl.float32)
        return (x + y).to(DTYPE).to(tl.float32)

    @triton.jit
    def _input_chunk(x_ptrs, NW, NB, rows, cols, M, K, mean, rstd, offset, NORM: tl.constexpr,
                     ROUND_FIRST: tl.constexpr, DTYPE):  # fmt: skip
        # Rows of X (at x_ptrs) at columns cols in fp32, normalised when NORM.
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
        if NORM != 0:
            nw = tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
            nb = nw
            if NORM == 1:
                nb = tl.load(NB + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = _normalize(x, nw, nb, mean, rstd, inside, offset, NORM, ROUND_FIRST, DTYPE)
        return x

    @triton.jit
    def _accumulate(acc, x, w, BLOCK_M: tl.constexpr):
        if BLOCK_M == 1:  # one row: multiply-add on the CUDA cores (a tensor-core tile would be 15/16 padding)
            return acc + tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        return tl.dot(x, w, acc)

    @triton.jit
    def _tanh(x):
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _activation(x, ACT: tl.constexpr):
        # 1: tanh GELU; 2: SiLU. x in fp32.
        if ACT == 1:
            x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
        elif ACT == 2:
            x = x / (1.0 + tl.exp(-x))
        return x

    @triton.jit
    def _linear_kernel(
        X, W, B, W2, B2, W3, B3, Y, R, NW, NB, PEN, PV, PI,
        M, N, K, n1, n2, stride_xm, stride_wk, stride_wn, stride_ym, stride_rm, eps, norm_offset, softcap, out_scale,
        out_divide, stride_pm,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ROUND_FIRST: tl.constexpr, ACT: tl.constexpr,
        GATED: tl.constexpr, SEGMENTS: tl.constexpr, SOFTCAP: tl.constexpr, RESIDUAL: tl.constexpr,
        ARGMAX: tl.constexpr, HAS_PEN: tl.constexpr, STORE_Y: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr, TAIL: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        # act(norm(X) @ W + B) for M <= BLOCK_M rows; one program streams a BLOCK_N-wide slab of W, its first
        # BLOCK_K rows (all of it when ONE_CHUNK: K <= BLOCK_K) before waiting on the previous kernel. The product is
        # rounded to W's dtype, as a stock nn.Linear's output is, before the activation, the residual add or the
        # argmax. TAIL (ONE_CHUNK only): K is held as two pieces, BLOCK_K columns and up to TAIL more (a K such as
        # 2,304 = 2,048 + 256 read whole, without a chunk that is mostly padding).
        # NORM: 1 LayerNorm (NW, NB, eps), 2 RMSNorm (NW + norm_offset, eps) of X's rows first, rounded to W's dtype
        # as the stock norm's output is.
        # SEGMENTS: the output columns are those of up to three matrices side by side (W, W2, W3 with biases B, B2,
        # B3; W2's columns start at n1, W3's at n2; BLOCK_N divides both), each (K, width) with W's strides: the
        # separate q, k and v projections of a Llama layer as one product.
        # GATED: act(norm(X) @ W + B) * (norm(X) @ W2 + B2), each product rounded first (a gated MLP's gate and up).
        # Then y * out_scale / out_divide (Granite's residual and logit multipliers), each rounded as stock's are
        # (exact when they are 1).
        # SOFTCAP: softcap * tanh(y / softcap), rounded after each operation as a stock LM head's dtype ops are.
        # RESIDUAL: R += that, in place (each program owns its columns). ARGMAX: the max of each row's (product +
        # PEN) over the program's columns and its first index, into PV, PI (M, programs).
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        in_cols = cols < N
        valid = (rows[:, None] < M) & in_cols[None, :]
        dtype = W.dtype.element_ty
        w_base = W
        b_base = B
        first = 0
        if SEGMENTS > 1:  # which matrix this program's columns belong to
            if pid * BLOCK_N >= n1:
                w_base = W2
                b_base = B2
                first = n1
            if SEGMENTS > 2:
                if pid * BLOCK_N >= n2:
                    w_base = W3
                    b_base = B3
                    first = n2
        local = cols - first
        w_ptrs = w_base + ks[:, None] * stride_wk + local[None, :] * stride_wn
        u_ptrs = W2 + ks[:, None] * stride_wk + local[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=(ks[:, None] < K) & in_cols[None, :], other=0.0)
        if GATED:
            u = tl.load(u_ptrs, mask=(ks[:, None] < K) & in_cols[None, :], other=0.0)
        if HAS_BIAS:
            bias = tl.load(b_base + local, mask=in_cols, other=0.0).to(tl.float32)
            if GATED:
                bias_u = tl.load(B2 + local, mask=in_cols, other=0.0).to(tl.float32)
        if NORM != 0 and ONE_CHUNK:
            nw = tl.load(NW + ks, mask=ks < K, other=0.0).to(tl.float32)
            nb = nw
            if NORM == 1:
                nb = tl.load(NB + ks, mask=ks < K, other=0.0).to(tl.float32)
        if TAIL > 0:  # the second piece of k, every weight of the slab requested before the wait
            kt = BLOCK_K + tl.arange(0, TAIL)
            tail_w = (kt[:, None] < K) & in_cols[None, :]
            w_t = tl.load(w_base + kt[:, None] * stride_wk + local[None, :] * stride_wn, mask=tail_w, other=0.0)
            if GATED:
                u_t = tl.load(W2 + kt[:, None] * stride_wk + local[None, :] * stride_wn, mask=tail_w, other=0.0)
            if NORM != 0:
                nw_t = tl.load(NW + kt, mask=kt < K, other=0.0).to(tl.float32)
                nb_t = nw_t
                if NORM == 1:
                    nb_t = tl.load(NB + kt, mask=kt < K, other=0.0).to(tl.float32)
        _wait_for_previous(PDL)
        x_ptrs = X + rows[:, None] * stride_xm + ks[None, :]
        inside = (rows[:, None] < M) & (ks[None, :] < K)
        if RESIDUAL:  # read early: its latency overlaps the product
            r_ptrs = R + rows[:, None] * stride_rm + cols[None, :]
            r = tl.load(r_ptrs, mask=valid, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if ONE_CHUNK:
            x = tl.load(x_ptrs, mask=inside, other=0.0)
            if TAIL > 0:
                inside_t = (rows[:, None] < M) & (kt[None, :] < K)
                x_t = tl.load(X + rows[:, None] * stride_xm + kt[None, :], mask=inside_t, other=0.0)
                if NORM != 0:  # statistics from the rows in registers
                    x, x_t = _normalize_split(x.to(tl.float32), x_t.to(tl.float32), nw, nb, nw_t, nb_t, inside,
                                              inside_t, K, eps, norm_offset, NORM, ROUND_FIRST, dtype, BLOCK_M)  # fmt: skip
                x_t = x_t.to(dtype)
                acc = _accumulate(acc, x_t, w_t, BLOCK_M)
                if GATED:
                    acc_u = _accumulate(acc_u, x_t, u_t, BLOCK_M)
            elif NORM != 0:  # statistics from the rows in registers
                x = _normalize_whole(x.to(tl.float32), nw, nb, inside, K, eps, norm_offset, NORM, ROUND_FIRST, dtype,
                                     BLOCK_M)  # fmt: skip
            x = x.to(dtype)
            acc = _accumulate(acc, x, w, BLOCK_M)
            if GATED:
                acc_u = _accumulate(acc_u, x, u, BLOCK_M)
        else:
            mean = tl.zeros((BLOCK_M,), tl.float32)
            rstd = tl.zeros((BLOCK_M,), tl.float32)
            if NORM != 0:  # statistics in fp32 over the row chunks (LayerNorm: two passes, variance about the mean)
                if NORM == 1:
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
            x = _input_chunk(x_ptrs, NW, NB, rows, ks, M, K, mean, rstd, norm_offset, NORM, ROUND_FIRST, dtype)
            x = x.to(dtype)
            acc = _accumulate(acc, x, w, BLOCK_M)
            if GATED:
                acc_u = _accumulate(acc_u, x, u, BLOCK_M)
            for k0 in range(BLOCK_K, K, BLOCK_K):  # a loop the compiler pipelines: no branch inside
                chunk_w = ((k0 + ks)[:, None] < K) & in_cols[None, :]
                w = tl.load(w_ptrs + k0 * stride_wk, mask=chunk_w, other=0.0)
                if GATED:
                    u = tl.load(u_ptrs + k0 * stride_wk, mask=chunk_w, other=0.0)
                x = _input_chunk(
                    x_ptrs + k0, NW, NB, rows, k0 + ks, M, K, mean, rstd, norm_offset, NORM, ROUND_FIRST, dtype
                ).to(dtype)
                acc = _accumulate(acc, x, w, BLOCK_M)
                if GATED:
                    acc_u = _accumulate(acc_u, x, u, BLOCK_M)
        if HAS_BIAS:
            acc += bias[None, :]
        acc = acc.to(dtype).to(tl.float32)
        acc = _activation(acc, ACT)
        if GATED:
            if HAS_BIAS:
                acc_u += bias_u[None, :]
            acc = acc.to(dtype).to(tl.float32) * acc_u.to(dtype).to(tl.float32)
        acc = (acc.to(dtype).to(tl.float32) * out_scale).to(dtype).to(tl.float32)
        acc = (acc / out_divide).to(dtype).to(tl.float32)
        if SOFTCAP:
            acc = (acc / softcap).to(dtype).to(tl.float32)
            acc = (_tanh(acc)).to(dtype).to(tl.float32)
            acc = (acc * softcap).to(dtype).to(tl.float32)
        if RESIDUAL:
            acc += r
            tl.store(r_ptrs, acc.to(R.dtype.element_ty), mask=valid)
        if ARGMAX:
            scores = acc
            if HAS_PEN:
                scores += tl.load(PEN + cols, mask=in_cols, other=0.0)[None, :]
            scores = tl.where(in_cols[None, :], scores, float("-inf"))
            best = tl.max(scores, axis=1)
            first_max = tl.argmax(scores, axis=1, tie_break_left=True)
            tl.store(PV + rows * stride_pm + pid, best, mask=rows < M)
            tl.store(PI + rows * stride_pm + pid, pid * BLOCK_N + first_max, mask=rows < M)
        if STORE_Y:
            tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=valid)

    @triton.jit
    def _rows_stream(x_desc, w_desc, n0, K, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
        # x (BLOCK_M, K) @ the BLOCK_N rows of W (N, K) from n0, in fp32; the first chunk of W requested before the
        # wait, the rest streamed through TMA in a pipelined loop.
        w = w_desc.load([n0, 0])
        _wait_for_previous(PDL)
        acc = tl.dot(x_desc.load([0, 0]), w.T)
        for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
            acc = tl.dot(x_desc.load([0, k0]), w_desc.load([n0, k0]).T, acc)
        return acc

    @triton.jit
    def _rows_tma_kernel(
        X_DESC, W_DESC, W2_DESC, W3_DESC, B, B2, B3, Y, M, N, K, n1, n2, stride_ym,
        HAS_BIAS: tl.constexpr, SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # norm(X) @ W.T + B for 2 <= M <= BLOCK_M rows already normalised, W (N, K) as nn.Linear keeps it, read
        # through TMA descriptors: up to three matrices side by side (``_linear_kernel``'s SEGMENTS), one program a
        # BLOCK_N-wide slab of one of them. Rounded to W's dtype, then stored as Y's.
        pid = tl.program_id(0)
        start = pid * BLOCK_N
        first = 0
        b_base = B
        if SEGMENTS > 2 and start >= n2:
            first = n2
            b_base = B3
            acc = _rows_stream(X_DESC, W3_DESC, start - n2, K, BLOCK_K, STAGES, PDL)
        elif SEGMENTS > 1 and start >= n1:
            first = n1
            b_base = B2
            acc = _rows_stream(X_DESC, W2_DESC, start - n1, K, BLOCK_K, STAGES, PDL)
        else:
            acc = _rows_stream(X_DESC, W_DESC, start, K, BLOCK_K, STAGES, PDL)
        rows = tl.arange(0, BLOCK_M)
        cols = start + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(b_base + cols - first, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        acc = acc.to(W_DESC.dtype).to(tl.float32)
        valid = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=valid)

    @triton.jit
    def _first_max(values, index):
        # The maximum of ``values`` and the smallest of the indices where it is reached.
        top = tl.max(values, axis=0)
        return top, tl.min(tl.where(values == top, index, 2147483647), axis=0)

    @triton.jit
    def _argmax_rows_kernel(PV, PI, OUT, BV, BI, CNT, P, stride_pm, BLOCK_P: tl.constexpr, CHUNKS: tl.constexpr,
                            BLOCK_C: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # The first index of each row's maximum, from the per-program maxima of _linear_kernel's ARGMAX. Program
        # (row, c) reads chunk c of BLOCK_P of them; with several chunks it writes its chunk's maximum and first index
        # into BV, BI (rows, CHUNKS), and the last of the row's programs to finish (counted in CNT[row]) picks among
        # them. (One program reading a 256,000-word head's 32,000 maxima took 37 us in one chunk, 18.5 in a loop over
        # chunks of 2,048.) A chunk's indices all come after the chunk before's: the smallest index among the chunks
        # reaching the maximum is the row's first.
        row = tl.program_id(0)
        c = tl.program_id(1)
        _wait_for_previous(PDL)
        p = c * BLOCK_P + tl.arange(0, BLOCK_P)
        values = tl.load(PV + row * stride_pm + p, mask=p < P, other=float("-inf"))
        index = tl.load(PI + row * stride_pm + p, mask=p < P, other=2147483647)
        best, first = _first_max(values, index)
        if CHUNKS == 1:
            tl.store(OUT + row, first.to(tl.int64))
        else:
            tl.store(BV + row * CHUNKS + c, best)
            tl.store(BI + row * CHUNKS + c, first)
            if _last_to_finish(CNT + row, CHUNKS):
                q = tl.arange(0, BLOCK_C)
                chunk_best = tl.load(BV + row * CHUNKS + q, mask=q < CHUNKS, other=float("-inf"), cache_modifier=".cg")
                chunk_first = tl.load(BI + row * CHUNKS + q, mask=q < CHUNKS, other=2147483647, cache_modifier=".cg")
                tl.store(OUT + row, _first_max(chunk_best, chunk_first)[1].to(tl.int64))

    @triton.jit
    def _embed_kernel(TOK, POS, WTE, WPE, X, E, scale, HAS_POS: tl.constexpr, SCALE: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # WTE[token] (+ WPE[position]) or WTE[token] * scale (Gemma's scaled embedding, the scale in X's dtype).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < E
        _wait_for_previous(PDL)
        tok = tl.load(TOK + row)
        a = tl.load(WTE + tok * E + cols, mask=m).to(tl.float32)
        if HAS_POS:
            pos = tl.load(POS + row)
            a += tl.load(WPE + pos * E + cols, mask=m).to(tl.float32)
        if SCALE:
            a *= scale
        tl.store(X + row * E + cols, a.to(X.dtype.element_ty), mask=m)

    @triton.jit
    def _norm_rows_kernel(X, NW, NB, Y, T, PW, R_OUT, K, stride_xm, eps, offset, p_eps, p_offset,
                          NORM: tl.constexpr, ROUND_FIRST: tl.constexpr, PENDING: tl.constexpr,
                          P_ROUND_FIRST: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # One row of X per program, normalised as ``_linear_kernel``'s prologue normalises a row it holds whole, into
        # Y (contiguous) in Y's dtype. PENDING: X is a residual stream still owed RMSNorm(T) (weight PW, p_eps,
        # p_offset; T and R_OUT (M, K) contiguous, X too): the row normalised is X + RMSNorm(T), which is written to
        # R_OUT (``add_norm`` and this kernel in one).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = (cols < K)[None, :]
        nw = tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
        nb = nw
        if NORM == 1:
            nb = tl.load(NB + cols, mask=cols < K, other=0.0).to(tl.float32)
        if PENDING:
            pw = tl.load(PW + cols, mask=cols < K, other=0.0).to(tl.float32)
        _wait_for_previous(PDL)
        x = tl.load(X + row * stride_xm + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        if PENDING:
            t = tl.load(T + row * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            t_rstd = 1.0 / tl.sqrt(tl.sum(t * t, axis=1) / K + p_eps)
            x = tl.where(inside, _settle(x, t, pw, t_rstd, p_offset, P_ROUND_FIRST, X.dtype.element_ty), 0.0)
            tl.store(R_OUT + row * K + cols[None, :], x.to(X.dtype.element_ty), mask=inside)
        y = _normalize_whole(x, nw, nb, inside, K, eps, offset, NORM, ROUND_FIRST, Y.dtype.element_ty, 1)
        tl.store(Y + row * K + cols[None, :], y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _gated_kernel(G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # Y = act(G) * U elementwise (a gated MLP's two products, from cuBLAS), the activation rounded to G's dtype
        # before the product, as stock's two PyTorch kernels round it.
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        _wait_for_previous(PDL)
        g = tl.load(G + i, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(U + i, mask=inside, other=0.0).to(tl.float32)
        a = _activation(g, ACT).to(Y.dtype.element_ty).to(tl.float32)
        tl.store(Y + i, (a * u).to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _add_norm_kernel(X, T, NW, OUT, E, eps, offset, ROUND_FIRST: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):  # fmt: skip
        # OUT = X + RMSNorm(T) for one row per program (a norm after a sublayer, before its residual add: Gemma 2/3,
        # OLMo 2); OUT may be X. The norm's output is rounded to X's dtype, as the stock module's is, before the add.
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        w = tl.load(NW + c, mask=c < E, other=0.0).to(tl.float32)
        _wait_for_previous(PDL)
        cols = c[None, :]
        t = tl.load(T + row * E + cols, mask=cols < E, other=0.0).to(tl.float32)
        x = tl.load(X + row * E + cols, mask=cols < E, other=0.0).to(tl.float32)
        t_rstd = 1.0 / tl.sqrt(tl.sum(t * t, axis=1) / E + eps)
        y = _settle(x, t, w, t_rstd, offset, ROUND_FIRST, X.dtype.element_ty)
        tl.store(OUT + row * E + cols, y.to(X.dtype.element_ty), mask=cols < E)

    @triton.jit
    def _rotate(x, xp, d, pos, FREQ, rope_scale, ROT: tl.constexpr, INTERLEAVED: tl.constexpr, DTYPE):
        # Rotary embedding of one head x (fp32, BLOCK_D) whose partners are xp: dims d < ROT turn by
        # position * FREQ[d % (ROT / 2)] (rotate-half pairs d, d + ROT / 2), or, INTERLEAVED, by
        # position * FREQ[d // 2] (pairs 2i, 2i + 1); cos and sin are rounded to DTYPE, as stock computes them.
        if ROT == 0:  # a layer without positions (NoPE)
            return x
        half: tl.constexpr = ROT // 2
        rot = d < ROT
        if INTERLEAVED:
            angle = pos * tl.load(FREQ + d // 2, mask=rot, other=0.0)
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
        else:
            angle = pos * tl.load(FREQ + d % half, mask=rot, other=0.0)
            sign = tl.where(d < half, -1.0, 1.0)
        c = (_cos(angle) * rope_scale).to(DTYPE).to(tl.float32)
        s = (_sin(angle) * rope_scale).to(DTYPE).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each operation rounded to DTYPE as stock's tensor operations are
        turned = (x * c).to(DTYPE).to(tl.float32) + (sign * xp * s).to(DTYPE).to(tl.float32)
        return tl.where(rot, turned, x).to(DTYPE).to(tl.float32)

    @triton.jit
    def _partners(d, ROT: tl.constexpr, INTERLEAVED: tl.constexpr):
        # The feature each feature d of a head turns with: d +- ROT / 2 (rotate-half), d ^ 1 (INTERLEAVED); itself
        # past ROT.
        half: tl.constexpr = ROT // 2
        if INTERLEAVED:
            return tl.where(d < ROT, d ^ 1, d)
        return tl.where(d < ROT, tl.where(d < half, d + half, d - half), d)

    @triton.jit
    def _qk_norm(x, xp, d, partner, dm, NW, rstd, offset, NORM: tl.constexpr, ROUND_FIRST: tl.constexpr, DTYPE):
        # The per-head (or per-projection) RMSNorm of q or k and of the rotate-half partners, rounded to DTYPE.
        if NORM != 0:
            w = tl.load(NW + d, mask=dm, other=0.0).to(tl.float32)
            wp = tl.load(NW + partner, mask=dm, other=0.0).to(tl.float32)
            x = x * rstd
            xp = xp * rstd
            if ROUND_FIRST:
                x = x.to(DTYPE).to(tl.float32)
                xp = xp.to(DTYPE).to(tl.float32)
            x = (x * (w + offset)).to(DTYPE).to(tl.float32)
            xp = (xp * (wp + offset)).to(DTYPE).to(tl.float32)
        return x, xp

    @triton.jit
    def _head_rstd(ROW, start, width, eps, BLOCK: tl.constexpr):
        # 1 / rms of ROW[start : start + width].
        i = tl.arange(0, BLOCK)
        v = tl.load(ROW + start + i, mask=i < width, other=0.0).to(tl.float32)
        return 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / width + eps)

    @triton.jit
    def _qk_statistics(ROW, start, first, width, NW, h, eps, D: tl.constexpr, QK_NORM: tl.constexpr,
                       BLOCK_D: tl.constexpr, NORM_BLOCK: tl.constexpr):  # fmt: skip
        # (1 / rms, weights) of the q or k norm of head h, at ROW[start : start + D] of its projection ROW[first :
        # first + width]: over the head (QK_NORM 1, weights NW), or over the whole projection (QK_NORM 2, the head's
        # slice of NW); (1, NW) without a norm.
        rstd = 1.0
        weights = NW
        if QK_NORM == 1:
            rstd = _head_rstd(ROW, start, D, eps, BLOCK_D)
        elif QK_NORM == 2:
            rstd = _head_rstd(ROW, first, width, eps, NORM_BLOCK)
            weights = NW + h * D
        return rstd, weights

    @triton.jit
    def _cache_tile(k_row, v_row, mask_row, s0, stop, d, dm, stride_ks, stride_vs, BLOCK_S: tl.constexpr):
        # Keys, values and mask of cache slots s0 .. s0 + BLOCK_S, those from ``stop`` on masked (zero keys and
        # values, mask -inf): past the current slot (not written yet) or past this program's slice of the cache.
        ss = s0 + tl.arange(0, BLOCK_S)
        inside = ss < stop
        k = tl.load(k_row + ss[:, None] * stride_ks + d[None, :], mask=inside[:, None] & dm[None, :], other=0.0)
        v = tl.load(v_row + ss[:, None] * stride_vs + d[None, :], mask=inside[:, None] & dm[None, :], other=0.0)
        mask = tl.load(mask_row + ss, mask=inside, other=float("-inf")).to(tl.float32)
        return k, v, mask, ss

    @triton.jit
    def _attend_tile(m_i, l_i, acc, k, v, mask, ss, slot, q, kn, vn, window, softcap, WINDOW: tl.constexpr,
                     SOFTCAP: tl.constexpr):  # fmt: skip
        # One online-softmax update of a query q over a tile of the cache (keys k, values v, additive mask at slots
        # ss); the current slot's key and value come from kn, vn (registers), not from the cache.
        new = (ss == slot)[:, None]
        scores = tl.sum(tl.where(new, kn[None, :], k.to(tl.float32)) * q[None, :], axis=1)
        if SOFTCAP:
            scores = _tanh(scores / softcap) * softcap
        scores += mask
        if WINDOW:
            scores = tl.where(ss > slot - window, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * tl.where(new, vn[None, :], v.to(tl.float32)), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        return m_new, l_i, acc

    @triton.jit
    def _rope_attention_kernel(
        QKV, K, V, MASK, SLOT, POS, FREQ, QN, KN, OUT, PART_O, PART_ML, CNT,
        S, stride_qkv, q_width, k_width, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_mb, stride_ob, scale, rope_scale, eps, norm_offset, window, softcap, chunk,
        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
        QK_NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, ROUND_FIRST: tl.constexpr, WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr, BLOCK_S: tl.constexpr, ONE_BLOCK: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # One query token per (row, head) of a rotary decoder, from the raw QKV product (B, q | k | v): the q/k
        # norm (QK_NORM 1: per head; 2: over the whole projection, OLMo 2), the rotary embedding, the new key/value
        # written into the cache at SLOT (by the group's first head), then attention over the cache up to SLOT (the
        # slots written so far) with the additive mask, a sliding WINDOW (slots > SLOT - window) and a logit SOFTCAP.
        # The new slot's key/value are used from registers: other programs may not have written them yet.
        # SPLITS > 1 (few rows, a long cache): program (b, h, split) covers ``chunk`` slots and writes its
        # unnormalised output and (max, sum) into PART_O, PART_ML; the last of (b, h)'s programs to finish (counted
        # in CNT[b * heads + h]) merges them (``_merge_splits``).
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        split = tl.program_id(2)
        kv_h = h // GROUP
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        partner = _partners(d, ROT, INTERLEAVED)
        dtype = K.dtype.element_ty
        k_row = K + b * stride_kb + kv_h * stride_kh
        v_row = V + b * stride_vb + kv_h * stride_vh
        if ONE_BLOCK:
            k, v, mask, ss = _cache_tile(k_row, v_row, MASK + b * stride_mb, 0, S, d, dm, stride_ks, stride_vs, BLOCK_S)
        slot = tl.load(SLOT)
        if not ONE_BLOCK:  # this program's slice of the cache, and its first tile read before the wait
            start = split.to(tl.int64) * chunk  # int64 as the slot is: the tile loop below carries it
            stop = tl.minimum(tl.minimum(start + chunk, S), slot + 1)
            if WINDOW:
                start = tl.maximum(start, tl.maximum(slot - window + 1, 0) // BLOCK_S * BLOCK_S)
            k, v, mask, ss = _cache_tile(k_row, v_row, MASK + b * stride_mb, start, stop, d, dm, stride_ks, stride_vs,
                                         BLOCK_S)  # fmt: skip
        _wait_for_previous(PDL)
        row = QKV + b * stride_qkv
        pos = tl.load(POS + b).to(tl.float32)
        q_at = row + h * D
        k_at = row + q_width + kv_h * D
        q = tl.load(q_at + d, mask=dm, other=0.0).to(tl.float32)
        qp = tl.load(q_at + partner, mask=dm, other=0.0).to(tl.float32)
        kn = tl.load(k_at + d, mask=dm, other=0.0).to(tl.float32)
        kp = tl.load(k_at + partner, mask=dm, other=0.0).to(tl.float32)
        vn = tl.load(row + q_width + k_width + kv_h * D + d, mask=dm, other=0.0)
        q_rstd, q_norm = _qk_statistics(row, h * D, 0, q_width, QN, h, eps, D, QK_NORM, BLOCK_D, NORM_BLOCK)
        k_rstd, k_norm = _qk_statistics(row, q_width + kv_h * D, q_width, k_width, KN, kv_h, eps, D, QK_NORM, BLOCK_D,
                                        NORM_BLOCK)  # fmt: skip
        q, qp = _qk_norm(q, qp, d, partner, dm, q_norm, q_rstd, norm_offset, QK_NORM, ROUND_FIRST, dtype)
        kn, kp = _qk_norm(kn, kp, d, partner, dm, k_norm, k_rstd, norm_offset, QK_NORM, ROUND_FIRST, dtype)
        q = _rotate(q, qp, d, pos, FREQ, rope_scale, ROT, INTERLEAVED, dtype) * scale
        kn = _rotate(kn, kp, d, pos, FREQ, rope_scale, ROT, INTERLEAVED, dtype)
        if (h % GROUP == 0) & (split == 0):
            tl.store(k_row + slot * stride_ks + d, kn.to(dtype), mask=dm)
            tl.store(v_row + slot * stride_vs + d, vn, mask=dm)
        vn = vn.to(tl.float32)
        if ONE_BLOCK:
            new = (ss == slot)[:, None]
            scores = tl.sum(tl.where(new, kn[None, :], k.to(tl.float32)) * q[None, :], axis=1)
            if SOFTCAP:
                scores = _tanh(scores / softcap) * softcap
            scores += tl.where(ss <= slot, mask, float("-inf"))  # the slots written so far
            if WINDOW:
                scores = tl.where(ss > slot - window, scores, float("-inf"))
            p = tl.exp(scores - tl.max(scores, axis=0))
            out = tl.sum(p[:, None] * tl.where(new, vn[None, :], v.to(tl.float32)), axis=0) / tl.sum(p, axis=0)
        else:
            m_i = -1.0e30
            l_i = 0.0
            acc = tl.zeros((BLOCK_D,), tl.float32)
            # The first tile (read before the wait; all masked when the slice holds no slot to attend), then the rest.
            m_i, l_i, acc = _attend_tile(m_i, l_i, acc, k, v, mask, ss, slot, q, kn, vn, window, softcap, WINDOW,
                                         SOFTCAP)  # fmt: skip
            for s0 in range(start + BLOCK_S, stop, BLOCK_S):
                k, v, mask, ss = _cache_tile(k_row, v_row, MASK + b * stride_mb, s0, stop, d, dm, stride_ks,
                                             stride_vs, BLOCK_S)  # fmt: skip
                m_i, l_i, acc = _attend_tile(m_i, l_i, acc, k, v, mask, ss, slot, q, kn, vn, window, softcap, WINDOW,
                                             SOFTCAP)  # fmt: skip
            if SPLITS > 1:
                pair = b * tl.num_programs(1) + h
                part = pair * SPLITS + split
                tl.store(PART_O + part * BLOCK_D + d, acc)
                tl.store(PART_ML + part * 2, m_i)
                tl.store(PART_ML + part * 2 + 1, l_i)
                if _last_to_finish(CNT + pair, SPLITS):
                    _merge_splits(PART_O, PART_ML, OUT + b * stride_ob + h * D, pair, D, BLOCK_D, SPLITS)
                return
            out = acc / l_i
        tl.store(OUT + b * stride_ob + h * D + d, out.to(OUT.dtype.element_ty), mask=dm)

    @triton.jit
    def _last_to_finish(CNT, programs):
        # Whether this program is the last of ``programs`` to get here (each counts itself in CNT once its stores are
        # done; the last also sees every other's stores and puts CNT back to 0 for the next kernel that uses it).
        tl.debug_barrier()  # every thread's stores issued before the count (the release covers them)
        done = tl.atomic_add(CNT, 1, sem="acq_rel") == programs - 1
        if done:
            tl.atomic_xchg(CNT, 0)
        return done

    @triton.jit
    def _merge_splits(PART_O, PART_ML, OUT, pair, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        # The attention output of one (row, head) ``pair`` into OUT (D,) from its SPLITS partial softmaxes, read from
        # L2 (other programs wrote them).
        parts = pair * SPLITS + tl.arange(0, SPLITS)
        m = tl.load(PART_ML + parts * 2, cache_modifier=".cg")
        weight = tl.exp(m - tl.max(m, axis=0))
        total = tl.sum(weight * tl.load(PART_ML + parts * 2 + 1, cache_modifier=".cg"), axis=0)
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(PART_O + parts[:, None] * BLOCK_D + d[None, :], cache_modifier=".cg")
        out = tl.sum(weight[:, None] * acc, axis=0) / total
        tl.store(OUT + d, out.to(OUT.dtype.element_ty), mask=d < D)

    @triton.jit
    def _rope_cache_kernel(
        QKV, Q, K_OUT, V_OUT, K, V, ROWS, COLUMNS, POS, FREQ, QN, KN,
        stride_qkv, q_width, k_width, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, rope_scale,
        eps, norm_offset,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROT: tl.constexpr,
        INTERLEAVED: tl.constexpr, QK_NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, ROUND_FIRST: tl.constexpr,
        GROUP: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # Program (t, g): heads g * GROUP .. g * GROUP + GROUP of token t, counting the query's heads first and then
        # the key/value heads, from the raw QKV product (T, q | k | v), as ``_rope_attention_kernel`` takes a new
        # token's: the q/k norm, the rotary embedding at POS[t]. Writes q, k, v (T, heads, D) contiguous, and the key
        # and value into the cache at (ROWS[t], head, COLUMNS[t]): a prompt's packed tokens before their attention.
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        partner = _partners(d, ROT, INTERLEAVED)
        dtype = K.dtype.element_ty
        _wait_for_previous(PDL)
        row = QKV + t * stride_qkv
        pos = tl.load(POS + t).to(tl.float32)
        b = tl.load(ROWS + t)
        column = tl.load(COLUMNS + t)
        for i in range(GROUP):  # a loop, not unrolled: as fast, and the first call compiles it sooner
            j = tl.program_id(1) * GROUP + i
            if j < HEADS + KV_HEADS:
                is_q = j < HEADS
                h = tl.where(is_q, j, j - HEADS)
                start = tl.where(is_q, h * D, q_width + h * D)
                x = tl.load(row + start + d, mask=dm, other=0.0).to(tl.float32)
                xp = tl.load(row + start + partner, mask=dm, other=0.0).to(tl.float32)
                norm_weights = KN
                if is_q:
                    norm_weights = QN
                first = tl.where(is_q, 0, q_width)  # where this head's projection starts in the row, and its width
                rstd, weights = _qk_statistics(row, start, first, tl.where(is_q, q_width, k_width), norm_weights, h,
                                               eps, D, QK_NORM, BLOCK_D, NORM_BLOCK)  # fmt: skip
                x, xp = _qk_norm(x, xp, d, partner, dm, weights, rstd, norm_offset, QK_NORM, ROUND_FIRST, dtype)
                x = _rotate(x, xp, d, pos, FREQ, rope_scale, ROT, INTERLEAVED, dtype).to(dtype)
                if is_q:
                    tl.store(Q + (t * HEADS + h) * D + d, x, mask=dm)
                else:
                    v = tl.load(row + q_width + k_width + h * D + d, mask=dm, other=0.0)
                    tl.store(K_OUT + (t * KV_HEADS + h) * D + d, x, mask=dm)
                    tl.store(V_OUT + (t * KV_HEADS + h) * D + d, v, mask=dm)
                    tl.store(K + b * stride_kb + h * stride_kh + column * stride_ks + d, x, mask=dm)
                    tl.store(V + b * stride_vb + h * stride_vh + column * stride_vs + d, v.to(dtype), mask=dm)

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
        live = rows < tl.where(slot < S, B, 0)  # the batch's rows, while the new slot lies in the cache
        tl.store(VALID + rows * S + slot, tl.full((BLOCK_B,), 1, tl.int1), mask=live)
        tl.store(MASK + rows * S + slot, tl.zeros((BLOCK_B,), MASK.dtype.element_ty), mask=live)
        tl.store(STEP, step + 1)
        tl.store(SLOT, slot)
        if HAS_BAN:
            if step + 1 >= tl.load(BAN):
                for e in tl.static_range(NUM_EOS):
                    tl.store(PENALTY + tl.load(EOS + e), 0.0)


MAX_ROWS = 16  # rows one linear kernel takes (one tensor-core tile)
Norm = tuple[torch.Tensor, torch.Tensor, float]  # LayerNorm (weight, bias, eps)
Part = tuple[torch.Tensor, "torch.Tensor | None"]  # (weight, bias) of one more matrix
# (t, post_norm, out): a sublayer output still owed to a residual stream (its norm, then the add), and where the sum goes
Pending = tuple[torch.Tensor, "RMSNorm", torch.Tensor]
_ACTIVATIONS = {None: 0, "gelu_tanh": 1, "silu": 2}


@dataclass(frozen=True)
class RMSNorm:
    """An RMSNorm before a product: x / rms(x) * (weight + offset). ``round_first``: the normalised row is rounded to
    the input's dtype before the weight multiplies it (Llama's form); Gemma (offset 1) and OLMo 2 multiply in fp32."""

    weight: torch.Tensor
    eps: float
    offset: float = 0.0
    round_first: bool = True


# One-row products of the shapes of models people run, where a sweep (``benchmarks/decode_kernels_gpu.py --llama
# NAME --norm --every``, H200, 2026-11-30) found a configuration faster than the rule below by more than its noise
# (~0.3 us): (K, N, gated) -> (BLOCK_N, BLOCK_K, num_warps). Narrower slabs put more programs on short outputs; Llama
# 3 8B's k = 4,096 reads in one chunk four columns at a time.
_ONE_ROW_SWEPT = {
    (2048, 2048, False): (4, 2048, 8),  # TinyLlama's and Qwen3's o: 3.90 -> 3.55 us
    (2048, 2304, False): (4, 2048, 8),  # Gemma 2 2B's o: 3.98 -> 3.82
    (6144, 2048, False): (4, 2048, 8),  # Qwen3 1.7B's down: 7.82 -> 7.50
    (9216, 2304, False): (4, 2048, 4),  # Gemma 2 2B's down: 17.2 -> 13.0
    (4096, 6144, False): (4, 4096, 4),  # Llama 3 8B's q|k|v: 18.8 -> 16.4
    (4096, 14336, True): (4, 4096, 8),  # Llama 3 8B's gate|up: 66.1 -> 58.5
}


def two_pieces(width: int) -> tuple[int, int]:
    """(the largest power of two <= ``width``, the rest): a rest of 0 or a power of two splits it into two pieces."""
    head = 1 << (width.bit_length() - 1)
    return head, width - head


def linear_config(m: int, k: int, n: int, gated: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an (m, k) @ (k, n) product: the best of sweeps on H100/H200s
    (``benchmarks/decode_kernels_gpu.py``, BENCHMARKS.md). GPT-2's products, one row: a few hundred programs, each
    reading up to 16K weights before the wait. Llama-size products (k and n >= 2048), one row: 8 columns per program
    (thousands of programs, each streaming long contiguous runs of k), up to 2,048 of k at a time (1,024 for two
    matrices or a long k, 512 for an LM head), or all of a k up to 4,096 that is the sum of two powers of two. A
    BLOCK_K that is such a sum (not a power of two) means k read whole in two pieces (``linear``). Several rows
    through a Llama-size plain product with a residual add take ``spread_rows``'s configuration where it has one."""
    large = k >= 2048 and n >= 2048
    if m == 1 and (k, n, gated) in _ONE_ROW_SWEPT:
        return _ONE_ROW_SWEPT[(k, n, gated)]
    if m == 1 and not large:
        block_n = 8 if n <= 1024 else 16 if n <= 8192 else 32
        budget = 8192 if gated else 16384
        return block_n, min(triton.next_power_of_2(k), max(16, budget // block_n)), 4
    if m == 1:
        # All of k in one chunk (its norm statistics from registers) up to 2,048, and for a long plain product up to
        # 8,192 (TinyLlama's down projection: 7.6 against 9.7 us in chunks of 1,024).
        long_plain = not gated and 2 * n <= k <= 8192
        block_k = 512 if n >= 16384 else 2048 if k <= 2048 or long_plain else 1024
        block_k = min(triton.next_power_of_2(k), block_k)
        warps = 8 if k <= 2048 and 8 * block_k * (2 if gated else 1) >= 16384 else 4
        rest = two_pieces(k)[1]
        if n < 16384 and block_k < k <= 4096 and rest and rest & (rest - 1) == 0:
            # k the sum of two powers of two (Gemma 2's 2,304 = 2,048 + 256, Phi-3's 3,072): read whole as two pieces
            # (every weight of a program's slab requested before the kernel waits, the norm's statistics from
            # registers) rather than in chunks, the last one mostly padding
            return 8, k, 8
        return 8, block_k, warps
    if not large:
        return (8, 256, 2) if n <= 1024 else (64, 128, 4) if n >= 16384 else (32, 128, 2)
    if n >= 16384:
        return 128, 128, 4
    if gated:
        return (64, 128, 8) if k <= 2048 else (32, 64, 4)
    return 32, 128, 4


# Several rows through a large product with a residual add (a Llama layer's o and down at batch 16), launched with
# PDL: (BLOCK_N, BLOCK_K, num_warps) -> num_stages, the narrowest whose programs number no more than the SMs. Each
# takes more than half an SM's shared memory (Triton's stages - 1 buffers of BLOCK_N x 512 weights and 16 x 512 rows:
# 128 KB and 144 KB), so one program an SM. With four stages at 16 columns (96 KB) two fit on one SM, and (our reading
# of the numbers) PDL, starting the programs while the kernel before still holds most SMs, stacks them on the SMs it
# has freed, the rest idle once it ends. `generate` b16 (H200): TinyLlama cuBLAS 14,685-14,705 tok/s, 16 columns at 4
# stages 13,042-13,087, at 5 stages 15,046-15,127; Llama 3 8B (n = 4,096) cuBLAS 3,317-3,325, 32 columns at 4 stages
# 3,427 (BENCHMARKS.md, twenty-second session).
_RESIDUAL_ROWS = {(16, 512, 4): 5, (32, 512, 4): 4}


def residual_rows_config(n: int, sms: int) -> tuple[int, int, int] | None:
    """The ``_RESIDUAL_ROWS`` configuration for ``n`` output columns on ``sms`` SMs: the narrowest whose programs
    all start at once, one an SM (16 columns up to 16 x ``sms``, 32 up to twice that); None past it."""
    return next((config for config in _RESIDUAL_ROWS if -(-n // config[0]) <= sms), None)


def spread_rows(x: torch.Tensor, n: int) -> tuple[int, int, int] | None:
    """The configuration at which a several-row product of ``x`` with a residual add over ``n`` output columns runs
    ``_linear_kernel``, one program an SM (``residual_rows_config``), or None: cuBLAS, which is faster without PDL
    (before Hopper, or ``SWITCHES.pdl`` off) and for a width needing a second wave of programs."""
    if x.shape[0] < 2 or not _pdl(x)["PDL"]:
        return None
    return residual_rows_config(n, _sm_count(_device_index(x)))


def linear_stages(m: int, n: int, config: tuple[int, int, int], residual: bool) -> int:
    """``_linear_kernel``'s ``num_stages``: 2 for an LM head's width (n >= 16,384), 4 otherwise, and that of
    ``_RESIDUAL_ROWS`` for a several-row residual product at one of its configurations (one program an SM)."""
    if m > 1 and residual and config in _RESIDUAL_ROWS:
        return _RESIDUAL_ROWS[config]
    return 2 if n >= 16384 else 4


def segment_block(block_n: int, widths: tuple[int, ...], rows: int) -> int | None:
    """The largest BLOCK_N <= ``block_n`` that divides every segment width (a program's columns then lie in one
    matrix); None if under the kernel's minimum (16 for a tensor-core tile)."""
    while block_n > 1 and any(w % block_n for w in widths):
        block_n //= 2
    return block_n if block_n >= (1 if rows == 1 else 16) else None


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
    eos_penalty: torch.Tensor | None = None,
    argmax: bool = False,
    config: tuple[int, int, int] | None = None,
    pending: Pending | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(norm(x) @ W + bias) for x (M <= 16, K) contiguous; W is ``weight`` (K, N) or, if ``transposed``,
    ``weight.T`` of an (N, K) weight (nn.Linear). ``norm``: LayerNorm (weight, bias, eps) or ``RMSNorm`` of x's rows
    first. ``act``: "gelu_tanh" or "silu" (``gelu_tanh=True`` is "gelu_tanh").

    - ``parts``: up to two more (weight, bias) matrices laid out like ``weight``, whose columns follow its columns
      (separate q, k, v projections computed as one); every width a multiple of 16.
    - ``up``: a gated product, act(norm(x) @ W + bias) * (norm(x) @ U + up bias), U laid out like ``weight``.
    - ``scale``, ``divide``: result * scale / divide (Granite's multipliers), each operation rounded to x's dtype.
    - ``softcap``: softcap * tanh(result / softcap) (Gemma 2's final logits), each operation rounded to x's dtype.
    - ``residual`` (M, N): ``residual += result`` in place; returns ``residual``.
    - ``argmax``: returns the (M,) int64 first index of each row's maximum of (result + ``eos_penalty``); the
      choice's reduction counts its programs in ``counters`` (int32 zeros, at least M, left zero; new zeros if None).
    - ``pending`` (t, post_norm, out): x is a residual stream still owed ``post_norm(t)`` (a post-norm layer's sublayer
      output); its sum (``add_norm``'s) is written into ``out`` and the product reads it. Several rows with a norm
      over several chunks: the row-norm kernel adds it; otherwise ``add_norm`` does, before the product (adding it in
      every program's prologue was slower at one row: Gemma 2 2B 479 -> 421-469 tok/s, H200).

    Several rows through a product with none of the epilogues above (a Llama layer's q|k|v) read the weights through
    TMA descriptors where ``_tma_rows`` allows (``_rows_tma``); pointer loads otherwise.
    """
    m, k = x.shape
    matrices = (weight, *(w for w, _ in parts))
    widths = tuple(w.shape[0] if transposed else w.shape[1] for w in matrices)
    n = sum(widths)
    biases = [bias, *(b for _, b in parts)] + ([up[1]] if up is not None else [])
    if any((b is None) != (bias is None) for b in biases):
        raise ValueError("either every matrix of one product has a bias or none has")
    plain = up is None and act is None and not gelu_tanh and softcap is None and scale == divide == 1.0
    if plain and m > 1 and residual is None and not argmax and config is None and transposed and _tma_rows(x, matrices):
        return _rows_tma(x, matrices, biases, widths, norm, pending, out_dtype)
    config = config or linear_config(m, k, n, gated=up is not None)
    block_n, block_k, warps = config
    head, tail = two_pieces(block_k)  # BLOCK_K the sum of two powers of two: k read whole as two pieces
    if tail & (tail - 1) or (tail and k > block_k):
        raise ValueError(f"BLOCK_K {block_k} is neither a power of two nor, for k <= it, the sum of two")
    if parts:
        found = segment_block(block_n if m == 1 else max(block_n, 16), widths, m)
        if found is None:
            raise ValueError(f"segment widths {widths} admit no block width")
        block_n = found
    stride_wk, stride_wn = (weight.stride(1), weight.stride(0)) if transposed else (weight.stride(0), weight.stride(1))
    extra = [w for w in matrices[1:]] + ([up[0]] if up is not None else [])
    if any(w.stride() != weight.stride() for w in extra):
        raise ValueError("every matrix of one product must have the first one's strides")
    programs = triton.cdiv(n, block_n)
    store_y = residual is None and not argmax
    y = x.new_empty((m, n) if store_y else (1,), dtype=out_dtype or x.dtype)
    r = residual if residual is not None else y
    kind, nw, nb, eps, offset, round_first = _norm_args(norm, x)
    if argmax:
        partial_values = x.new_empty(m, programs, dtype=torch.float32)
        partial_index = x.new_empty(m, programs, dtype=torch.int32)
    else:
        partial_values = partial_index = y
    second = up if up is not None else parts[0] if parts else (weight, bias)
    third = parts[1] if len(parts) > 1 else second
    pointers = [
        t if t is not None else x
        for t in (weight, bias, second[0], second[1], third[0], third[1])
    ]  # fmt: skip
    pdl = _pdl(x)
    if norm is not None and m > 1 and k > block_k:
        # Several rows normalised over several chunks: normalised by a small kernel first, the product then plain.
        # Each program normalising its 16 rows chunk by chunk inside the product's loop was more than twice as slow
        # (TinyLlama's q|k|v at 16 rows: 16.1 us, with statistics from a kernel before; 8.0 now, H200).
        x, kind = norm_rows(x, norm, weight.dtype, pending=pending), 0
    elif pending is not None:
        t, post_norm, out = pending
        x = add_norm(x, t, post_norm, out=out)
    launch(_linear_kernel, (programs,),
        x, *pointers, y, r, nw, nb, eos_penalty if eos_penalty is not None else x,
        partial_values, partial_index, m, n, k, widths[0],
        sum(widths[:2]), x.stride(0), stride_wk, stride_wn, y.stride(0), r.stride(0), eps, offset, softcap or 1.0,
        scale, divide, programs,
        HAS_BIAS=bias is not None, NORM=kind, ROUND_FIRST=round_first,
        ACT=_ACTIVATIONS["gelu_tanh" if gelu_tanh else act], GATED=up is not None, SEGMENTS=len(matrices),
        SOFTCAP=softcap is not None, RESIDUAL=residual is not None, ARGMAX=argmax,
        HAS_PEN=eos_penalty is not None, STORE_Y=store_y, BLOCK_M=1 if m == 1 else MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=head, ONE_CHUNK=k <= block_k, TAIL=tail, num_warps=warps,
        num_stages=linear_stages(m, n, config, residual is not None), **pdl,
    )  # fmt: skip
    if residual is not None:
        return residual
    if not argmax:
        return y
    return first_max(partial_values, partial_index, counters)


# Several-row products read through TMA: (BLOCK_N, BLOCK_K, stages, warps), for k up to _TMA_MAX_K. TinyLlama's q|k|v
# as one matrix at 16 rows (H200, alone, no PDL): 6.66 us against 7.72 for ``_linear_kernel``'s pointer loads. In the
# batch-16 step (q, k and v as three matrices, with PDL), tok/s: TinyLlama +1.2-1.6%, Qwen3 1.7B +0.8%, Gemma 2 2B
# (k = 2,304) +1.5%, and Llama 3 8B (k = 4,096) -2.1%, which therefore keeps the pointer kernel (BENCHMARKS.md,
# twenty-first session).
_TMA_ROWS = (32, 256, 4, 4)
_TMA_MAX_K = 4095


def _tma_rows(x: torch.Tensor, matrices: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``_rows_tma`` takes a several-row product of x over these (N, K) matrices: Triton's host-side TMA
    descriptors on a Hopper or newer GPU (or Triton's interpreter), fp16/bf16, k up to ``_TMA_MAX_K``, every
    matrix's rows contiguous and 16-byte aligned and x's rows a multiple of 16 bytes long (a TMA descriptor's
    demands), and every width a multiple of the tile."""
    if not (_HAS_TMA and SWITCHES.tma and x.dtype in (torch.float16, torch.bfloat16) and x.shape[1] <= _TMA_MAX_K):
        return False
    if (x.shape[1] * x.element_size()) % 16:
        return False
    if x.is_cuda and not _on_hopper(x):
        return False
    if not x.is_cuda and not INTERPRETED:
        return False
    aligned = [
        w.stride(1) == 1 and (w.stride(0) * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0 for w in matrices
    ]
    return all(aligned) and all(w.dtype == x.dtype and w.shape[0] % _TMA_ROWS[0] == 0 for w in matrices)


def _rows_tma(
    x: torch.Tensor,
    matrices: tuple[torch.Tensor, ...],
    biases: list[torch.Tensor | None],
    widths: tuple[int, ...],
    norm: Norm | RMSNorm | None,
    pending: Pending | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """``linear`` for 2-16 rows over up to three (N, K) matrices side by side, their weights streamed through TMA
    (``_rows_tma_kernel``); the rows normalised by ``norm_rows`` first. ``biases``: all present or all None."""
    if norm is not None:
        x = norm_rows(x, norm, matrices[0].dtype, pending=pending)
    elif pending is not None:
        t, post_norm, out = pending
        x = add_norm(x, t, post_norm, out=out)
    m, k = x.shape
    if x.data_ptr() % 16 or x.stride() != (k, 1):
        x = x.clone(memory_format=torch.contiguous_format)  # rows at 16-byte aligned addresses, for the descriptor
    block_n, block_k, stages, warps = _TMA_ROWS
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [MAX_ROWS, block_k])
    descs = [TensorDescriptor(w, list(w.shape), [w.stride(0), 1], [block_n, block_k]) for w in matrices]
    descs += [descs[-1]] * (3 - len(descs))
    pointers = [b if b is not None else x for b in biases] + [x] * (3 - len(biases))
    n = sum(widths)
    y = x.new_empty((m, n), dtype=out_dtype or x.dtype)
    launch(_rows_tma_kernel, (n // block_n,),
        x_desc, *descs, *pointers, y, m, n, k, widths[0], sum(widths[:2]), y.stride(0),
        HAS_BIAS=biases[0] is not None, SEGMENTS=len(matrices), BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        STAGES=stages, num_warps=warps, **_pdl(x),
    )  # fmt: skip
    return y


def _counters(counters: torch.Tensor | None, needed: int, device: torch.device) -> torch.Tensor:
    """The int32 zeros a kernel's programs count themselves in (``_last_to_finish``): the caller's (at least
    ``needed``), or new ones."""
    if counters is None:
        return torch.zeros(needed, dtype=torch.int32, device=device)
    if counters.numel() < needed or counters.dtype != torch.int32:
        raise ValueError(f"{needed} int32 counters needed, got {counters.numel()} {counters.dtype}")
    return counters


def first_max(values: torch.Tensor, index: torch.Tensor, counters: torch.Tensor | None = None) -> torch.Tensor:
    """(M,) int64: the smallest of each row's ``index`` (M, P) int32 where its ``values`` (M, P) fp32 reach their
    maximum (both contiguous): the greedy choice from an LM head's per-program maxima. Rows of more than 2,048 are
    read in chunks by programs of their own, which count themselves in ``counters`` (int32 zeros, at least M, left
    zero; new zeros if None)."""
    rows, programs = values.shape
    chosen = values.new_empty(rows, dtype=torch.long)
    block_p = min(triton.next_power_of_2(programs), 2048)
    chunks = triton.cdiv(programs, block_p)
    best = values.new_empty(rows, chunks)
    first = index.new_empty(rows, chunks)
    counts = _counters(counters, rows, values.device) if chunks > 1 else chosen
    launch(_argmax_rows_kernel, (rows, chunks),
        values, index, chosen, best, first, counts, programs, values.stride(0),
        BLOCK_P=block_p, CHUNKS=chunks, BLOCK_C=triton.next_power_of_2(chunks), num_warps=8, **_pdl(values),
    )  # fmt: skip
    return chosen


def embed(
    tokens: torch.Tensor,
    positions: torch.Tensor | None,
    wte: torch.Tensor,
    wpe: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """wte[tokens] (+ wpe[positions]) (* ``scale``): tokens, positions (B,) int64 -> (B, E)."""
    batch, width = tokens.shape[0], wte.shape[1]
    x = torch.empty(batch, width, device=wte.device, dtype=wte.dtype)
    launch(_embed_kernel, (batch,),
        tokens, positions if positions is not None else tokens, wte, wpe if wpe is not None else wte, x, width,
        scale, HAS_POS=wpe is not None, SCALE=scale != 1.0, BLOCK=triton.next_power_of_2(width), **_pdl(wte),
    )  # fmt: skip
    return x


def add_norm(x: torch.Tensor, t: torch.Tensor, norm: RMSNorm, out: torch.Tensor | None = None) -> torch.Tensor:
    """x + norm(t) into ``out`` (default: x, in place), rows (M, E) contiguous; returns it."""
    rows, width = x.shape
    out = x if out is None else out
    launch(_add_norm_kernel, (rows,),
        x, t, norm.weight, out, width, norm.eps, norm.offset, ROUND_FIRST=norm.round_first,
        BLOCK=triton.next_power_of_2(width), **_pdl(x),
    )  # fmt: skip
    return out


def gated(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """act(g) * u for contiguous g and u of one shape and dtype, in one kernel (PyTorch takes two and a tensor
    between them); ``act`` "silu" or "gelu_tanh"."""
    if not (g.is_contiguous() and u.is_contiguous() and g.shape == u.shape and g.dtype == u.dtype):
        raise ValueError("a gated product needs both halves contiguous, of one shape and dtype")
    y = torch.empty_like(g)
    block = 2048
    launch(_gated_kernel, (triton.cdiv(g.numel(), block),), g, u, y, g.numel(), ACT=_ACTIVATIONS[act], BLOCK=block,
           num_warps=8, **_pdl(g))  # fmt: skip
    return y


@dataclass(frozen=True)
class Rotary:
    """A rotary embedding: the first ``2 * len(inv_freq)`` features of each head turn by position * inv_freq
    (rotate-half pairs (i, i + half); ``interleaved``: pairs (2i, 2i + 1), as GLM and Helium), cos and sin times
    ``scale`` (YaRN's attention factor)."""

    inv_freq: torch.Tensor
    scale: float = 1.0
    interleaved: bool = False


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
    block_s: int = 64,
    warps: int = 4,
    splits: int = 1,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per row of a rotary decoder, from its raw QKV product ``qkv`` (B, (H + 2 Hkv) D): q/k norm
    (``qk_norm``: (q norm, k norm, per head)), rotary embedding at ``positions`` (B,), the new key/value written
    into ``kv`` (2, B, Hkv, S, D) at ``slot`` (1,), attention over the cache up to ``slot`` with the additive
    ``mask`` (B, S), an optional sliding ``window`` and logit ``softcap``. ``splits`` (a power of two): programs per
    (row, head), each over a slice of the cache, merged by the last of them to finish (a long cache and few rows);
    they count themselves in ``counters`` (int32 zeros, at least B * H, left zero; new zeros if None).
    Returns (B, H * D)."""
    batch = qkv.shape[0]
    kv_heads, slots, dim = kv.shape[2], kv.shape[3], kv.shape[4]
    out = qkv.new_empty(batch, heads * dim)
    q_width, k_width = heads * dim, kv_heads * dim
    mode, norm, k_weight = _qk_norm_args(qk_norm, qkv)
    k, v = kv[0], kv[1]
    block_d = triton.next_power_of_2(dim)
    one_block = slots <= block_s
    splits = 1 if one_block else splits
    chunk = triton.cdiv(triton.cdiv(slots, splits), block_s) * block_s
    part_o = qkv.new_empty(batch * heads * splits * block_d, dtype=torch.float32) if splits > 1 else out
    part_ml = qkv.new_empty(batch * heads * splits * 2, dtype=torch.float32) if splits > 1 else out
    counts = _counters(counters, batch * heads, qkv.device) if splits > 1 else slot
    pdl = _pdl(qkv)
    launch(_rope_attention_kernel, (batch, heads, splits),
        qkv, k, v, mask, slot, positions, rotary.inv_freq, norm.weight, k_weight, out, part_o, part_ml, counts, slots,
        qkv.stride(0), q_width, k_width, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), out.stride(0), scale, rotary.scale, norm.eps, norm.offset, window or 0, softcap or 1.0, chunk,
        GROUP=heads // kv_heads, D=dim, BLOCK_D=block_d, ROT=2 * rotary.inv_freq.shape[0],
        INTERLEAVED=rotary.interleaved, QK_NORM=mode, NORM_BLOCK=triton.next_power_of_2(max(q_width, k_width)),
        ROUND_FIRST=norm.round_first, WINDOW=window is not None, SOFTCAP=softcap is not None, BLOCK_S=block_s,
        ONE_BLOCK=one_block, SPLITS=splits, num_warps=warps, **pdl,
    )  # fmt: skip
    return out


def _qk_norm_args(
    qk_norm: tuple[RMSNorm, RMSNorm, bool] | None, like: torch.Tensor
) -> tuple[int, RMSNorm, torch.Tensor]:
    """(QK_NORM, the q norm, the k norm's weight) of the rotary kernels' arguments from ``qk_norm`` (q norm, k norm,
    per head): QK_NORM 0 none, 1 per head, 2 over the whole projection; without norms a stand-in over ``like``."""
    if qk_norm is None:
        norm = RMSNorm(like, 0.0)
        return 0, norm, norm.weight
    q_norm, k_norm, per_head = qk_norm
    return 1 if per_head else 2, q_norm, k_norm.weight


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
    group: int | None = None,
    warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed tokens of prompts, from their raw QKV product ``qkv`` (T, (H + 2 Hkv) D), rows contiguous: q/k
    norm and rotary embedding at ``positions`` (T,), as ``rope_attention`` treats a new token; keys and values
    written into ``kv`` (2, B, Hkv, S, D) at (``rows``, ``columns``) (T,). ``group`` heads a program over ``warps``
    warps. Returns q (T, H, D), k, v (T, Hkv, D)."""
    tokens = qkv.shape[0]
    kv_heads, dim = kv.shape[2], kv.shape[4]
    q = qkv.new_empty(tokens, heads, dim)
    k_out, v_out = (qkv.new_empty(tokens, kv_heads, dim) for _ in range(2))
    mode, norm, k_weight = _qk_norm_args(qk_norm, qkv)
    k, v = kv[0], kv[1]
    block_d = triton.next_power_of_2(dim)
    # 512 features a program over one warp. H200, fp16/bf16, 544 / 2,048 / 8,192 tokens: TinyLlama's 36 heads of 64
    # 7.2 / 15.2 / 60.4 us (a head a program over four warps: 24.7 / 89.5 / 355), Qwen3's 24 of 128 with q/k norms
    # 10.1 / 27.2 / 100.3 (16.2 / 60.5 / 239), Gemma 2's 12 of 256 7.1 / 19.1 / 72.1 (8.6 / 30.1 / 119.5).
    group = group or max(1, 512 // block_d)
    warps = warps or 1
    launch(_rope_cache_kernel, (tokens, triton.cdiv(heads + kv_heads, group)),
        qkv, q, k_out, v_out, k, v, rows, columns, positions, rotary.inv_freq, norm.weight, k_weight,
        qkv.stride(0), heads * dim, kv_heads * dim, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), rotary.scale, norm.eps, norm.offset, HEADS=heads, KV_HEADS=kv_heads, D=dim,
        BLOCK_D=block_d, ROT=2 * rotary.inv_freq.shape[0], INTERLEAVED=rotary.interleaved, QK_NORM=mode,
        NORM_BLOCK=triton.next_power_of_2(max(heads, kv_heads) * dim), ROUND_FIRST=norm.round_first, GROUP=group,
        num_warps=warps, **_pdl(qkv),
    )  # fmt: skip
    return q, k_out, v_out


def _norm_args(
    norm: Norm | RMSNorm | None, x: torch.Tensor
) -> tuple[int, torch.Tensor, torch.Tensor, float, float, bool]:
    """(NORM, weight, bias, eps, offset, ROUND_FIRST) of the kernels' norm arguments (NORM 0: none, 1: LayerNorm,
    2: RMSNorm); ``x`` fills the pointers a norm lacks."""
    if isinstance(norm, RMSNorm):
        return 2, norm.weight, norm.weight, norm.eps, norm.offset, norm.round_first
    if norm is None:
        return 0, x, x, 0.0, 0.0, False
    return 1, norm[0], norm[1], norm[2], 0.0, False


def norm_rows(
    x: torch.Tensor, norm: Norm | RMSNorm, dtype: torch.dtype | None = None, pending: Pending | None = None
) -> torch.Tensor:
    """norm(x) for rows x (M, K) whose last dimension is contiguous, as ``linear``'s prologue normalises them, in a
    new (M, K) tensor (of x's dtype unless ``dtype``): one kernel where PyTorch's RMSNorm takes seven. ``pending``
    (t, post_norm, out): x is still owed post_norm(t); the rows normalised are x + post_norm(t), as ``add_norm`` sums
    them, and that sum is written into ``out`` (x, t and out contiguous)."""
    rows, width = x.shape
    kind, nw, nb, eps, offset, round_first = _norm_args(norm, x)
    t, pw, r_out, p_eps, p_offset, p_round_first = x, x, x, 0.0, 0.0, False
    if pending is not None:
        t, post_norm, r_out = pending
        if not (
            x.is_contiguous() and t.is_contiguous() and r_out.is_contiguous() and t.shape == x.shape == r_out.shape
        ):
            raise ValueError("a pending sum needs x, the sublayer output and the output buffer alike and contiguous")
        pw, p_eps, p_offset, p_round_first = post_norm.weight, post_norm.eps, post_norm.offset, post_norm.round_first
    y = x.new_empty(rows, width, dtype=dtype)
    launch(_norm_rows_kernel, (rows,),
        x, nw, nb, y, t, pw, r_out, width, x.stride(0), eps, offset, p_eps, p_offset, NORM=kind,
        ROUND_FIRST=round_first, PENDING=pending is not None, P_ROUND_FIRST=p_round_first,
        BLOCK=triton.next_power_of_2(width), **_pdl(x),
    )  # fmt: skip
    return y


def advance(chosen: torch.Tensor, buffers: StepBuffers) -> None:
    """The bookkeeping of one generated token in one launch (see ``ops.sampling.advance``)."""
    b = buffers
    batch = chosen.shape[0]
    has_ban = b.eos_penalty is not None
    launch(_advance_kernel, (1,),
        chosen, b.unfinished, b.eos, b.pad, b.out, b.tokens, b.positions, b.step, b.slot, b.valid, b.mask, b.active,
        b.eos_penalty if b.eos_penalty is not None else b.mask, b.ban_steps, batch, b.out.stride(0), b.valid.shape[1],
        NUM_EOS=b.eos.numel(), HAS_BAN=has_ban, BLOCK_B=max(16, triton.next_power_of_2(batch)), **_pdl(b.mask),
    )  # fmt: skip
