"""Decoders: causal language models, through transformers' attention interface.

One mechanism serves every such model type, whatever its layers look like (``call_state`` traces a call end to end):

- ``attention.attention_function`` is registered as the attention function ``"bettertransformer"``, with its mask
  function, and the model is switched to it. Ordinary calls compute exactly what stock SDPA computes; it adds logit
  softcapping (Gemma 2) and exact attention weights when ``output_attentions`` asks for them. Models whose
  modules compute attention themselves (BLOOM, Falcon, GPT-Neo; GPT-J and CodeGen before transformers 5.24) get
  a short forward per module (``attention_modules.py``) that hands the attention to the same function.
- ``CausalDecoder`` wraps the base model's ``forward``. A left-padded prompt with an empty cache (generate's
  prefill) runs once on its real tokens only, packed into one row; the hidden states and the keys/values are
  then laid back out in the padded layout the decode steps expect. A row of sequences packed with restarting
  ``position_ids`` (transformers' ``DataCollatorWithFlattening``) gets attention within each sequence only.
- RMSNorms of the forms the fused step knows run through PyTorch's fused RMSNorm op whenever a gradient is needed
  (training): one kernel forward for the stock composition's seven.
- The language-model head's ``generate`` runs the static-cache loop of ``generation.py``, with the model's fused
  decode step when the registry names one (``decode_steps/``).

Everything else (right padding, chunked prefill, a continued cache, static caches) runs the stock forward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._compat import is_distributed_tensor, register_attention, set_attention
from ..ops.fused import rms_norm_with_grad
from ..ops.padding import PackInfo, gather_rows, pack_info, unpack
from .attention import ATTENTION_NAME, attention_function, mask_function
from .attention_modules import ModuleAttention, route
from .call_state import carry_call_state, current_decoder_call, decoder_call, drop_carried_call_state
from .decode_steps import DecodeStep
from .decode_steps.llama import rms_norm_form
from .generation import FastGenerate
from .patching import Calls, InstanceForward, LogOnce, bind_arguments, check_requires

# Base-model arguments the packed path handles (any other tensor argument runs the stock forward); Trainer's
# num_items_in_batch only scales the loss, and passes through.
_HANDLED = frozenset(
    {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache", "past_key_values", "num_items_in_batch"}
)
_BLOCKING_FLAGS = ("output_attentions", "output_hidden_states", "output_router_logits")


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Lengths (host int32) of the sequences packed in one row, each starting where position ids do not step by 1."""
    row = position_ids[0]
    starts = torch.ones_like(row, dtype=torch.bool)
    starts[1:] = row[1:] - row[:-1] != 1
    bounds = torch.nonzero(starts).squeeze(1).cpu()
    return torch.diff(bounds, append=torch.tensor([row.numel()])).to(torch.int32)


def _norm_with_grad(
    module: Any, offset: float, round_first: bool, eps: float, stock: Callable, *args: Any, **kwargs: Any
) -> Any:
    """An RMSNorm module's forward (its form from ``rms_norm_form``): PyTorch's fused op when a gradient is needed,
    else (or where the op does not fit: other arguments, distributed tensors) the stock forward."""
    x = args[0] if len(args) == 1 and not kwargs else None
    weight = module.weight
    if (
        isinstance(x, torch.Tensor)
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and not (is_distributed_tensor(x) or is_distributed_tensor(weight))
    ):
        out = rms_norm_with_grad(x, weight, eps, offset, round_first)
        if out is not None:
            return out
    return stock(*args, **kwargs)


