"""transform / reverse: find the base models the registry knows, attach their adapters, and undo it.

Nothing is swapped but ``forward`` functions (instance attributes): every parameter and buffer stays in its stock module,
so ``state_dict()`` keys and values never change, ``save_pretrained`` writes a stock checkpoint, and
``reverse`` is exact by construction.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

from torch import nn

from ._compat import is_distributed_tensor
from .adapters.sentence_encode import FastEncode, is_sentence_transformer
from .registry import support_for, supported_model_types

_STATE = "_bettertransformer_state"


class _State:
    """What ``transform`` attached to one model, for ``reverse`` and ``call_counts``."""

    def __init__(self, patches: list[Any]):
        self.patches = patches


def _model_type(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None)


def _targets(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(base model, registry entry) for every supported base model in ``model``, outermost first."""
    from transformers import PreTrainedModel

    found: list[tuple[nn.Module, Any]] = []
    # The modules of an encoder already found: an encoder-decoder's encoder and decoder, and DINOv2's encoder module,
    # are base models of their own, and the entry found covers them (a causal LM's inner base models keep their own
    # entries).
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, PreTrainedModel) or module is not module.base_model:
            continue
        support = support_for(module, model)
        if support is not None:
            found.append((module, support))
            if support.encoder is not None:
                inside.update(id(m) for m in module.modules())
    return found


def is_transformed(model: nn.Module) -> bool:
    """True if ``model`` was returned by ``transform`` and not yet reversed."""
    return isinstance(getattr(model, _STATE, None), _State)


def _state_of(model: nn.Module, action: str) -> _State:
    state = getattr(model, _STATE, None)
    if not isinstance(state, _State):
        raise ValueError(f"this model was not transformed by bettertransformer; {action}")
    return state


def transform(model: nn.Module, keep_original_model: bool = False) -> nn.Module:
    """Make ``model`` faster; returns the transformed model.

    Args:
        model: a transformers model (any head), or a module holding one (a sentence-transformers model).
        keep_original_model: if True, transform a deep copy and leave ``model`` untouched; otherwise change
            ``model`` in place (its parameters are shared, never copied) and return it.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module`` (a model name, say).
        ValueError: ``model`` is already transformed.
        NotImplementedError: no part of ``model`` has a supported model type (the message lists them), or a
            supported type is configured in a way the fast path does not cover.
    """
    if not isinstance(model, nn.Module):
        hint = f"; load it first, e.g. AutoModel.from_pretrained({model!r})" if isinstance(model, str) else ""
        raise TypeError(f"transform takes a model (a torch.nn.Module), not a {type(model).__name__}{hint}")
    if is_transformed(model):
        raise ValueError("this model is already transformed; call BetterTransformer.reverse(model) first")
    if not _targets(model):
        types = sorted({t for t in (_model_type(m) for m in model.modules()) if t}) or ["(no config.model_type)"]
        raise NotImplementedError(
            f"bettertransformer does not support model type {', '.join(repr(t) for t in types)}. "
            f"Supported model types: {', '.join(supported_model_types())}"
        )
    if keep_original_model:
        if any(is_distributed_tensor(p) for p in model.parameters()):
            raise ValueError(
                "keep_original_model=True copies the model, and a sharded one (tensor parallelism, FSDP: DTensor "
                "weights) cannot be copied; transform it in place with keep_original_model=False"
            )
        model = copy.deepcopy(model)
    patches = []
    try:
        for base, support in _targets(model):
            patches.append(support.attach(base, model))
        if is_sentence_transformer(model):
            encode = FastEncode(model)
            encode.attach()
            patches.append(encode)
    except Exception:
        for patch in reversed(patches):
            patch.detach()
        raise
    setattr(model, _STATE, _State(patches))
    first = next(model.parameters(), None)
    if first is not None and first.is_cuda:
        from .ops.compile_ahead import start_setup

        start_setup()  # Triton's set-up on threads, while the caller prepares its inputs
    return model


def reverse(model: nn.Module) -> nn.Module:
    """Undo ``transform`` in place and return the stock model, with the transformed model's current weights.

    Raises:
        ValueError: ``model`` was not transformed.
    """
    state = _state_of(model, "nothing to reverse")
    for patch in reversed(state.patches):
        patch.detach()
    delattr(model, _STATE)
    return model


def call_counts(model: nn.Module) -> dict[str, int]:
    """How many calls of a transformed model took a fast path, and how many ran the stock computation.

    "fast" / "stock": base-model forwards (encoders: padding-free or stock; decoders: a padding-free prefill or
    packed rows, or the stock forward). "fast generate" / "stock generate": ``generate`` calls of a decoder that ran
    the static-cache loop or transformers' own generate. "fast encode" / "stock encode": ``encode`` calls of a
    sentence-transformers model that ran ours or its own. "graphed training": encoder training forwards whose layers
    replayed captured CUDA graphs (``SWITCHES.training_graphs``), counted among the "fast" ones.
    """
    state = _state_of(model, "no calls to count")
    total: Counter[str] = Counter()
    for patch in state.patches:
        total.update(dict.fromkeys(patch.counted, 0))
        total.update(patch.calls.snapshot())
    return dict(total)


def cache_info(model: nn.Module) -> dict[str, int]:
    """What the fast ``generate`` of a transformed decoder holds on the device: ``runners`` (static buffers per
    batch and length bucket), ``graphs`` (captured CUDA graphs) and ``buffer_bytes`` (the runners' key/value and
    loop buffers; the graphs' own memory comes from one pool per model, shared by its graphs, and is not counted).
    All zero for encoders. The bounds are ``bettertransformer.switches.SWITCHES.max_graphs`` and
    ``max_graph_bytes``."""
    state = _state_of(model, "nothing is cached")
    total: Counter[str] = Counter(runners=0, graphs=0, buffer_bytes=0)
    for patch in state.patches:
        generation = getattr(patch, "generation", None)
        if generation is not None:
            total.update(generation.cache_info())
    return dict(total)


class BetterTransformer:
    """The one-line API: ``BetterTransformer.transform(model)`` and ``BetterTransformer.reverse(model)``."""

    transform = staticmethod(transform)
    reverse = staticmethod(reverse)
    is_transformed = staticmethod(is_transformed)
    call_counts = staticmethod(call_counts)
    cache_info = staticmethod(cache_info)
