"""A decode step that runs the layers of a GPT-2-shaped decoder directly, in five kernels per layer.

The generic decode step (``generation.Runner``) calls the model's own forward, which launches ~25 kernels per
GPT-2 layer; at batch 1 every kernel costs microseconds however small, so the launch count sets the speed. This
step reads the same modules through attribute paths (``GPT2Layout``) and fuses what the stock forward splits
(``ops.decode``): each LayerNorm into the matrix product after it, the residual add into the one before it, the
key/value write into the QKV projection, GELU into the FFN's first product, and for greedy decoding the choice of
the next token into the LM head. It computes the same function; only rounding differs (fewer intermediate
roundings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ...ops import decode
from ...ops.attention import packed_attention
from ..decode_state import DecodeState
from ..patching import check_requires, resolve
from .base import TANH_GELU, FusedStep, Packing, Projection, check_one_device


@dataclass(frozen=True)
class GPT2Layout:
    """Attribute paths of a GPT-2-shaped decoder: pre-LayerNorm, one fused QKV projection, learned positions,
    tanh-GELU MLP.

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


def _norm(module: nn.LayerNorm) -> decode.Norm:
    return (module.weight, module.bias, module.eps)


def _affine_layer_norm(module: Any) -> bool:
    return type(module) is nn.LayerNorm and module.weight is not None and module.bias is not None


class _Layer:
    def __init__(self, layer: nn.Module, layout: GPT2Layout):
        self.layer = layer
        self.ln1, self.ln2 = resolve(layer, layout.ln1), resolve(layer, layout.ln2)
        self.norm1, self.norm2 = _norm(self.ln1), _norm(self.ln2)
        attention = resolve(layer, layout.attention)
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        self.scaling = float(attention.scaling)
        found = [Projection.of(resolve(layer, p)) for p in (layout.qkv, layout.o, layout.ffn_in, layout.ffn_out)]
        self.missing_projection = any(p is None for p in found)
        # Checked by ``unsupported`` before any step runs.
        self.qkv, self.o, self.ffn_in, self.ffn_out = (cast(Projection, p) for p in found)
        self.act: Any = resolve(layer, layout.act)
        self.gelu_tanh = type(self.act).__name__ in TANH_GELU

    def unsupported(self) -> str | None:
        """Why this layer's modules cannot run in the fused step, or None."""
        if not all(_affine_layer_norm(n) for n in (self.ln1, self.ln2)):
            return "a norm that is not an nn.LayerNorm with weight and bias"
        if self.missing_projection:
            return "a projection that is not nn.Linear or Conv1D (an adapter or quantized layer)"
        return None


class GPT2DecodeStep(FusedStep):
    """The fused decode step of a GPT-2-shaped model (``base.DecodeStep``): (tokens, positions, state) -> next-token
    logits."""

    layout = GPT2Layout()

    def __init__(self, base: nn.Module, head: Any):
        layout = self.layout
        check_requires(base.config, layout.requires, "fused decode step")
        check_one_device(base)
        self.embed: nn.Embedding = resolve(base, layout.embed)
        self.positions: nn.Embedding = resolve(base, layout.positions)
        self.final_norm: nn.LayerNorm = resolve(base, layout.final_norm)
        self.layers = [_Layer(layer, layout) for layer in resolve(base, layout.layers)]
        self.head: Any = head.get_output_embeddings()
        self.base, self.layout = base, layout
        self.module_ids = [id(m) for m in self._modules(head)]
        self.no_rotation = decode.Rotary(torch.zeros(1, device=self.embed.weight.device)[:0])  # no features turn
        problem = next((p for p in (layer.unsupported() for layer in self.layers) if p), None)
        if problem is None and not _affine_layer_norm(self.final_norm):
            problem = "a final norm that is not an nn.LayerNorm with weight and bias"
        if problem:
            raise NotImplementedError(problem)

    def _modules(self, head: Any) -> list[Any]:
        base, layout = self.base, self.layout
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
        return modules + [head.get_output_embeddings()]

    def head_options(self) -> dict[str, Any]:
        return {"norm": _norm(self.final_norm)}

    def new_cache(self, batch: int, slots: int) -> list[torch.Tensor]:
        """Zeroed per-layer key/value buffers (2, batch, heads, slots, head_dim), in layer order."""
        weight = self.embed.weight
        return [
            weight.new_zeros(2, batch, layer.heads, slots, layer.head_dim) for layer in self.layers
        ]  # fmt: skip

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, state: DecodeState, packing: Packing) -> torch.Tensor:
        """Run the prompts (B, L) on their real tokens only (``packing``); write their keys/values into ``state.kv``
        at their columns. Returns the (B, V) fp32 logits of each row's last token. No host synchronisation: a CUDA
        graph can hold it."""
        x = decode.embed(
            ids.reshape(-1)[packing.flat], positions.reshape(-1)[packing.flat], self.embed.weight,
            self.positions.weight,
        )  # fmt: skip
        tokens = x.shape[0]

        def attend(layer: _Layer, kv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            qkv = layer.qkv(x, norm=layer.norm1, kernels=False)
            q, k, v = qkv.view(tokens, 3, layer.heads, layer.head_dim).unbind(1)  # (T, H, D)
            kv[0][packing.rows, :, packing.columns] = k
            kv[1][packing.rows, :, packing.columns] = v
            return packed_attention(q, k, v, packing.info, scale=layer.scaling, causal=True)

        # PyTorch's kernels: a prefill replays from a CUDA graph, where they cost about as much as ours, and a first
        # call then compiles no Triton kernels for its row count (each ~0.5-1 s with an empty Triton cache).
        h = self._layers(x, state, attend, kernels=False)
        return self._logits(h[packing.last], kernels=False)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState) -> torch.Tensor:
        x = decode.embed(tokens[:, 0], positions[:, 0], self.embed.weight, self.positions.weight)

        def attend(layer: _Layer, kv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            qkv = layer.qkv
            # The rotary decoders' attention without a rotation (NoPE): it writes the new key/value, attends over
            # the slots written so far and splits a long cache across programs.
            return decode.rope_attention(
                qkv(x, norm=layer.norm1), kv, state.mask, state.slot, positions[:, 0], heads=layer.heads,
                scale=layer.scaling, rotary=self.no_rotation, counters=state.buffers.counters,
            )  # fmt: skip

        return self._layers(x, state, attend)

    def _layers(
        self,
        x: torch.Tensor,
        state: DecodeState,
        attend: Callable[[_Layer, torch.Tensor, torch.Tensor], torch.Tensor],
        kernels: bool = True,
    ) -> torch.Tensor:
        """Every layer over the residual stream ``x`` (N, E), updated in place and returned; ``attend(layer, kv, x)``
        applies the layer's first LayerNorm, returns the attention output (N, H, D) and writes the layer's
        keys/values into ``kv``."""
        for layer, kv in zip(self.layers, state.kv, strict=True):
            a = attend(layer, kv, x)
            layer.o(a.reshape(x.shape[0], -1), residual=x, kernels=kernels)
            f = layer.ffn_in(x, norm=layer.norm2, gelu_tanh=layer.gelu_tanh, kernels=kernels)
            layer.ffn_out(f if layer.gelu_tanh else layer.act(f), residual=x, kernels=kernels)
        return x
