"""Decoders whose layers compute attention inside their own modules, outside transformers' attention interface.

For these the model cannot be switched to our attention function by name. ``ModuleAttention`` names the attention
module class of such a model and a forward that computes the module's projections itself and hands the attention
to ``attention.attention_function``; ``CausalDecoder`` installs it on every such module (an instance attribute, undone
by ``reverse``). From there the packed prefill, packed rows and the static-cache decode step work as for any other
decoder. An encoder-decoder's decoder is routed the same way (``EncoderLayout.decoder_modules``, installed by
``seq2seq_generation.Seq2SeqGenerate``): FSMT's, whose attention modules then follow transformers' cache protocol
as before and hand the attention to ours, so generate's decode steps reach the static buffers.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .call_state import current_decoder_call
from .decode_state import DecodeUnsupported
from .patching import InstanceForward, modules_of_class


@dataclass(frozen=True)
class ModuleAttention:
    """module_class: the class name of the attention modules to route; forward(module, attention, *args, **kwargs)
    replaces their ``method``, ``attention`` being ``attention_function``. ``fallback``: used only when the model
    cannot switch to the attention interface (a model that moved to it in a later transformers release)."""

    module_class: str
    forward: Callable[..., Any]
    requires: tuple[tuple[str, Any], ...] = ()  # (config attribute, the only supported value)
    method: str = "forward"
    fallback: bool = False
    # ALiBi models: module -> (heads,) fp32 slopes; the adapter passes them to the attention as ``alibi_slopes``.
    alibi: Callable[[nn.Module], torch.Tensor] | None = None


def route(root: nn.Module, specs: Iterable[ModuleAttention], forward: Callable[..., Any]) -> list[InstanceForward]:
    """Give every module under ``root`` of each spec's class a forward of ours in place of its ``method``:
    ``forward(spec, module, stock, *args, **kwargs)``. Raises ``NotImplementedError``, installing nothing, when a
    spec's class has no module there. The returned patches undo it (``restore``)."""
    found = [(spec, modules_of_class(root, spec.module_class)) for spec in specs]
    for spec, modules in found:
        if not modules:
            raise NotImplementedError(f"no {spec.module_class} modules in {type(root).__name__}")
    return [
        InstanceForward(module, functools.partial(forward, spec, module), spec.method)
        for spec, modules in found
        for module in modules
    ]


