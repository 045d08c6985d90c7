"""The padding-free forward of an encoder whose attention goes through transformers' attention interface
(ModernBERT: rotary positions, alternating global and local-window layers).

Its own forward runs on the real tokens only, packed into one row, with each token's position in its padded row as
``position_ids``; our attention function (``adapters.attention``) keeps the sequences apart, and applies the local
layers' bidirectional window inside each sequence. The output is laid back out in the padded shape, zeros at the
padding. Every module of the model runs as it is: nothing about its layers needs describing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._compat import output_capture_active, register_attention, set_attention
from ..ops.padding import PackInfo, pack, pack_info, unpack
from .attention import ATTENTION_NAME, attention_function, mask_function
from .call_state import decoder_call
from .encoder import _columns, _reads_first_position, warn_left_padding
from .patching import Calls, InstanceForward, LogOnce, bind, flat_arguments

_ARGUMENTS = {"input_ids", "attention_mask", "position_ids", "inputs_embeds", "return_dict", "kwargs"}


class InterfaceEncoder:
    """Wraps one base model's forward (an instance attribute; ``detach`` restores it)."""

    def __init__(self, base: nn.Module, root: nn.Module | None = None):
        self.base = base
        self.calls = Calls()
        self.counted = ("fast", "stock")
        self.log = LogOnce()
        self._signature = inspect.signature(base.forward)
        self._patch: InstanceForward | None = None
        self._previous_attention: Any = None
        self.reads_first = _reads_first_position(base, root if root is not None else base)
        self.model_name = type(root if root is not None else base).__name__

    def attach(self) -> None:
        """Route the model's attention through ours (outside packed calls it computes what SDPA computes) and wrap
        its forward."""
        config: Any = self.base.config
        self._previous_attention = config._attn_implementation
        register_attention(ATTENTION_NAME, attention_function, mask_function)
        if not set_attention(self.base, ATTENTION_NAME):
            raise NotImplementedError(f"{config.model_type}: the model cannot switch its attention implementation")
        self._patch = InstanceForward(self.base, self.forward)

    def detach(self) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        config: Any = self.base.config
        config._attn_implementation = self._previous_attention

    def _stock_reason(self, arguments: dict[str, Any]) -> str | None:
        ids, mask = arguments.get("input_ids"), arguments.get("attention_mask")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or arguments.get("inputs_embeds") is not None:
            return "inputs other than (batch, seq) input_ids"
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            return "no (batch, seq) padding mask"
        if arguments.get("position_ids") is not None:
            return "explicit position_ids"
        for flag in ("output_attentions", "output_hidden_states"):
            if arguments.get(flag) or getattr(self.base.config, flag, False):
                return flag
        if output_capture_active():
            return "per-layer outputs are being recorded"
        extra = [k for k, v in arguments.items() if k not in _ARGUMENTS and v is not None and v is not False]
        return f"arguments {sorted(extra)}" if extra else None

    def _plan(self, args: tuple, kwargs: dict) -> tuple[inspect.BoundArguments, torch.Tensor, PackInfo] | str:
        """The call's bound arguments, input ids and packing, or why the stock forward must run it."""
        bound = bind(self._signature, args, kwargs)
        if bound is None:
            return "arguments the base model's signature does not take"
        arguments = flat_arguments(bound)
        reason = self._stock_reason(arguments)
        if reason is not None:
            return reason
        ids = arguments["input_ids"]
        info = pack_info(arguments["attention_mask"], ids.shape[0], ids.shape[1], ids.device)
        if info.indices is None:
            return "no padding (nothing to skip)"
        if not info.contiguous:
            return "a mask with holes (the local windows count padded positions)"
        return bound, ids, info

    def forward(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        plan = self._plan(args, kwargs)
        if isinstance(plan, str):
            self.calls.add("stock")
            self.log(plan, "stock %s forward for %s", type(self.base).__name__, plan)
            return stock(*args, **kwargs)
        bound, ids, info = plan
        self.calls.add("fast")
        if info.left_padded and self.reads_first:
            warn_left_padding(self.log, self.model_name)
        bound.arguments["input_ids"] = pack(ids, info)[None]
        bound.arguments["attention_mask"] = None
        bound.arguments["position_ids"] = _columns(info)[None]  # each token's position in its padded row
        with decoder_call(packed=info, decode=None, weights=False, stock_mask=None):
            out = stock(*bound.args, **bound.kwargs)
        hidden = unpack(out[0][0], info)  # (B, L, hidden), zeros at padding
        if isinstance(out, tuple):
            return (hidden, *out[1:])
        out.last_hidden_state = hidden
        return out