class CausalDecoder:
    """Attaches the decoder fast paths to one causal LM's base model, and takes them off again."""

    def __init__(
        self,
        base: nn.Module,
        attention: ModuleAttention | None = None,
        decode_step: type[DecodeStep] | None = None,
        root: nn.Module | None = None,
    ):
        config: Any = base.config
        self.base, self.config, self.attention = base, config, attention
        self.calls = Calls()
        self.log = LogOnce()
        self._signature = inspect.signature(base.forward)
        params = self._signature.parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        self.takes_positions = "position_ids" in params  # ALiBi models (BLOOM) take none
        self._patches: list[InstanceForward] = []
        self._checkpointed: list[nn.Module] = []
        self._previous_attention: Any = None
        self._alibi: dict[tuple[int, torch.device], torch.Tensor] = {}
        # Attention computed in the model's own modules, which we route (models without the interface).
        self.by_module = attention is not None and not (
            attention.fallback and type(base)._can_set_attn_implementation()  # type: ignore[attr-defined]
        )
        if attention is not None:
            check_requires(config, attention.requires, "fast path")
        # The language-model head whose generate gets the static-cache loop: the transformers model that owns the
        # base model (wrappers such as a PEFT model forward generate to it).
        from transformers import PreTrainedModel

        heads: list[Any] = [
            m for m in (root.modules() if root is not None else ())
            if isinstance(m, PreTrainedModel) and m is not base and m.base_model is base
            and callable(getattr(m, "generate", None)) and m.get_output_embeddings() is not None
        ]  # fmt: skip
        self.generation: FastGenerate | None = None
        if heads:
            step = self._decode_step(heads[0], decode_step)
            self.generation = FastGenerate(heads[0], self.cache_name, self.calls, step)
        # The keys call_counts always shows.
        generation = ("fast generate", "stock generate", "fused steps", "generic steps")
        self.counted = ("fast", "stock") + (generation if self.generation else ())

    def _decode_step(self, head: nn.Module, family: type[DecodeStep] | None) -> DecodeStep | None:
        """The model's fused decode step, when the registry names a family and the model's modules fit it."""
        if family is None:
            return None
        try:
            return family(self.base, head)
        except NotImplementedError as problem:
            self.log("decode step", "generic decode step for %s (%s)", self.config.model_type, problem)
            return None

    def attach(self) -> None:
        """Register our attention, switch the model to it, and wrap the base model's forward (and generate)."""
        register_attention(ATTENTION_NAME, attention_function, mask_function)
        self._previous_attention = self.config._attn_implementation
        if self.by_module:
            assert self.attention is not None
            self._patches = route(self.base, (self.attention,), self._module_forward)
            # The name only selects masks for these models (their modules are ours now): mask_function gives
            # the stock implementation's mask to ordinary calls and none to packed calls and decode steps.
            self.config._attn_implementation = ATTENTION_NAME
        elif not set_attention(self.base, ATTENTION_NAME):
            set_attention(self.base, self._previous_attention)
            raise NotImplementedError(
                f"{self.config.model_type} does not route its attention through transformers' attention interface "
                "in this transformers release, so bettertransformer cannot speed it up"
            )
        self._patches.append(InstanceForward(self.base, self.forward))
        for module in self.base.modules():
            form = rms_norm_form(module)
            if form is not None:
                self._patches.append(InstanceForward(module, functools.partial(_norm_with_grad, module, *form)))
        # Layers that checkpoint (transformers gives them a ``gradient_checkpointing`` flag), the base model included.
        self._checkpointed = [m for m in self.base.modules() if hasattr(m, "gradient_checkpointing")]
        if self.generation is not None:
            self.generation.attach()

    def detach(self) -> None:
        """Undo ``attach``: the previous attention implementation, the stock forwards and generate."""
        if self.generation is not None:
            self.generation.detach()
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = []
        drop_carried_call_state(self._checkpointed)
        self._alibi.clear()
        self.config._attn_implementation = self._previous_attention

    def _module_forward(
        self, layout: ModuleAttention, module: nn.Module, stock: Callable, *args: Any, **kwargs: Any
    ) -> Any:
        """An attention module's forward (models without the interface): ours, handing the attention to
        ``attention_function`` (with the module's ALiBi slopes where it has them)."""
        attention: Callable[..., Any] = attention_function
        if layout.alibi is not None:
            attention = functools.partial(attention_function, alibi_slopes=self._slopes(module, layout.alibi))
        return layout.forward(module, attention, *args, **kwargs)

    def _slopes(self, module: nn.Module, slopes: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """A module's ALiBi slopes on its device, computed once (a decode step under a CUDA graph copies nothing);
        held here, not on the module, so ``reverse`` leaves the module as it was."""
        device = next(module.parameters()).device
        key = (id(module), device)
        if key not in self._alibi:
            self._alibi[key] = slopes(module).to(device)
        return self._alibi[key]

    # -- the base model's forward --------------------------------------------------------------------------------
    def forward(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward: a padding-free prefill, packed rows, or the stock forward."""
        call = current_decoder_call()
        if call is not None and call.decode is not None:  # a step of the fast generate loop, counted there
            return stock(*args, **kwargs)
        if self.base.training and torch.is_grad_enabled():
            carry_call_state(self._checkpointed)  # checkpointing may have been switched on since the last call
        stock_mask = self._previous_attention if self.by_module else None
        arguments = bind_arguments(self._signature, args, kwargs)
        mode = self._packable(arguments) if arguments is not None else None
        if mode is None:
            self.calls.add("stock")
            wants = arguments.get("output_attentions") if arguments is not None else None
            weights = bool(wants if wants is not None else getattr(self.config, "output_attentions", False))
            with decoder_call(packed=None, decode=None, weights=weights, stock_mask=stock_mask):
                return stock(*args, **kwargs)
        assert arguments is not None
        if mode == "rows":
            info = self._row_segments(arguments["position_ids"])
            if info is None:
                self.calls.add("stock")
                with decoder_call(packed=None, decode=None, weights=False, stock_mask=stock_mask):
                    return stock(*args, **kwargs)
            self.calls.add("fast")
            return self._run_packed(stock, info, arguments)
        return self._packed_prefill(stock, arguments, (args, kwargs), stock_mask)

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
        with decoder_call(packed=info, decode=None, weights=False):
            return stock(**arguments)

    def _packed_prefill(
        self, stock: Callable, arguments: dict[str, Any], stock_args: tuple, stock_mask: str | None
    ) -> Any:
        mask = arguments["attention_mask"].bool()
        batch, length = mask.shape
        # Real tokens must form one run per row ending at the last column (left padding): the last column is what
        # generate reads, and a sliding window then counts the same keys as stock.
        left_padded = bool((mask[:, -1].all() & (mask[:, 1:] >= mask[:, :-1]).all()).item())
        info = pack_info(mask, batch, length, mask.device) if left_padded else None
        if info is None or info.indices is None or info.max_len == 0:
            self.calls.add("stock")
            with decoder_call(packed=None, decode=None, weights=False, stock_mask=stock_mask):
                return stock(*stock_args[0], **stock_args[1])
        self.calls.add("fast")
        from transformers import DynamicCache

        run = dict(arguments)
        flat = info.indices
        for name in ("input_ids", "inputs_embeds"):
            if run.get(name) is not None:
                value = run[name]
                run[name] = gather_rows(value.reshape(batch * length, *value.shape[2:]), flat)[None]
        if self.takes_positions:
            positions = arguments["position_ids"].expand(batch, length)
            run["position_ids"] = positions.reshape(-1).index_select(0, flat)[None]
        run["attention_mask"] = None
        use_cache = arguments.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        scratch = DynamicCache()  # every layer keeps the full packed keys/values
        run[self.cache_name], run["use_cache"] = scratch, True
        out = self._run_packed(stock, info, run)
        out.last_hidden_state = unpack(
            out.last_hidden_state[0], info.to(out.last_hidden_state.device)
        )  # (B, L, hidden), zeros at padding
        if not use_cache:
            setattr(out, self.cache_name, None)
            return out
        cache = arguments.get(self.cache_name)
        if cache is None:
            cache = DynamicCache(config=self.config)
        layer: Any
        for index, layer in enumerate(scratch.layers):
            # (1, Hkv, T, D) -> (B, Hkv, L, D) with zeros at padding; decode steps mask those slots out.
            keys, values = (
                unpack(t[0].transpose(0, 1), info.to(t.device)).transpose(1, 2) for t in (layer.keys, layer.values)
            )
            cache.update(keys.contiguous(), values.contiguous(), index)
        setattr(out, self.cache_name, cache)
        return out
