"""The attention function (and its mask function) registered with transformers as ``"bettertransformer"``.

Decoders are switched to it for good (``decoder.CausalDecoder``); encoders too, for the calls that run the stock
forward (``encoder.PackedEncoder``: ``output_attentions``, odd masks). It computes what stock SDPA computes, adds
logit softcapping (Gemma 2), and returns exact attention weights when they are asked for (stock SDPA returns none).
For the packed calls and decode steps of decoders it reads the call's state (``call_state.DecoderCall``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._compat import capturing
from ..ops.attention import attention_with_weights, packed_attention
from .call_state import current_decoder_call

ATTENTION_NAME = "bettertransformer"


def attention_function(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract: q (B, H, Lq, D), k/v (B, Hkv, Lk, D) -> ((B, Lq, H, D), weights).

    The mask is the one ``mask_function`` built (SDPA's bool mask, True = attend, or None when plain causal
    attention is exact), or, from our module forwards, the model's own additive mask. ``alibi_slopes`` (H,): the
    module's ALiBi, already in the mask of an ordinary call; packed and decode-step calls rebuild it relative to
    each query.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    call = current_decoder_call()
    if call is not None and call.decode is not None and query.shape[2] == 1:
        window = sliding_window if causal else None
        out = call.decode.attend(module, query, key, value, scale, window, softcap, alibi_slopes)
        return out.transpose(1, 2), None
    info = call.packed if call is not None else None
    if info is not None and query.shape[0] == 1 and query.shape[2] == info.total and key.shape[2] == info.total:
        # (1, H, T, D) -> (T, H, D): views of the projections' (T, H, D) layout, no copy.
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        info = info.to(q.device)  # a layer on another GPU (device_map)
        bias = None
        if alibi_slopes is not None:  # slope * (key position - query position) inside each sequence
            positions = torch.arange(info.max_len, device=q.device, dtype=torch.float32)
            bias = alibi_slopes.float()[None, :, None, None] * (positions[None, :] - positions[:, None])
        out = packed_attention(
            q, k, v, info, scale=scale, dropout_p=dropout, bias=bias, causal=causal,
            window=sliding_window, softcap=softcap,  # bidirectional windows too (ModernBERT)
        )  # fmt: skip
        return out.unsqueeze(0), None
    explicit = call is not None and call.weights
    weights = capturing("attentions") or bool(kwargs.get("output_attentions")) or explicit
    q_len, kv_len = query.shape[2], key.shape[2]
    # As stock SDPA: with no mask, a multi-token query is causal, aligned to the start of the keys.
    causal = causal and q_len > 1 and attention_mask is None
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # T5's relative positions: an additive bias on every score
        attention_mask, causal = _with_bias(attention_mask, position_bias, causal, query), False
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if softcap is None and not weights:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    out, probs = attention_with_weights(
        query, key, value, attention_mask, scale=scale, dropout_p=dropout, causal=causal, softcap=softcap
    )
    return out.transpose(1, 2).contiguous(), probs if weights else None


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor, causal: bool, query: torch.Tensor) -> torch.Tensor:
    """One additive mask of ``bias`` (broadcastable to (B, H, Lq, Lk)) and the call's mask (bool, True = attend;
    additive; or None, with ``causal`` for a causal query aligned to the keys' start)."""
    lowest = torch.finfo(query.dtype).min
    if mask is None and causal:
        mask = torch.ones(bias.shape[-2], bias.shape[-1], dtype=torch.bool, device=bias.device).tril()
    if mask is None:
        return bias.to(query.dtype)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, lowest).to(query.dtype)
    return (bias + mask).to(query.dtype)


def mask_function(*args: Any, **kwargs: Any) -> Any:
    """The mask function registered beside ``attention_function``: none when the caller computes the attention
    pattern itself (packed calls, decode steps), the stock implementation's mask for models whose own modules
    read it, else SDPA's."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    call = current_decoder_call()
    if call is not None and not call.needs_mask:
        return None
    if call is not None and call.stock_mask is not None:
        return ALL_MASK_ATTENTION_FUNCTIONS[call.stock_mask](*args, **kwargs)
    return sdpa_mask(*args, **kwargs)
