"""Padding-free encoders: one adapter for every BERT-shaped encoder (post- or pre-LayerNorm).

The adapter leaves every module and parameter where it is. It installs two things, both undone by ``detach``:

- an instance-level ``forward`` on the base model, which remembers the call's ``(batch, seq)`` padding mask while
  the stock forward runs (the encoder itself only sees the 4D mask transformers builds from it);
- an instance-level ``forward`` on the encoder module, which unpads the embeddings once, runs every layer on the
  packed real tokens with the stock layers' own weights, and re-pads once.

Calls the packed path cannot honour exactly run the stock encoder forward instead (see ``_stock_reason``).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
from dataclasses import dataclass, replace
from types import UnionType
from typing import Any, Callable, Union, get_args, get_origin

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._compat import output_capture_active, register_attention, set_attention
from ..ops.attention import packed_attention
from ..ops.dispatch import use_triton
from ..ops.fused import add_layer_norm, conv1d_gemm, dropout_add_layer_norm_pair, half_linear, linear_gelu, rms_norm
from ..ops.padding import PackInfo, PendingPack, dense_layout, pack, pack_info, to_dense, unpack
from ..ops.rotary import rotate_pairs
from ..switches import SWITCHES
from .attention import ATTENTION_NAME, attention_function, mask_function
from .attention_modules import ModuleAttention
from .graphed_stack import GraphedStack, capture_dtype
from .call_state import EncoderCall, current_encoder_call, current_host_mask, encoder_call, update_encoder_call
from .patching import (
    Calls,
    InstanceForward,
    LogOnce,
    bind,
    check_requires,
    existing_path,
    flat_arguments,
    has_path,
    resolve,
)


@dataclass(frozen=True)
class EncoderLayout:
    """Where a BERT-shaped encoder keeps its pieces, as attribute paths.

    ``encoder`` is relative to the base model; ``layers``, ``pre`` and ``final_norm`` to the encoder; every
    other path to one layer. A post-LayerNorm layer (BERT) computes::

        a = LN1(dropout(o(attention(q(x), k(x), v(x)))) + x)
        y = LN2(dropout(ffn_out(act(ffn_in(a)))) + a)

    and a pre-LayerNorm layer (``pre_norm=True``: RoBERTa-PreLayerNorm, XLM-RoBERTa-XL, Megatron-BERT)::

        a = x + dropout(o(attention(LN1(x))))
        y = a + dropout(ffn_out(act(ffn_in(LN2(a)))))

    A path may name alternatives, ``"a|b"``: the first that exists in the layer (a module that moved between
    transformers releases).
    """

    encoder: str = "encoder"
    layers: str = "layer"
    q: str = "attention.self.query"
    k: str = "attention.self.key"
    v: str = "attention.self.value"
    attn_dropout: str | None = "attention.self.dropout"
    o: str = "attention.output.dense"
    o_dropout: str | None = "attention.output.dropout"
    ln1: str = "attention.output.LayerNorm"
    ffn_in: str = "intermediate.dense"
    act: str = "intermediate.intermediate_act_fn"
    ffn_out: str = "output.dense"
    ffn_dropout: str | None = "output.dropout"
    ln2: str = "output.LayerNorm"
    num_heads: str = "num_attention_heads"  # a config attribute
    # A position-wise module the encoder applies before its layers (ALBERT's embedding projection).
    pre: str | None = None
    pre_norm: bool = False
    # A LayerNorm the encoder applies after its last layer (pre-LayerNorm encoders).
    final_norm: str | None = None
    # The layers in execution order, when ``layers`` is not a plain list (ALBERT shares layers between steps).
    layer_order: Callable[[nn.Module], list[nn.Module]] | None = None
    # (encoder, positions (B, L) int64) -> additive attention bias (B, H, L, L), for relative positions (MPNet).
    relative_bias: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # (encoder, positions (T,) int64) -> (sin (T, D/2), cos (T, D/2), rotate values too): rotary positions applied to
    # each layer's queries and keys (RoFormer), by each token's position in its padded row, as the stock model does.
    rotary: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, bool]] | None = None
    # Config flags that change the layer's math away from the shape above, each with the value we support.
    requires: tuple[tuple[str, Any], ...] = (("is_decoder", False), ("add_cross_attention", False))
    # The module whose forward takes the padding mask, relative to the base model, when it is not the base model
    # itself: an encoder-decoder's encoder (the base model's mask also feeds the decoder's cross-attention).
    entry: str | None = None
    # The encoder's own forward computes the embeddings and then loops over ``layers`` (BART and its kin): the
    # first layer's call runs every layer packed and the others pass its result on, so the embeddings, and any
    # norm after the loop, stay the stock code's. Inference only (their dropouts are plain floats).
    loop: bool = False
    # The entry's own forward reads the padding mask before the layers (wav2vec2 zeroes the padded frames before its
    # positional convolution): it keeps the mask, rather than leaving it to the packed layers alone.
    keep_mask: bool = False
    # fp16 overflow guard after each layer, as the stock layer applies it (``_clamp_fp16``'s forms); None: none.
    clamp_fp16: str | None = None
    # A layer of another shape than the BERT one above (T5's): the class that runs it on packed tokens.
    layer_class: type[PackedLayer] | None = None
    # In a ``loop`` layout, what a stock layer returns, made from the hidden states (T5's blocks return a tuple).
    layer_output: Callable[[torch.Tensor], Any] | None = None
    # In a ``loop`` layout, the layers take (seq, batch, hidden) states (FSMT's fairseq layout).
    seq_first: bool = False
    # An encoder-decoder's decoder self-attention bias in a decode step (T5's relative positions):
    # (decoder, current slot (1,) int64, slots S) -> (1, H, 1, S) additive bias.
    decoder_bias: Callable[[nn.Module, torch.Tensor, int], torch.Tensor] | None = None
    # An encoder-decoder's decoder modules that compute attention themselves (no attention interface: FSMT's), each
    # routed through ours by its forward (``attention_modules``), so that generate's decode steps reach the static
    # buffers; also any module whose stock forward a decode step cannot run on the device (FSMT's positions,
    # ProphetNet's whole decoder).
    decoder_modules: tuple[ModuleAttention, ...] = ()
    # Classes of RMS-norm modules (T5's) that, anywhere in the model (the decoder too), run as one fused kernel in
    # fp16/bf16 inference on CUDA (``ops.fused.rms_norm``), and as their own forward otherwise.
    rms_norms: tuple[str, ...] = ()
    # A module (relative to the base model) whose 1D convolutions (zero padding, no dilation) run as matrix products
    # in fp16/bf16 inference on CUDA (``ops.fused.conv1d_gemm``): wav2vec2's positional convolution, which cuDNN runs
    # slowly in fp16.
    gemm_convolutions: str | None = None
    # Attention is causal inside each sequence (CLIP's text tower, whose encoder is called with is_causal=True).
    causal: bool = False
    # The encoder's attention dropout is a plain float (not a module): training runs its own layers. (``loop``
    # layouts always do.)
    stock_training: bool = False
    # Position-wise modules that scale the attention's and the feed-forward's output before each residual add
    # (DINOv2's LayerScale), relative to one layer.
    attn_scale: str | None = None
    ffn_scale: str | None = None
    # The feed-forward module, run whole (its own forward on the packed tokens) in the layers that have no ``ffn_in``:
    # a feed-forward of another shape (DINOv2's SwiGLU MLP).
    ffn: str | None = None
    # Keyword arguments of the encoder's forward the packed path takes (YOLOS's image height and width), passed to
    # ``mid_positions``; any other argument runs the stock encoder.
    encoder_kwargs: tuple[str, ...] = ()
    # (encoder, its call's keyword arguments) -> position embeddings (L - 1, S, hidden) added to the states after every
    # layer but the last, by each token's position in its padded row (YOLOS's mid-position embeddings), or None.
    mid_positions: Callable[[nn.Module, dict[str, Any]], torch.Tensor | None] | None = None
    # Something reads every position, padded ones too (DINOv2's image classifier averages all patches): a batch with
    # padding runs stock.
    reads_padding: bool = False
    # A module (relative to the base model) whose forward returns (embeddings, their (batch, seq) padding mask): the
    # packed layers take that mask rather than the base model's (ViLT's embeddings append the image patches and
    # their mask to the text's). The base model's forward keeps its mask (the module reads it).
    embedding_mask: str | None = None


# The encoder call whose layers the first layer of a ``loop`` layout ran packed (the later layers pass on its result).
_LOOPED: contextvars.ContextVar[EncoderCall | None] = contextvars.ContextVar("bettertransformer_looped", default=None)


def _rate(dropout: Any) -> float:
    """The drop probability a dropout module applies now (0 in eval mode or without one)."""
    return float(dropout.p) if dropout is not None and dropout.training else 0.0


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _is_exact_gelu(act: Any) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _output_type(forward: Callable) -> type:
    """The ModelOutput class the stock encoder forward returns (read off its annotation). Without one, the output
    class of BERT-style encoders, whose fields (cache, cross-attentions) the base models read."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Default
    from transformers.utils import ModelOutput

    annotation = inspect.signature(forward).return_annotation
    if isinstance(annotation, str):
        function = inspect.unwrap(getattr(forward, "__func__", forward))  # the model file's own function
        try:
            annotation = eval(annotation, getattr(function, "__globals__", {}))  # noqa: S307
        except Exception:
            return Default
    candidates = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    for cls in candidates:
        if isinstance(cls, type) and issubclass(cls, ModelOutput):
            return cls
    return Default


