"""Unpad a padded batch once, re-pad it once.

A padded batch ``(B, S, ...)`` with a key mask ``(B, S)`` becomes a packed tensor ``(T, ...)`` holding only
the ``T`` real tokens, rows one after another. ``PackInfo`` carries what the packed layers need: the gather
indices, the cumulative sequence lengths that variable-length attention takes, and the longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackInfo:
    """Where the real tokens of a padded ``(batch, seqlen)`` batch live.

    indices:    (T,) int64, flat positions ``b * seqlen + s`` of the real tokens, row-major; ``None`` when
                every position is real (then packing is a plain reshape).
    cu_seqlens: (B + 1,) int32, ``cu_seqlens[b]`` is the packed offset of row ``b``'s first token.
    lengths:    (B,) int64, real tokens per row.
    max_len:    longest row, a Python int (the one host sync of a forward).
    batch, seqlen: the padded shape.
    """

    indices: torch.Tensor | None
    cu_seqlens: torch.Tensor
    lengths: torch.Tensor
    max_len: int
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        """T, the number of real tokens."""
        return self.batch * self.seqlen if self.indices is None else self.indices.numel()


def pack_info(mask: torch.Tensor | None, batch: int, seqlen: int, device: torch.device) -> PackInfo:
    """Build the ``PackInfo`` of a ``(B, S)`` key mask (nonzero = real token), or of an unpadded batch.

    Rows may hold no real token at all; such a row packs to zero tokens.
    """
    if mask is None:
        lengths = torch.full((batch,), seqlen, dtype=torch.int64, device=device)
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return PackInfo(None, cu, lengths, seqlen, batch, seqlen)
    mask = mask.to(device=device, dtype=torch.bool)
    lengths = mask.sum(dim=1)  # (B,)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, dim=0)
    # One host sync: the kernels need the longest row and the token count as Python ints.
    stats = torch.stack([lengths.max(), cu[-1].to(torch.int64)]).tolist()
    max_len, total = int(stats[0]), int(stats[1])
    if total == batch * seqlen:
        return PackInfo(None, cu, lengths, seqlen, batch, seqlen)
    indices = torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)  # (T,)
    return PackInfo(indices, cu, lengths, max_len, batch, seqlen)


def pack(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """(B, S, *rest) -> (T, *rest): keep the real tokens only."""
    flat = x.reshape(info.batch * info.seqlen, *x.shape[2:])
    if info.indices is None:
        return flat
    return flat.index_select(0, info.indices)


def unpack(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """(T, *rest) -> (B, S, *rest), zeros at padded positions. Differentiable."""
    rest = x.shape[1:]
    if info.indices is None:
        return x.reshape(info.batch, info.seqlen, *rest)
    out = x.new_zeros(info.batch * info.seqlen, *rest).index_copy(0, info.indices, x)
    return out.reshape(info.batch, info.seqlen, *rest)


def dense_layout(info: PackInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that lay the packed tokens out left-aligned in a ``(B, max_len)`` grid.

    Returns ``(index, valid)``: ``index`` (B * max_len,) int64 holds, for each grid slot, the packed position
    of its token (0 for empty slots), and ``valid`` (B, max_len) bool says which slots hold a token. Row ``b``'s
    ``i``-th real token lands in slot ``(b, i)``, so relative positions inside a contiguous row are kept.
    """
    device = info.cu_seqlens.device
    ar = torch.arange(info.max_len, device=device)
    valid = ar[None, :] < info.lengths[:, None]  # (B, L)
    index = (info.cu_seqlens[:-1, None].to(torch.int64) + ar[None, :]) * valid  # (B, L)
    return index.reshape(-1), valid


def to_dense(x: torch.Tensor, info: PackInfo, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(T, *rest) -> (B, max_len, *rest), zeros in empty slots."""
    if x.shape[0] == 0:
        return x.new_zeros(info.batch, info.max_len, *x.shape[1:])
    out = x.index_select(0, index).reshape(info.batch, info.max_len, *x.shape[1:])
    return out * valid.reshape(info.batch, info.max_len, *([1] * (x.dim() - 1))).to(x.dtype)


def from_dense(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, max_len, *rest) -> (T, *rest): the inverse of ``to_dense`` on filled slots."""
    return x.reshape(-1, *x.shape[2:])[valid.reshape(-1)]
