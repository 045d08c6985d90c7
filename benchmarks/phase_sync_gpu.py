"""Is a synchronisation inside one kernel cheaper than a kernel boundary with programmatic dependent launch (PDL)?

A chain of one-row products shaped like TinyLlama's layer (q|k|v 2048 -> 2560, o 2048 -> 2048, gate|up as one plain
2048 -> 11264, down 5632 -> 2048; fp16, 22 layers of distinct weights, each product's output the next one's input),
streamed as the decode step streams them (each program reads its slab of the weights, then waits, then multiplies):

- A: one kernel per product, launched with PDL (the decode step's design);
- B: one kernel per layer, its four products as phases: the programs of a phase load their weights, then spin on a
  counter the previous phase's programs raise (four ways to spin, below), the first phase waits by PDL;
- C: one kernel for all 22 layers, phases as in B;
- P: a persistent kernel (as many programs as fit at once), each looping over its share of every product, with a
  grid-wide barrier between products.

Spins: 0 atomic reads, 1 volatile reads then one atomic, 2 volatile reads with a 100 ns sleep, 3 atomic reads with a
200 ns sleep. C and P assume programs start in the order of their ids (each waits only on programs before it).
Prints microseconds per 22 layers (a CUDA graph of the chain, replayed) and the error against a float32 reference.
Run: ``PYTHONPATH=src python benchmarks/phase_sync_gpu.py`` (results: BENCHMARKS.md, seventeenth session).
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_kernels_gpu import graph_us  # noqa: E402

L = 22
SHAPES = {"q|k|v": (2048, 2560), "o": (2048, 2048), "gate|up": (2048, 11264), "down": (5632, 2048)}


@triton.jit
def _sleep(c, NS: tl.constexpr):
    return tl.inline_asm_elementwise(
        f"nanosleep.u32 {NS}; mov.u32 $0, $1;", "=r,r", [c], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _spin(CNT, target, SPIN: tl.constexpr):
    if SPIN == 0:
        c = tl.atomic_add(CNT, 0, sem="acquire")
        while c < target:
            c = tl.atomic_add(CNT, 0, sem="acquire")
    elif SPIN == 1:
        c = tl.load(CNT, volatile=True)
        while c < target:
            c = tl.load(CNT, volatile=True)
        tl.atomic_add(CNT, 0, sem="acquire")
    elif SPIN == 2:
        c = tl.load(CNT, volatile=True)
        while c < target:
            c = _sleep(c, 100)
            c = tl.load(CNT, volatile=True)
        tl.atomic_add(CNT, 0, sem="acquire")
    else:
        c = tl.atomic_add(CNT, 0, sem="acquire")
        while c < target:
            c = _sleep(c, 200)
            c = tl.atomic_add(CNT, 0, sem="acquire")


@triton.jit
def _rows_times_x(X, W, Y, K, rows, w, BLOCK_K: tl.constexpr):
    # Y[rows] = W[rows] @ X (W (N, K) row-major), its first chunk of K given (w, read before the wait).
    ks = tl.arange(0, BLOCK_K)
    x = tl.load(X + ks, mask=ks < K, other=0.0, cache_modifier=".cg")
    acc = tl.sum(x[:, None].to(tl.float32) * w.to(tl.float32), axis=0)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(W + rows[None, :] * K + (k0 + ks)[:, None], mask=(k0 + ks)[:, None] < K, other=0.0)
        x = tl.load(X + k0 + ks, mask=k0 + ks < K, other=0.0, cache_modifier=".cg")
        acc += tl.sum(x[:, None].to(tl.float32) * w.to(tl.float32), axis=0)
    tl.store(Y + rows, acc.to(Y.dtype.element_ty))


@triton.jit
def _product(X, W, Y, N, K, pid, CNT_IN, target, CNT_OUT, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         MODE: tl.constexpr, PDL: tl.constexpr, SPIN: tl.constexpr):  # fmt: skip
    # One program's columns of a product. MODE 0: it waits by PDL only; 1: then spins until CNT_IN reaches target, and
    # counts itself in CNT_OUT when its columns are written.
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w = tl.load(W + rows[None, :] * K + ks[:, None], mask=ks[:, None] < K, other=0.0)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if MODE > 0:
        _spin(CNT_IN, target, SPIN)
    _rows_times_x(X, W, Y, K, rows, w, BLOCK_K)
    if MODE > 0:
        tl.debug_barrier()
        tl.atomic_add(CNT_OUT, 1, sem="release")


@triton.jit
def single(X, W, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    _product(X, W, Y, N, K, tl.program_id(0), X, 0, X, BLOCK_N, BLOCK_K, 0, PDL, 0)


@triton.jit
def layers(XA, YQ, YO, YG, WQ, WO, WG, WD, CNT, ZERO, first_layer, n_layers, PQ: tl.constexpr, PO: tl.constexpr,
         PG: tl.constexpr, PD: tl.constexpr, BQ: tl.constexpr, BO: tl.constexpr, BG: tl.constexpr,
         BD: tl.constexpr, ZN: tl.constexpr, PDL: tl.constexpr, SPIN: tl.constexpr):  # fmt: skip
    # CNT (layers, 4): programs done per phase. Layer l's qkv waits on layer l-1's down (the kernel before, by PDL,
    # when it is this launch's first layer). ZERO: counters of the launch before, zeroed by program 0 after its wait.
    per: tl.constexpr = PQ + PO + PG + PD
    pid = tl.program_id(0)
    layer = first_layer + pid // per
    r = pid % per
    c = CNT + layer * 4
    first = layer == first_layer
    if r < PQ:
        if PDL:
            if pid == 0:
                gdc_wait()
                tl.store(ZERO + tl.arange(0, ZN), tl.zeros((ZN,), tl.int32))
        prev = tl.where(first, c + 3, c - 1)  # when first: no counter to wait on (target 0)
        _product(
            XA,
            WQ + layer.to(tl.int64) * 2560 * 2048,
            YQ,
            2560,
            2048,
            r,
            prev,
            tl.where(first, 0, PD),
            c,
            BQ,
            2048,
            1,
            PDL,
            SPIN,
        )
    elif r < PQ + PO:
        _product(
            YQ, WO + layer.to(tl.int64) * 2048 * 2048, YO, 2048, 2048, r - PQ, c, PQ, c + 1, BO, 2048, 1, PDL, SPIN
        )
    elif r < PQ + PO + PG:
        _product(
            YO,
            WG + layer.to(tl.int64) * 11264 * 2048,
            YG,
            11264,
            2048,
            r - PQ - PO,
            c + 1,
            PO,
            c + 2,
            BG,
            2048,
            1,
            PDL,
            SPIN,
        )
    else:
        _product(
            YG,
            WD + layer.to(tl.int64) * 2048 * 5632,
            XA,
            2048,
            5632,
            r - PQ - PO - PG,
            c + 2,
            PG,
            c + 3,
            BD,
            2048,
            1,
            PDL,
            SPIN,
        )


@triton.jit
def _tile(X, W, N, K, blk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    return tl.load(W + rows[None, :] * K + ks[:, None], mask=ks[:, None] < K, other=0.0)


@triton.jit
def _blocks(X, W, Y, N, K, pid, w, NPROG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # this program's column blocks pid, pid + NPROG, ...; the first block's first weight chunk given (w)
    nblk = N // BLOCK_N
    ks = tl.arange(0, BLOCK_K)
    for blk in range(pid, nblk, NPROG):
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        if blk != pid:
            w = tl.load(W + rows[None, :] * K + ks[:, None], mask=ks[:, None] < K, other=0.0)
        _rows_times_x(X, W, Y, K, rows, w, BLOCK_K)


@triton.jit
def _barrier(CNT, target, SPIN: tl.constexpr):
    tl.debug_barrier()
    tl.atomic_add(CNT, 1, sem="release")
    _spin(CNT, target, SPIN)


@triton.jit
def persistent(XA, YQ, YO, YG, WQ, WO, WG, WD, CNT, n_layers, NPROG: tl.constexpr, BQ: tl.constexpr,
         BO: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, SPIN: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    for layer in range(n_layers):
        l64 = layer.to(tl.int64)
        c = CNT + layer * 4
        wq = WQ + l64 * 2560 * 2048
        wo = WO + l64 * 2048 * 2048
        wg = WG + l64 * 11264 * 2048
        wd = WD + l64 * 2048 * 5632
        w = _tile(XA, wq, 2560, 2048, pid, BQ, 2048)
        if layer > 0:
            _spin(c - 1, NPROG, SPIN)
        _blocks(XA, wq, YQ, 2560, 2048, pid, w, NPROG, BQ, 2048)
        w = _tile(YQ, wo, 2048, 2048, pid, BO, 2048)
        _barrier(c, NPROG, SPIN)
        _blocks(YQ, wo, YO, 2048, 2048, pid, w, NPROG, BO, 2048)
        w = _tile(YO, wg, 11264, 2048, pid, BG, 2048)
        _barrier(c + 1, NPROG, SPIN)
        _blocks(YO, wg, YG, 11264, 2048, pid, w, NPROG, BG, 2048)
        w = _tile(YG, wd, 2048, 5632, pid, BD, 2048)
        _barrier(c + 2, NPROG, SPIN)
        _blocks(YG, wd, XA, 2048, 5632, pid, w, NPROG, BD, 2048)
        tl.debug_barrier()
        tl.atomic_add(c + 3, 1, sem="release")


def main() -> None:
    dev, dt = "cuda", torch.float16
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    wq, wo, wg, wd = (torch.randn(L, n, k, device=dev, dtype=dt) / k**0.5 for k, n in SHAPES.values())
    total = sum(w.numel() * 2 for w in (wq, wo, wg, wd))
    xa = torch.randn(2048, device=dev, dtype=dt)
    yq, yo, yg = (torch.empty(n, device=dev, dtype=dt) for n in (2560, 2048, 11264))
    counters = torch.zeros(2, L, 4, device=dev, dtype=torch.int32)  # B's launches alternate sets, zeroing the other

    def reference(x: torch.Tensor) -> torch.Tensor:
        for i in range(L):
            q = (wq[i].float() @ x.float()).half()
            o = (wo[i].float() @ q[:2048].float()).half()
            g = (wg[i].float() @ o.float()).half()
            x = (wd[i].float() @ g[:5632].float()).half()
        return x

    def run_a(warps: int, bq: int = 8, bo: int = 4, bg: int = 8, bd: int = 8) -> None:
        for i in range(L):
            for x, w, y, (k, n), bn in (
                (xa, wq, yq, SHAPES["q|k|v"], bq),
                (yq, wo, yo, SHAPES["o"], bo),
                (yo, wg, yg, SHAPES["gate|up"], bg),
                (yg, wd, xa, SHAPES["down"], bd),
            ):
                single[(n // bn,)](x, w[i], y, n, k, BLOCK_N=bn, BLOCK_K=2048, PDL=True, num_warps=warps,
                                   launch_pdl=True)  # fmt: skip

    def run_layers(group: int, warps: int, pdl: bool = True, spin: int = 0) -> None:
        bq, bo, bg, bd = 8, 4, 8, 8
        p = (2560 // bq, 2048 // bo, 11264 // bg, 2048 // bd)
        launches = L // group
        for i in range(launches):
            j = i - 1 if i else launches - 1
            zero = counters[j % 2][j * group : (j + 1) * group]
            layers[(sum(p) * group,)](
                xa, yq, yo, yg, wq, wo, wg, wd, counters[i % 2], zero, i * group, group, PQ=p[0], PO=p[1], PG=p[2],
                PD=p[3], BQ=bq, BO=bo, BG=bg, BD=bd, ZN=4 * group, PDL=pdl, SPIN=spin, num_warps=warps,
                launch_pdl=pdl,
            )  # fmt: skip

    def run_p(nprog: int, bq: int, bo: int, bg: int, bd: int, spin: int, warps: int) -> None:
        persistent[(nprog,)](xa, yq, yo, yg, wq, wo, wg, wd, counters[0], L, NPROG=nprog, BQ=bq, BO=bo, BG=bg, BD=bd,
                             SPIN=spin, num_warps=warps)  # fmt: skip

    cases = [("A kernel per product, 8 warps", lambda: run_a(8)), ("A kernel per product, 4 warps", lambda: run_a(4))]
    for spin in range(4):
        cases.append((f"B kernel per layer, spin {spin}", lambda spin=spin: run_layers(1, 4, spin=spin)))
        cases.append((f"C one kernel, spin {spin}", lambda spin=spin: run_layers(L, 4, pdl=False, spin=spin)))
    for nprog, *blocks in ((128, 4, 16, 8, 16), (256, 2, 8, 4, 8), (512, 1, 4, 2, 4)):
        for spin in (0, 3):
            cases.append((f"P {nprog} programs, spin {spin}", lambda a=(nprog, *blocks, spin, 4): run_p(*a)))
    for name, fn in cases:
        x0 = torch.randn(2048, device=dev, dtype=dt)
        xa.copy_(x0)
        counters.zero_()
        fn()
        torch.cuda.synchronize()
        expected = reference(x0).float()
        error = ((xa.float() - expected).abs().max() / expected.abs().max()).item()
        counters.zero_()

        def chain(i: int, fn=fn, zeroed=name[0] in "CP") -> None:
            if i == 0:  # graph_us captures its copies; the chain runs once per replay
                if zeroed:
                    counters.zero_()
                fn()

        t = graph_us(chain) * 24
        print(f"{name:32s} {t:7.1f} us / {L} layers, {t / L:5.2f} us a layer, {total / t / 1e6:.2f} TB/s, "
              f"error {error:.1e}", flush=True)  # fmt: skip
    print(f"{total / 1e9:.3f} GB of weights; at 4.65 TB/s {total / 4.65e6:.1f} us")


if __name__ == "__main__":
    main()
