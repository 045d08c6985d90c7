"""Choosing the next token on the device, with no host synchronisation (so it can live inside a CUDA graph).

The processing follows transformers' generate, in its order: repetition penalty, minimum length (end-of-sequence
tokens banned), then for sampling temperature, top-k and top-p, then argmax or a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """What generate asked for. ``None`` / neutral values switch a step off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def next_tokens(
    logits: torch.Tensor,
    sampling: Sampling,
    *,
    seen: torch.Tensor | None,
    ban_eos: torch.Tensor,
    eos: torch.Tensor,
) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) next tokens.

    seen:    (B, V) bool, the tokens so far (prompt included, as transformers counts them), for the repetition penalty.
    ban_eos: () bool tensor, True while the minimum length is not reached.
    eos:     (E,) end-of-sequence ids (may be empty).
    """
    scores = logits
    if sampling.repetition_penalty != 1.0 and seen is not None:
        penalty = sampling.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if eos.numel():
        banned = torch.zeros_like(scores[0], dtype=torch.bool).index_fill_(0, eos, True) & ban_eos
        scores = scores.masked_fill(banned, float("-inf"))
    if not sampling.do_sample:
        return scores.argmax(-1)
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[..., -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    # A draw from probs without a host round trip: argmax of p / Exp(1) noise (the exponential race).
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(-1)
