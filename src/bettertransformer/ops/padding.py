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

    indices:      (T,) int64, flat positions ``b * seqlen + s`` of the real tokens, row-major; ``None`` when
                  every position is real (then packing is a plain reshape).
    cu_seqlens:   (B + 1,) int32 on the device, ``cu_seqlens[b]`` is the packed offset of row ``b``'s first token.
    lengths:      (B,) int32 on the device, real tokens per row.
    host_lengths: the same on the CPU.
    max_len:      longest row.
    batch, seqlen: the padded shape.
    left_padded:  some row has real tokens but a pad at position 0 (a pooler reading position 0 reads a pad).
    contiguous:   every row's real tokens are one run (no holes): distances between a row's tokens are distances
                  in its packed order (relative-position biases can then be built once for all rows).
    """

    indices: torch.Tensor | None
    cu_seqlens: torch.Tensor
    lengths: torch.Tensor
    host_lengths: torch.Tensor
    max_len: int
    batch: int
    seqlen: int
    left_padded: bool = False
    contiguous: bool = True

    def to(self, device: torch.device) -> PackInfo:
        """The same layout with its device tensors on ``device`` (a model split across GPUs by ``device_map``)."""
        if self.cu_seqlens.device == device:
            return self
        indices = None if self.indices is None else self.indices.to(device)
        moved = (indices, self.cu_seqlens.to(device), self.lengths.to(device), self.host_lengths)
        return PackInfo(*moved, self.max_len, self.batch, self.seqlen, self.left_padded, self.contiguous)

    @property
    def total(self) -> int:
        """T, the number of real tokens."""
        return self.batch * self.seqlen if self.indices is None else self.indices.numel()


class PendingPack:
    """A ``PackInfo`` whose host-side numbers are still on their way from the GPU.

    The constructor launches the row count and an asynchronous copy of it to pinned host memory; ``finish``
    waits for that copy alone. Started before the embeddings are queued, the wait then overlaps their GPU work
    instead of draining the queue, as a plain ``.cpu()`` after the embeddings would. ``host_mask``, a CPU copy of
    ``mask`` (a tokenizer's output, say), makes the wait unnecessary: the numbers are counted on the host and the
    device lengths are copied up, so the host can queue work past this batch.
    """

    def __init__(
        self,
        mask: torch.Tensor | None,
        batch: int,
        seqlen: int,
        device: torch.device,
        host_mask: torch.Tensor | None = None,
    ):
        self.batch, self.seqlen, self.device = batch, seqlen, device
        self.mask = None if mask is None else mask.to(device, non_blocking=True)
        self.lengths = None
        self.numbers: torch.Tensor | None = None
        self.event = None
        if self.mask is None:
            self.host = torch.full((batch,), seqlen, dtype=torch.int32)
            return
        if host_mask is not None and seqlen and host_mask.device.type == "cpu":
            counted = _row_numbers(host_mask)
            self.numbers, self.host = counted, counted[0]
            up = counted[0].pin_memory() if self.mask.is_cuda else counted[0]
            self.lengths = up.to(device, non_blocking=True)
            return
        # Row lengths, whether position 0 is real, and runs of real tokens, in one copy to the host: (3, B).
        numbers = _row_numbers(self.mask) if seqlen else None
        self.lengths = numbers[0] if numbers is not None else torch.zeros(batch, dtype=torch.int32, device=device)
        if numbers is not None and numbers.is_cuda:
            pinned = torch.empty(3, batch, dtype=torch.int32, pin_memory=True)
            pinned.copy_(numbers, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            numbers = pinned
        self.numbers = numbers
        self.host = self.lengths if numbers is None else numbers[0]

    def finish(self) -> PackInfo:
        """Wait for the row lengths to reach the host and build the ``PackInfo``."""
        if self.event is not None:
            self.event.synchronize()
        batch, seqlen, host = self.batch, self.seqlen, self.host
        # Pinned, so the copy back to the GPU is asynchronous: a copy from pageable memory waits for the whole
        # stream (the embeddings) first, which left the GPU idle while Python issued the next kernels.
        pinned = self.device.type == "cuda"
        cu_host = torch.zeros(batch + 1, dtype=torch.int32, pin_memory=pinned)
        torch.cumsum(host, 0, out=cu_host[1:])
        total = int(cu_host[-1])
        max_len = int(host.max()) if batch else 0
        cu = cu_host.to(self.device, non_blocking=True)
        if self.mask is None or total == batch * seqlen:
            if self.lengths is None:
                lengths = (host.pin_memory() if pinned else host).to(self.device, non_blocking=True)
            else:
                lengths = self.lengths
            return PackInfo(None, cu, lengths, host.clone(), seqlen, batch, seqlen)
        # The size is known on the host, so this nonzero needs no second sync.
        indices = torch.nonzero_static(self.mask.reshape(-1), size=total).squeeze(1)  # (T,)
        assert self.lengths is not None  # set whenever there is a mask
        left_padded = self.numbers is not None and bool(((self.numbers[1] == 0) & (host > 0)).any())
        contiguous = self.numbers is None or bool((self.numbers[2] <= 1).all())
        return PackInfo(indices, cu, self.lengths, host.clone(), max_len, batch, seqlen, left_padded, contiguous)


def _row_numbers(mask: torch.Tensor) -> torch.Tensor:
    """(3, B) int32 of a (B, S) mask, S > 0: real tokens per row, whether position 0 is real, runs of real tokens."""
    real = mask != 0
    starts = real[:, 0].to(torch.int32) + (real[:, 1:] & ~real[:, :-1]).sum(1, dtype=torch.int32)
    return torch.stack([real.sum(1, dtype=torch.int32), real[:, 0].to(torch.int32), starts])


def pack_info(mask: torch.Tensor | None, batch: int, seqlen: int, device: torch.device) -> PackInfo:
    """Build the ``PackInfo`` of a ``(B, S)`` key mask (nonzero = real token), or of an unpadded batch.

    Costs one device-to-host copy (the row lengths: kernels need the longest row and the token count as
    Python ints) and a handful of small kernels. Rows may hold no real token at all.
    """
    return PendingPack(mask, batch, seqlen, device).finish()


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for distinct indices, whose backward copies the gradient rows back into zeros
    (``index_copy``) instead of ``index_select``'s ``index_add``: atomic adds, slow in 16-bit types (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 for distinct ``index`` values, differentiable."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, index)
    return x.index_select(0, index)


def pack(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """(B, S, *rest) -> (T, *rest): keep the real tokens only."""
    flat = x.reshape(info.batch * info.seqlen, *x.shape[2:])
    if info.indices is None:
        return flat
    return gather_rows(flat, info.indices)


def unpack(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """(T, *rest) -> (B, S, *rest), zeros at padded positions. Differentiable."""
    rest = x.shape[1:]
    if info.indices is None:
        return x.reshape(info.batch, info.seqlen, *rest)
    out = x.new_zeros(info.batch * info.seqlen, *rest)
    if torch.is_grad_enabled() and x.requires_grad:
        out = out.index_copy(0, info.indices, x)
    else:
        out.index_copy_(0, info.indices, x)  # no copy of the zeros
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


def from_dense(x: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """(B, max_len, *rest) -> (T, *rest): the inverse of ``to_dense`` on filled slots. Each packed token's slot is
    computed from ``cu_seqlens`` (no boolean indexing), so this needs no host synchronisation and can be captured
    in a CUDA graph."""
    cu = info.cu_seqlens
    tokens = torch.arange(info.total, device=cu.device, dtype=cu.dtype)
    row = torch.searchsorted(cu[1:], tokens, right=True)  # the row of each packed token (empty rows skipped)
    slots = row * info.max_len + (tokens - cu[row])
    return gather_rows(x.reshape(-1, *x.shape[2:]), slots)