_Rotary = tuple[torch.Tensor, torch.Tensor, bool]  # sin (T, D/2), cos (T, D/2), rotate the values too


# A layer's projection parameters cast for a captured stack, by name: (weight, bias) copies (``_Stack``).
Halves = dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None


class PackedLayer:
    """One stock encoder layer, run on packed tokens with its own parameters (never copies of them)."""

    _LINEARS: tuple[str, ...] = ("q", "k", "v", "o", "ffn_in", "ffn_out")
    _NORMS: tuple[str, ...] = ("ln1", "ln2")

    def __init__(self, layer: nn.Module, layout: EncoderLayout, num_heads: int):
        self.layer = layer
        whole_ffn = layout.ffn is not None and not has_path(layer, layout.ffn_in)
        # The projections this layer reads (a feed-forward run whole has none of its own here).
        self.linears = ("q", "k", "v", "o") if whole_ffn else self._LINEARS
        ffn = ("ffn",) if whole_ffn else ("act", "ffn_dropout")
        names = (*self.linears, *self._NORMS, *ffn, "attn_dropout", "o_dropout", "attn_scale", "ffn_scale")
        paths = {name: self._path(getattr(layout, name)) for name in names}
        modules = {name: self._resolve(path) for name, path in paths.items()}
        self.q, self.k, self.v, self.o = (modules[n] for n in ("q", "k", "v", "o"))
        self.ffn_in: Any = modules.get("ffn_in")
        self.ffn_out: Any = modules.get("ffn_out")
        self.ffn: Any = modules.get("ffn")
        self.ln1, self.ln2 = modules["ln1"], modules["ln2"]
        self.act: Any = modules.get("act")
        self.attn_dropout, self.o_dropout = modules["attn_dropout"], modules["o_dropout"]
        self.ffn_dropout: Any = modules.get("ffn_dropout")
        self.attn_scale, self.ffn_scale = modules["attn_scale"], modules["ffn_scale"]
        # (parent module, attribute, child) for every module this layer reads, to notice later swaps cheaply.
        self._slots: list[tuple[nn.Module, str, nn.Module]] = []
        for name, path in paths.items():
            child = modules[name]
            if isinstance(child, nn.Module):
                assert path is not None
                parent_path, _, attr = path.rpartition(".")
                self._slots.append((self._resolve(parent_path) if parent_path else layer, attr, child))
        self.exact_gelu = _is_exact_gelu(self.act)
        # A post-norm layer of the BERT form, captured for training, runs one dropout+residual+LayerNorm kernel per
        # sublayer. Only when captured: eager training waits on the host, and Triton's launches cost more host time
        # than the PyTorch kernels they replace (H200: eager steps 26.2-26.9 -> 29.4-31.5 ms with them).
        self.fused_norms = (
            not layout.pre_norm
            and self.attn_scale is None
            and self.ffn_scale is None
            and self.ffn is None
            and all(d is None or type(d) is nn.Dropout for d in (self.o_dropout, self.ffn_dropout))
            and all(
                isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None
                for n in (self.ln1, self.ln2)
            )
        )
        self.pre_norm = layout.pre_norm
        self.causal = layout.causal
        self._heads(num_heads)

    def _heads(self, num_heads: int) -> None:
        """The attention's head shape and scale, and which projections run fused (``q``, ``k``, ``v`` read)."""
        self.num_heads = num_heads
        self.head_dim = self.q.out_features // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self._qkv_cache: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        # Plain nn.Linear projections run fused (one QKV product, GELU in the FFN-in product); others (LoRA,
        # quantized) run their own forward.
        self.plain = {name: type(getattr(self, name)).forward is nn.Linear.forward for name in self.linears}
        self.fused_qkv = all(self.plain[name] for name in ("q", "k", "v"))

    def _path(self, path: str | None) -> str | None:
        """``path`` in this layer, the alternative that exists when it names several."""
        return None if path is None else existing_path(self.layer, path)

    def _resolve(self, path: str | None) -> Any:
        return None if path is None else resolve(self.layer, path)

    def unsupported(self) -> str | None:
        """Why this layer's modules cannot run packed, or None.

        A projection that is not a plain ``nn.Linear`` but maps features like one (a PEFT LoRA layer, a quantized
        linear: it has ``in_features`` and ``out_features``) runs its own forward on the packed tokens, unfused."""
        for name in self.linears:
            module = getattr(self, name)
            if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
                return f"{name} is a {type(module).__name__}, not a linear projection"
        for name in self._NORMS:
            module = getattr(self, name)
            if type(module).forward is not nn.LayerNorm.forward:
                return f"{name} is a {type(module).__name__}, not a plain nn.LayerNorm"
        return None

    def is_current(self) -> bool:
        """False once someone swapped a module of the layer (adapters applied after transform, say).

        Checks each module's entry in its parent's ``_modules`` (a dict lookup, not ``nn.Module.__getattr__``).
        """
        return all(parent._modules.get(attr) is child for parent, attr, child in self._slots)

    @property
    def device(self) -> torch.device:
        """Where this layer's parameters live."""
        return self.ln1.weight.device

    def qkv_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused (3 * H * D, hidden) projection: a derived cache, rebuilt whenever a source tensor changes.

        When a gradient is needed it is concatenated on the fly, so that autograd reaches the stock parameters.
        """
        linears = (self.q, self.k, self.v)
        params = [m.weight for m in linears] + [m.bias for m in linears if m.bias is not None]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._concat(linears)
        if any(p.is_inference() for p in params):  # made under inference_mode: no version counter to key a cache by
            with torch.no_grad():
                return self._concat(linears)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._qkv_cache is None or self._qkv_cache[0] != key:
            with torch.no_grad():
                self._qkv_cache = (key, *self._concat(linears))
        return self._qkv_cache[1], self._qkv_cache[2]

    @staticmethod
    def _concat(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = torch.cat([m.weight for m in linears])
        if all(m.bias is None for m in linears):
            return weight, None
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
        return weight, bias

    def clear_cache(self) -> None:
        """Drop the cached fused QKV weight."""
        self._qkv_cache = None

    def __call__(
        self,
        x: torch.Tensor,
        info: PackInfo,
        bias: torch.Tensor | None,
        rotary: _Rotary | None = None,
        halves: Halves = None,
    ) -> torch.Tensor:
        """x: (T, hidden) -> (T, hidden). ``halves``: the projections' parameters already cast by a captured stack
        (``half_sources``)."""
        if self.pre_norm:
            a = x + self._attention(_layer_norm(x, self.ln1), info, bias, rotary, halves=halves)
            return a + self._ffn(_layer_norm(a, self.ln2), halves=halves)
        if self.fused_norms and bias is None and rotary is None:
            half = capture_dtype()
            if half is not None:
                return self.fused_pair(x, None, info, half, halves)[0]
        a = self._attention(x, info, bias, rotary, halves=halves)
        x = add_layer_norm(a, x, self.ln1.weight, self.ln1.bias, self.ln1.eps, reuse_x=True)
        return add_layer_norm(
            self._ffn(x, halves=halves), x, self.ln2.weight, self.ln2.bias, self.ln2.eps, reuse_x=True
        )

    def fused_pair(
        self, x: torch.Tensor, x_half: torch.Tensor | None, info: PackInfo, half: torch.dtype, halves: Halves = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A post-norm layer of the BERT form while its stack is captured (``fused_norms``): one dropout+residual+
        LayerNorm kernel per sublayer, each handing on its output and that output in ``half`` (what the next
        product reads, so no product casts its input). ``x_half``: x in ``half``, or None (cast by the product);
        ``halves``: the projections' parameters already cast (``half_sources``)."""
        a = self._attention(x if x_half is None else x_half, info, None, None, tail=True, halves=halves)
        x, x_half = dropout_add_layer_norm_pair(
            a, x, self.ln1.weight, self.ln1.bias, self.ln1.eps, _rate(self.o_dropout), half, self._tail_bias("o")
        )  # fmt: skip
        h = self._ffn(x_half, tail=True, halves=halves)
        return dropout_add_layer_norm_pair(
            h, x, self.ln2.weight, self.ln2.bias, self.ln2.eps, _rate(self.ffn_dropout), half, self._tail_bias("ffn_out")
        )  # fmt: skip

    def _tail_bias(self, name: str) -> torch.Tensor | None:
        """The bias of the sublayer's last product whose gradient the fused norm after it computes (``_linear``
        leaves it out for a plain projection; another module computes its own)."""
        return getattr(self, name).bias if self.plain[name] else None

    def half_sources(self) -> dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        """The plain projections' (weights, biases) a captured stack casts for the layer at once, by name: ``qkv``
        (q, k and v stacked: their biases all or none), ``o``, ``ffn_in``, ``ffn_out``."""
        sources = {}
        if self.fused_qkv:
            linears = (self.q, self.k, self.v)
            biases = tuple(m.bias for m in linears if m.bias is not None)
            if len(biases) in (0, 3):
                sources["qkv"] = (tuple(m.weight for m in linears), biases)
        for name in ("o", "ffn_in", "ffn_out"):
            module = getattr(self, name)
            if self.plain.get(name):
                sources[name] = ((module.weight,), () if module.bias is None else (module.bias,))
        return sources

    def _attention(
        self,
        x: torch.Tensor,
        info: PackInfo,
        bias: torch.Tensor | None,
        rotary: _Rotary | None,
        tail: bool = False,
        halves: Halves = None,
    ) -> torch.Tensor:
        """dropout(o(attention(q(x), k(x), v(x)))), x: (T, hidden). ``tail``: the output's dropout, and its bias's
        gradient, left to the caller (a fused dropout+residual+LayerNorm, ``fused_pair``)."""
        tokens = x.shape[0]
        half = capture_dtype()
        if self.fused_qkv:
            if half is not None and halves is not None and "qkv" in halves:  # q, k, v stacked, cast by the stack
                linears = (self.q, self.k, self.v)
                biases = tuple(m.bias for m in linears) if self.q.bias is not None else None
                qkv = half_linear(x, tuple(m.weight for m in linears), biases, half, *halves["qkv"])
            else:
                weight, b = self.qkv_parameters()
                qkv = F.linear(x, weight, b) if half is None else half_linear(x, weight, b, half)
            q, k, v = qkv.view(tokens, 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, D) each
        else:
            q, k, v = (m(x).view(tokens, self.num_heads, self.head_dim) for m in (self.q, self.k, self.v))
        if rotary is not None:
            sin, cos, values = rotary
            q, k = rotate_pairs(q, sin, cos), rotate_pairs(k, sin, cos)
            v = rotate_pairs(v, sin, cos) if values else v
        p = _rate(self.attn_dropout)
        ctx = packed_attention(q, k, v, info, scale=self.scale, dropout_p=p, bias=bias, causal=self.causal)  # (T, H, D)
        a = self._linear("o", ctx.reshape(tokens, -1), halves, bias_grad=not tail)
        if not tail and self.o_dropout is not None and self.o_dropout.training:
            a = self.o_dropout(a)
        return a if self.attn_scale is None else self.attn_scale(a)

    def _linear(self, name: str, x: torch.Tensor, halves: Halves = None, bias_grad: bool = True) -> torch.Tensor:
        """The projection ``name`` of x (T, in): F.linear with a plain module's parameters (``half_linear`` while a
        training stack is captured, with the copies in ``halves`` when it holds them, and without the bias's
        gradient unless ``bias_grad``), else the module's own forward."""
        module = getattr(self, name)
        if not self.plain[name]:
            return module(x)
        half = capture_dtype()
        if half is None:
            return F.linear(x, module.weight, module.bias)
        half_weight, half_bias = halves.get(name, (None, None)) if halves is not None else (None, None)
        return half_linear(x, module.weight, module.bias, half, half_weight, half_bias, bias_grad=bias_grad)

    def _ffn(self, x: torch.Tensor, tail: bool = False, halves: Halves = None) -> torch.Tensor:
        """dropout(ffn_out(act(ffn_in(x)))), or the feed-forward module run whole; scaled by ``ffn_scale``.
        ``tail``: as ``_attention``'s."""
        if self.ffn is not None:
            h = self.ffn(x)
        else:
            if self.exact_gelu and self.plain["ffn_in"] and capture_dtype() is None:
                h = linear_gelu(x, self.ffn_in.weight, self.ffn_in.bias)
            else:
                h = self.act(self._linear("ffn_in", x, halves))
            h = self._linear("ffn_out", h, halves, bias_grad=not tail)
            if not tail and self.ffn_dropout is not None and self.ffn_dropout.training:
                h = self.ffn_dropout(h)
        return h if self.ffn_scale is None else self.ffn_scale(h)


