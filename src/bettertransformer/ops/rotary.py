"""Rotary position embeddings applied to packed tokens."""

from __future__ import annotations

import torch


def rotate_pairs(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair of features (x[2i], x[2i+1]) by angle i of its token (RoFormer's interleaved form):
    (x[2i] cos_i - x[2i+1] sin_i, x[2i+1] cos_i + x[2i] sin_i).

    x: (T, H, D); sin, cos: (T, D / 2), one row per token. Returns (T, H, D). The same operations, in the same order,
    as RoFormer's ``apply_rotary_position_embeddings``, so the result is bit-identical to it.
    """
    s, c = sin[:, None, :], cos[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c + -odd * s, odd * c + even * s], dim=-1).flatten(-2)
