"""The ops on their own: they import torch only, never transformers."""

from __future__ import annotations

import collections
import dataclasses
import inspect
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bettertransformer.ops import fused, triton_kernels
from bettertransformer.ops.attention import attention_with_weights, packed_attention
from bettertransformer.ops.padding import pack, pack_info, unpack
from bettertransformer.switches import SWITCHES, switched

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Tests of our Triton kernels: on a CUDA GPU, or on the CPU under Triton's interpreter (``make kernel-check``).
KERNELS = "cuda" if torch.cuda.is_available() else "cpu" if triton_kernels.INTERPRETED else None
kernels = pytest.mark.skipif(KERNELS is None, reason="needs a CUDA GPU or Triton's interpreter (make kernel-check)")


def _mask(lengths, seq, left=False):
    mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for row, n in enumerate(lengths):
        if left:
            mask[row, seq - n :] = True
        else:
            mask[row, :n] = True
    return mask


def _reference_attention(q, k, v, lengths, scale, bias=None, causal=False, window=None):
    """Per-sequence attention in float64: q (T, Hq, D), k/v (T, Hkv, D)."""
    groups = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lengths:
        qs = q[start : start + n].double().transpose(0, 1)  # (Hq, n, D)
        ks, vs = (t[start : start + n].double().repeat_interleave(groups, 1).transpose(0, 1) for t in (k, v))
        scores = qs @ ks.transpose(1, 2) * scale
        if bias is not None:
            scores = scores + bias[0, :, :n, :n].double()
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        if causal:
            allowed = (j <= i) & ((i - j) < window if window is not None else True)
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif window is not None:
            scores = scores.masked_fill((i - j).abs() >= window, float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


def test_ops_import_without_transformers():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'transformers': raise ImportError('transformers is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bettertransformer.ops.attention, bettertransformer.ops.padding, bettertransformer.ops.fused\n"
        "assert 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("left", [False, True])
def test_pack_unpack_round_trip(left):
    mask = _mask([5, 1, 7, 0], 7, left)
    x = torch.randn(4, 7, 3)
    info = pack_info(mask, 4, 7, x.device)
    packed = pack(x, info)
    assert packed.shape == (13, 3) and info.max_len == 7 and info.cu_seqlens.tolist() == [0, 5, 6, 13, 13]
    torch.testing.assert_close(packed, x[mask])
    back = unpack(packed, info)
    torch.testing.assert_close(back, x * mask[..., None])


def test_pack_info_says_whether_rows_have_holes():
    for left in (False, True):
        assert pack_info(_mask([5, 1, 7, 0], 7, left), 4, 7, torch.device("cpu")).contiguous
    holes = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]])
    assert not pack_info(holes, 2, 4, torch.device("cpu")).contiguous
    from bettertransformer.ops.padding import PendingPack

    assert not PendingPack(holes, 2, 4, torch.device("cpu"), host_mask=holes).finish().contiguous


def test_pack_gradient_lands_on_the_real_tokens():
    """pack's backward copies each packed row's gradient back to its position, zeros at padding."""
    mask = _mask([5, 1, 7, 0], 7, left=True)
    x = torch.randn(4, 7, 3, requires_grad=True)
    weight = torch.randn(13, 3)
    (pack(x, pack_info(mask, 4, 7, x.device)) * weight).sum().backward()
    expected = torch.zeros(4, 7, 3)
    expected[mask] = weight
    assert torch.equal(x.grad, expected)


def test_unpadded_batch_packs_by_reshape():
    x = torch.randn(3, 4, 2)
    info = pack_info(None, 3, 4, x.device)
    assert info.indices is None and info.total == 12
    assert pack(x, info).data_ptr() == x.data_ptr()
    info = pack_info(torch.ones(3, 4), 3, 4, x.device)
    assert info.indices is None


@pytest.mark.parametrize("backend", ["dense", "loop"])
@pytest.mark.parametrize("lengths", [[9, 1, 4, 6], [8, 8], [0, 5, 0, 3]])
def test_packed_attention_backends_match_reference(backend, lengths):
    torch.manual_seed(0)
    seq = max(max(lengths), 1)
    info = pack_info(_mask(lengths, seq), len(lengths), seq, torch.device("cpu"))
    q, k, v = (torch.randn(sum(lengths), 3, 8) for _ in range(3))
    out = packed_attention(q, k, v, info, scale=0.3, backend=backend)
    torch.testing.assert_close(out.double(), _reference_attention(q, k, v, lengths, 0.3), atol=1e-5, rtol=1e-5)


def test_loop_backend_batches_consecutive_sequences_of_one_length(monkeypatch):
    """The CPU's loop backend runs each run of consecutive equal lengths as one batched call, with each sequence's
    result exactly what a call of its own gives (windowed and causal too)."""
    torch.manual_seed(0)
    lengths = [6, 6, 6, 4, 0, 4, 6, 1]
    seq = max(lengths)
    info = pack_info(_mask(lengths, seq), len(lengths), seq, torch.device("cpu"))
    q, k, v = (torch.randn(sum(lengths), 4, 8) for _ in range(3))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(q.shape[0]) or sdpa(q, *a, **kw)
    )
    for options in (dict(), dict(causal=True, window=3)):
        calls.clear()
        out = packed_attention(q, k, v, info, scale=0.3, backend="loop", **options)
        assert calls == [3, 2, 1, 1]  # the runs 6 6 6 | 4 (0) 4 | 6 | 1: an empty sequence does not break a run
        start = 0
        for n in lengths:  # each sequence alone, as the backend ran it before
            alone = pack_info(torch.ones(1, n, dtype=torch.long), 1, n, torch.device("cpu")) if n else None
            if n:
                one = packed_attention(q[start : start + n], k[start : start + n], v[start : start + n], alone,
                                       scale=0.3, backend="loop", **options)  # fmt: skip
                assert torch.equal(out[start : start + n], one)
            start += n


