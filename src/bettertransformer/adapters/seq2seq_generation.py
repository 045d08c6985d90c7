"""Fast ``generate`` for encoder-decoders (BART, T5, Whisper and their kin): the encoder once, then the decoder's
steps on static buffers, each replayed from a CUDA graph.

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

A decoder whose modules compute attention themselves, with no attention interface (FSMT's), gets forwards of ours
on those modules (``EncoderLayout.decoder_modules``, from ``attention_modules``): they keep the stock math and cache
protocol and hand the attention to our function, so the same prefill and steps apply. ProphetNet's decoder, whose
stock forward cannot run a step on static buffers at all, gets a forward of ours for the decode steps (its prefill
stays stock).

A model whose decoder is not on our attention function (an ``eager`` model, say) runs stock generate; one whose
decoder routes only some of its attention modules through it is noticed at its first step (``DecodeState.attended``
counts the calls) and runs stock generate too.

Models with a ``generate`` of their own (Whisper: language and task tokens, suppressed tokens, timestamps, long-form
audio) keep it: it prepares the decoder's prompt, its logits processors and the encoder's states, and hands the
decoding loop to ours through transformers' ``custom_generate`` hook (``Seq2SeqGenerate._decode``). The loop runs
when every processor and stopping criterion is one it implements (``_read_processors``); otherwise transformers' own
loop for the call's mode runs, with the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._compat import set_attention
from .attention import ATTENTION_NAME, attention_function
from .attention_modules import ModuleAttention, route
from .call_state import decoding
from .decode_state import DecodeState, DecodeUnsupported
from .generation import FastGenerate, Runner, _Plan
from .patching import Calls, InstanceForward


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
        # The encoder's states (B, cross_length, hidden) as the model output the decoder steps are given (for its
        # shapes), and the steps' 4D placeholder self-attention mask: both made at the first prefill.
        self.encoder_outputs: Any = None
        self.placeholder_mask: torch.Tensor | None = None
        self.step_cache: Any = None
        self.plan: _Plan | None = None

    @property
    def nbytes(self) -> int:
        """Device bytes of its static buffers, the encoder's states included."""
        if self.encoder_outputs is None:
            return super().nbytes
        states = self.encoder_outputs.last_hidden_state
        return super().nbytes + states.numel() * states.element_size()

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
        batch, length = inputs.shape[:2]
        head = self.head
        if inputs.dim() == 3:  # the encoder's states, computed by the model's own generate
            states, given_mask = inputs, None
        else:
            encoder = head.get_encoder()
            states = encoder(input_ids=inputs, attention_mask=encoder_mask, return_dict=True).last_hidden_state
            given_mask = encoder_mask
        from transformers.modeling_outputs import BaseModelOutput

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        try:
            out = head(
                attention_mask=given_mask, decoder_input_ids=ids, encoder_outputs=BaseModelOutput(states),
                use_cache=True, **{self.cache_name: cache},
            )  # fmt: skip
        except (TypeError, ValueError, AttributeError) as problem:  # a decoder that takes no transformers cache
            raise DecodeUnsupported(f"the decoder's first step with a cache: {type(problem).__name__}: {problem}")
        self_layers, cross_layers = _tensors(cache.self_attention_cache), _tensors(cache.cross_attention_cache)
        if len(cross_layers) != len(self_layers) or any(k.shape[2] != length for k, _ in cross_layers):
            raise DecodeUnsupported("a cross-attention cache that is not one projection of the encoder per layer")
        if self.state is None:
            self.encoder_outputs = BaseModelOutput(states.new_zeros(self.batch, self.cross_length, states.shape[2]))
            kv = [k.new_zeros(2, self.batch, k.shape[1], self.length, k.shape[3]) for k, _ in self_layers]
            cross = {
                i: k.new_zeros(2, self.batch, k.shape[1], self.cross_length, k.shape[3])
                for i, (k, _) in enumerate(cross_layers)
            }
            cross_mask = torch.zeros(self.batch, 1, 1, self.cross_length, dtype=states.dtype, device=self.device)
            self.state = DecodeState(kv, self.buffers, cross, cross_mask, self.owner.self_bias)
            self.placeholder_mask = self.ones[:, :, None, None].to(states.dtype)
            self.step_cache = _step_cache(_pass_through_cache(self.buffers.slot), cross, len(cross_layers))
        state = self.state
        assert state.cross_mask is not None
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
        encoder_states = self.encoder_outputs.last_hidden_state
        encoder_states.zero_()
        encoder_states[:batch, :length] = states
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
        with decoding(state):
            try:
                out = self.head(
                    decoder_input_ids=b.tokens, encoder_outputs=self.encoder_outputs,
                    decoder_attention_mask=self.placeholder_mask, use_cache=True, **{self.cache_name: self.step_cache},
                )  # fmt: skip
            except (TypeError, ValueError, AttributeError) as problem:  # a decoder our step cache does not fit
                raise DecodeUnsupported(f"a decode step: {type(problem).__name__}: {problem}") from problem
        if state.attended != 2 * len(state.kv):
            raise DecodeUnsupported(
                f"{state.attended} attention calls through ours in a step of {len(state.kv)} decoder layers "
                "(an attention implementation other than ours, or layers of another shape)"
            )
        self._select(out.logits[:, -1].float())


