"""The static device tensors of a generate loop: what each decode step reads and updates besides the weights and the
key/value cache. Static (allocated once per runner, updated in place) so that a CUDA graph can replay the step."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch


@dataclass
class StepBuffers:
    """One runner's loop state, B rows (a bucket: rows past the call's batch count as finished), S cache slots.

    tokens:      (B, 1) int64, the token each row feeds to the next step.
    positions:   (B, 1) int64, its position id.
    slot:        (1,) int64, the cache slot of that token.
    step:        (1,) int64, the index of the token the next step produces.
    valid:       (B, S) bool, the slots holding real tokens (prompt and produced).
    mask:        (B, S) the same as an additive mask (0 or -inf), in the model's dtype.
    unfinished:  (B,) bool, rows that have not produced an end-of-sequence id.
    active:      () int64, tokens produced while some row was unfinished (where the output is cut).
    out:         (B, S) int64, the produced tokens.
    eos:         (E,) int64, the end-of-sequence ids.
    pad:         () int64, the id finished rows produce.
    ban_steps:   () int64, steps during which end-of-sequence ids are banned (min_new_tokens).
    eos_penalty: (V,) fp32, -inf at the end-of-sequence ids while banned, else 0; None without a minimum length.
    seen:        (B, V) bool, tokens so far, for the repetition penalty; None without one.
    counters:    (COUNTERS,) int32 zeros: a kernel's programs count themselves there to find the last one to finish
                 (which then finishes the work: a post-norm's residual add, a split attention's merge) and leave it
                 zero. One runner's kernels run one after another, so they share them.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    slot: torch.Tensor
    step: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    unfinished: torch.Tensor
    active: torch.Tensor
    out: torch.Tensor
    eos: torch.Tensor
    pad: torch.Tensor
    ban_steps: torch.Tensor
    eos_penalty: torch.Tensor | None
    seen: torch.Tensor | None
    counters: torch.Tensor

    # At least rows x heads of any attention split along the cache (ops.decode.rope_attention splits below 256).
    COUNTERS = 256

    @classmethod
    def allocate(
        cls,
        batch: int,
        slots: int,
        vocab: int,
        eos: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        *,
        penalty: bool,
        bans: bool,
    ) -> StepBuffers:
        """Zeroed buffers; ``penalty``: keep ``seen`` (a repetition penalty); ``bans``: keep ``eos_penalty``."""
        new = functools.partial(torch.zeros, device=device)
        return cls(
            tokens=new(batch, 1, dtype=torch.long),
            positions=new(batch, 1, dtype=torch.long),
            slot=new(1, dtype=torch.long),
            step=new(1, dtype=torch.long),
            valid=new(batch, slots, dtype=torch.bool),
            mask=new(batch, slots, dtype=dtype),
            unfinished=new(batch, dtype=torch.bool),
            active=new((), dtype=torch.long),
            out=new(batch, slots, dtype=torch.long),
            eos=torch.tensor(eos, dtype=torch.long, device=device),
            pad=new((), dtype=torch.long),
            ban_steps=new((), dtype=torch.long),
            eos_penalty=new(vocab, dtype=torch.float32) if bans else None,
            seen=new(batch, vocab, dtype=torch.bool) if penalty else None,
            counters=new(cls.COUNTERS, dtype=torch.int32),
        )

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer (for saving and restoring around a capture's warm-up steps)."""
        return [t for f in fields(self) if (t := getattr(self, f.name)) is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
