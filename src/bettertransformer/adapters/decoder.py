"""Decoders: causal language models whose attention goes through transformers' attention interface.

One mechanism serves every such model type, whatever its layers look like:

- ``decoder_attention`` is registered as the attention function ``"bettertransformer"`` (with its mask function)
  and the model is switched to it. Ordinary calls compute exactly what stock SDPA computes; it adds logit
  softcapping (Gemma 2) and exact attention weights when ``output_attentions`` asks for them.
- ``CausalDecoder`` wraps the base model's ``forward``. A left-padded prompt with an empty cache (generate's
  prefill) runs once on its real tokens only, packed into one row; the hidden states and the keys/values are
  then laid back out in the padded layout the decode steps expect. A row of sequences packed with restarting
  ``position_ids`` (transformers' ``DataCollatorWithFlattening``) gets attention within each sequence only.

Everything else (decode steps, right padding, chunked prefill, static caches) runs the stock forward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._compat import capturing, register_attention, set_attention
from ..ops.attention import attention, attention_with_weights, packed_attention
from ..ops.padding import PackInfo, pack_info, unpack
from .attention_modules import ModuleAttention
from .encoder import InstanceForward

logger = logging.getLogger("bettertransformer")

ATTENTION_NAME = "bettertransformer"

# The packing of the base-model call running now: set while its layers run on packed tokens.
_PACKED: ContextVar[PackInfo | None] = ContextVar("bettertransformer_packed", default=None)
# Set while the base-model call asked for attention weights through an explicit argument (models that return them
# from their modules rather than through transformers' output capture).
_WEIGHTS: ContextVar[bool] = ContextVar("bettertransformer_weights", default=False)
# Set while a caller computes the attention pattern itself (a packed call, a captured decode step): no mask needed.
_NO_MASK: ContextVar[bool] = ContextVar("bettertransformer_no_mask", default=False)


@dataclass
class DecodeState:
    """The static key/value buffers of a decode step (see ``adapters/generation.py``).

    kv: per layer (2, B, Hkv, S, D), keys then values; slot: (1,) the slot of the token being fed; valid: (B, S)
    which slots hold real tokens (the current one included); mask: (B, S) the same as an additive mask (0 or -inf).
    Layers are taken in call order, one per attention call.
    """

    kv: list[torch.Tensor]
    slot: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    layer: int = 0
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def additive_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, S): 0 for the keys the current token sees, -inf elsewhere; built once per step.

        A sliding window counts slots, as transformers' caches do (padding slots included)."""
        if window is None and dtype == self.mask.dtype:
            return self.mask[:, None, None, :]
        key = (window, dtype)
        if key not in self.masks:
            allowed = self.valid
            if window is not None:
                slots = torch.arange(allowed.shape[1], device=allowed.device)
                allowed = allowed & (slots > self.slot - window)
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            self.masks[key] = torch.where(allowed, zero, float("-inf"))[:, None, None, :]
        return self.masks[key]

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        window: int | None,
        softcap: float | None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write this layer's new key/value (B, Hkv, 1, D) into its buffer; attend (B, H, 1, D) over it.

        ALiBi (``alibi_slopes``, (H,)) adds slope * (key slot - current slot), relative so it stays small for the
        keys that matter (the stock absolute form differs by a per-row constant, which softmax ignores)."""
        kv = self.kv[self.layer]
        self.layer = (self.layer + 1) % len(self.kv)
        kv[0].index_copy_(2, self.slot, key.to(kv.dtype))
        kv[1].index_copy_(2, self.slot, value.to(kv.dtype))
        mask = self.additive_mask(window, query.dtype)
        batch, heads, _, dim = query.shape
        if alibi_slopes is not None:
            slots = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.float32)
            relative = alibi_slopes.float()[None, :, None, None] * (slots - self.slot.float())  # (1, H, 1, S)
            mask = (mask + relative).to(query.dtype)  # (B, H, 1, S)
            out = attention(query, kv[0], kv[1], mask, scale=scale, softcap=softcap)
            return out
        kv_heads = kv.shape[2]
        # Grouped-query heads of one key/value head become the query rows of one attention call (no repeated keys).
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
        out = attention(grouped, kv[0], kv[1], mask, scale=scale, softcap=softcap)
        return out.reshape(batch, heads, 1, dim)


_DECODE: ContextVar[DecodeState | None] = ContextVar("bettertransformer_decode", default=None)


@contextlib.contextmanager
def decode_context(state: DecodeState) -> Iterator[None]:
    """Run a one-token forward against ``state``'s buffers (the model gets no cache and builds no mask)."""
    state.layer = 0
    state.masks.clear()
    decode, no_mask = _DECODE.set(state), _NO_MASK.set(True)
    try:
        yield
    finally:
        _DECODE.reset(decode)
        _NO_MASK.reset(no_mask)


