"""Fast ``generate`` for encoder-decoders (BART, T5 and their kin): the encoder once, then the decoder's steps on
static buffers, each replayed from a CUDA graph.

The loop is ``generation.FastGenerate``'s; what differs is the prefill and the step:

1. Prefill: the encoder (padding-free, ``encoder.PackedEncoder``) runs once on the inputs; then the decoder's first
   step, the model's own forward with a transformers cache, on the start token. Its cross-attention keys/values
   (every layer's projection of the encoder's states) are copied into static buffers, once per call; so is the
   start token's self-attention key/value.
2. Each new token is the model's own forward under our attention function (``DecodeState.attend``) with a cache
   object of ours (``_StepCache``): its cross-attention part hands each cross-attention module the static buffers
   as "already computed" keys/values (no projection of the encoder's states per step), its self-attention part
   passes the new token's key/value through to ``attend``, which writes it into the static buffer, and it reports
   the current slot as the length seen so far (the decoder's positions). The self-attention mask is ours: a 4D
   placeholder mask keeps transformers from building one.

A model whose decoder does not route every attention module through our attention function (an ``eager``
model, say) is noticed at its first step (``DecodeState.attended`` counts the calls) and runs stock generate.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._compat import set_attention
from .attention import ATTENTION_NAME
from .call_state import decoding
from .decode_state import DecodeState, DecodeUnsupported
from .generation import FastGenerate, Runner, _Plan
from .patching import Calls


def _tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _step_cache(self_attention: Any, cross: dict[int, torch.Tensor], layers: int) -> Any:
    """An ``EncoderDecoderCache`` for one decode step: cross-attention layer ``i`` holds ``cross[i]``'s keys and
    values, marked as computed; the self-attention part is ``self_attention``."""
    from transformers import DynamicCache, EncoderDecoderCache

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    cross_cache: Any = cache.cross_attention_cache
    for index in range(layers):
        kv = cross[index]
        cross_cache.update(kv[0, :, :, :1], kv[1, :, :, :1], index)  # creates the layer; its tensors are replaced
        layer = cross_cache.layers[index]
        layer.keys, layer.values = kv[0], kv[1]
        cache.is_updated[index] = True
    cache.self_attention_cache = self_attention
    return cache


def _pass_through_cache(slot: torch.Tensor) -> Any:
    """A self-attention cache that keeps nothing: ``update`` hands the step's key/value on to the attention function
    (which writes them into the static buffers), and the length seen so far is ``slot`` (a device tensor, so the
    decoder's position arithmetic stays on the device)."""
    from transformers import DynamicCache

    class _StepCache(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return key_states, value_states

        def get_seq_length(self, *args: Any, **kwargs: Any) -> Any:
            return slot

    return _StepCache()


class Seq2SeqRunner(Runner):
    """A runner of an encoder-decoder: also the encoder's states and the cross-attention buffers (``cross_length``
    encoder positions, a bucket)."""

    owner: Seq2SeqGenerate

    def __init__(self, owner: Seq2SeqGenerate, batch: int, length: int, plan: _Plan, step: Any, bans: bool):
        super().__init__(owner, batch, length, plan, step, bans)
        assert plan.encoder is not None
        self.cross_length = -(-plan.encoder[0].shape[1] // 64) * 64
        self.cache_name = owner.cache_name
        self.encoder_states: torch.Tensor | None = None  # (B, cross_length, hidden), for the decoder's shapes
        self.step_cache: Any = None
        self.plan: _Plan | None = None

    def run(self, plan: _Plan) -> torch.Tensor:
        self.plan = plan
        try:
            return super().run(plan)
        finally:
            self.plan = None

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder, then the decoder's first step (the start tokens ``ids``) with a transformers cache, whose
        keys/values go into the static buffers."""
        from transformers import DynamicCache, EncoderDecoderCache

        assert self.plan is not None and self.plan.encoder is not None
        inputs, encoder_mask = self.plan.encoder
        batch, length = inputs.shape
        head = self.head
        states = head.get_encoder()(input_ids=inputs, attention_mask=encoder_mask, return_dict=True).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = head(
            attention_mask=encoder_mask, decoder_input_ids=ids, encoder_outputs=(states,), use_cache=True,
            **{self.cache_name: cache},
        )  # fmt: skip
        self_layers, cross_layers = _tensors(cache.self_attention_cache), _tensors(cache.cross_attention_cache)
        if len(cross_layers) != len(self_layers) or any(k.shape[2] != length for k, _ in cross_layers):
            raise DecodeUnsupported("a cross-attention cache that is not one projection of the encoder per layer")
        if self.state is None:
            kv = [k.new_zeros(2, self.batch, k.shape[1], self.length, k.shape[3]) for k, _ in self_layers]
            cross = {
                i: k.new_zeros(2, self.batch, k.shape[1], self.cross_length, k.shape[3])
                for i, (k, _) in enumerate(cross_layers)
            }
            cross_mask = torch.zeros(self.batch, 1, 1, self.cross_length, dtype=states.dtype, device=self.device)
            self.state = DecodeState(kv, self.buffers, cross, cross_mask, self.owner.self_bias)
            self.encoder_states = states.new_zeros(self.batch, self.cross_length, states.shape[2])
            self.step_cache = _step_cache(_pass_through_cache(self.buffers.slot), cross, len(cross_layers))
        state = self.state
        assert state.cross_mask is not None and self.encoder_states is not None
        for buffer, (keys, values) in zip(state.kv, self_layers, strict=True):
            buffer.zero_()
            buffer[0, :batch, :, : ids.shape[1]] = keys
            buffer[1, :batch, :, : ids.shape[1]] = values
        for index, (keys, values) in enumerate(cross_layers):
            buffer = state.cross_kv[index]
            buffer.zero_()
            buffer[0, :batch, :, :length] = keys
            buffer[1, :batch, :, :length] = values
        allowed = torch.zeros(self.batch, self.cross_length, dtype=torch.bool, device=self.device)
        allowed[:batch, :length] = encoder_mask.bool()
        allowed[batch:, 0] = True  # the bucket's extra rows see one (zero) key rather than none (no NaN)
        state.cross_mask.copy_(torch.where(allowed, 0.0, float("-inf"))[:, None, None, :])
        self.encoder_states.zero_()
        self.encoder_states[:batch, :length] = states
        b = self.buffers
        b.valid.zero_()
        b.valid[:batch, : ids.shape[1]] = True
        b.mask.copy_(torch.where(b.valid, 0.0, float("-inf")))
        b.tokens.fill_(0)
        b.positions.zero_()
        b.positions[:batch] = ids.shape[1] - 1
        b.slot.fill_(ids.shape[1] - 1)
        return out.logits[:, -1].float()

    def _decode_step(self) -> None:
        state, b = self.state, self.buffers
        assert state is not None
        placeholder = self.ones[:, :, None, None].to(state.cross_mask.dtype if state.cross_mask is not None else None)
        with decoding(state):
            out = self.head(
                decoder_input_ids=b.tokens, encoder_outputs=(self.encoder_states,),
                decoder_attention_mask=placeholder, use_cache=True, **{self.cache_name: self.step_cache},
            )  # fmt: skip
        if state.attended != 2 * len(state.kv):
            raise DecodeUnsupported(
                f"{state.attended} attention calls through ours in a step of {len(state.kv)} decoder layers "
                "(an attention implementation other than ours, or layers of another shape)"
            )
        self._select(out.logits[:, -1].float())


class Seq2SeqGenerate(FastGenerate):
    """Replaces ``generate`` on an encoder-decoder's LM head; ``self_bias``: the decoder's self-attention bias
    (``DecodeState.self_bias``), for T5's relative positions."""

    def __init__(self, head: Any, calls: Calls, self_bias: Callable[[DecodeState], torch.Tensor] | None = None):
        import inspect

        params = inspect.signature(head.forward).parameters
        super().__init__(head, "cache" if "cache" in params else "past_key_values", calls)
        self.runner_class = Seq2SeqRunner
        self.self_bias = self_bias
        self._decoder = head.get_decoder()
        self._previous_attention: Any = None

    def attach(self) -> None:
        """Switch the decoder to our attention function (T5's decoder keeps a config of its own) and install
        ``generate``. Only a decoder on SDPA is switched: another implementation is the user's choice, and its
        decode steps then fail the attention-call check and run stock."""
        config = self._decoder.config
        self._previous_attention = config._attn_implementation
        if self._previous_attention == "sdpa":
            set_attention(self._decoder, ATTENTION_NAME)
        super().attach()

    def detach(self) -> None:
        super().detach()
        self._decoder.config._attn_implementation = self._previous_attention

    def _decoder_prompt(self, inputs: torch.Tensor, config: Any) -> torch.Tensor | str:
        """One start token per row, as stock generate starts an encoder-decoder's decoder."""
        start = config.decoder_start_token_id
        if start is None:
            start = getattr(self.head.config, "decoder_start_token_id", None)
        if start is None:
            start = config.bos_token_id
        if not isinstance(start, int):
            return "no single decoder start token id"
        return torch.full((inputs.shape[0], 1), start, dtype=torch.long, device=inputs.device)