def _window_bias(query: torch.Tensor, key: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """(q, kv) additive mask: query i (at cache slot kv - q + i) sees key slots j with i - j < window."""
    q_len, kv_len = query.shape[2], key.shape[2]
    rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    keys = torch.arange(kv_len, device=query.device)[None, :]
    return torch.where(rows - keys < window, 0.0, torch.finfo(dtype).min).to(dtype)


def gpt_neo_attention(
    module: nn.Module,
    attention: Callable[..., Any],
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPT-Neo's ``GPTNeoSelfAttention``: separate q/k/v projections, no 1/sqrt(d) scaling, and on "local" layers
    a sliding window (``config.window_size`` slots, the current one included) that the module applies itself."""
    m: Any = module
    batch, length, _ = hidden_states.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, length, m.num_heads, m.head_dim).transpose(1, 2)

    query, key, value = heads(m.q_proj(hidden_states)), heads(m.k_proj(hidden_states)), heads(m.v_proj(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, m.layer_id)
    window = m.config.window_size if m.attention_type == "local" else None
    mask = attention_mask
    if window is not None and mask is not None and mask.dim() == 4:  # the model's mask is causal only
        mask = mask + _window_bias(query, key, window, mask.dtype)
    dropout = m.attn_dropout.p if m.training else 0.0
    out, weights = attention(
        m, query, key, value, mask, dropout=dropout, scaling=1.0, sliding_window=window,
        output_attentions=output_attentions,
    )  # fmt: skip
    out = m.resid_dropout(m.out_proj(out.reshape(batch, length, -1)))
    return out, weights


def _falcon_split_heads(m: Any, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's ``_split_heads`` with slices where it indexes with lists: a list index is a host-to-device
    copy, which a CUDA graph cannot capture. The same values, as views."""
    batch, length, _ = fused.shape
    if m.new_decoder_architecture:
        qkv = fused.view(batch, length, -1, m.num_heads // m.num_kv_heads + 2, m.head_dim)
        query, key, value = qkv[:, :, :, :-2], qkv[:, :, :, -2:-1], qkv[:, :, :, -1:]
        key, value = torch.broadcast_to(key, query.shape), torch.broadcast_to(value, query.shape)
        return query.flatten(2, 3), key.flatten(2, 3), value.flatten(2, 3)
    if m.multi_query:
        qkv = fused.view(batch, length, m.num_heads + 2, m.head_dim)
        return qkv[..., :-2, :], qkv[..., -2:-1, :], qkv[..., -1:, :]
    return m._split_heads(fused)


def falcon_attention(
    module: nn.Module,
    attention: Callable[..., Any],
    hidden_states: torch.Tensor,
    alibi: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Falcon's ``FalconAttention`` with rotary positions (``alibi=False``; ALiBi configs are refused at
    ``transform``): fused QKV in any of its three layouts."""
    m: Any = module
    if alibi is not None or position_embeddings is None:
        raise NotImplementedError("falcon with ALiBi positions is not supported")
    query, key, value = _falcon_split_heads(m, m.query_key_value(hidden_states))  # (B, L, heads, D) each
    batch, length = query.shape[:2]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, heads, L, D)
    cos, sin = position_embeddings
    rotate = sys.modules[type(m).__module__].apply_rotary_pos_emb  # the model file's own rotary helper
    query, key = rotate(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, m.layer_idx)
    dropout = m.attention_dropout.p if m.training else 0.0
    out, weights = attention(
        m, query, key, value, attention_mask, dropout=dropout, scaling=m.inv_norm_factor,
        output_attentions=output_attentions,
    )  # fmt: skip
    return m.dense(out.reshape(batch, length, -1)), weights


def bloom_alibi_slopes(module: nn.Module) -> torch.Tensor:
    """(heads,) fp32 ALiBi slopes, from the model file's own ``build_alibi_tensor`` (position 1 of a 2-token row)."""
    build = sys.modules[type(module).__module__].build_alibi_tensor
    ones = torch.ones(1, 2, dtype=torch.long)
    return build(ones, module.num_heads, torch.float32)[:, 0, 1]  # (heads,)


def bloom_attention(
    module: nn.Module,
    attention: Callable[..., Any],
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BLOOM's ``BloomAttention``: ALiBi (a per-head bias proportional to the key's position), fused QKV interleaved
    per head, and the residual dropout-add inside the module (``pretraining_tp`` slicing is not reproduced).
    ``attention`` comes with this module's ALiBi slopes bound (``bloom_alibi_slopes``)."""
    m: Any = module
    batch, length, _ = hidden_states.shape
    query, key, value = m._reshape(m.query_key_value(hidden_states))  # (B, H, L, D) each
    if layer_past is not None:
        key, value = layer_past.update(key, value, m.layer_idx)
    bias = alibi.view(batch, m.num_heads, 1, key.shape[2])  # the model's ALiBi, from the mask's positions
    mask = bias if attention_mask is None else bias + attention_mask
    dropout = m.attention_dropout.p if m.training else 0.0
    # ``attention`` carries the module's slopes (ModuleAttention.alibi) for packed calls and decode steps.
    out, weights = attention(
        m, query, key, value, mask, dropout=dropout, scaling=m.inv_norm_factor, output_attentions=output_attentions
    )
    out = m.dense(out.reshape(batch, length, -1))
    out = torch.nn.functional.dropout(out, p=m.hidden_dropout, training=m.training) + residual
    return out, weights


def scaled_attention(
    module: nn.Module,
    attention: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``_attn(query, key, value, attention_mask)`` of GPT-J and CodeGen before transformers 5.24: q/k/v
    (B, H, L, D) after rotary positions and the cache, logits divided by ``scale_attn``, an additive causal mask.
    Returns (B, H, L, D) as the stock method does."""
    m: Any = module
    dropout = m.attn_dropout.p if m.training else 0.0
    # Rotary positions leave the query (CodeGen: the key too) in fp32 while the value is in the model's dtype; the
    # stock method computes the logits in fp32 from them. SDPA wants one dtype and accumulates in fp32 anyway.
    query, key = query.to(value.dtype), key.to(value.dtype)
    out, weights = attention(m, query, key, value, attention_mask, dropout=dropout, scaling=1.0 / float(m.scale_attn))
    return out.transpose(1, 2), weights


def fsmt_attention(
    module: nn.Module,
    attention: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None = None,
    layer_state: Any = None,
    attn_mask: torch.Tensor | None = None,
    output_attentions: bool | None = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FSMT's (fairseq's) ``Attention`` in its decoder: states sequence first, (L, B, E); the query scaled by
    head_dim ** -0.5; an additive (L, S) causal mask and a (B, S) padding mask (True: a pad), each to the dtype's
    lowest value as stock applies them; the cache as stock keeps it (an ``EncoderDecoderCache``: the cross-attention
    keys/values computed once, marked in ``is_updated``). Stock FSMT builds no causal mask when ``use_cache`` is on
    (its default, also in a plain forward), so attention is causal only when the mask says so: ``is_causal=False``."""
    m: Any = module
    length, batch, width = query.shape
    cross = bool(m.encoder_decoder_attention)
    part, updated = layer_state, False
    if layer_state is not None and hasattr(layer_state, "is_updated"):  # an EncoderDecoderCache
        updated = bool(layer_state.is_updated.get(m.layer_idx))
        part = layer_state.cross_attention_cache if cross else layer_state.self_attention_cache

    def heads(x: torch.Tensor) -> torch.Tensor:  # (L, B, E) -> (B, H, L, D)
        return x.view(-1, batch, m.num_heads, m.head_dim).permute(1, 2, 0, 3)

    if cross and part is not None and updated:
        keys, values = part.layers[m.layer_idx].keys, part.layers[m.layer_idx].values
    else:
        source = key if cross else query
        assert source is not None
        keys, values = heads(m.k_proj(source)), heads(m.v_proj(source))
        if part is not None:
            keys, values = part.update(keys, values, m.layer_idx)
            if cross and hasattr(layer_state, "is_updated"):
                layer_state.is_updated[m.layer_idx] = True
    queries = heads(m.q_proj(query))
    if key_padding_mask is not None and key_padding_mask.dim() == 0:  # stock's placeholder for "no mask"
        key_padding_mask = None
    mask = None
    if attn_mask is not None or key_padding_mask is not None:
        mask = queries.new_zeros(batch, 1, length, keys.shape[2])  # (B, 1, L, S) additive
        if attn_mask is not None:
            mask = mask + attn_mask.to(queries.dtype)
        if key_padding_mask is not None:
            mask = mask.masked_fill(key_padding_mask[:, None, None, :].bool(), torch.finfo(queries.dtype).min)
    dropout = m.dropout if m.training else 0.0
    out, weights = attention(
        m, queries, keys, values, mask, dropout=dropout, scaling=m.scaling, is_causal=False,
        output_attentions=output_attentions,
    )  # fmt: skip
    out = out.transpose(0, 1).reshape(length, batch, width)  # (B, L, H, D) -> (L, B, E)
    return m.out_proj(out), weights


def fsmt_positions(
    module: nn.Module, attention: Callable[..., Any], input: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """FSMT's ``SinusoidalPositionalEmbedding`` in the decoder. From transformers 5.24 the decoder passes the cache's
    length as ``cache_length``; in a decode step of ours that is the step's slot, a device tensor, and stock's check
    that its table is long enough (``if max_pos > self.weight.size(0)``, growing the table when not) would read it on
    the host, which a CUDA graph cannot capture. There the positions are stock's without the check, which the runner's
    slots must not outrun: a table shorter than them sends that call to stock generate (which grows the table, a new
    tensor: the one a captured step reads is held by its runner).
    Everywhere else (and in transformers 5.17, whose decode steps embed one token at the first position) the stock
    forward runs."""
    m: Any = module
    cache_length = kwargs.get("cache_length")
    call = current_decoder_call()
    if not isinstance(cache_length, torch.Tensor) or call is None or call.decode is None:
        return type(m).forward(m, input, *args, **kwargs)
    slots = call.decode.mask.shape[1]
    if m.padding_idx + 1 + slots > m.weight.shape[0]:
        raise DecodeUnsupported(
            f"decoder positions up to {slots} past its sinusoidal table of {m.weight.shape[0]} rows", this_call=True
        )
    call.decode.held[id(m)] = m.weight  # a later stock call may grow (replace) the table a graph reads
    positions = m.make_positions(input, m.padding_idx) + cache_length  # (B, L) + (1,)
    return nn.Embedding.forward(m, positions)


def prophetnet_decoder(module: nn.Module, attention: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """ProphetNet's ``ProphetNetDecoder``: outside a decode step of ours, the stock forward; in one, ``_prophetnet_step``.

    Its stock forward cannot run a step on the static buffers: it branches on the cache's length on the host (a sync
    a CUDA graph cannot capture), and its n-gram attention checks its positions against the number of keys, which
    the buffers' slots are not. Its modules compute attention themselves, so the step is computed here from them."""
    call = current_decoder_call()
    if call is None or call.decode is None:
        return type(module).forward(module, *args, **kwargs)
    return _prophetnet_step(module, call.decode, *args, **kwargs)


def _prophetnet_step(
    module: nn.Module, state: Any, input_ids: torch.Tensor | None = None, *args: Any, **kwargs: Any
) -> Any:
    """One cached step of ProphetNet's decoder, as stock computes it for ``generate``, for the main stream and the
    first predict stream only.

    Stock ``generate`` takes the next token's logits from the first predict stream (``ProphetNetForConditionalGeneration``
    reads ``logits_ngram``'s stream 0 as ``logits``); that stream attends to the main stream's keys and its own, and the
    main stream to its own keys alone, so the other predict streams change neither and are not computed (their
    states are returned as zeros: their logits, ``logits_ngram``, are not what a step of ours reads).

    Per layer: the main stream's self-attention writes its key/value into the layer's buffer and attends over it
    (``DecodeState.attend``) with ProphetNet's relative-position bias (bucketed key position - query position, scored
    from the token's own states); the predict stream attends over the same slots and its own key
    (``DecodeState.attend_beside``); then cross-attention over the encoder's static keys/values, the feed-forward and
    the post-LayerNorms, as stock. Positions: the cache holds ``slot`` tokens, so this token's position is
    padding index + slot + 1 and the predict stream's one more."""
    m: Any = module
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or m.ngram < 1:
        raise DecodeUnsupported("a ProphetNet decode step of other than one token id per row")
    embeddings = m.position_embeddings
    pad, slots = embeddings.padding_idx, state.mask.shape[1]
    if pad != 0:  # stock's cached steps check it (their positions must equal the keys' count)
        raise DecodeUnsupported(f"ProphetNet's cached steps with padding index {pad} (stock's need 0)")
    if pad + slots + 2 > embeddings.weight.shape[0]:
        raise DecodeUnsupported(
            f"decoder positions up to {slots + 1} past its table of {embeddings.weight.shape[0]}", this_call=True
        )
    batch, width = input_ids.shape[0], m.word_embeddings.embedding_dim
    heads = m.config.num_decoder_attention_heads
    dim = width // heads
    position = (state.slot + pad + 1)[None]  # (1, 1)
    main = m.word_embeddings(input_ids) + embeddings._forward(position)  # (B, 1, E)
    # Stock's predict stream n adds ngram_embeddings[n - 1]: the first stream, the last embedding.
    stream = (m.ngram_embeddings.weight[-1] + embeddings._forward(position + 1)).expand(batch, 1, width)
    hidden = torch.cat([main, stream], dim=1)  # (B, 2, E): the main stream, then the first predict stream
    if m.embeddings_layer_norm:
        hidden = m.embeddings_layer_norm(hidden)
    hidden = nn.functional.dropout(hidden, p=m.dropout, training=m.training)
    buckets = sys.modules[type(m).__module__].compute_relative_buckets
    keys = torch.arange(slots, device=input_ids.device)
    # Key position - query position (stock: key j at j + 1; the predict stream's keys at j, its own at slot + 1).
    main_buckets = buckets(m.num_buckets, m.relative_max_distance, keys - state.slot - pad, False).long()
    own = state.slot.new_zeros(1) - pad
    predict_relative = torch.cat([keys - state.slot - pad - 1, own])  # (S + 1,)
    predict_buckets = buckets(m.num_buckets, m.relative_max_distance, predict_relative, False).long()

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, 2, E) -> (B, H, 2, D)
        return x.view(batch, 2, heads, dim).transpose(1, 2)

    def merge(x: torch.Tensor) -> torch.Tensor:  # (B, H, 2, D) -> (B, 2, E)
        return x.transpose(1, 2).reshape(batch, 2, width)

    for index, layer in enumerate(m.layers):
        attn = layer.self_attn
        query = split(attn.query_proj(hidden) / (attn.head_dim**0.5))  # stock scales before the product
        key, value = split(attn.key_proj(hidden)), split(attn.value_proj(hidden))
        table = attn.relative_pos_embeddings(hidden).view(batch, 2, attn.num_buckets, heads).permute(0, 3, 1, 2)
        main_bias = table[:, :, :1].gather(-1, main_buckets.expand(batch, heads, 1, slots))  # (B, H, 1, S)
        predict_bias = table[:, :, 1:].gather(-1, predict_buckets.expand(batch, heads, 1, slots + 1))
        main_out = state.attend(attn, query[:, :, :1], key[:, :, :1], value[:, :, :1], 1.0, None, None, bias=main_bias)
        stream_out = state.attend_beside(attn, query[:, :, 1:], key[:, :, 1:], value[:, :, 1:], 1.0, predict_bias)
        out = attn.out_proj(merge(torch.cat([main_out, stream_out], dim=2)))
        out = nn.functional.dropout(out, p=attn.dropout, training=attn.training)
        hidden = layer.self_attn_layer_norm(hidden + out)
        cross = getattr(layer, "cross_attn", None)
        if cross is None or index not in state.cross_kv:
            raise DecodeUnsupported("a ProphetNet decoder layer without cross-attention on the static buffers")
        kv = state.cross_kv[index]
        query = split(cross.query_proj(hidden) / (cross.head_dim**0.5))
        out = cross.out_proj(merge(state.attend(cross, query, kv[0], kv[1], 1.0, None, None)))
        out = nn.functional.dropout(out, p=cross.dropout, training=cross.training)
        hidden = layer.cross_attn_layer_norm(out + hidden)
        hidden = layer.feed_forward_layer_norm(layer.feed_forward(hidden) + hidden)
    others = hidden.new_zeros(batch, m.ngram - 1, width)
    output = sys.modules[type(m).__module__].ProphetNetDecoderModelOutput
    return output(last_hidden_state=hidden[:, :1], last_hidden_state_ngram=torch.cat([hidden[:, 1:], others], dim=1))