# Base-model arguments the packed path handles (any other tensor argument runs the stock forward).
_HANDLED = frozenset({"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache", "past_key_values"})
_BLOCKING_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")


def decoder_attention(
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

    The mask is the one ``sdpa_mask`` builds (bool, True = attend), or None when plain causal attention is exact;
    or, from our module adapters, an additive mask. ``alibi_slopes`` (H,): the module's ALiBi, already in the mask
    of an ordinary call; packed and decode-step calls rebuild it relative to each query.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    decode = _DECODE.get()
    if decode is not None and query.shape[2] == 1:
        out = decode.attend(query, key, value, scale, sliding_window if causal else None, softcap, alibi_slopes)
        return out.transpose(1, 2), None
    info = _PACKED.get()
    if info is not None and query.shape[0] == 1 and query.shape[2] == info.total and key.shape[2] == info.total:
        # (1, H, T, D) -> (T, H, D): views of the projections' (T, H, D) layout, no copy.
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        bias = None
        if alibi_slopes is not None:  # slope * (key position - query position) inside each sequence
            positions = torch.arange(info.max_len, device=q.device, dtype=torch.float32)
            bias = alibi_slopes.float()[None, :, None, None] * (positions[None, :] - positions[:, None])
        out = packed_attention(
            q, k, v, info, scale=scale, dropout_p=dropout, bias=bias, causal=causal,
            window=sliding_window if causal else None, softcap=softcap,
        )  # fmt: skip
        return out.unsqueeze(0), None
    weights = capturing("attentions") or bool(kwargs.get("output_attentions")) or _WEIGHTS.get()
    q_len, kv_len = query.shape[2], key.shape[2]
    # As stock SDPA: with no mask, a multi-token query is causal, aligned to the start of the keys.
    causal = causal and q_len > 1 and attention_mask is None
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


def _flatten(bound: inspect.BoundArguments) -> dict[str, Any]:
    arguments = dict(bound.arguments)
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Lengths (host int32) of the sequences packed in one row, each starting where position ids do not step by 1."""
    row = position_ids[0]
    starts = torch.ones_like(row, dtype=torch.bool)
    starts[1:] = row[1:] - row[:-1] != 1
    bounds = torch.nonzero(starts).squeeze(1).cpu()
    return torch.diff(bounds, append=torch.tensor([row.numel()])).to(torch.int32)


class CausalDecoder:
    """Attaches the decoder fast paths to one causal LM's base model, and takes them off again."""

    def __init__(self, base: nn.Module, layout: Any = None, root: nn.Module | None = None):
        config: Any = base.config
        self.base, self.config = base, config
        self.calls: Counter[str] = Counter()
        self._signature = inspect.signature(base.forward)
        params = self._signature.parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        self.takes_positions = "position_ids" in params  # ALiBi models (BLOOM) take none
        self._patches: list[InstanceForward] = []
        self._by_module = False  # attention computed in the model's own modules (set by attach)
        self._previous_attention: Any = None
        self.layout = layout
        for flag, supported in getattr(layout, "requires", ()):
            if getattr(config, flag, supported) != supported:
                raise NotImplementedError(
                    f"{config.model_type} with {flag}={getattr(config, flag)!r} is not supported "
                    f"(only {flag}={supported!r})"
                )
        # The language-model head whose generate gets the static-cache loop.
        heads: list[Any] = [
            m for m in (root.modules() if root is not None else ())
            if m is not base and getattr(m, "base_model", None) is base and callable(getattr(m, "generate", None))
            and callable(getattr(m, "get_output_embeddings", None)) and m.get_output_embeddings() is not None  # type: ignore[operator]
        ]  # fmt: skip
        from .generation import FastGenerate  # it builds on this module's decode state

        self.generation = None
        if heads:
            self.generation = FastGenerate(heads[0], self.cache_name, self.calls, self._fused_step(heads[0], layout))

    def _fused_step(self, head: nn.Module, layout: Any) -> Any:
        """The model's own decode step, when the registry gives its layers' layout and they match it."""
        from .decode_step import DecodeLayout, FusedDecodeStep

        if not isinstance(layout, DecodeLayout):
            return None
        try:
            return FusedDecodeStep(self.base, head, layout)
        except NotImplementedError as problem:
            logger.info("bettertransformer: generic decode step for %s (%s)", self.config.model_type, problem)
            return None

    def attach(self) -> None:
        """Register our attention, switch the model to it, and wrap the base model's forward (and generate)."""
        register_attention(ATTENTION_NAME, decoder_attention, _mask_function)
        self._previous_attention = self.config._attn_implementation
        layout = self.layout
        by_module = isinstance(layout, ModuleAttention) and not (
            layout.fallback and type(self.base)._can_set_attn_implementation()  # type: ignore[attr-defined]
        )
        self._by_module = by_module
        if by_module:  # attention computed in the model's own modules
            self._patches = [
                InstanceForward(module, functools.partial(self._module_forward, module), layout.method)
                for module in self.base.modules()
                if type(module).__name__ == layout.module_class
            ]
            if not self._patches:
                raise NotImplementedError(f"{self.config.model_type}: no {layout.module_class} modules found")
        elif not set_attention(self.base, ATTENTION_NAME):
            set_attention(self.base, self._previous_attention)
            raise NotImplementedError(
                f"{self.config.model_type} does not route its attention through transformers' attention interface "
                "in this transformers release, so bettertransformer cannot speed it up"
            )
        self._patches.append(InstanceForward(self.base, self._forward))
        if self.generation is not None:
            self.generation.attach()

    def detach(self) -> None:
        """Undo ``attach``: the previous attention implementation, the stock forward and generate."""
        if self.generation is not None:
            self.generation.detach()
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = []
        self.config._attn_implementation = self._previous_attention

    def _module_forward(self, module: nn.Module, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        assert isinstance(self.layout, ModuleAttention)
        return self.layout.forward(module, decoder_attention, *args, **kwargs)

    # -- the base model's forward --------------------------------------------------------------------------------
    def _forward(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        if _DECODE.get() is not None:  # a step of the fast generate loop, counted there
            if not self._by_module:
                return stock(*args, **kwargs)
            # A step attends with the decode state's own mask. Mask creation goes to our mask function, which makes
            # none: the model's own (e.g. transformers' eager_mask) copies a host scalar to the GPU, which a CUDA
            # graph cannot capture. Our module forwards do not read the implementation name.
            previous, self.config._attn_implementation = self.config._attn_implementation, ATTENTION_NAME
            try:
                return stock(*args, **kwargs)
            finally:
                self.config._attn_implementation = previous
        try:
            arguments = _flatten(self._signature.bind(*args, **kwargs))
        except TypeError:
            arguments = None
        mode = self._packable(arguments) if arguments is not None else None
        if mode is None:
            self.calls["stock"] += 1
            wants = arguments is not None and arguments.get("output_attentions")
            token = _WEIGHTS.set(bool(wants if wants is not None else getattr(self.config, "output_attentions", False)))
            try:
                return stock(*args, **kwargs)
            finally:
                _WEIGHTS.reset(token)
        assert arguments is not None
        if mode == "rows":
            info = self._row_segments(arguments["position_ids"])
            if info is None:
                self.calls["stock"] += 1
                return stock(*args, **kwargs)
            self.calls["fast"] += 1
            return self._run_packed(stock, info, arguments)
        return self._packed_prefill(stock, arguments, stock_args=(args, kwargs))

    def _packable(self, arguments: dict[str, Any]) -> str | None:
        """'prefill' (a padded batch), 'rows' (sequences packed in one row), or None (run stock)."""
        for flag in _BLOCKING_FLAGS:
            value = arguments.get(flag)
            if value if value is not None else getattr(self.config, flag, False):
                return None
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor) and name not in _HANDLED:
                return None  # token_type_ids, a 4D mask under another name, ...
        cache = arguments.get(self.cache_name)
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
            return None
        mask, positions = arguments.get("attention_mask"), arguments.get("position_ids")
        if self.takes_positions and (not isinstance(positions, torch.Tensor) or positions.dim() != 2):
            return None  # stock's default positions are model-specific (OPT counts them from the mask)
        tokens = arguments.get("input_ids")
        if tokens is None:
            tokens = arguments.get("inputs_embeds")
        if tokens is None:
            return None
        batch, length = tokens.shape[:2]
        if mask is None:  # sequences packed in a row are told apart by their restarting positions
            return "rows" if batch == 1 and length > 1 and positions is not None else None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (batch, length):
            return None
        # Padding-free prefill is for inference: a training loss would also see the logits at pad positions.
        return "prefill" if not torch.is_grad_enabled() and length > 1 else None

    def _row_segments(self, position_ids: torch.Tensor) -> PackInfo | None:
        lengths = _segments(position_ids)
        if lengths.numel() < 2:
            return None  # one sequence: plain causal attention is already exact
        total = int(lengths.sum())
        grid = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
        info = pack_info(grid.to(position_ids.device), lengths.numel(), grid.shape[1], position_ids.device)
        assert info.total == total
        return info

    def _run_packed(self, stock: Callable, info: PackInfo, arguments: dict[str, Any]) -> Any:
        packed, no_mask = _PACKED.set(info), _NO_MASK.set(True)
        try:
            return stock(**arguments)
        finally:
            _PACKED.reset(packed)
            _NO_MASK.reset(no_mask)

    def _packed_prefill(self, stock: Callable, arguments: dict[str, Any], stock_args: tuple) -> Any:
        mask = arguments["attention_mask"].bool()
        batch, length = mask.shape
        # Real tokens must form one run per row ending at the last column (left padding): the last column is what
        # generate reads, and a sliding window then counts the same keys as stock.
        left_padded = bool((mask[:, -1].all() & (mask[:, 1:] >= mask[:, :-1]).all()).item())
        info = pack_info(mask, batch, length, mask.device) if left_padded else None
        if info is None or info.indices is None or info.max_len == 0:
            self.calls["stock"] += 1
            return stock(*stock_args[0], **stock_args[1])
        self.calls["fast"] += 1
        from transformers import DynamicCache

        run = dict(arguments)
        flat = info.indices
        for name in ("input_ids", "inputs_embeds"):
            if run.get(name) is not None:
                value = run[name]
                run[name] = value.reshape(batch * length, *value.shape[2:]).index_select(0, flat)[None]
        if self.takes_positions:
            positions = arguments["position_ids"].expand(batch, length)
            run["position_ids"] = positions.reshape(-1).index_select(0, flat)[None]
        run["attention_mask"] = None
        use_cache = arguments.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        scratch = DynamicCache()  # every layer keeps the full packed keys/values
        run[self.cache_name], run["use_cache"] = scratch, True
        out = self._run_packed(stock, info, run)
        out.last_hidden_state = unpack(out.last_hidden_state[0], info)  # (B, L, hidden), zeros at padding
        if not use_cache:
            setattr(out, self.cache_name, None)
            return out
        cache = arguments.get(self.cache_name)
        if cache is None:
            cache = DynamicCache(config=self.config)
        layer: Any
        for index, layer in enumerate(scratch.layers):
            # (1, Hkv, T, D) -> (B, Hkv, L, D) with zeros at padding; decode steps mask those slots out.
            keys, values = (unpack(t[0].transpose(0, 1), info).transpose(1, 2) for t in (layer.keys, layer.values))
            cache.update(keys.contiguous(), values.contiguous(), index)
        setattr(out, self.cache_name, cache)
        return out


def _mask_function(*args: Any, **kwargs: Any) -> Any:
    """The mask function registered with the attention: stock's SDPA mask, or none when the caller needs none."""
    from transformers.masking_utils import sdpa_mask

    if _NO_MASK.get():
        return None
    return sdpa_mask(*args, **kwargs)
