"""Per-call state: what our code at the top of a call tells our code deep inside transformers' stock forward.

We cannot add arguments to transformers' functions, so a call's state travels in two context variables, set and
reset by ``with`` blocks. Context variables are local to a thread (and to an asyncio task): calls from other
threads never see each other's state.

The route of a call, and where each piece of state is set and read:

Encoders (``encoder.py``)::

    model(input_ids, attention_mask)
    -> PackedEncoder.base_forward        the base model's forward (an instance attribute): pushes an EncoderCall
                                         with the (batch, seq) mask, and withholds the mask from the stock forward
    -> transformers' base-model forward  embeddings; no 4D mask is built (it got none); embeddings that make a
                                         mask of their own (ViLT's: text and image patches) replace the call's mask
    -> PackedEncoder.forward             the encoder module's forward: reads its own EncoderCall, packs the real
                                         tokens once (ops.padding), runs every layer on them (ops.attention,
                                         ops.fused), pads back once
    -> transformers' pooler / task head, unchanged
    (a transformed SentenceTransformer's encode (``sentence_encode.py``) also passes the tokenizer's host copy of
    the mask, ``host_mask``, so packing needs no copy back from the device)

Decoders (``decoder.py``, ``generation.py``)::

    model.generate(ids, attention_mask)  FastGenerate.generate (the head's generate): plans the call, takes the
                                         model's lock, runs a runner:
        prefill -> head forward -> CausalDecoder.forward (below) on the prompt
        each new token -> with decoding(state): DecoderCall(decode=DecodeState) -> head forward (or a fused step,
                          which calls no transformers code and needs no call state)
    model(ids, attention_mask, ...)      CausalDecoder.forward, the base model's forward: picks a padding-free
                                         prefill (DecoderCall(packed=PackInfo)), packed rows (the same), or the
                                         stock forward (DecoderCall(weights=..., stock_mask=...))
    -> transformers' layers
       -> masking_utils.create_causal_mask -> AttentionMaskInterface["bettertransformer"] = attention.mask_function:
              no mask when the DecoderCall is packed or decoding (the caller knows the pattern); the stock
              implementation's mask for models whose modules compute attention themselves; else SDPA's mask
       -> the attention modules -> AttentionInterface["bettertransformer"] = attention.attention_function (models
          without the interface: our module forwards in attention_modules.py call it):
              decode -> DecodeState.attend: writes this token's key/value into the layer's static buffer, attends
              packed -> ops.attention.packed_attention, within each sequence
              else   -> SDPA (or the explicit softmax for softcaps and attention weights), with the mask above
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from ..ops.padding import PackInfo, PendingPack

if TYPE_CHECKING:
    from .decode_state import DecodeState


@dataclass(frozen=True)
class EncoderCall:
    """One base-model call of a transformed encoder, for its encoder's forward.

    owner:        id of the PackedEncoder whose base model is running (a model may hold several encoders).
    mask:         the call's (batch, seq) padding mask, or None.
    blocked:      why the call's arguments rule the packed path out, if they do.
    mask_dropped: the stock forward runs without the mask (we hold it); a stock fallback must restart the call.
    pending:      the mask's packing, started before the stock forward runs.
    """

    owner: int
    mask: torch.Tensor | None
    blocked: str | None
    mask_dropped: bool = False
    pending: PendingPack | None = None


@dataclass(frozen=True)
class DecoderCall:
    """One base-model call (or decode step) of a transformed decoder, for our attention and mask functions.

    packed:     the packing of a call running on packed real tokens (prefill or packed rows).
    decode:     the static buffers of a decode step of the fast generate loop.
    weights:    the call asked for attention weights through an explicit argument (models that return them
                from their modules rather than through transformers' output capture).
    stock_mask: the attention implementation whose masks the model's own attention modules expect (models routed
                module by module); None for models that use our attention function through the interface.
    """

    packed: PackInfo | None = None
    decode: DecodeState | None = None
    weights: bool = False
    stock_mask: str | None = None

    @property
    def needs_mask(self) -> bool:
        """False when the caller computes the attention pattern itself (packed calls, decode steps)."""
        return self.packed is None and self.decode is None


_ENCODER_CALLS: ContextVar[tuple[EncoderCall, ...]] = ContextVar("bettertransformer_encoder_calls", default=())
# A host copy of the padding mask of the encoder call about to run (a tokenizer's output), so the encoder need not
# copy the mask's row lengths back from the device (``sentence_encode.FastEncode``).
_HOST_MASK: ContextVar[torch.Tensor | None] = ContextVar("bettertransformer_host_mask", default=None)
_DECODER_CALL: ContextVar[DecoderCall | None] = ContextVar("bettertransformer_decoder_call", default=None)


@contextlib.contextmanager
def encoder_call(call: EncoderCall) -> Iterator[None]:
    """Push ``call`` for the duration of a base-model forward (calls nest: a model inside a model)."""
    token = _ENCODER_CALLS.set(_ENCODER_CALLS.get() + (call,))
    try:
        yield
    finally:
        _ENCODER_CALLS.reset(token)


def update_encoder_call(call: EncoderCall, **fields: Any) -> EncoderCall:
    """Replace the running ``call`` by a copy with these fields, for the rest of its base-model forward (``encoder_call``
    restores the stack as it was before that forward): what the stock forward computes on the way to the encoder
    (ViLT's embeddings make the padding mask of the image and text tokens together)."""
    updated = replace(call, **fields)
    _ENCODER_CALLS.set(tuple(updated if c is call else c for c in _ENCODER_CALLS.get()))
    return updated


def current_encoder_call(owner: int) -> EncoderCall | None:
    """The innermost running call of the encoder adapter ``owner``."""
    for call in reversed(_ENCODER_CALLS.get()):
        if call.owner == owner:
            return call
    return None


@contextlib.contextmanager
def host_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Run encoder calls whose padding mask equals ``mask``, a CPU tensor (the caller moved it to the device)."""
    token = _HOST_MASK.set(mask)
    try:
        yield
    finally:
        _HOST_MASK.reset(token)


def current_host_mask() -> torch.Tensor | None:
    """The host copy of the running encoder call's padding mask, if the caller gave one."""
    return _HOST_MASK.get()


@contextlib.contextmanager
def decoder_call(**fields: Any) -> Iterator[DecoderCall]:
    """Run a decoder call with these ``DecoderCall`` fields (the others as the enclosing call has them)."""
    call = replace(_DECODER_CALL.get() or DecoderCall(), **fields)
    token = _DECODER_CALL.set(call)
    try:
        yield call
    finally:
        _DECODER_CALL.reset(token)


def decoding(state: DecodeState) -> contextlib.AbstractContextManager[DecoderCall]:
    """Run one decode step of the model's own forward against ``state``'s buffers."""
    state.begin_step()
    return decoder_call(decode=state, packed=None)


def current_decoder_call() -> DecoderCall | None:
    """The decoder call running in this thread, if any."""
    return _DECODER_CALL.get()


class CarriedCheckpoint:
    """A layer's gradient-checkpointing function (transformers sets one per layer as ``_gradient_checkpointing_func``)
    that runs the layer, and its recomputation in the backward pass, under the call state of the forward that
    checkpointed it. The backward pass runs outside that forward, where these context variables are unset: a packed
    call's attention would otherwise be recomputed across the whole row, its sequences no longer kept apart."""

    def __init__(self, checkpoint: Callable[..., Any]):
        self.checkpoint = checkpoint

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        context = contextvars.copy_context()

        def run(*inner: Any, **named: Any) -> Any:
            return context.copy().run(function, *inner, **named)

        return self.checkpoint(run, *args, **kwargs)


def carry_call_state(modules: Iterable[Any]) -> None:
    """Wrap the modules' gradient-checkpointing functions (where set) in ``CarriedCheckpoint``."""
    for module in modules:
        checkpoint = vars(module).get("_gradient_checkpointing_func")
        if checkpoint is not None and not isinstance(checkpoint, CarriedCheckpoint):
            module._gradient_checkpointing_func = CarriedCheckpoint(checkpoint)


def drop_carried_call_state(modules: Iterable[Any]) -> None:
    """Undo ``carry_call_state``."""
    for module in modules:
        checkpoint = vars(module).get("_gradient_checkpointing_func")
        if isinstance(checkpoint, CarriedCheckpoint):
            module._gradient_checkpointing_func = checkpoint.checkpoint