class T5Layer(PackedLayer):
    """A T5 encoder block on packed tokens: its RMS norm, attention with no 1/sqrt(d) scale and the encoder's
    relative-position bias (computed once per call, as the stock stack shares the first block's), residual; its RMS
    norm, its feed-forward module run whole (it keeps T5's fp32 output projection in fp16 models), residual; T5's fp16
    guard after each sublayer. The norms and the feed-forward are position-wise modules: their own forwards run on
    the packed tokens."""

    _LINEARS = ("q", "k", "v", "o")
    _NORMS = ()  # T5's RMS norms run their own forward

    def __init__(self, layer: nn.Module, layout: EncoderLayout, num_heads: int):
        self.layer = layer
        block: Any = layer
        attention, feed_forward = block.layer[0], block.layer[-1]
        self.q, self.k, self.v, self.o = (getattr(attention.SelfAttention, n) for n in ("q", "k", "v", "o"))
        self.ln1, self.ln2, self.ffn = attention.layer_norm, feed_forward.layer_norm, feed_forward.DenseReluDense
        self._slots = [(attention.SelfAttention, n, getattr(attention.SelfAttention, n)) for n in ("q", "k", "v", "o")]
        self._slots += [(attention, "layer_norm", self.ln1), (feed_forward, "layer_norm", self.ln2)]
        self._slots.append((feed_forward, "DenseReluDense", self.ffn))
        self.attn_dropout = self.o_dropout = None  # training runs the stock blocks (loop layout)
        self.attn_scale = self.ffn_scale = None
        self.linears = self._LINEARS
        self._heads(num_heads)
        self.scale = 1.0  # T5 scales its attention logits not at all
        self.pre_norm = True
        self.causal = False
        # T5's ReLU feed-forward of plain products runs as two products here (saving its modules' calls: the
        # encoder is host-bound on the GPU); other feed-forwards (mT5's gated one, adapters) run their own forward.
        ffn: Any = self.ffn
        self.plain_ffn = (
            type(ffn).__name__ == "T5DenseActDense" and isinstance(ffn.act, nn.ReLU)
            and all(type(m).forward is nn.Linear.forward and m.bias is None for m in (ffn.wi, ffn.wo))
        )  # fmt: skip

    def unsupported(self) -> str | None:
        problem = super().unsupported()
        block: Any = self.layer
        if problem is None and (getattr(block, "is_decoder", False) or len(block.layer) != 2):
            return "a decoder block (cross-attention)"
        return problem

    def __call__(
        self,
        x: torch.Tensor,
        info: PackInfo,
        bias: torch.Tensor | None,
        rotary: _Rotary | None = None,
        halves: Halves = None,
    ) -> torch.Tensor:
        # The norms' kernel called directly (the encoder is host-bound): the module itself is the fallback. (No
        # ``halves``: a T5 stack is not captured.)
        x = _clamp_fp16(x + self._attention(_fused_rms_norm(self.ln1, self.ln1, x), info, bias, rotary), "inf")
        return _clamp_fp16(x + self._feed_forward(_fused_rms_norm(self.ln2, self.ln2, x)), "inf")

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plain_ffn:
            return self.ffn(x)
        ffn: Any = self.ffn
        h = F.linear(x, ffn.wi.weight).relu_()
        return F.linear(h.to(ffn.wo.weight.dtype), ffn.wo.weight)  # T5 may keep wo in fp32 in fp16 models


