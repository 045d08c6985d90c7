"""A decode step that runs the layers of a GPT-2-shaped decoder directly, in about nine kernels per layer.

The general decode step (``generation._Runner``) calls the model's own forward, which launches ~25 kernels per
GPT-2 layer; at batch 1 every kernel costs ~2 us however small, so the launch count sets the speed. This step
reads the same modules through attribute paths (``DecodeLayout``) and fuses what the stock forward splits:
the residual add with the next LayerNorm, the key/value write into one buffer, the attention mask built once
per step, GELU in one kernel. It computes the same function; only rounding differs (fewer intermediate roundings).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.fused import residual_layer_norm_
from .encoder import resolve


@dataclass(frozen=True)
class DecodeLayout:
    """Attribute paths of a pre-LayerNorm decoder with one fused QKV projection and learned positions (GPT-2).

    Paths of ``embed``, ``positions``, ``layers`` and ``final_norm`` are relative to the base model; the others to
    one layer. ``requires`` lists (config attribute, the only supported value) pairs.
    """

    embed: str = "wte"
    positions: str = "wpe"
    layers: str = "h"
    ln1: str = "ln_1"
    attention: str = "attn"
    qkv: str = "attn.c_attn"
    o: str = "attn.c_proj"
    ln2: str = "ln_2"
    ffn_in: str = "mlp.c_fc"
    act: str = "mlp.act"
    ffn_out: str = "mlp.c_proj"
    final_norm: str = "ln_f"
    requires: tuple[tuple[str, Any], ...] = (("add_cross_attention", False),)


def _projection(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x (B, in) -> (B, out) for an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored (in, out))."""
    if type(module) is nn.Linear:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight, bias = module.weight, module.bias
        return lambda x: torch.addmm(bias, x, weight)
    return None


def _activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    name = type(module).__name__
    if name == "NewGELUActivation":  # 0.5x(1 + tanh(...)) in eight kernels; the same formula in one
        return functools.partial(F.gelu, approximate="tanh")
    if name in ("GELUActivation", "GELU") and getattr(module, "approximate", "none") == "none":
        return F.gelu
    return module


class _Layer:
    def __init__(self, layer: nn.Module, layout: DecodeLayout):
        self.layer = layer
        self.ln1, self.ln2 = resolve(layer, layout.ln1), resolve(layer, layout.ln2)
        attention = resolve(layer, layout.attention)
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        self.scaling = float(attention.scaling)
        self.modules = [resolve(layer, p) for p in (layout.qkv, layout.o, layout.ffn_in, layout.ffn_out)]
        self.qkv, self.o, self.ffn_in, self.ffn_out = (_projection(m) for m in self.modules)
        self.act = _activation(resolve(layer, layout.act))

    def unsupported(self) -> str | None:
        if any(type(n) is not nn.LayerNorm for n in (self.ln1, self.ln2)):
            return "a norm that is not nn.LayerNorm"
        if any(p is None for p in (self.qkv, self.o, self.ffn_in, self.ffn_out)):
            return "a projection that is not nn.Linear or Conv1D (an adapter or quantized layer)"
        return None


class FusedDecodeStep:
    """One decode step of a whole GPT-2-shaped model: (tokens, positions, buffers) -> next-token logits."""

    def __init__(self, base: nn.Module, head: nn.Module, layout: DecodeLayout):
        config: Any = base.config
        for flag, supported in layout.requires:
            if getattr(config, flag, supported) != supported:
                raise NotImplementedError(f"{flag}={getattr(config, flag)!r}")
        self.embed: nn.Embedding = resolve(base, layout.embed)
        self.positions: nn.Embedding = resolve(base, layout.positions)
        self.final_norm: nn.LayerNorm = resolve(base, layout.final_norm)
        self.layers = [_Layer(layer, layout) for layer in resolve(base, layout.layers)]
        self.head: Any = head.get_output_embeddings()
        self.base, self.layout, self.module_ids = base, layout, self._module_ids(base, head, layout)
        problem = next((p for p in (layer.unsupported() for layer in self.layers) if p), None)
        if problem is None and type(self.final_norm) is not nn.LayerNorm:
            problem = "a final norm that is not nn.LayerNorm"
        if problem:
            raise NotImplementedError(problem)

    @staticmethod
    def _module_ids(base: nn.Module, head: nn.Module, layout: DecodeLayout) -> list[int]:
        paths = (
            layout.ln1,
            layout.attention,
            layout.qkv,
            layout.o,
            layout.ln2,
            layout.ffn_in,
            layout.act,
            layout.ffn_out,
        )
        modules = [resolve(base, p) for p in (layout.embed, layout.positions, layout.final_norm)]
        modules += [resolve(layer, p) for layer in resolve(base, layout.layers) for p in paths]
        return [id(m) for m in modules + [head.get_output_embeddings()]]

    def is_current(self, head: nn.Module) -> bool:
        """False if modules were swapped since (e.g. adapters added): the step would run stale modules."""
        return self._module_ids(self.base, head, self.layout) == self.module_ids

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, state: Any) -> torch.Tensor:
        """tokens, positions: (B, 1); state: ``decoder.DecodeState``. Returns (B, V) fp32 logits."""
        batch = tokens.shape[0]
        x = self.embed(tokens[:, 0]) + self.positions(positions[:, 0])  # (B, E), the residual stream
        mask = state.additive_mask(None, x.dtype)
        update: torch.Tensor | None = None
        for layer, kv in zip(self.layers, state.kv, strict=True):
            if update is None:
                h = F.layer_norm(x, layer.ln1.normalized_shape, layer.ln1.weight, layer.ln1.bias, layer.ln1.eps)
            else:
                h = residual_layer_norm_(x, update, layer.ln1)
            qkv = layer.qkv(h)  # (B, 3E)
            width = layer.heads * layer.head_dim
            q = qkv[:, :width].view(batch, layer.heads, 1, layer.head_dim)
            new_kv = qkv[:, width:].view(batch, 2, layer.heads, layer.head_dim).transpose(0, 1).unsqueeze(3)
            kv.index_copy_(3, state.slot, new_kv)  # keys and values of this token, one kernel
            a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=layer.scaling)
            h = residual_layer_norm_(x, layer.o(a.reshape(batch, width)), layer.ln2)
            update = layer.ffn_out(layer.act(layer.ffn_in(h)))
        assert update is not None
        h = residual_layer_norm_(x, update, self.final_norm)
        return F.linear(h, self.head.weight, self.head.bias).float()