@pytest.mark.parametrize("backend", ["dense", "loop"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("lengths", [[7, 1, 5, 0, 9], [6, 6, 6]])  # padded, and none (one batched call)
def test_causal_packed_attention(backend, window, kv_heads, lengths):
    """Decoder-style attention on packed rows: causal, sliding window, grouped-query heads."""
    torch.manual_seed(0)
    seq = max(lengths)
    info = pack_info(_mask(lengths, seq), len(lengths), seq, torch.device("cpu"))
    q = torch.randn(sum(lengths), 4, 8)
    k, v = (torch.randn(sum(lengths), kv_heads, 8) for _ in range(2))
    out = packed_attention(q, k, v, info, scale=0.3, causal=True, window=window, backend=backend)
    ref = _reference_attention(q, k, v, [n for n in lengths if n], 0.3, causal=True, window=window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "loop"])
@pytest.mark.parametrize("lengths", [[7, 1, 5, 0, 9], [6, 6, 6]])
def test_bidirectional_window(backend, lengths):
    """Without ``causal`` a window keeps |i - j| < window (ModernBERT's local layers)."""
    torch.manual_seed(0)
    seq = max(lengths)
    info = pack_info(_mask(lengths, seq), len(lengths), seq, torch.device("cpu"))
    q, k, v = (torch.randn(sum(lengths), 4, 8) for _ in range(3))
    out = packed_attention(q, k, v, info, scale=0.3, window=3, backend=backend)
    expected = _reference_attention(q, k, v, [n for n in lengths if n], 0.3, window=3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_dense_backend_with_bias_and_gradients():
    torch.manual_seed(0)
    lengths = [6, 2, 5]
    info = pack_info(_mask(lengths, 6, left=True), 3, 6, torch.device("cpu"))
    q, k, v = (torch.randn(13, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    out = packed_attention(q, k, v, info, scale=0.5, bias=bias)
    ref = _reference_attention(q, k, v, lengths, 0.5, bias)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_explicit_softmax_gives_a_query_with_no_key_zero_weights(softcap):
    """As PyTorch's SDPA: a query row whose mask allows no key gets zero weights and a zero output, not NaN."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, :, :3] = False  # batch row 0: its first three queries see nothing (left padding)
    out, probs = attention_with_weights(q, k, v, mask, scale=0.3, softcap=softcap)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert probs[0, :, :3].abs().max() == 0 and out[0, :, :3].abs().max() == 0
    assert torch.allclose(probs[0, :, 3:].sum(-1), torch.ones(4, 3))
    if softcap is None:
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        assert torch.allclose(out, expected, atol=1e-6)


def test_fused_ops_reference_path():
    x, r = torch.randn(5, 16), torch.randn(5, 16)
    w, b = torch.randn(16), torch.randn(16)
    torch.testing.assert_close(fused.add_layer_norm(x, r, w, b, 1e-5), F.layer_norm(x + r, (16,), w, b, 1e-5))
    w2, b2 = torch.randn(8, 16), torch.randn(8)
    torch.testing.assert_close(fused.linear_gelu(x, w2, b2), F.gelu(F.linear(x, w2, b2)))


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("head_dim", [32, 64])
def test_triton_attention_backend_matches_reference(head_dim):
    """Our packed attention kernel (the encoder's) on rows of mixed lengths, one of them empty, one longer than a
    tile, against per-sequence float64 attention. (On the GPU the test above also covers it at BERT's sizes.)"""
    torch.manual_seed(0)
    lengths = [70, 1, 17, 0, 33]
    info = pack_info(_mask(lengths, 70).to(KERNELS), len(lengths), 70, torch.device(KERNELS))
    q, k, v = (torch.randn(sum(lengths), 2, head_dim, device=KERNELS, dtype=torch.float16) for _ in range(3))
    ref = _reference_attention(q.cpu(), k.cpu(), v.cpu(), [n for n in lengths if n], head_dim**-0.5)
    out = packed_attention(q, k, v, info, scale=head_dim**-0.5, backend="triton")
    assert (out.double().cpu() - ref).abs().max().item() < 2e-3


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize(("p", "n", "pair"), [(0.0, 48, False), (0.5, 48, False), (0.5, 300, True), (0.0, 48, True)])
def test_dropout_add_layer_norm_kernels_match_pytorch(p, n, pair):
    """The training kernels of LayerNorm(dropout(a) + x) (a bf16, the residual x and the norm fp32, as under
    autocast) against PyTorch's composition with the same dropout mask: outputs and all four gradients. Rows not a
    multiple of the kernels' row tiles, widths not a power of two (300: several backward programs, the last one
    partly past the end). ``pair``: also the output rounded to bf16 (what the next product reads), its gradient
    summed into the output's, as autograd sums a cast's, and the gradient of a bias added into a upstream (a's
    column sums). (p = 0.5 scales by 2, exactly: Triton's interpreter rounds
    fp32 to bf16 toward zero where the GPU and PyTorch round to nearest.)"""
    rows, eps = 70, 1e-12
    device = KERNELS
    torch.manual_seed(0)
    a = torch.randn(rows, n, device=device).to(torch.bfloat16).requires_grad_()
    x = torch.randn(rows, n, device=device, requires_grad=True)
    w = (torch.randn(n, device=device) + 1).requires_grad_()
    b = torch.randn(n, device=device, requires_grad=True)
    dy = torch.randn(rows, n, device=device)
    dy2 = torch.randn(rows, n, device=device).to(torch.bfloat16)
    a_bias = torch.randn(n, device=device, requires_grad=True)
    torch.manual_seed(1)  # the seed the call below draws: first its mask, read off a zero residual
    _, _, h, *_ = triton_kernels.dropout_add_layer_norm_forward(
        a.detach(), torch.zeros_like(x), w, b, eps, p, torch.float32
    )
    keep = h != 0
    torch.manual_seed(1)
    if pair:
        y, y2 = fused._DropoutAddLayerNorm.apply(a, x, w, b, eps, p, torch.float32, torch.bfloat16, a_bias)
        *grads, bias_grad = torch.autograd.grad([y, y2], [a, x, w, b, a_bias], [dy, dy2])
    else:
        y = fused._DropoutAddLayerNorm.apply(a, x, w, b, eps, p, torch.float32)
        grads = torch.autograd.grad(y, [a, x, w, b], dy)
    dropped = torch.where(keep, a * (1 / (1 - p)), torch.zeros((), dtype=a.dtype, device=device))
    ref = F.layer_norm(dropped + x, (n,), w, b, eps)
    if pair:
        ref_grads = torch.autograd.grad([ref, ref.to(torch.bfloat16)], [a, x, w, b], [dy, dy2])
        assert y2.dtype == torch.bfloat16
        # y rounded (to nearest on the GPU; Triton's interpreter rounds toward zero: one bf16 unit apart at most)
        torch.testing.assert_close(y2.float(), y.to(torch.bfloat16).float(), rtol=2**-7, atol=0)
    else:
        ref_grads = torch.autograd.grad(ref, [a, x, w, b], dy)
    if p:
        assert 0.35 < keep.float().mean().item() < 0.65
    else:
        assert keep.all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["a", "x", "weight", "bias"], grads, ref_grads, strict=True):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-2 if name == "a" else 1e-4, atol=1e-4, msg=name)
    if pair:
        torch.testing.assert_close(bias_grad, grads[0].float().sum(0), rtol=1e-5, atol=1e-5)


@kernels
@pytest.mark.kernels
def test_dropout_add_layer_norm_draws_a_new_mask_each_call():
    a = torch.ones(40, 64, device=KERNELS, dtype=torch.float16)
    x = torch.zeros(40, 64, device=KERNELS)
    w, b = torch.ones(64, device=KERNELS), torch.zeros(64, device=KERNELS)
    masks = [triton_kernels.dropout_add_layer_norm_forward(a, x, w, b, 1e-5, 0.5, torch.float32)[2] != 0 for _ in "ab"]
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("bias", [True, False])
def test_half_linear_computes_what_autocast_computes(bias):
    """The captured training stack's product: output and gradients as autocast's F.linear gives them (CPU, bf16:
    both round the weight gradient to bf16 here; on CUDA ours keeps it in fp32)."""
    torch.manual_seed(0)
    x = torch.randn(37, 24, requires_grad=True)
    weight = torch.randn(16, 24, requires_grad=True)
    b = torch.randn(16, requires_grad=True) if bias else None
    grad = torch.randn(37, 16, dtype=torch.bfloat16)
    results = []
    for run in (lambda: F.linear(x, weight, b), lambda: fused.half_linear(x, weight, b, torch.bfloat16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run()
        inputs = [x, weight] + ([b] if bias else [])
        results.append((y, torch.autograd.grad(y, inputs, grad)))
    (y, grads), (ours, our_grads) = results
    assert ours.dtype == y.dtype == torch.bfloat16
    torch.testing.assert_close(ours, y)
    for actual, expected in zip(our_grads, grads, strict=True):
        assert actual.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)


def test_half_linear_of_stacked_weights_and_cast_copies():
    """q, k and v given apart (with their copies in bf16 made by the caller, as a captured stack makes them): the
    output and gradients of the concatenated matrix, each weight's and bias's gradient its own slice."""
    torch.manual_seed(0)
    x = torch.randn(37, 24, requires_grad=True)
    weights = tuple(torch.randn(8, 24, requires_grad=True) for _ in range(3))
    biases = tuple(torch.randn(8, requires_grad=True) for _ in range(3))
    grad = torch.randn(37, 24, dtype=torch.bfloat16)
    inputs = [x, *weights, *biases]
    whole = fused.half_linear(x, torch.cat(weights), torch.cat(biases), torch.bfloat16)
    expected = torch.autograd.grad(whole, inputs, grad)
    copies = torch.cat(weights).to(torch.bfloat16), torch.cat(biases).to(torch.bfloat16)
    for made in ((None, None), copies):
        stacked = fused.half_linear(x, weights, biases, torch.bfloat16, *made)
        assert torch.equal(stacked, whole)
        for actual, want in zip(torch.autograd.grad(stacked, inputs, grad), expected, strict=True):
            assert actual.shape == want.shape and torch.equal(actual, want)
    with pytest.raises(ValueError, match="a bias for every"):
        fused.half_linear(x, weights, biases[:2], torch.bfloat16)


@pytest.mark.parametrize(("offset", "round_first"), [(0.0, True), (1.0, False), (0.0, False)])
def test_rms_norm_with_grad_matches_the_stock_forms(offset, round_first):
    """PyTorch's fused RMSNorm op in the stock modules' three forms (Llama's, Gemma's, OLMo 2's): output and
    gradients of the stock composition in fp32; in bf16 within its rounding (2^-7 of each value); None where the
    form does not fit (Llama's with a weight of another dtype)."""
    from bettertransformer.ops.decode import RMSNorm, rms_norm

    torch.manual_seed(0)
    x = torch.randn(5, 3, 32, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(32) * 0.5).requires_grad_()
    out = fused.rms_norm_with_grad(x, weight, 1e-6, offset, round_first)
    expected = rms_norm(x, RMSNorm(weight, 1e-6, offset, round_first))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (x, weight), g), torch.autograd.grad(expected, (x, weight), g), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    xb, wb = x.detach().bfloat16(), weight.detach().bfloat16()
    low = fused.rms_norm_with_grad(xb, wb, 1e-6, offset, round_first)
    stock = rms_norm(xb, RMSNorm(wb, 1e-6, offset, round_first))
    assert low.dtype == stock.dtype == torch.bfloat16
    ulp = 2.0**-7 * stock.float().abs().clamp(min=2.0**-126)
    assert ((low.float() - stock.float()).abs() <= ulp * 1.01).all()
    mixed = fused.rms_norm_with_grad(xb, weight.detach(), 1e-6, offset, round_first)
    assert (mixed is None) == round_first


@pytest.mark.parametrize("has_gqa", [False, True])
def test_varlen_backend_passes_grouped_heads_as_they_are(has_gqa, monkeypatch):
    """Grouped-query heads reach the flash kernels with their own key/value heads: through ``varlen_attn``'s
    ``enable_gqa`` where this torch has it, else through PyTorch's flash op directly (torch 2.11), never as copies
    of k and v with their heads repeated. (Their values: ``test_varlen_backend_matches_reference_on_cuda``.)"""
    from bettertransformer.ops import attention

    calls = []

    def varlen_attn(q, k, v, *args, enable_gqa=False, **kwargs):
        calls.append(("varlen_attn", k.shape[1], v.shape[1], enable_gqa))
        return torch.zeros_like(q)

    def flash(q, k, v, *args):
        calls.append(("flash", k.shape[1], v.shape[1]))
        return torch.zeros_like(q)

    params = frozenset({"query", "key", "value", "scale", "window_size"} | ({"enable_gqa"} if has_gqa else set()))
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (varlen_attn, params))
    monkeypatch.setattr(attention._FlashVarlen, "apply", flash)
    lengths = [5, 3]
    info = pack_info(_mask(lengths, 5), len(lengths), 5, torch.device("cpu"))
    q = torch.randn(sum(lengths), 8, 16)
    k, v = torch.randn(sum(lengths), 2, 16), torch.randn(sum(lengths), 2, 16)
    with torch.no_grad():
        packed_attention(q, k, v, info, scale=0.25, causal=True, backend="varlen")
    assert calls == ([("varlen_attn", 2, 2, True)] if has_gqa else [("flash", 2, 2)])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_backend_matches_reference_on_cuda(dtype):
    torch.manual_seed(0)
    lengths = [130, 1, 77, 512, 3, 0, 64]
    info = pack_info(_mask(lengths, 512).cuda(), len(lengths), 512, torch.device("cuda"))
    q, k, v = (torch.randn(sum(lengths), 12, 64, device="cuda", dtype=dtype) for _ in range(3))
    ref = _reference_attention(q.cpu(), k.cpu(), v.cpu(), [n for n in lengths if n], 0.125)
    for backend in ("triton", "varlen", "dense"):
        out = packed_attention(q, k, v, info, scale=0.125, backend=backend)
        err = (out.double().cpu() - ref).abs().max().item()
        assert err < (2e-3 if dtype == torch.float16 else 1.6e-2), (backend, err)
    # Causal with a sliding window and grouped-query heads (decoder prefill), on the CUDA backends.
    kv = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=dtype) for _ in range(2))
    k4, v4 = kv
    ref = _reference_attention(q.cpu(), k4.cpu(), v4.cpu(), [n for n in lengths if n], 0.125, causal=True, window=100)
    for backend in ("varlen", "dense"):
        out = packed_attention(q, k4, v4, info, scale=0.125, causal=True, window=100, backend=backend)
        err = (out.double().cpu() - ref).abs().max().item()
        assert err < (2e-3 if dtype == torch.float16 else 1.6e-2), (backend, err)
    # Bidirectional with a window (ModernBERT's local layers).
    ref = _reference_attention(q.cpu(), k.cpu(), v.cpu(), [n for n in lengths if n], 0.125, window=65)
    for backend in ("varlen", "dense"):
        out = packed_attention(q, k, v, info, scale=0.125, window=65, backend=backend)
        err = (out.double().cpu() - ref).abs().max().item()
        assert err < (2e-3 if dtype == torch.float16 else 1.6e-2), (backend, err)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_backend_in_training_on_cuda(causal):
    """Training runs flash attention on the packed rows directly (``_FlashVarlen``), grouped-query heads as they
    are: without dropout its output is varlen_attn's (the inference path) and its gradients the dense backend's;
    with dropout, a seed gives one draw, the mean over draws is the undropped output, and gradients flow to q, k
    and v."""
    from bettertransformer.ops.attention import BACKENDS, _Call, pick_backend

    torch.manual_seed(0)
    lengths = [37, 1, 0, 90, 12]
    info = pack_info(_mask(lengths, 90).cuda(), len(lengths), 90, torch.device("cuda"))
    q, k, v = (
        torch.randn(sum(lengths), heads, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for heads in (4, 2, 2)
    )
    assert pick_backend(q, 0.1, None, causal=causal, gqa=True) == "varlen"

    def run(p, backend="varlen"):
        call = _Call(q, k, v, info, 0.125, p, None, causal, None, None)
        return BACKENDS[backend](call)

    plain = run(0.0)
    assert type(plain.grad_fn).__name__ == "_FlashVarlenBackward"
    with torch.no_grad():
        torch.testing.assert_close(plain, run(0.0), atol=1e-3, rtol=0)  # varlen_attn
    grads = torch.autograd.grad(plain.float().square().sum(), (q, k, v))
    dense = run(0.0, "dense")
    torch.testing.assert_close(plain, dense, atol=1.6e-2, rtol=0)
    dense_grads = torch.autograd.grad(dense.float().square().sum(), (q, k, v))
    for a, b in zip(grads, dense_grads, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    torch.manual_seed(1)
    first = run(0.3)
    torch.manual_seed(1)
    again = run(0.3)
    assert torch.equal(first, again) and not torch.equal(first, plain)
    with torch.no_grad():
        mean = sum(run(0.3).float() for _ in range(400)) / 400
    assert (mean - plain.float()).abs().mean() < 0.1 * plain.float().abs().mean()
    dropped = torch.autograd.grad(first.float().square().sum(), (q, k, v))
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in dropped)


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernels_match_torch(dtype):
    """LayerNorm + residual and GELU against fp32 PyTorch: within one unit in the last place of the output dtype."""
    assert triton_kernels.AVAILABLE
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7  # relative spacing of the dtype's numbers
    x, r = (torch.randn(1000, 768, device=KERNELS, dtype=dtype) for _ in range(2))
    w, b = torch.randn(768, device=KERNELS, dtype=dtype), torch.randn(768, device=KERNELS, dtype=dtype)
    ref = F.layer_norm((x.float() + r.float()), (768,), w.float(), b.float(), 1e-12)
    out = triton_kernels.add_layer_norm(x, r, w, b, 1e-12)
    torch.testing.assert_close(out.float(), ref, rtol=ulp, atol=1e-3)
    y = torch.randn(333, 3072, device=KERNELS, dtype=dtype)
    ref = F.gelu(y.float())
    out = triton_kernels.gelu_(y.clone())
    torch.testing.assert_close(out.float(), ref, rtol=ulp, atol=1e-3)


def _decode_inputs(device, dtype, batch=3, heads=4, kv_heads=2, dim=16, slots=40, width=64):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    kv = rand(2, batch, kv_heads, slots, dim)
    valid = torch.rand(batch, slots, generator=gen) < 0.7
    valid[:, 5] = True
    mask = torch.where(valid, 0.0, float("-inf")).to(device, dtype)
    x = rand(batch, width)
    weight = rand(width, (heads + 2 * kv_heads) * dim) / width**0.5
    return kv, mask, x, weight, rand(weight.shape[1])


def _count_launches(monkeypatch, module, *names):
    """Count the calls of ``module``'s functions ``names`` (a dict updated as they run)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args, name=name, original=original, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def _run_decode_ops(device, dtype, batch=3):
    """Every decode op once, from the same inputs; returns the outputs and the updated cache."""
    from bettertransformer.ops import decode

    kv, mask, x, weight, bias = _decode_inputs(device, dtype, batch=batch)
    slot = torch.tensor([5], device=device)
    # GPT-2's attention: the rotary decode attention without rotation, over the QKV product
    positions, no_rotation = torch.full((batch,), 5, device=device), decode.Rotary(torch.zeros(1, device=device)[:0])
    qkv = decode.linear(x, weight, bias, transposed=False)
    att = decode.rope_attention(qkv, kv, mask, slot, positions, heads=4, scale=0.25, rotary=no_rotation)
    fc = decode.linear(x, weight, bias, transposed=False, gelu_tanh=True)
    lin = decode.linear(x, weight.t().contiguous(), None, transposed=True, out_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    wte, wpe = (torch.randn(n, 64, generator=gen).to(device, dtype) for n in (50, 20))
    emb = decode.embed(
        torch.tensor([3, 49, 0, 7][:batch], device=device), torch.tensor([0, 19, 7, 2][:batch], device=device), wte, wpe
    )
    norm = (
        torch.rand(64, generator=gen).to(device, dtype) + 0.5,
        torch.randn(64, generator=gen).to(device, dtype),
        1e-5,
    )
    normed = decode.linear(x + 3, weight, bias, transposed=False, norm=norm)  # LayerNorm prologue
    residual = decode.linear(x, weight[:, :64], bias[:64], transposed=False, residual=x.clone() * 2)  # in place
    return [qkv, att, fc, lin, emb, kv, normed, residual]


def test_decode_ops_reference_path():
    qkv_out, att, fc, lin, emb, kv, normed, residual = _run_decode_ops("cpu", torch.float64)
    _, mask, x, weight, bias = _decode_inputs("cpu", torch.float64)
    qkv = x @ weight + bias
    torch.testing.assert_close(qkv_out, qkv)
    torch.testing.assert_close(kv[0, :, :, 5], qkv[:, 64:96].view(3, 2, 16))  # keys written at the slot
    torch.testing.assert_close(kv[1, :, :, 5], qkv[:, 96:].view(3, 2, 16))
    written = mask.clone()
    written[:, 6:] = float("-inf")  # the slots after this token's are not written yet: never attended
    expected = _reference_attention_decode(qkv[:, :64].view(3, 4, 16), kv, written, 0.25)
    torch.testing.assert_close(att, expected.reshape(3, 64))
    torch.testing.assert_close(fc, F.gelu(qkv, approximate="tanh"))
    assert lin.dtype == torch.float32
    torch.testing.assert_close(residual, 2 * x + qkv[:, :64])
    gen = torch.Generator().manual_seed(1)
    torch.randn(50 + 20, 64, generator=gen)  # the embeddings' draws
    w, b = torch.rand(64, generator=gen).double() + 0.5, torch.randn(64, generator=gen).double()
    expected = F.layer_norm(x + 3, (64,), w, b, 1e-5) @ weight + bias
    torch.testing.assert_close(normed, expected)


def _reference_attention_decode(q, kv, mask, scale):
    k = kv[0].repeat_interleave(2, dim=1)  # (B, H, S, D)
    v = kv[1].repeat_interleave(2, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q, k) * scale + mask[:, None, :]
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_kernels_match_the_reference_path(batch, monkeypatch):
    from bettertransformer.ops import decode_kernels

    launches = _count_launches(monkeypatch, decode_kernels, "linear", "rope_attention", "embed")
    got = _run_decode_ops(KERNELS, torch.float16, batch)
    assert launches == {"linear": 5, "rope_attention": 1, "embed": 1}  # the kernels ran, not the reference path
    expected = _run_decode_ops("cpu", torch.float64, batch)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        error = (a.double().cpu() - b).abs().max().item()
        assert error < 2e-2 * max(1.0, b.abs().max().item()), (i, error)


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("with_norm", [False, True])
def test_greedy_head_picks_the_first_maximum_of_the_rounded_logits(batch, with_norm, monkeypatch):
    from bettertransformer.ops import decode, decode_kernels

    launches = _count_launches(monkeypatch, decode_kernels, "linear")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 96, generator=gen).to(KERNELS).half()
    weight = (torch.randn(5000, 96, generator=gen) / 10).to(KERNELS).half()  # (V, E): many programs per row
    norm = (torch.ones(96).to(KERNELS).half(), torch.zeros(96).to(KERNELS).half(), 1e-5) if with_norm else None
    penalty = torch.zeros(5000, device=KERNELS)
    penalty[4] = float("-inf")
    chosen = decode.greedy_head(x, weight, None, transposed=True, norm=norm, eos_penalty=penalty)
    logits = decode.linear(x, weight, None, transposed=True, norm=norm, out_dtype=torch.float32)
    inputs = F.layer_norm(x.float(), (96,), eps=1e-5).half() if with_norm else x
    torch.testing.assert_close(logits, inputs.float() @ weight.float().t(), atol=5e-3, rtol=5e-3)
    assert torch.equal(logits, logits.half().float())  # rounded to fp16, as a stock LM head's logits are
    assert torch.equal(chosen, (logits + penalty).argmax(-1))
    # Exact ties in different programs: the first index wins, a banned id never does.
    tied = weight.clone()
    tied[[40, 1200, 3001]] = 0
    tied[[40, 1200, 3001], 0] = 60.0  # logit 60 for every row below; the others stay under ~6
    penalty[40] = float("-inf")
    xs = x.clone()
    xs[:, 0] = 1.0
    got = decode.greedy_head(xs, tied, None, transposed=True, norm=None, eos_penalty=penalty)
    assert got.tolist() == [1200] * batch
    # Both greedy heads and the logits ran our kernel (only plain products with both sides >= 2048 go to cuBLAS).
    assert launches == {"linear": 3}


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_choice_over_partial_maxima_in_several_chunks(rows):
    # 20,000 columns in programs of 8: 2,500 partial maxima per row, reduced in chunks of 2,048.
    from bettertransformer.ops import decode_kernels

    gen = torch.Generator().manual_seed(0)
    x = torch.ones(rows, 64).to(KERNELS).half()
    weight = (torch.randn(20000, 64, generator=gen) / 100).to(KERNELS).half()

    def choose(w: torch.Tensor, penalty: torch.Tensor | None = None) -> list[int]:
        got = decode_kernels.linear(x, w, None, transposed=True, argmax=True, eos_penalty=penalty, config=(8, 64, 4))
        return got.tolist()

    assert choose(weight) == (x @ weight.t()).float().argmax(-1).tolist()
    for top in ([19000], [40, 19000], [16500, 19000]):  # the maximum in the last chunk; ties across chunks
        w = weight.clone()
        w[top] = 1.0
        assert choose(w) == [top[0]] * rows
    banned = torch.full((20000,), float("-inf"), device=KERNELS)
    assert choose(weight, banned) == [0] * rows  # every score -inf: the first index, as torch.argmax gives


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("programs", [700, 2048, 2500, 5000])
def test_first_max_over_chunks_of_partial_maxima(programs):
    """The greedy choice's reduction (``first_max``) over 1 to 3 chunks of 2,048 per-program maxima: the smallest
    index among the maxima, with ties inside a chunk and across chunks, a maximum in the last (partial) chunk, and
    every value -inf; the counters it shares with the calls before are back at zero after each call."""
    from bettertransformer.ops import decode_kernels

    gen = torch.Generator().manual_seed(0)
    rows = 3
    values = torch.randn(rows, programs, generator=gen)
    index = torch.arange(programs, dtype=torch.int32).repeat(rows, 1) * 8 + torch.randint(0, 8, (rows, programs))
    values[0, [5, programs // 2, programs - 1]] = 9.0  # ties across chunks (within one when there is one chunk)
    values[1, programs - 1] = 9.0  # the last value: the last chunk, partial unless 2,048 divides it
    values[2] = float("-inf")
    counters = torch.zeros(rows + 2, dtype=torch.int32, device=KERNELS)
    for _ in range(2):
        got = decode_kernels.first_max(values.to(KERNELS), index.to(KERNELS), counters)
        assert not counters.any()
    top = values.max(-1, keepdim=True).values
    expected = torch.where(values == top, index, torch.iinfo(torch.int32).max).min(-1).values
    assert got.tolist() == expected.tolist()
    assert got.tolist()[:2] == [index[0, 5].item(), index[1, programs - 1].item()]


@cuda
@pytest.mark.cuda
def test_launches_inside_compiling_ahead_compile_without_running_on_cuda():
    from bettertransformer.ops import compile_ahead, decode_kernels

    if not compile_ahead.SUPPORTED:
        pytest.skip("this Triton has no asynchronous compile mode")
    # A width no other test uses: a kernel variant of its own (BLOCK = 2**k), so it is compiled in the block.
    width = 4096 + 8
    wte = torch.randn(10, width, device="cuda", dtype=torch.float16)
    tokens = torch.tensor([3, 7], device="cuda")
    cache = decode_kernels._embed_kernel.device_caches[torch.cuda.current_device()][0]
    before = set(cache)
    with compile_ahead.compiling_ahead(torch.device("cuda"), threads=4) as ahead:
        assert ahead
        skipped = decode_kernels.embed(tokens, None, wte, None)
        skipped.fill_(1.0)  # what the kernel would have overwritten stays
    torch.cuda.synchronize()
    assert bool((skipped == 1.0).all())
    new = [cache[key] for key in set(cache) - before]
    assert len(new) == 1 and new[0].module is not None  # compiled and loaded on the pool, before any launch ran it
    assert torch.equal(decode_kernels.embed(tokens, None, wte, None), wte[tokens])  # and it runs as usual after
    with switched(compile_ahead=False), compile_ahead.compiling_ahead(torch.device("cuda")) as ahead:
        assert not ahead
        assert torch.equal(decode_kernels.embed(tokens, None, wte, None), wte[tokens])  # launched as usual


def test_compiling_ahead_starts_one_compilation_per_kind_of_launch():
    from concurrent.futures import ThreadPoolExecutor

    from bettertransformer.ops import compile_ahead

    class Kernel:  # records what compiling ahead asks of it
        def __init__(self):
            self.warmed = []

        def warmup(self, *args, grid, **kwargs):
            self.warmed.append((args, kwargs))

    a, b = Kernel(), Kernel()
    half, single = torch.zeros(64, dtype=torch.float16), torch.zeros(64)
    unaligned = torch.zeros(65, dtype=torch.float16)[1:]  # 2 bytes in: not 16-byte aligned
    assert half.data_ptr() % 16 == 0 and unaligned.data_ptr() % 16 != 0
    launches = [
        (a, (half, 8), {"BLOCK": 64}),
        (a, (torch.ones(64, dtype=torch.float16), 8), {"BLOCK": 64}),  # alike: another layer's tensor
        (a, (single, 8), {"BLOCK": 64}),  # another dtype
        (a, (unaligned, 8), {"BLOCK": 64}),  # another alignment
        (a, (half, 9), {"BLOCK": 64}),  # another integer
        (a, (half, 8), {"BLOCK": 128}),  # another constant
        (b, (half, 8), {"BLOCK": 64}),  # another kernel
        (a, ([1], 8), {}),  # unhashable: a kind of its own
        (a, ([1], 8), {}),
    ]
    descriptor = collections.namedtuple("Descriptor", "base block_shape padding")  # as a host-side TMA descriptor
    launches += [
        (a, (descriptor(half, [16, 64], "zero"), 8), {}),
        (a, (descriptor(torch.ones(64, dtype=torch.float16), [16, 64], "zero"), 8), {}),  # alike: another weight
        (a, (descriptor(half, [32, 64], "zero"), 8), {}),  # another block
    ]
    with ThreadPoolExecutor(1) as loader:
        ahead = compile_ahead._Ahead(torch.device("cpu"), loader)
        for kernel, args, kwargs in launches:
            ahead.record(kernel, (1,), args, kwargs)
        assert len(ahead.kinds) == 10  # only the first launch of a kind is held
        ahead.compile_recorded()
    kinds = [args[0].dtype if isinstance(args[0], torch.Tensor) else args[0] for args, _ in a.warmed]
    assert kinds[:7] == [torch.float16, torch.float32, torch.float16, torch.float16, torch.float16, [1], [1]]
    assert [tuple(d.block_shape) for d in kinds[7:]] == [(16, 64), (32, 64)]
    assert a.warmed[0][0][0] is half and len(b.warmed) == 1 and ahead.kinds == {}


def test_compile_mode_builds_each_new_variants_launcher_beside_its_compilation():
    from concurrent.futures import ThreadPoolExecutor

    from bettertransformer.ops import compile_ahead

    if not compile_ahead.SUPPORTED:
        pytest.skip("this Triton has no asynchronous compile mode")
    from triton.runtime._async_compile import AsyncCompileMode

    def compilation(src):  # as Triton's JIT submits one: a closure over the variant's source
        return lambda: (src, "compiled")

    # Triton 3.6 passes a finalising function after the compilation; later releases a clean-up function too.
    after = [lambda kernel: None] + [lambda: None] * (len(inspect.signature(AsyncCompileMode.submit).parameters) - 4)

    built = []

    def build(src):
        built.append(src)
        if src == "broken":
            raise RuntimeError("no C compiler")  # left to the load, which builds (and raises) again

    with ThreadPoolExecutor(2) as pool:
        with compile_ahead._Compiles(pool, build) as mode:
            futures = [mode.submit(key, compilation(src), *after) for key, src in
                       [("a", "source a"), ("a", "source a"), ("b", "source b"), ("c", "broken")]]  # fmt: skip
        assert [f.result()[0] for f in futures] == ["source a", "source a", "source b", "broken"]
    assert sorted(built) == ["broken", "source a", "source b"]  # once a variant, failures swallowed
    with ThreadPoolExecutor(1) as pool, compile_ahead._Compiles(pool, None) as mode:  # no launchers to build
        assert mode.submit("a", compilation("source a"), *after).result() == ("source a", "compiled")
    assert compile_ahead._free_variable(compilation("x"), "src") == "x"
    assert compile_ahead._free_variable(lambda: None, "src") is None


def test_triton_setup_starts_once_and_only_where_kernels_compile_ahead():
    from bettertransformer.ops import compile_ahead

    first = compile_ahead.start_setup()
    assert compile_ahead.start_setup() is first  # one set-up a process
    if compile_ahead.SUPPORTED and torch.version.cuda is not None:
        assert len(first) == 2
        for part in first:
            part.result(timeout=300)  # Triton's key and its driver module, built on threads; raises what they raised
    else:
        assert first == []  # a CPU-only torch or a Triton without asynchronous compiles: no thread


@kernels
@pytest.mark.kernels
def test_advance_kernel_matches_the_reference_path(monkeypatch):
    from bettertransformer.ops import decode_kernels
    from bettertransformer.ops.sampling import advance
    from bettertransformer.ops.step_buffers import StepBuffers

    launches = []
    kernel = decode_kernels.advance
    monkeypatch.setattr(decode_kernels, "advance", lambda *a: launches.append(1) or kernel(*a))
    results = []
    for device, triton in (("cpu", False), (KERNELS, True)):

        def t(values, dtype=torch.long, device=device):
            return torch.tensor(values, dtype=dtype, device=device)

        buffers = StepBuffers(
            unfinished=t([True, True, False], torch.bool), eos=t([7, 9]), pad=t(0), out=torch.zeros(3, 6, dtype=torch.long, device=device),
            tokens=torch.zeros(3, 1, dtype=torch.long, device=device), positions=t([[4], [2], [0]]), step=t([1]),
            slot=t([3]), valid=torch.zeros(3, 6, dtype=torch.bool, device=device),
            mask=torch.full((3, 6), float("-inf"), dtype=torch.float16, device=device), active=t(0),
            eos_penalty=torch.zeros(12, device=device).index_fill_(0, t([7, 9]), float("-inf")), ban_steps=t(2), seen=None,
            counters=torch.zeros(StepBuffers.COUNTERS, dtype=torch.int32, device=device),
        )  # fmt: skip
        with switched(triton=triton):
            advance(t([9, 5, 5]), buffers)
        results.append({k: v.cpu() for k, v in vars(buffers).items() if v is not None})
    assert launches == [1]  # the second call ran our kernel, the first one the reference
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    assert results[0]["unfinished"].tolist() == [False, True, False]
    assert results[0]["out"][:, 1].tolist() == [9, 5, 0]
    assert results[0]["eos_penalty"].isfinite().all()  # step 2 reached ban_steps


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("epilogue", [True, False])
def test_linear_gelu_in_half_precision_on_cuda(epilogue, monkeypatch):
    """The tanh GELU of the cuBLASLt epilogue stays within fp16 rounding of the exact GELU."""
    monkeypatch.setattr(SWITCHES, "gelu_epilogue", epilogue)
    torch.manual_seed(0)
    x, w, b = (
        torch.randn(300, 768, device="cuda"),
        torch.randn(3072, 768, device="cuda") / 28,
        torch.randn(3072, device="cuda"),
    )
    expected = F.gelu(F.linear(x.double(), w.double(), b.double()))
    with torch.no_grad():
        out = fused.linear_gelu(x.half(), w.half(), b.half())
        stock = F.gelu(F.linear(x.half(), w.half(), b.half()))
    stock_error = (stock.double() - expected).abs().max().item()
    assert (out.double() - expected).abs().max().item() <= 2 * stock_error


def test_packing_from_a_host_copy_of_the_mask_matches():
    """A caller's host copy of the mask (a tokenizer's output) gives the same packing as counting on the device."""
    from bettertransformer.ops.padding import PendingPack

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
    counted = PendingPack(mask, 4, 5, torch.device("cpu")).finish()
    given = PendingPack(mask.clone(), 4, 5, torch.device("cpu"), host_mask=mask).finish()
    for field in ("indices", "cu_seqlens", "lengths", "host_lengths"):
        assert torch.equal(getattr(counted, field), getattr(given, field)), field
    assert (counted.max_len, counted.total, counted.left_padded) == (given.max_len, given.total, given.left_padded)
    assert given.left_padded


def _run_llama_decode_ops(device, dtype, batch):
    """The Llama-family decode ops once each, from the same inputs; returns their outputs and the updated caches."""
    from bettertransformer.ops import decode

    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    width, heads, kv_heads, dim, slots, inner = 64, 4, 2, 32, 40, 96
    x = rand(batch, width)
    norm = decode.RMSNorm(rand(width, scale=0.2) + 1, 1e-6)
    gemma_norm = decode.RMSNorm(rand(width, scale=0.2), 1e-6, offset=1.0, round_first=False)
    wq, wk, wv = (rand(n, width, scale=width**-0.5) for n in (heads * dim, kv_heads * dim, kv_heads * dim))
    bq, bk, bv = (rand(n) for n in (heads * dim, kv_heads * dim, kv_heads * dim))
    qkv = decode.linear(x, wq, bq, transposed=True, norm=norm, parts=((wk, bk), (wv, bv)))
    wg, wu = rand(inner, width, scale=width**-0.5), rand(inner, width, scale=width**-0.5)
    gated = decode.linear(x, wg, None, transposed=True, norm=gemma_norm, act="silu", up=(wu, None))
    gelu = decode.linear(x, wg, None, transposed=True, act="gelu_tanh", up=(wu, None))
    head = rand(300, width, scale=0.5)
    logits = decode.linear(x, head, None, transposed=True, norm=norm, softcap=3.0, out_dtype=torch.float32)
    chosen = decode.greedy_head(x, head, None, transposed=True, norm=norm, eos_penalty=None, softcap=3.0)
    added = decode.add_norm(x.clone(), rand(batch, width), gemma_norm)
    # Granite's multipliers: a residual add of 0.22 x the product, logits divided by 8.
    scaled = decode.linear(x, wg, None, transposed=True, residual=torch.ones_like(gated), scale=0.22)
    divided = decode.linear(x, head, None, transposed=True, divide=8.0)
    embedded = decode.embed(torch.tensor([3, 49, 0, 7][:batch], device=device), None, rand(50, width), None, 8.0)
    mask = torch.where(torch.rand(batch, slots, generator=gen) < 0.7, 0.0, float("-inf")).to(device, dtype)
    slot = torch.tensor([30], device=device)
    mask[:, 30] = 0
    positions = torch.tensor([29, 3, 4000, 17][:batch], device=device)
    rotary = decode.Rotary((1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)).to(device), 1.2)  # half the features
    qk_norm = (decode.RMSNorm(rand(dim) + 1, 1e-6), decode.RMSNorm(rand(dim) + 1, 1e-6), True)
    outputs = [qkv, gated, gelu, logits, added, embedded, scaled, divided]
    interleaved = decode.Rotary(rotary.inv_freq, 1.0, interleaved=True)  # GLM's pairs (2i, 2i + 1)
    for window, softcap, norms, turn in (
        (None, None, None, rotary),
        (6, 20.0, qk_norm, rotary),
        (None, None, None, interleaved),
    ):
        kv = rand(2, batch, kv_heads, slots, dim)
        att = decode.rope_attention(
            qkv, kv, mask, slot, positions, heads=heads, scale=dim**-0.5, rotary=turn, qk_norm=norms,
            window=window, softcap=softcap,
        )  # fmt: skip
        outputs += [att, kv]
    return outputs, chosen, logits


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("batch", [1, 4])
def test_llama_decode_kernels_match_the_reference_path(batch, monkeypatch):
    from bettertransformer.ops import decode_kernels

    launches = _count_launches(monkeypatch, decode_kernels, "linear", "rope_attention", "embed", "add_norm")
    got, chosen, logits = _run_llama_decode_ops(KERNELS, torch.float16, batch)
    assert launches == {"linear": 7, "rope_attention": 3, "embed": 1, "add_norm": 1}  # the kernels ran
    expected, _, _ = _run_llama_decode_ops("cpu", torch.float64, batch)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        error = (a.double().cpu() - b).abs().max().item()
        assert error < 2e-2 * max(1.0, b.abs().max().item()), (i, error)
    assert torch.equal(chosen, logits.argmax(-1))  # the fused choice is the argmax of the softcapped logits


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize(
    "rows, chunked, width",
    [(1, False, 200), (3, False, 200), (16, False, 200), (1, True, 200), (3, True, 200), (16, True, 200),
     (1, True, 8200)],
)  # fmt: skip
def test_decode_linear_adds_a_pending_post_norm_before_its_product(rows, chunked, width):
    """A post-norm layer's sublayer output t owed to the residual stream x (Gemma 2, OLMo 2): the next product reads
    x + post_norm(t) and writes that sum into the stream's next buffer, as ``add_norm`` then the product would
    (several rows normalised over several chunks: the row-norm kernel adds it; otherwise ``add_norm`` before the
    product); rows held in one chunk or several, a long row (8,200 columns) among them. With a Gemma pre-norm and
    with none (OLMo 2), against the float64 reference path."""
    from bettertransformer.ops import decode, decode_kernels

    gen = torch.Generator().manual_seed(0)
    out = 48
    x, t = torch.randn(rows, width, generator=gen), torch.randn(rows, width, generator=gen) * 3
    w = torch.randn(out, width, generator=gen) / width**0.5
    post = torch.randn(width, generator=gen) * 0.2
    pre = torch.randn(width, generator=gen) * 0.2
    config = (16, 64 if width < 1000 else 1024, 2) if chunked else None
    for pre_norm in (pre, None):

        def run(device, dtype, pre_norm=pre_norm):
            post_norm = decode.RMSNorm(post.to(device, dtype), 1e-6, offset=1.0, round_first=False)
            norm = None
            if pre_norm is not None:
                norm = decode.RMSNorm(pre_norm.to(device, dtype), 1e-6, offset=1.0, round_first=False)
            xs, ts, ws = x.to(device, dtype), t.to(device, dtype), w.to(device, dtype)
            sums = torch.full_like(xs, float("nan"))
            if device == "cpu" and dtype == torch.float64:
                y = decode.linear(xs, ws, None, transposed=True, norm=norm, pending=(ts, post_norm, sums))
            else:
                y = decode_kernels.linear(
                    xs, ws, None, transposed=True, norm=norm, pending=(ts, post_norm, sums), config=config
                )  # fmt: skip
                added = decode_kernels.add_norm(xs.clone(), ts, post_norm)  # the separate kernel's sum
                assert (sums.double() - added.double()).abs().max().item() < 2e-3 * added.abs().max().item()
            return y.double().cpu(), sums.double().cpu()

        (got, got_sums), (expected, expected_sums) = run(KERNELS, torch.float16), run("cpu", torch.float64)
        assert (got_sums - expected_sums).abs().max().item() < 2e-3 * expected_sums.abs().max().item()
        assert (got - expected).abs().max().item() < 2e-2 * expected.abs().max().item()


def _half_dtypes():
    """fp16 and bf16; fp16 only under Triton's interpreter (3.9), which rounds to bf16 by truncation and whose bf16
    tensor-core product is off by ~1e12."""
    return [torch.float16] if os.environ.get("TRITON_INTERPRET") == "1" else [torch.float16, torch.bfloat16]


def _linear_errors(x, w, u, norm, dtype, config):
    """(our kernel's error, PyTorch's error in ``dtype``, the result's largest magnitude) of ``decode.linear`` with
    ``norm`` (an ``RMSNorm``, a LayerNorm triple or None), gated by ``u`` unless None, against the float64 path."""
    from bettertransformer.ops import decode, decode_kernels

    def run(device, dtype, kernels):
        spec = norm
        if isinstance(norm, decode.RMSNorm):
            spec = dataclasses.replace(norm, weight=norm.weight.to(device, dtype))
        elif norm is not None:
            spec = (norm[0].to(device, dtype), norm[1].to(device, dtype), norm[2])
        kw = dict(act="silu", up=(u.to(device, dtype), None)) if u is not None else {}
        xs, ws = x.to(device, dtype), w.to(device, dtype)
        if kernels:
            return decode_kernels.linear(xs, ws, None, transposed=True, norm=spec, config=config, **kw)
        return decode.linear(xs, ws, None, transposed=True, norm=spec, kernels=False, **kw)

    expected = run("cpu", torch.float64, False)
    stock = (run("cpu", dtype, False).double() - expected).abs().max().item()
    error = (run(KERNELS, dtype, True).double().cpu() - expected).abs().max().item()
    return error, stock, expected.abs().max().item()


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_decode_linear_normalises_rows_over_several_chunks(rows):
    """A norm over more columns than one chunk: one row's statistics gathered by every program over the chunks, several
    rows normalised by a kernel of their own (``_norm_rows_kernel``) first; RMSNorm in Llama's form and Gemma's (1 +
    w, multiplied in fp32) and LayerNorm, plain and gated products. The error against the float64 reference path
    within a small multiple of PyTorch's own in fp16 and bf16."""
    from bettertransformer.ops import decode, decode_kernels

    gen = torch.Generator().manual_seed(0)
    width, out = 1000, 272  # not powers of two; several chunks of k
    x, w = torch.randn(rows, width, generator=gen), torch.randn(out, width, generator=gen) / width**0.5
    u = torch.randn(out, width, generator=gen) / width**0.5
    scale, shift = torch.randn(width, generator=gen) * 0.2 + 1, torch.randn(width, generator=gen)
    config = (16, 256, 4) if rows == 1 else None
    assert width > (config or decode_kernels.linear_config(rows, width, out))[1]
    norms = (
        decode.RMSNorm(scale, 1e-6), decode.RMSNorm(scale - 1, 1e-6, offset=1.0, round_first=False), (scale, shift, 1e-5)
    )  # fmt: skip
    for norm, gated, dtype in itertools.product(norms, (False, True), _half_dtypes()):
        error, stock, largest = _linear_errors(x, w, u if gated else None, norm, dtype, config)
        assert error <= 3 * stock + 1e-3 * largest, (norm, gated, dtype, error, stock)


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("rows, width", [(2, 200), (5, 1000), (16, 1000)])
def test_decode_linear_reads_several_rows_through_tma(rows, width, monkeypatch):
    """Several rows over q, k and v side by side (three matrices, or slices of one fused matrix as Phi-3 keeps
    them), with biases and without, an RMSNorm first or none, k shorter than a tile or not a multiple of it: the
    TMA kernel runs, and its error against the float64 reference path stays within a small multiple of PyTorch's
    own; so with a post-norm's output owed to the rows (the sum written out too), and with rows not 16-byte aligned.
    Widths that are not a multiple of its tile, or the switch off, keep the pointer kernel."""
    from bettertransformer.ops import decode, decode_kernels
    from bettertransformer.switches import switched

    ran = []
    launch = decode_kernels.launch

    def record(kernel, grid, *args, **kwargs):
        ran.append(kernel)
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(decode_kernels, "launch", record)
    gen = torch.Generator().manual_seed(0)
    widths = (128, 64, 64)
    x = torch.randn(rows, width, generator=gen)
    ws = [torch.randn(n, width, generator=gen) / width**0.5 for n in widths]
    bs = [torch.randn(n, generator=gen) for n in widths]
    scale = torch.randn(width, generator=gen) * 0.2 + 1

    def run(device, dtype, norm, bias, one_matrix, kernels):
        spec = decode.RMSNorm(scale.to(device, dtype), 1e-6) if norm else None
        weights = [w.to(device, dtype) for w in ws]
        if one_matrix:  # one (q|k|v, K) matrix, split into views of it
            weights = list(torch.cat(weights).split(widths))
        biases = [b.to(device, dtype) if bias else None for b in bs]
        parts = tuple(zip(weights[1:], biases[1:], strict=True))
        xs = x.to(device, dtype)
        if kernels:
            return decode_kernels.linear(xs, weights[0], biases[0], transposed=True, norm=spec, parts=parts)
        return decode.linear(xs, weights[0], biases[0], transposed=True, norm=spec, parts=parts, kernels=False)

    for norm, bias, one_matrix, dtype in itertools.product((True, False), (True, False), (False, True), _half_dtypes()):
        ran.clear()
        expected = run("cpu", torch.float64, norm, bias, one_matrix, False)
        stock = (run("cpu", dtype, norm, bias, one_matrix, False).double() - expected).abs().max().item()
        got = run(KERNELS, dtype, norm, bias, one_matrix, True)
        assert ran[-1] is decode_kernels._rows_tma_kernel, ran
        error = (got.double().cpu() - expected).abs().max().item()
        assert error <= 3 * stock + 1e-3 * expected.abs().max().item(), (norm, bias, one_matrix, dtype, error, stock)
    t, post = torch.randn(rows, width, generator=gen) * 3, torch.randn(width, generator=gen) * 0.2

    def owed(device, dtype, kernels):  # a post-norm layer's sublayer output owed to the rows (Gemma 2)
        post_norm = decode.RMSNorm(post.to(device, dtype), 1e-6, offset=1.0, round_first=False)
        weights = [w.to(device, dtype) for w in ws]
        xs, sums = x.to(device, dtype), torch.full((rows, width), float("nan"), dtype=dtype, device=device)
        kw = dict(norm=decode.RMSNorm(scale.to(device, dtype), 1e-6), parts=tuple((w, None) for w in weights[1:]))
        kw["pending"] = (t.to(device, dtype), post_norm, sums)
        if kernels:
            y = decode_kernels.linear(xs, weights[0], None, transposed=True, **kw)
        else:
            y = decode.linear(xs, weights[0], None, transposed=True, kernels=False, **kw)
        return y.double().cpu(), sums.double().cpu()

    ran.clear()
    expected, expected_sums = owed("cpu", torch.float64, False)
    stock, stock_sums = owed("cpu", torch.float16, False)
    got, got_sums = owed(KERNELS, torch.float16, True)
    assert ran[-1] is decode_kernels._rows_tma_kernel
    for a, b, ref in ((got, stock, expected), (got_sums, stock_sums, expected_sums)):
        assert (a - ref).abs().max().item() <= 3 * (b - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
    flat = torch.zeros(rows * width + 1, dtype=torch.float16, device=KERNELS)
    shifted = flat[1:].view(rows, width).copy_(x)  # rows 2 bytes past a 16-byte boundary: copied for the descriptor
    assert shifted.is_contiguous() and shifted.data_ptr() % 16
    w16 = ws[0].to(KERNELS, torch.float16)
    got = decode_kernels.linear(shifted, w16, None, transposed=True)
    assert ran[-1] is decode_kernels._rows_tma_kernel
    expected = x.double() @ ws[0].double().t()
    assert (got.double().cpu() - expected).abs().max().item() < 1e-2 * expected.abs().max().item()
    xs = x.to(KERNELS, torch.float16)
    for weight, switch in ((ws[0][:112], True), (ws[0], False)):
        ran.clear()
        with switched(tma=switch):
            decode_kernels.linear(xs, weight.to(KERNELS, torch.float16), None, transposed=True)
        assert ran == [decode_kernels._linear_kernel]


@kernels
@pytest.mark.kernels
def test_decode_linear_adds_a_residual_over_several_rows_one_program_an_sm(monkeypatch):
    """A Llama layer's o and down at 16 rows (a large plain product with a residual add) take the narrowest of 16 or
    32 columns a program whose programs number no more than the SMs, in chunks of 512 of k, at 5 or 4 stages (one
    program an SM), other products their stages as before; the kernel at each configuration adds the product, rounded
    to the weights' dtype, into the residual in place (k not a multiple of the chunk, rows fewer than the tile),
    within fp16 rounding of the float64 reference. Off CUDA (no PDL) such a product stays on cuBLAS."""
    from bettertransformer.ops import decode, decode_kernels

    narrow, wide = (16, 512, 4), (32, 512, 4)
    assert decode_kernels.residual_rows_config(2048, 132) == narrow  # TinyLlama's, Qwen3 1.7B's o and down: 128
    assert decode_kernels.residual_rows_config(2304, 132) == wide  # 144 programs of 16 columns: 72 of 32
    assert decode_kernels.residual_rows_config(4096, 132) == wide  # Llama 3 8B's: 128 programs of 32 columns
    assert decode_kernels.residual_rows_config(8192, 132) is None  # a second wave either way: cuBLAS
    assert decode_kernels.linear_stages(16, 2048, narrow, residual=True) == 5
    assert decode_kernels.linear_stages(16, 4096, wide, residual=True) == 4
    assert decode_kernels.linear_stages(16, 2048, narrow, residual=False) == 4
    assert decode_kernels.linear_stages(1, 2048, narrow, residual=True) == 4
    assert decode_kernels.linear_stages(16, 32000, (128, 128, 4), residual=False) == 2
    assert decode_kernels.spread_rows(torch.zeros(16, 2048), 2048) is None  # no PDL off CUDA: cuBLAS

    stages = []
    launch = decode_kernels.launch

    def record(kernel, grid, *args, **kwargs):
        stages.append((kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_warps"], kwargs["num_stages"]))
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(decode_kernels, "launch", record)
    gen = torch.Generator().manual_seed(0)
    for rows, config, n in ((16, narrow, 48), (5, narrow, 48), (16, wide, 96)):
        x = torch.randn(rows, 1100, generator=gen).to(KERNELS, torch.float16)
        weight = (torch.randn(n, 1100, generator=gen) / 1100**0.5).to(KERNELS, torch.float16)
        residual = torch.randn(rows, n, generator=gen).to(KERNELS, torch.float16)
        expected = residual.double() + (x.double() @ weight.double().T).half().double()
        out = residual.clone()
        got = decode_kernels.linear(x, weight, None, transposed=True, residual=out, config=config)
        assert got is out
        torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=2e-3)
        assert stages[-1] == (*config, decode_kernels._RESIDUAL_ROWS[config])
    # through ops.decode on the CPU: cuBLAS's addmm, the same sum
    x, weight = torch.randn(16, 2048, generator=gen), torch.randn(2048, 2048, generator=gen) / 2048**0.5
    residual = torch.randn(16, 2048, generator=gen)
    got = decode.linear(x, weight, None, transposed=True, residual=residual.clone())
    torch.testing.assert_close(got, residual + x @ weight.T, rtol=1e-5, atol=1e-5)
    # ops.decode passes spread_rows's configuration on to the kernel, where the device has one
    monkeypatch.setattr(decode, "_kernel_rows", lambda rows: True)
    monkeypatch.setattr(decode_kernels, "spread_rows", lambda rows, n: narrow)
    x, weight, residual = (t.to(KERNELS, torch.float16) for t in (x, weight, residual))
    launched = len(stages)
    got = decode.linear(x, weight, None, transposed=True, residual=residual.clone())
    assert stages[launched:] == [(*narrow, 5)]
    expected = residual.double() + (x.double() @ weight.double().T).half().double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=2e-3)


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("width", [2304, 3072])
def test_decode_linear_reads_a_row_whole_in_two_pieces(width, monkeypatch):
    """A one-row product whose k is the sum of two powers of two (Gemma 2's 2,304, Phi-3's 3,072) is read whole as
    two pieces (BLOCK_K 2,048 and a TAIL), as the default configuration chooses for Llama-size products; RMSNorm in
    both forms, LayerNorm and none, plain and gated, against the float64 reference path within a small multiple of
    PyTorch's own error. A BLOCK_K that is neither a power of two nor the sum of two, or two pieces shorter than k,
    is refused."""
    from bettertransformer.ops import decode, decode_kernels

    for n, gated in ((4096, False), (9216, True)):  # Gemma 2 2B's q|k|v and gate|up at 2,304; Phi-3's at 3,072
        assert decode_kernels.linear_config(1, width, n, gated=gated) == (8, width, 8)
    assert decode_kernels.linear_config(1, 4096, 4096) == (8, 1024, 4)  # a power of two: chunks, as before
    pieces = []
    launch = decode_kernels.launch

    def record(kernel, grid, *args, **kwargs):
        if kernel is decode_kernels._linear_kernel:
            pieces.append((kwargs["BLOCK_K"], kwargs["TAIL"], kwargs["ONE_CHUNK"]))
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(decode_kernels, "launch", record)
    gen = torch.Generator().manual_seed(0)
    out = 48
    x, w = torch.randn(1, width, generator=gen), torch.randn(out, width, generator=gen) / width**0.5
    u = torch.randn(out, width, generator=gen) / width**0.5
    scale, shift = torch.randn(width, generator=gen) * 0.2 + 1, torch.randn(width, generator=gen)
    norms = (
        decode.RMSNorm(scale, 1e-6), decode.RMSNorm(scale - 1, 1e-6, offset=1.0, round_first=False),
        (scale, shift, 1e-5), None,
    )  # fmt: skip
    dtypes = _half_dtypes()
    for norm, gated, dtype in itertools.product(norms, (False, True), dtypes):
        error, stock, largest = _linear_errors(x, w, u if gated else None, norm, dtype, (8, width, 8))
        assert error <= 3 * stock + 1e-3 * largest, (norm, gated, dtype, error, stock)
        assert pieces[-1] == (2048, width - 2048, True)
    assert len(pieces) == len(norms) * 2 * len(dtypes)
    xs, ws = x.to(KERNELS, torch.float16), w.to(KERNELS, torch.float16)
    for config in ((8, 2048 + 512 + 256, 4), (8, 2048 + 128, 4)):  # three powers of two; two short of k
        with pytest.raises(ValueError, match="BLOCK_K"):
            decode_kernels.linear(xs, ws, None, transposed=True, config=config)


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_rope_attention_kernel_splits_with_a_window(splits):
    """The kernel's cache slices (``splits``) with a sliding window that starts inside the slices: a slice wholly
    before the window attends to nothing (its first tile, read before the kernel waits, is masked), and no slice
    counts another's slots. The last slice of each (row, head) to finish merges them: the counters it shares with
    the calls before are back at zero after each call."""
    from bettertransformer.ops import decode, decode_kernels

    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, batch, slots = 8, 2, 64, 3, 300
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen)
    kv = torch.randn(2, batch, kv_heads, slots, dim, generator=gen)
    mask = torch.zeros(batch, slots)
    mask[1, :40] = float("-inf")
    slot, positions = torch.tensor([250]), torch.tensor([250, 210, 100])
    rotary = decode.Rotary(1.0 / 10000 ** (torch.arange(0, dim // 2, 2) / (dim // 2)))
    counters = torch.zeros(batch * heads + 5, dtype=torch.int32, device=KERNELS)
    for window, softcap in ((None, None), (64, 30.0), (200, None)):
        cache = kv.double()
        expected = decode.rope_attention(
            qkv.double(), cache, mask.double(), slot, positions, heads=heads, scale=dim**-0.5, rotary=rotary,
            window=window, softcap=softcap,
        )  # fmt: skip
        got = decode_kernels.rope_attention(
            qkv.to(KERNELS).half(), kv.to(KERNELS).half(), mask.to(KERNELS).half(), slot.to(KERNELS),
            positions.to(KERNELS), heads=heads, scale=dim**-0.5, rotary=decode.Rotary(rotary.inv_freq.to(KERNELS)),
            window=window, softcap=softcap, block_s=64, warps=2, splits=splits, counters=counters,
        )  # fmt: skip
        assert (got.double().cpu() - expected).abs().max().item() < 1e-2, window
        assert not counters.any()


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 4, 64), (16, 8, 128), (8, 8, 64)])
def test_rope_attention_over_a_long_cache(heads, kv_heads, dim):
    """The rotary decode attention kernel over a cache of several tiles split across programs, at one row and at
    three, with grouped and ungrouped heads, a window, a softcap and q/k norms, against the float64 reference path.
    Slots after the current one are never attended (not written yet), whatever the mask says there."""
    from bettertransformer.ops import decode

    gen = torch.Generator().manual_seed(0)
    batch, slots = 3, 300
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen)
    kv = torch.randn(2, batch, kv_heads, slots, dim, generator=gen)
    mask = torch.zeros(batch, slots)  # zeros after the current slot too: the kernel stops at the slot regardless
    mask[1, :40] = float("-inf")  # a left-padded row
    slot, positions = torch.tensor([250]), torch.tensor([250, 210, 100])
    rotary = decode.Rotary(1.0 / 10000 ** (torch.arange(0, dim // 2, 2) / (dim // 2)))  # half the features turn
    norms = (decode.RMSNorm(torch.rand(dim) + 0.5, 1e-6), decode.RMSNorm(torch.rand(dim) + 0.5, 1e-6), True)

    def run(device, dtype, window, softcap, qk_norm, rows):
        def to(t):
            return t.to(device, dtype) if t.is_floating_point() else t.to(device)

        cache = to(kv[:, :rows].clone())
        turn = decode.Rotary(rotary.inv_freq.to(device))
        qk = tuple(decode.RMSNorm(to(n.weight), n.eps) for n in qk_norm[:2]) + (True,) if qk_norm else None
        out = decode.rope_attention(
            to(qkv[:rows]), cache, to(mask[:rows]), to(slot), to(positions[:rows]), heads=heads, scale=dim**-0.5,
            rotary=turn, qk_norm=qk, window=window, softcap=softcap,
        )  # fmt: skip
        return out.double().cpu(), cache.double().cpu()

    for rows in (1, batch):
        for window, softcap, qk_norm in ((None, None, None), (64, 30.0, norms)):
            expected, expected_cache = run("cpu", torch.float64, window, softcap, qk_norm, rows)
            got, cache = run(KERNELS, torch.float16, window, softcap, qk_norm, rows)
            assert (cache - expected_cache).abs().max().item() < 1e-2
            assert (got - expected).abs().max().item() < 1e-2


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_kernel_for_many_rows(act, monkeypatch):
    """A gated product over more rows than the step's kernels take (a prefill's): cuBLAS's two products, then
    act(gate) * up in one kernel, the activation rounded to fp16 before the product as PyTorch's two kernels round
    it; against float64 within fp16's rounding, and a size that is not a multiple of the kernel's block."""
    from bettertransformer.ops import decode, decode_kernels

    launches = _count_launches(monkeypatch, decode_kernels, "gated")
    gen = torch.Generator().manual_seed(0)
    x, w, u = (torch.randn(*shape, generator=gen) for shape in ((37, 64), (96, 64), (96, 64)))
    with torch.no_grad():
        got = decode.linear(
            x.to(KERNELS, torch.float16), w.to(KERNELS, torch.float16), None, transposed=True, act=act,
            up=(u.to(KERNELS, torch.float16), None),
        ).double().cpu()  # fmt: skip
    assert launches == {"gated": 1}
    g16, u16 = (x.half().double() @ m.half().double().T for m in (w, u))
    g16, u16 = g16.half().double(), u16.half().double()  # the two products rounded, as cuBLAS's are
    a = F.gelu(g16, approximate="tanh") if act == "gelu_tanh" else F.silu(g16)
    expected = a.half().double() * u16
    assert (got - expected).abs().max().item() <= 2e-3 * expected.abs().max().item()
    g = torch.zeros(4, 6, dtype=torch.float16, device=KERNELS)
    with pytest.raises(ValueError, match="contiguous"):
        decode_kernels.gated(g, g.t().contiguous().t(), act)


@kernels
@pytest.mark.kernels
@pytest.mark.parametrize("heads, kv_heads, dim, rot, interleaved, qk", [
    (8, 2, 64, 32, False, None), (4, 4, 32, 32, True, "head"), (6, 2, 64, 64, False, "whole"),
])  # fmt: skip
def test_rope_into_cache_kernel(heads, kv_heads, dim, rot, interleaved, qk, monkeypatch):
    """A prompt's packed tokens (two left-padded rows) turned by the rotary embedding (grouped heads, partial and
    interleaved rotary, q/k norms per head and over the whole projection) and their keys/values written into the
    cache at their rows and columns, by the prefill's kernel against the float64 reference path. The kernel takes
    512 features of heads a program: 10 heads of 64 fill one program and two heads of the next, 8 of 32 half of
    one."""
    from bettertransformer.ops import decode, decode_kernels

    launches = _count_launches(monkeypatch, decode_kernels, "rope_into_cache")

    gen = torch.Generator().manual_seed(0)
    batch, slots, width = 2, 12, (heads + 2 * kv_heads) * dim
    rows, columns = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1]), torch.tensor([3, 4, 5, 0, 1, 2, 3, 4, 5])
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5]) + 1000  # angles far past 2 pi
    qkv = torch.randn(rows.shape[0], width, generator=gen) * 2
    kv = torch.randn(2, batch, kv_heads, slots, dim, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot // 2) / (rot // 2))
    norm_width = {"head": (dim, dim), "whole": (heads * dim, kv_heads * dim)}.get(qk, (0, 0))
    weights = [torch.rand(n, generator=gen) + 0.5 for n in norm_width]

    def run(device, dtype):
        def to(t):
            return t.to(device, dtype) if t.is_floating_point() else t.to(device)

        norms = None if qk is None else (*(decode.RMSNorm(to(w), 1e-6) for w in weights), qk == "head")
        cache = to(kv.clone())
        q, k, v = decode.rope_into_cache(
            to(qkv), cache, to(rows), to(columns), to(positions), heads=heads,
            rotary=decode.Rotary(inv_freq.to(device), 1.0, interleaved), qk_norm=norms,
        )  # fmt: skip
        return [t.double().cpu() for t in (q, k, v, cache)]

    expected = run("cpu", torch.float64)
    assert launches == {"rope_into_cache": 0}
    got = run(KERNELS, torch.float16)
    assert launches == {"rope_into_cache": 1}  # the kernel ran, not the reference path
    for name, a, b in zip("q k v cache".split(), got, expected, strict=True):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() < 2e-2, name
    untouched = torch.ones(batch, slots, dtype=torch.bool)
    untouched[rows, columns] = False
    assert torch.equal(got[3].transpose(2, 3)[:, untouched], kv.half().double().transpose(2, 3)[:, untouched])


@kernels
@pytest.mark.kernels
def test_rms_norm_before_a_cublas_product_runs_as_one_kernel(monkeypatch):
    """An RMSNorm before a product our kernels do not take (``kernels=False``, as the prefill's; or more than 16
    rows) is normalised by ``norm_rows``' kernel, as the stock module's operations would: Llama's form and Gemma's
    (offset 1, multiplied in fp32)."""
    from bettertransformer.ops import decode, decode_kernels

    launches = _count_launches(monkeypatch, decode_kernels, "norm_rows")
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(20, 96, generator=gen) * 3, torch.randn(40, 96, generator=gen) / 10
    scale = torch.rand(96, generator=gen) + 0.5
    for offset, round_first in ((0.0, True), (1.0, False)):
        norm = decode.RMSNorm(scale.to(KERNELS).half(), 1e-6, offset, round_first)
        got = decode.linear(x.to(KERNELS).half(), weight.to(KERNELS).half(), None, transposed=True, norm=norm,
                            kernels=False)  # fmt: skip
        reference = decode.RMSNorm(scale.double(), 1e-6, offset, round_first)
        expected = decode.rms_norm(x.double(), reference) @ weight.double().t()
        assert (got.double().cpu() - expected).abs().max().item() < 2e-2
    assert launches == {"norm_rows": 2}


_TRITON_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32",
    torch.bool: "*i1",
}  # fmt: skip


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _TRITON_TYPES[value.dtype]
    if hasattr(value, "block_shape"):  # a host-side TMA descriptor
        return f"tensordesc<{_TRITON_TYPES[value.base.dtype][1:]}{list(value.block_shape)}>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    return "fp32"