# Why a batch runs stock when its model reads where it has padding (``EncoderLayout.reads_padding``).
_PADDING_READ = (
    "padding in a model that reads every position (a head averaging them all): stock computes states there; the "
    "padding-free path would leave zeros"
)


class _StockBatch(Exception):
    """Raised by the packed path when the batch's padding lies where the model reads: the stock computation runs."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Restart(Exception):
    """Raised by the encoder when a call whose mask was withheld from the stock model must run stock."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Encoder arguments the packed path may ignore whatever their value: positions are already in the embeddings,
# an encoder that is not a decoder (see EncoderLayout.requires) keeps no cache whatever use_cache says, and
# num_items_in_batch (Trainer's) only scales a loss.
_IGNORED_KWARGS = frozenset({"position_ids", "token_type_ids", "return_dict", "use_cache", "num_items_in_batch"})


# Task heads that read the state at position 0 (directly or through the pooler).
_FIRST_POSITION_HEADS = (
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
    "ForPreTraining",
)


def _reads_first_position(base: nn.Module, root: nn.Module) -> bool:
    """Whether something reads position 0 of the encoder's output: the base model's pooler, or a task head."""
    if getattr(base, "pooler", None) is not None:
        return True
    return any(
        type(m).__name__.endswith(_FIRST_POSITION_HEADS) and getattr(m, "base_model", None) is base
        for m in root.modules()
    )


