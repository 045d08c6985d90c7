"""Comparison helpers that say where and how much two tensors differ."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def assert_close_at(
    actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None, *, atol: float, rtol: float = 0.0, what=""
):
    """Compare ``actual`` and ``expected`` at the positions where ``mask`` (B, S) is nonzero."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert_finite_where_expected(a, e, what)
    keep = torch.ones(a.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu()
    keep = keep.reshape(*keep.shape, *([1] * (a.dim() - keep.dim()))).expand(a.shape).to(a.device)
    finite = torch.isfinite(a) & torch.isfinite(e) | ~keep
    if not bool(finite.all()):
        where = tuple(int(i) for i in torch.nonzero(~finite)[0])
        raise AssertionError(
            f"{what}: non-finite value at index {where}: actual {a[where].item()}, expected {e[where].item()}"
        )
    err = torch.where(keep, (a - e).abs() - rtol * e.abs(), torch.zeros_like(a))
    worst = err.max().item() if err.numel() else 0.0
    if not worst <= atol:
        where = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(
            f"{what}: max error {worst:.3e} > atol {atol:.1e} at index {where}: "
            f"actual {a[where].item():.6g}, expected {e[where].item():.6g}; "
            f"{int((err > atol).sum())} of {int(keep.sum())} compared elements off"
        )


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    """``actual`` within ``rel`` of ``expected``'s scale (its largest magnitude, at least ``rel``): a plain absolute
    tolerance on small gradients would pass one that is 0.1% off."""
    error = (actual - expected).abs().max().item()
    assert error <= rel * max(expected.abs().max().item(), rel), (what, error, expected.abs().max().item())


def assert_finite_where_expected(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """``actual`` is finite wherever ``expected`` is, padded positions included.

    A non-finite value at a padded position is not harmless: the next layer multiplies it by a zero attention
    weight (0 * NaN = NaN) and the real tokens of its row turn NaN too.
    """
    bad = torch.isfinite(expected) & ~torch.isfinite(actual)
    if bool(bad.any()):
        where = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} non-finite values where the reference is finite, first at index {where}: "
            f"actual {actual[where].item()}, expected {expected[where].item()}"
        )


def max_error_at(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |actual - expected| over the positions where ``mask`` (B, S) is nonzero; NaN if a value there is."""
    keep = mask.bool().to(actual.device).reshape(*mask.shape, *([1] * (actual.dim() - 2)))
    error = (actual.double() - expected.double()).abs()
    return torch.where(keep, error, torch.zeros_like(error)).max().item()


def half_precision_trio(make: Callable[[], nn.Module], dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Module]:
    """On the GPU: the fp32 model ``make()`` builds (the reference), the same weights in ``dtype`` (stock), and a
    transformed copy of that (ours)."""
    from bettertransformer import BetterTransformer

    stock = make().to("cuda", dtype)
    return make().cuda(), stock, BetterTransformer.transform(stock, keep_original_model=True)


def assert_error_within_stock(
    ours: torch.Tensor, stock: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, factor: float = 4
) -> None:
    """Our half-precision error against the fp32 ``expected`` at the positions ``mask`` keeps stays within ``factor``
    times stock's own error (plus 1e-3)."""
    ours_error, stock_error = max_error_at(ours, expected, mask), max_error_at(stock, expected, mask)
    assert ours_error <= factor * stock_error + 1e-3, (ours_error, stock_error)