def _divisible_by_16(value) -> bool:
    """What Triton's launcher marks ``tt.divisibility = 16``: a tensor whose address, or an integer that, is a
    multiple of 16 (it specialises integers equal to 1 into constants)."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


@pytest.mark.kernels
@pytest.mark.skipif(not triton_kernels.INTERPRETED, reason="without the interpreter the kernels compile as they run")
def test_decode_kernels_compile_for_hopper(monkeypatch):
    """The decode-kernel variants the tests above launch under the interpreter also compile for an H100/H200
    (sm_90), with the Triton the GPU machine has when ``make kernel-check`` provides it (``BT_COMPILE_TRITON``). The
    interpreter runs the kernels as Python and misses what only the compiler checks (a loop-carried value whose type
    changes in the loop)."""
    from bettertransformer.ops import decode_kernels

    launches = {}
    launch = decode_kernels.launch

    def record(kernel, grid, *args, **kwargs):
        # Each launch as Triton's launcher specialises it on the GPU: integers equal to 1 become constants, and
        # addresses and integers that are multiples of 16 are marked so (the compiler vectorises on that).
        names = kernel.fn.__code__.co_varnames[: kernel.fn.__code__.co_argcount]
        constexprs = {k: v for k, v in kwargs.items() if k in names}
        runtime = dict(zip([name for name in names if name not in constexprs], args, strict=True))
        ones = {n: 1 for n, a in runtime.items() if type(a) is int and a == 1}
        runtime = {n: a for n, a in runtime.items() if n not in ones}
        entry = dict(
            kernel=kernel.fn.__name__, signature={n: _triton_type(a) for n, a in runtime.items()},
            constexprs={**constexprs, **ones}, divisible=sorted(n for n, a in runtime.items() if _divisible_by_16(a)),
            options={k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")},
        )  # fmt: skip
        launches[json.dumps(entry, sort_keys=True)] = entry
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(decode_kernels, "launch", record)
    for batch in (1, 4):
        _run_llama_decode_ops(KERNELS, torch.float16, batch)
        _run_decode_ops(KERNELS, torch.float16, batch)
    test_rope_attention_kernel_splits_with_a_window(2)
    test_rope_into_cache_kernel(6, 2, 64, 64, False, "whole", monkeypatch)
    test_rms_norm_before_a_cublas_product_runs_as_one_kernel(monkeypatch)
    test_decode_linear_normalises_rows_over_several_chunks(1)
    test_decode_linear_normalises_rows_over_several_chunks(16)
    test_decode_linear_reads_a_row_whole_in_two_pieces(2304, monkeypatch)
    test_decode_linear_reads_several_rows_through_tma(16, 1000, monkeypatch)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get("BT_COMPILE_TRITON"):  # the GPU machine's Triton, installed apart
        env["PYTHONPATH"] = os.pathsep.join([os.environ["BT_COMPILE_TRITON"], env.get("PYTHONPATH", "")])
    script = os.path.join(os.path.dirname(__file__), "compile_for_gpu.py")
    done = subprocess.run(
        [sys.executable, script], input=json.dumps(list(launches.values())), text=True, env=env, capture_output=True
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"compiled {len(launches)} variants" in done.stdout