def warn_left_padding(log: LogOnce, model_name: str) -> None:
    """Once per model: its pooler or head reads position 0, a pad position in this left-padded batch."""
    log(
        "left padding", "%s reads position 0 (a pooler or classification head), which this batch's left padding "
        "makes a pad position: stock computes a state for the pad token there, bettertransformer leaves zeros; "
        "neither is meaningful. Pad on the right (tokenizer.padding_side = 'right').",
        model_name, level=logging.WARNING,
    )  # fmt: skip


class _Stack:
    """The packed layers run one after another, and their captured training graphs (None where the layers'
    parameters are not plain tensors on one device: sharded, quantized or spread over GPUs)."""

    def __init__(self, layers: list[PackedLayer]):
        self.layers = layers
        modules = [packed.layer for packed in layers]
        params = [p for m in modules for p in m.parameters()]
        devices = {p.device for p in params}
        head_dim = layers[0].head_dim
        capturable = (
            all(type(p) is nn.Parameter for p in params)
            and len(devices) == 1
            and head_dim % 8 == 0
            and head_dim <= 256  # flash attention's range
            # Only plain nn.Linear projections: another module's forward (PEFT LoRA, quantized) may branch on state
            # a graph would bake in (adapters disabled or merged).
            and all(all(packed.plain.values()) for packed in layers)
            and type(layers[0]).__call__ is PackedLayer.__call__
        )
        self.device = devices.pop() if len(devices) == 1 else None
        self.graphs = GraphedStack(self.run, modules) if capturable else None
        self.dropouts = [
            m for module in modules for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)
        ]

    def run(self, x: torch.Tensor, info: PackInfo) -> torch.Tensor:
        half = capture_dtype()
        if half is None:
            for packed in self.layers:
                x = packed(x, info, None, None)
            return x
        copies = self._half_parameters(half)  # captured: the products read copies cast once for the whole stack
        if all(packed.fused_norms for packed in self.layers):
            x_half = None  # the layers hand each other their outputs in both dtypes (``PackedLayer.fused_pair``)
            for packed, halves in zip(self.layers, copies, strict=True):
                x, x_half = packed.fused_pair(x, x_half, info, half, halves)
            return x
        for packed, halves in zip(self.layers, copies, strict=True):
            x = packed(x, info, None, None, halves)
        return x

    def _half_parameters(self, half: torch.dtype) -> list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
        """Every layer's projection weights and biases (``PackedLayer.half_sources``) cast to ``half`` by one
        multi-tensor copy into one buffer (as autocast would cast them, ~100 small casts and a q|k|v concatenation
        per step for BERT-base): per layer, by name, the (weight, bias) copies, q, k and v stacked."""
        sources = [packed.half_sources() for packed in self.layers]
        tensors = [t for layer in sources for weights, biases in layer.values() for t in (*weights, *biases)]
        if not tensors:
            return [{} for _ in sources]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=half, device=tensors[0].device)
        start = 0

        def block(group: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
            """The next stretch of ``flat``, as ``group`` stacked along its first dimension."""
            nonlocal start
            if not group:
                return None
            size = sum(t.numel() for t in group)
            start += size
            return flat[start - size : start].view(sum(t.shape[0] for t in group), *group[0].shape[1:])

        copies = [{name: (block(w), block(b)) for name, (w, b) in layer.items()} for layer in sources]
        views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]
        with torch.no_grad():
            torch._foreach_copy_(views, tensors)
        return copies  # type: ignore[return-value]  # every group of weights is non-empty

    def trains(self) -> bool:
        """Some layer parameter takes a gradient."""
        assert self.graphs is not None
        return any(p.requires_grad for p in self.graphs.params)

    def checkpointed(self) -> bool:
        return any(getattr(packed.layer, "gradient_checkpointing", False) for packed in self.layers)

    def state(self) -> tuple:
        """What the captured graphs bake in besides shapes: the dropouts' modes and rates."""
        return tuple((m.training, m.p) for m in self.dropouts)