class Seq2SeqGenerate(FastGenerate):
    """Replaces ``generate`` on an encoder-decoder's LM head; ``self_bias``: the decoder's self-attention bias
    (``DecodeState.self_bias``), for T5's relative positions; ``routed``: forwards of ours for the decoder's modules
    that compute attention themselves (FSMT's), installed while transformed."""

    runner_class = Seq2SeqRunner

    def __init__(
        self, head: Any, calls: Calls, self_bias: Callable[[DecodeState], torch.Tensor] | None = None,
        routed: tuple[ModuleAttention, ...] = (),
    ):  # fmt: skip
        import inspect

        from transformers.generation.utils import GenerationMixin

        params = inspect.signature(head.forward).parameters
        super().__init__(head, "cache" if "cache" in params else "past_key_values", calls)
        self.self_bias = self_bias
        self.routed = routed
        self._decoder = head.get_decoder()
        self._previous_attention: Any = None
        self._module_patches: list[InstanceForward] = []
        # A generate of the model's own (Whisper's) prepares the call; our loop decodes (custom_generate).
        self.own_generate = type(head).generate is not GenerationMixin.generate

    def attach(self) -> None:
        """Switch the decoder to our attention function and install ``generate``. A decoder with the attention
        interface is switched by name (T5's decoder keeps a config of its own), and only from SDPA: another
        implementation is the user's choice, and its ``generate`` calls then run stock (``_model_problem``). A
        decoder without it gets our forwards on the modules ``routed`` names."""
        if self.routed:
            self._module_patches = route(self._decoder, self.routed, _routed_forward)
        else:
            self._previous_attention = self._decoder.config._attn_implementation
            if self._previous_attention == "sdpa":
                set_attention(self._decoder, ATTENTION_NAME)
        super().attach()

    def _model_problem(self) -> str | None:
        attention = None if self.routed else self._decoder.config._attn_implementation
        if attention is not None and attention != ATTENTION_NAME:
            return f"a decoder on {attention} attention (its decode steps would not reach the static buffers)"
        return super()._model_problem()

    def detach(self) -> None:
        super().detach()
        for patch in reversed(self._module_patches):
            patch.restore()
        self._module_patches = []
        if not self.routed:
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

    def generate(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """Our plan and loop; for a model with a generate of its own, that generate with our decoding loop."""
        if not self.own_generate:
            return super().generate(stock, *args, **kwargs)
        if kwargs.get("custom_generate") is not None or kwargs.get("assistant_model") is not None:
            return stock(*args, **kwargs)
        return stock(*args, custom_generate=self._decode, **kwargs)

    def _decode(
        self, model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
        generation_config: Any, **model_kwargs: Any,
    ) -> Any:  # fmt: skip
        """The decoding loop ``generate`` calls (its ``custom_generate``): ours when the call's processors and
        criteria are ones it implements, else transformers' own sampling or search loop."""
        plan = self._prepared_plan(input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
        out = self._attempt(plan)
        if isinstance(out, torch.Tensor):
            return out
        self.calls.add("stock generate")
        self.log(out, "transformers' decoding loop runs for %s", out)
        from transformers.generation.utils import GENERATION_MODES_MAPPING

        method = getattr(type(model), GENERATION_MODES_MAPPING[generation_config.get_generation_mode()])
        return method(
            model, input_ids, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
            generation_config=generation_config, **model_kwargs,
        )  # fmt: skip

    def _prepared_plan(
        self, input_ids: torch.Tensor, processors: Any, criteria: Any, config: Any, model_kwargs: dict[str, Any]
    ) -> _Plan | str:
        """The plan of a call ``generate`` prepared: its prompt, processors, stopping criteria and encoder states."""
        problem = self._model_problem()
        if problem is not None:
            return problem
        if config.get_generation_mode() not in ("greedy_search", "sample"):
            return f"generation mode {config.get_generation_mode()}"
        flags = (
            "return_dict_in_generate",
            "output_scores",
            "output_logits",
            "output_attentions",
            "output_hidden_states",
        )
        asked = [flag for flag in flags if getattr(config, flag, False)]
        if asked:
            return f"generation setting {asked[0]}"
        if model_kwargs.get("streamer") is not None or model_kwargs.get("synced_gpus"):
            return "a streamer or synced GPUs"
        encoder_outputs = model_kwargs.get("encoder_outputs")
        states = None if encoder_outputs is None else encoder_outputs[0]
        if not isinstance(states, torch.Tensor) or states.dim() != 3 or input_ids.dim() != 2:
            return "no encoder states, or a prompt that is not (batch, length)"
        prompt = input_ids.shape[1]
        found = _read_processors(processors, criteria, prompt, _Prepared(config.do_sample, config.pad_token_id))
        if isinstance(found, str):
            return found
        if found.max_length is None or found.max_length <= prompt:
            return "no length limit, or no tokens to generate"
        if set(found.suppress) & set(found.eos_token_id):
            return "a suppressed end-of-sequence id"
        batch = input_ids.shape[0]
        # Whisper's decoder attends to every encoder position (its cross-attention takes no mask).
        everywhere = torch.ones(batch, states.shape[1], dtype=torch.long, device=states.device)
        plan = _Plan(
            input_ids, torch.ones_like(input_ids), found.max_length - prompt, found.ban_steps, found,
            encoder=(states, everywhere),
        )  # fmt: skip
        plan.suppress, plan.begin_suppress = tuple(found.suppress), tuple(found.begin_suppress)
        return plan


def _routed_forward(spec: ModuleAttention, module: Any, stock: Callable, *args: Any, **kwargs: Any) -> Any:
    """A routed decoder module's forward: ``spec``'s, handing the attention to ``attention_function``."""
    return spec.forward(module, attention_function, *args, **kwargs)


@dataclass
class _Prepared:
    """The settings a prepared call's processors and stopping criteria stand for, under the names of
    ``GenerationConfig`` that ``_Plan`` reads, with the limits ``_Plan`` takes as numbers and the suppressed ids."""

    do_sample: bool
    pad_token_id: int | None
    eos_token_id: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    forced_eos_at: int | None = None  # the length at which the forced end-of-sequence id comes
    max_length: int | None = None
    ban_steps: int = 0
    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _read_processors(processors: Any, criteria: Any, prompt: int, found: _Prepared) -> _Prepared | str:
    """``found`` filled with the settings ``generate``'s prepared processors and stopping criteria stand for, or the
    first one the loop does not implement."""
    for criterion in criteria:
        name = type(criterion).__name__
        if name == "MaxLengthCriteria":
            found.max_length = int(criterion.max_length)
        elif name == "EosTokenCriteria":
            found.eos_token_id = _ids(criterion.eos_token_id)
        else:
            return f"stopping criterion {name}"
    for processor in processors:
        name = type(processor).__name__
        if getattr(processor, "min_tokens_to_keep", 1) != 1:
            return f"{name} keeping {processor.min_tokens_to_keep} tokens"
        if name == "SuppressTokensLogitsProcessor":
            found.suppress += _ids(processor.suppress_tokens)
        elif name == "SuppressTokensAtBeginLogitsProcessor" and int(processor.begin_index) == prompt:
            found.begin_suppress += _ids(processor.begin_suppress_tokens)
        elif name == "MinLengthLogitsProcessor":
            found.ban_steps = max(found.ban_steps, int(processor.min_length) - prompt)
        elif name == "MinNewTokensLengthLogitsProcessor" and int(processor.prompt_length_to_skip) == prompt:
            found.ban_steps = max(found.ban_steps, int(processor.min_new_tokens))
        elif name == "RepetitionPenaltyLogitsProcessor" and not getattr(processor, "prompt_ignore_length", None):
            found.repetition_penalty = float(processor.penalty)
        elif name == "TemperatureLogitsWarper":
            found.temperature = float(processor.temperature)
        elif name == "TopKLogitsWarper":
            found.top_k = int(processor.top_k)
        elif name == "TopPLogitsWarper":
            found.top_p = float(processor.top_p)
        elif name == "ForcedBOSTokenLogitsProcessor":
            found.forced_bos_token_id = int(processor.bos_token_id)
        elif name == "ForcedEOSTokenLogitsProcessor" and len(_ids(processor.eos_token_id)) == 1:
            found.forced_eos_token_id = _ids(processor.eos_token_id)[0]
            found.forced_eos_at = int(processor.max_length)
        else:
            return f"logits processor {name}"
    if found.forced_eos_token_id is not None and found.forced_eos_at != found.max_length:
        return "an end-of-sequence id forced before the length limit"
    return found