class PackedEncoder:
    """The padding-free forward of one base model's encoder."""

    def __init__(self, base: nn.Module, layout: EncoderLayout, root: nn.Module | None = None):
        config: Any = base.config
        check_requires(config, layout.requires, "padding-free path")
        self.base = base
        self.layout = layout
        standalone = layout.entry is not None and not hasattr(base, layout.entry.split(".")[0])
        # An encoder-decoder's encoder transformed on its own is its own entry and encoder.
        self.encoder: nn.Module = base if standalone else resolve(base, layout.encoder)
        if layout.loop and any(hasattr(m, "encoder_attn") for m in resolve(self.encoder, layout.layers)):
            raise NotImplementedError(f"{config.model_type}: these are decoder layers (cross-attention)")
        self.layers = self._build_layers()
        problem = self._unsupported()
        if problem:
            raise NotImplementedError(f"{config.model_type}: {problem}")
        self.pre = resolve(self.encoder, layout.pre) if layout.pre else None
        self.final_norm = resolve(self.encoder, layout.final_norm) if layout.final_norm else None
        self._previous_attention: Any = None
        self._stack: _Stack | None = None
        self._switched = False
        self.calls = Calls()
        self.log = LogOnce()
        self.entry: nn.Module = resolve(base, layout.entry) if layout.entry and not standalone else base
        self._signature = inspect.signature(self.entry.forward)
        self._patches: list[InstanceForward] = []
        self.output_type = _output_type(self.encoder.forward)
        self.reads_first = _reads_first_position(base, root if root is not None else base)
        self.model_name = type(root if root is not None else base).__name__
        self.generation = self._generation(root if root is not None else base)
        generation = ("fast generate", "stock generate", "generic steps")
        self.counted = ("fast", "stock") + (generation if self.generation else ())
        # The two calls torch.compile leaves whole (see their docstrings). Wrapped here, not by decorators: the wrapper
        # imports torch._dynamo (~1 s, which `bettertransformer list` need not pay; a model built by transformers has
        # imported it already).
        self._base_forward_uncompiled = torch.compiler.disable(self.base_forward)
        self._packed_uncompiled = torch.compiler.disable(self._packed)

    def _generation(self, root: nn.Module) -> Any:
        """An encoder-decoder's fast ``generate`` (``seq2seq_generation``), on its LM head: the base model itself
        (T5) or the transformers model that owns it; None for an encoder alone."""
        from transformers import PreTrainedModel

        from .seq2seq_generation import Seq2SeqGenerate

        base = self.base
        if self.layout.entry is None or not getattr(base.config, "is_encoder_decoder", False):
            return None
        candidates: list[Any] = [base]
        candidates += [m for m in root.modules() if isinstance(m, PreTrainedModel) and m.base_model is base]
        for head in candidates:
            if callable(getattr(head, "generate", None)) and head.get_output_embeddings() is not None:
                bias = self.layout.decoder_bias
                decoder = head.get_decoder()
                routed = self.layout.decoder_modules
                if not routed and not isinstance(decoder, PreTrainedModel):  # no config, no attention interface
                    return None
                self_bias = None if bias is None else lambda state: bias(decoder, state.slot, state.kv[0].shape[3])
                return Seq2SeqGenerate(head, self.calls, self_bias, routed)
        return None

    def _build_layers(self) -> list[PackedLayer]:
        layout = self.layout
        stock = layout.layer_order(self.encoder) if layout.layer_order else list(resolve(self.encoder, layout.layers))
        num_heads = getattr(self.base.config, layout.num_heads)
        unique: dict[int, PackedLayer] = {}  # ALBERT runs one layer module many times: one PackedLayer for it
        kind = layout.layer_class or PackedLayer
        return [unique.setdefault(id(m), kind(m, layout, num_heads)) for m in stock]

    def _layers_changed(self) -> str | None:
        """Re-read the layers if someone swapped modules since transform; say why they cannot run packed."""
        if all(layer.is_current() for layer in self.layers):
            return None
        self.layers = self._build_layers()
        return self._unsupported()

    def _unsupported(self) -> str | None:
        """The first reason a layer's modules cannot run packed, or None."""
        return next((p for p in (layer.unsupported() for layer in self.layers) if p), None)

    # -- installing and removing ----------------------------------------------------------------------------
    def attach(self) -> None:
        """Wrap the base model's and the encoder's forward. A model on SDPA is switched to our attention function,
        which computes what SDPA computes and, unlike SDPA, returns exact attention weights when the stock forward
        runs for ``output_attentions`` (as eager does). Other implementations are the user's choice, kept as is."""
        config: Any = self.base.config
        self._previous_attention = config._attn_implementation
        if self._previous_attention == "sdpa":
            register_attention(ATTENTION_NAME, attention_function, mask_function)
            self._switched = set_attention(self.base, ATTENTION_NAME)
        self._patches = [InstanceForward(self.entry, self._base_forward_uncompiled)]
        if self.layout.loop:
            stock = list(resolve(self.encoder, self.layout.layers))
            self._patches.append(InstanceForward(stock[0], self._run_layers))
            self._patches += [InstanceForward(layer, self._pass_on) for layer in stock[1:]]
        else:
            self._patches.append(InstanceForward(self.encoder, self.forward))
        if self.layout.embedding_mask is not None:
            self._patches.append(InstanceForward(resolve(self.base, self.layout.embedding_mask), self._embedding_mask))
        self._patches += [
            InstanceForward(module, functools.partial(_fused_rms_norm, module))
            for module in self.base.modules()
            if type(module).__name__ in self.layout.rms_norms
        ]
        if self.layout.gemm_convolutions is not None:
            convolutions = resolve(self.base, self.layout.gemm_convolutions).modules()
            self._patches += [
                InstanceForward(module, functools.partial(_gemm_conv1d, module))
                for module in convolutions
                if isinstance(module, nn.Conv1d) and isinstance(module.padding, tuple) and module.dilation == (1,)
                and module.padding_mode == "zeros"
            ]  # fmt: skip
        if self.generation is not None:
            self.generation.attach()

    def detach(self) -> None:
        """Restore both forwards and the attention implementation; drop the fused weights."""
        if self.generation is not None:
            self.generation.detach()
        for patch in reversed(self._patches):
            patch.restore()
        self._patches = []
        if self._switched:
            config: Any = self.base.config
            config._attn_implementation = self._previous_attention
        for layer in self.layers:
            layer.clear_cache()
        self._stack = None

    def base_forward(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward, with this call's padding mask held for the encoder while it runs.

        When the packed path will likely run, the stock forward gets ``attention_mask=None``: the encoder reads
        the mask from here, and transformers need not build (and sync on) its 4D version. If the encoder then
        finds the call needs the stock computation after all, it raises ``_Restart`` and the call reruns stock
        with the user's mask.

        Left out of ``torch.compile`` whole (a model around it, a classifier head, still compiles): the packed
        layers are ours already, and traced, this forward lost its overlap of the row lengths' read with the
        embeddings and broke graphs at the call state (a ContextVar) and the call counter's lock; compiled
        inference of BERT-base ran 7% slower than eager (BENCHMARKS.md).
        """
        call, bound = self._describe_call(args, kwargs)
        run_args, run_kwargs = args, kwargs
        keep = self.layout.keep_mask or self.layout.embedding_mask is not None
        if (
            call.blocked is None
            and call.mask is not None
            and bound is not None
            and not keep
            and not output_capture_active()
        ):
            bound.arguments["attention_mask"] = None
            run_args, run_kwargs = bound.args, bound.kwargs
            # Start counting the real tokens now; the encoder collects the result after the embeddings are queued.
            mask = call.mask
            host = current_host_mask()
            host = host if host is not None and tuple(host.shape) == tuple(mask.shape) else None
            pending = PendingPack(mask, mask.shape[0], mask.shape[1], self.layers[0].q.weight.device, host)
            call = replace(call, mask_dropped=True, pending=pending)
        try:
            with encoder_call(call):
                return stock(*run_args, **run_kwargs)
        except _Restart as restart:
            with encoder_call(replace(call, blocked=restart.reason, mask_dropped=False, pending=None)):
                return stock(*args, **kwargs)

    def _describe_call(self, args: tuple, kwargs: dict) -> tuple[EncoderCall, inspect.BoundArguments | None]:
        bound = bind(self._signature, args, kwargs)
        if bound is None:
            return EncoderCall(id(self), None, "arguments the base model's signature does not take"), None
        arguments = flat_arguments(bound)
        mask = arguments.get("attention_mask")
        blocked = None
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            blocked = "an attention_mask that is not a (batch, seq) padding mask"
        if arguments.get("head_mask") is not None:
            blocked = "head_mask"
        for flag in ("output_attentions", "output_hidden_states"):
            value = arguments.get(flag)
            if value is None:
                value = getattr(self.base.config, flag, False)
            if value:
                blocked = flag
        if "attention_mask" not in bound.arguments:  # passed through **kwargs: leave the call as it is
            if mask is not None:  # a forward that does not name it may ignore it (YOLOS; DINOv2 before 5.24)
                blocked = "an attention_mask the base model's forward does not name"
            return EncoderCall(id(self), mask, blocked), None
        return EncoderCall(id(self), mask, blocked), bound

    # -- the forward -------------------------------------------------------------------------------------------
    def _stock_reason(self, call: EncoderCall | None, hidden_states: Any, args: tuple, kwargs: dict) -> str | None:
        """Why this call must run the stock computation, or None when the packed path is exact."""
        if call is None:
            return "the encoder was called outside its base model's forward"
        if call.blocked:
            return call.blocked
        if output_capture_active():
            return "per-layer outputs are being recorded (output_hidden_states / output_attentions)"
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            return "hidden states that are not (batch, seq, hidden)"
        if any(a is not None for a in args):
            return "extra positional encoder inputs"
        for name, value in kwargs.items():
            # Labels such as sentence-transformers' modality="text" pass through the layers unused; any other
            # value (a tensor, a cache, a flag) may change what the stock layers compute.
            if name == "is_causal" and value is True and self.layout.causal:
                continue  # the attention this layout computes
            if name in self.layout.encoder_kwargs:
                continue
            if name not in _IGNORED_KWARGS and value is not None and value is not False and not isinstance(value, str):
                return f"encoder argument {name}"
        if call.mask is not None and tuple(call.mask.shape) != tuple(hidden_states.shape[:2]):
            return "an attention_mask whose shape differs from the input's"
        if (self.layout.loop or self.layout.stock_training) and self.encoder.training:
            return "training (this encoder's dropouts are plain floats: its own layers run)"
        return self._layers_changed()

    def forward(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """The encoder's forward: packed when exact, else ``stock`` (the encoder's own forward, called as we were).
        Its first argument, the hidden states, may come by name as ``hidden_states`` or ``inputs_embeds`` (CLIP's
        encoder); its second, by position or name, is the stock model's attention mask, which the packed layers do
        not read (they take the call's own)."""
        named = dict(kwargs)
        hidden_states = args[0] if args else named.pop("hidden_states", named.pop("inputs_embeds", None))
        if len(args) < 2:
            named.pop("attention_mask", None)
        call = current_encoder_call(id(self))
        reason = self._stock_reason(call, hidden_states, args[2:], named)
        if reason is None:
            assert call is not None
            try:
                out = self._packed_uncompiled(call, hidden_states, named.get("return_dict") is not False, named)
            except _StockBatch as batch:
                reason = batch.reason
            else:
                self.calls.add("fast")
                return out
        self._stock_call(call, reason, "forward")
        return stock(*args, **kwargs)

    def _stock_call(self, call: EncoderCall | None, reason: str, what: str) -> None:
        """Before a stock forward for ``reason``: restart the call when the stock model did not get its mask; else
        count and log it."""
        if call is not None and call.mask_dropped:
            raise _Restart(reason)
        self.calls.add("stock")
        self.log(reason, "stock %s %s for %s", type(self.encoder).__name__, what, reason)

    def _packed(
        self, call: EncoderCall, hidden_states: torch.Tensor, return_dict: bool, kwargs: dict[str, Any] | None = None
    ) -> Any:
        """The layers on the real tokens only (``_StockBatch`` when the batch's padding lies where the model reads).
        Left out of ``torch.compile``'s graphs: its shapes come from the
        mask's row lengths (a host read: a graph break whatever we do), and its kernels are our fused ones already,
        so the compiler has nothing to gain inside; it compiles the embeddings and the heads around it."""
        batch, seqlen, _ = hidden_states.shape
        if call.pending is not None and call.pending.device == hidden_states.device:
            info = call.pending.finish()
        else:
            info = pack_info(call.mask, batch, seqlen, hidden_states.device)
        if info.indices is not None and self.layout.reads_padding:
            raise _StockBatch(_PADDING_READ)
        if info.left_padded and self.reads_first:
            warn_left_padding(self.log, self.model_name)
        x = pack(hidden_states, info)  # (T, hidden)
        if self.pre is not None:
            x = self.pre(x)
        bias = self._relative_bias(info) if self.layout.relative_bias is not None else None
        rotary = self.layout.rotary(self.encoder, _columns(info)) if self.layout.rotary is not None else None
        mid = None if self.layout.mid_positions is None else self.layout.mid_positions(self.encoder, kwargs or {})
        graphed = self._graphed(x, info, bias, rotary, mid)
        if graphed is not None:
            x = graphed
        else:
            x, info = self._layer_loop(x, info, bias, rotary, mid)
        if self.final_norm is not None:
            x = self.final_norm(x)
        out = unpack(x, info)  # (B, S, hidden), zeros at padding
        return self.output_type(last_hidden_state=out) if return_dict else (out,)

    def _layer_loop(
        self, x: torch.Tensor, info: PackInfo, bias: torch.Tensor | None, rotary: _Rotary | None, mid: Any
    ) -> tuple[torch.Tensor, PackInfo]:
        """The packed layers one after another, eagerly; the output and its layout, on the last layer's device."""
        for i, packed in enumerate(self.layers):
            layer = packed.layer
            device = packed.device
            if device != x.device:  # layers spread over GPUs (device_map): move the tokens and their layout along
                x, info = x.to(device), info.to(device)
                bias = None if bias is None else bias.to(device)
                if rotary is not None:
                    rotary = (rotary[0].to(device), rotary[1].to(device), rotary[2])
            if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
                x = checkpoint(packed, x, info, bias, rotary, use_reentrant=False)
            else:
                x = packed(x, info, bias, rotary)
            if self.layout.clamp_fp16 is not None:
                x = _clamp_fp16(x, self.layout.clamp_fp16)
            if mid is not None and i < mid.shape[0]:
                x = _add_by_column(x, mid[i].to(x.device), info)
        return x, info

    def _graphed(self, x: torch.Tensor, info: PackInfo, bias: Any, rotary: Any, mid: Any) -> torch.Tensor | None:
        """The layers' output from the stack's captured training graphs (``graphed_stack``), or None where they do
        not apply: not a CUDA training call with flash attention, or layers with extras (biases, rotations, mid-stack
        additions, gradient checkpointing, parameters that are not plain tensors on this GPU)."""
        limit = SWITCHES.training_graphs
        if not x.is_cuda:
            self._stack = None  # the layers left the GPU: let their graphs go
            return None
        if not limit or not torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return None
        if bias is not None or rotary is not None or mid is not None or self.layout.clamp_fp16 is not None:
            return None
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
        if dtype not in (torch.float16, torch.bfloat16) or SWITCHES.attention_backend not in (None, "varlen"):
            return None
        stack = self._stack
        if stack is None or stack.layers is not self.layers or stack.device not in (None, x.device):
            stack = self._stack = _Stack(self.layers)  # new layers, or moved to another GPU
        if stack.graphs is None or stack.device != x.device or stack.checkpointed():
            return None
        if not (x.requires_grad or stack.trains()):
            return None
        if stack.graphs.busy():
            self.log("graphs busy", "a second forward before the first one's backward: run eagerly")
            return None
        out = stack.graphs(x, info, limit, stack.state())
        if out is None:  # the capture failed (logged): this stack trains eagerly from now on
            stack.graphs = None
            return None
        self.calls.add("graphed training")
        return out

    def _run_layers(self, stock: Callable, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        """The first layer's forward in a ``loop`` layout: every layer, packed, when exact (the other layers then
        pass the result on); else this layer's own forward."""
        call = current_encoder_call(id(self))
        states = (
            hidden_states.transpose(0, 1)
            if self.layout.seq_first and isinstance(hidden_states, torch.Tensor)
            else hidden_states
        )
        # The stock layers' mask (positional or by name) is not read: the packed layers take the call's own.
        masks = ("attention_mask", "encoder_padding_mask")
        reason = self._stock_reason(call, states, (), {k: v for k, v in kwargs.items() if k not in masks})
        packed = None
        if reason is None:
            assert call is not None
            try:
                packed = self._packed_uncompiled(call, states, return_dict=False)
            except _StockBatch as batch:
                reason = batch.reason
        if reason is not None:
            self._stock_call(call, reason, "layers")
            return stock(hidden_states, *args, **kwargs)
        self.calls.add("fast")
        assert call is not None and packed is not None
        out = packed[0].transpose(0, 1) if self.layout.seq_first else packed[0]
        _LOOPED.set(call)
        return self._as_layer_output(out)

    def _embedding_mask(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """The forward of the ``embedding_mask`` module: the (embeddings, padding mask) it returns, the mask made the
        call's own for the packed layers."""
        out = stock(*args, **kwargs)
        call = current_encoder_call(id(self))
        mask = out[1] if isinstance(out, tuple) and len(out) == 2 else None
        if call is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2 and call.pending is None:
            update_encoder_call(call, mask=mask)
        return out

    def _pass_on(self, stock: Callable, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        """A later layer's forward in a ``loop`` layout: the first layer ran them all in this call."""
        call = current_encoder_call(id(self))
        if call is not None and _LOOPED.get() is call:
            return self._as_layer_output(hidden_states)
        return stock(hidden_states, *args, **kwargs)

    def _as_layer_output(self, hidden_states: torch.Tensor) -> Any:
        """What a stock layer of a ``loop`` layout returns, made from its output hidden states."""
        return self.layout.layer_output(hidden_states) if self.layout.layer_output else hidden_states

    def _relative_bias(self, info: PackInfo) -> torch.Tensor:
        """(B or 1, H, L, L) bias from the tokens' original positions in the padded batch."""
        assert self.layout.relative_bias is not None
        device = info.cu_seqlens.device
        if info.indices is None or info.contiguous:
            # No holes in any row: distances between a row's tokens are distances in its packed order, and the
            # relative biases (functions of distance) are one (1, H, L, L) table for all rows.
            positions = torch.arange(info.max_len, device=device)[None, :]  # (1, L)
        else:
            index, valid = dense_layout(info)
            positions = to_dense(_columns(info), info, index, valid)  # (B, L)
        return self.layout.relative_bias(self.encoder, positions)


def _clamp_fp16(x: torch.Tensor, form: str) -> torch.Tensor:
    """The stock layers' fp16 overflow guards, without a host read; other dtypes pass unchanged. ``form``:
    "always" (clamp to the fp16 range less 1000: mBART's kin), "nonfinite" (that, only when some value is not
    finite: BART's kin), "inf" (clamp to the fp16 range, less 1000 when some value is infinite: T5)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    if form == "inf":
        limit = torch.where(torch.isinf(x).any(), top - 1000, top)
        return torch.clamp(x, min=-limit, max=limit)
    clamped = x.clamp(min=-(top - 1000), max=top - 1000)
    return clamped if form == "always" else torch.where(torch.isfinite(x).all(), x, clamped)


def _fused_rms_norm(module: Any, stock: Callable, hidden_states: torch.Tensor) -> torch.Tensor:
    """An RMS-norm module's forward: our fused kernel where it runs (CUDA, fp16/bf16, no gradient), else ``stock``
    (its own forward, or the module itself, whose routed forward then runs its own)."""
    if use_triton(hidden_states) and module.weight.dtype == hidden_states.dtype:
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return stock(hidden_states)


def _gemm_conv1d(module: nn.Conv1d, stock: Callable, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d's forward: matrix products in fp16/bf16 CUDA inference, else its own."""
    if not (x.is_cuda and x.dim() == 3 and x.dtype in (torch.float16, torch.bfloat16)):
        return stock(x)
    weight = module.weight  # computed here when parametrized (weight norm): only on this path
    if x.dtype != weight.dtype or (torch.is_grad_enabled() and weight.requires_grad):
        return stock(x)
    padding = module.padding[0]
    assert isinstance(padding, int)
    return conv1d_gemm(x, weight, module.bias, module.stride[0], padding, module.groups)


def _add_by_column(x: torch.Tensor, table: torch.Tensor, info: PackInfo) -> torch.Tensor:
    """x (T, hidden) + the row of ``table`` (S, hidden) at each packed token's position in its padded row."""
    if info.indices is None:  # every position real: the packed tokens are the padded rows, one after another
        return (x.view(info.batch, info.seqlen, -1) + table).view(x.shape)
    return x + table[_columns(info)]


def _columns(info: PackInfo) -> torch.Tensor:
    """(T,) each packed token's position in its padded row."""
    if info.indices is None:
        return torch.arange(info.seqlen, device=info.cu_seqlens.device).repeat(info.batch)
    return info.indices % info.seqlen
