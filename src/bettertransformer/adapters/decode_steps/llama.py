"""A decode step that runs the layers of a Llama-shaped decoder directly, in five kernels per layer.

The Llama family (Llama, Mistral, Qwen 2/3, Gemma 1-3, Phi-3, OLMo 2) shares one layer shape: RMSNorm, q/k/v
projections with rotary embeddings and grouped-query heads, a gated MLP. The members differ in details a
``LlamaLayout`` names (where the norms sit, fused or separate projections) or the modules carry (q/k norms, sliding
windows, logit softcaps, scaled embeddings). Per layer, on CUDA in fp16/bf16 (``ops.decode``):

1. RMSNorm + the q, k and v products as one (three matrices side by side, one kernel);
2. q/k norm, rotary embedding, the key/value write into the cache and attention over it (one kernel);
3. the output projection + the residual add;
4. RMSNorm + gate and up products + the activation and their product (one kernel);
5. the down projection + the residual add.

With a norm after each sublayer (Gemma 2/3, OLMo 2, GLM-4) the residual add waits for that norm's statistics over the
whole output: the sublayer output is owed to the residual stream until the next product (4., or the next layer's 1.),
which adds it with its own norm in one kernel where it normalises rows ahead (several rows), or after one add-norm
kernel (one row), writing the sum into the stream's other buffer (``_Stream``).

The final norm, the LM head, a final logit softcap and the greedy choice of the next token are one more kernel and a
small reduction. It computes the same function as the stock forward; only rounding differs (fewer intermediate
roundings). On the CPU, and for more than 16 rows, the same step runs on PyTorch's kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...ops import decode
from ...ops.attention import packed_attention
from ..decode_state import DecodeState
from ..patching import resolve
from .base import TANH_GELU, FusedStep, Packing, check_one_device

# RMSNorm classes by name: (offset added to the weight, whether the normalised row is rounded before the weight
# multiplies it). Llama's multiplies in the input's dtype; Gemma's (1 + w) and OLMo 2's multiply in fp32.
_RMS_NORMS: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(
        ("LlamaRMSNorm", "MistralRMSNorm", "MinistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
         "SeedOssRMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm", "GlmRMSNorm", "Glm4RMSNorm"),
        (0.0, True),
    ),
    **dict.fromkeys(("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"), (1.0, False)),
    **dict.fromkeys(("Olmo2RMSNorm", "Olmo3RMSNorm", "HeliumRMSNorm"), (0.0, False)),
}  # fmt: skip
_SILU = {"SiLU", "SiLUActivation"}
# Rotary embeddings whose frequencies change with the sequence length at run time.
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class LlamaLayout:
    """Attribute paths of a Llama-shaped decoder. ``embed``, ``layers``, ``final_norm`` and ``rotary`` are relative
    to the base model, the others to one layer. A norm path of None: the layer has no norm there. ``qkv`` names the
    q, k and v projections, or one fused projection (Phi-3); ``gate_up`` the gate and up projections, or one fused
    (gate | up) projection. ``multipliers``: the base model's ``embedding_multiplier``, each layer's
    ``residual_multiplier`` and the config's ``logits_scaling`` (Granite). A layer's sliding window is its attention module's ``sliding_window``; with
    ``config_window`` (Mistral, Phi-3, whose attention reads it there) the config's when the module has none."""

    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    rotary: str = "rotary_emb"
    attention: str = "self_attn"
    pre_attention: str | None = "input_layernorm"
    post_attention: str | None = None
    pre_mlp: str | None = "post_attention_layernorm"
    post_mlp: str | None = None
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    act: str = "mlp.act_fn"
    config_window: bool = False
    multipliers: bool = False  # Granite: embedding, residual and logit multipliers
    interleaved_rotary: bool = False  # rotary pairs (2i, 2i + 1): GLM, Helium
    gated: bool = True  # False: one up projection and the activation (StarCoder2), ``gate_up`` names it


GEMMA2_LAYOUT = LlamaLayout(
    post_attention="post_attention_layernorm",
    pre_mlp="pre_feedforward_layernorm",
    post_mlp="post_feedforward_layernorm",
)
OLMO2_LAYOUT = LlamaLayout(
    pre_attention=None, post_attention="post_attention_layernorm", pre_mlp=None, post_mlp="post_feedforward_layernorm"
)
PHI3_LAYOUT = LlamaLayout(
    qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",), act="mlp.activation_fn", config_window=True
)
MISTRAL_LAYOUT = LlamaLayout(config_window=True)
GRANITE_LAYOUT = LlamaLayout(multipliers=True)
HELIUM_LAYOUT = LlamaLayout(interleaved_rotary=True)
STARCODER2_LAYOUT = LlamaLayout(
    gate_up=("mlp.c_fc",), down="mlp.c_proj", act="mlp.act", gated=False, config_window=True
)
GLM_LAYOUT = LlamaLayout(gate_up=("mlp.gate_up_proj",), act="mlp.activation_fn", interleaved_rotary=True)
GLM4_LAYOUT = LlamaLayout(
    post_attention="post_self_attn_layernorm", pre_mlp="post_attention_layernorm", post_mlp="post_mlp_layernorm",
    gate_up=("mlp.gate_up_proj",), act="mlp.activation_fn", interleaved_rotary=True,
)  # fmt: skip


def _epsilon(module: Any) -> Any:
    """An RMSNorm module's epsilon (``variance_epsilon`` or ``eps``, by model family), or None."""
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def rms_norm_form(module: Any) -> tuple[float, bool, float] | None:
    """(offset, round_first, eps) of an RMSNorm whose form the fused step knows (``decode.RMSNorm``), with a weight
    and an epsilon; None for any other module."""
    form = _RMS_NORMS.get(type(module).__name__)
    eps = _epsilon(module)
    if form is None or not isinstance(getattr(module, "weight", None), torch.Tensor) or eps is None:
        return None
    return (*form, float(eps))


def _rms_norm(module: Any) -> decode.RMSNorm:
    offset, round_first = _RMS_NORMS[type(module).__name__]
    return decode.RMSNorm(module.weight, float(_epsilon(module)), offset, round_first)


def _is_layer_norm(module: Any) -> bool:
    return type(module) is nn.LayerNorm and module.weight is not None and module.bias is not None


def _norm_spec(module: Any) -> decode.RMSNorm | decode.Norm:
    """What ``decode.linear`` takes for a norm before a product: an affine LayerNorm's (weight, bias, eps), or an
    ``RMSNorm``."""
    if _is_layer_norm(module):
        return (module.weight, module.bias, float(module.eps))
    return _rms_norm(module)


def _check_norm(module: Any, where: str, layer_norm: bool = False) -> None:
    """Raise unless ``module`` is an RMSNorm the step knows (or, with ``layer_norm``, an affine nn.LayerNorm: the
    norms before a product, StarCoder2's)."""
    if layer_norm and _is_layer_norm(module):
        return
    name = type(module).__name__
    if name not in _RMS_NORMS or not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise NotImplementedError(f"a {where} norm the fused step does not know ({name})")
    if _epsilon(module) is None:
        raise NotImplementedError(f"a {where} norm without an epsilon ({name})")


def _linears(modules: list[Any], what: str) -> list[nn.Linear]:
    for module in modules:
        if type(module) is not nn.Linear:
            raise NotImplementedError(f"a {what} projection that is not nn.Linear (an adapter or quantized layer)")
    return modules


def _parts(modules: list[nn.Linear], widths: tuple[int, ...]) -> list[decode.Part]:
    """(weight, bias) of each block of output columns: the modules' own, or slices of one fused module's."""
    if len(modules) == len(widths):
        return [(m.weight, m.bias) for m in modules]
    (fused,) = modules
    weights = fused.weight.split(widths)
    biases = fused.bias.split(widths) if fused.bias is not None else (None,) * len(widths)
    return list(zip(weights, biases, strict=True))


class _Stream:
    """A step's residual stream: the rows x, and a sublayer output still owed to them (t and its post-norm), which
    the next product adds (``decode.linear``'s ``pending``), writing the sum into the other of two buffers. A layer
    without post-norms adds in place and never owes anything."""

    def __init__(self, x: torch.Tensor):
        self.x: torch.Tensor = x
        self.spare: torch.Tensor | None = None
        self.owed: tuple[torch.Tensor, decode.RMSNorm] | None = None

    def owe(self, t: torch.Tensor, norm: decode.RMSNorm) -> None:
        self.settle()
        self.owed = (t, norm)

    def take(self) -> tuple[torch.Tensor, decode.Pending | None]:
        """(x, pending) for the next product; the stream's rows are the pending sum's buffer from then on."""
        if self.owed is None:
            return self.x, None
        t, norm = self.owed
        x, out = self.x, self.spare if self.spare is not None else torch.empty_like(self.x)
        self.x, self.spare, self.owed = out, x, None
        return x, (t, norm, out)

    def settle(self) -> torch.Tensor:
        """The rows with what they are owed added (in place)."""
        if self.owed is not None:
            t, norm = self.owed
            decode.add_norm(self.x, t, norm)
            self.owed = None
        return self.x


class _Layer:
    def __init__(self, layer: nn.Module, layout: LlamaLayout, rotary: nn.Module, config: Any):
        self.layer = layer
        self.norms = {
            where: resolve(layer, path) if path is not None else None
            for where, path in (
                ("pre_attention", layout.pre_attention), ("post_attention", layout.post_attention),
                ("pre_mlp", layout.pre_mlp), ("post_mlp", layout.post_mlp),
            )
        }  # fmt: skip
        for where, norm in self.norms.items():
            if norm is not None:
                _check_norm(norm, where.replace("_", "-"), layer_norm=where.startswith("pre"))
        attention = resolve(layer, layout.attention)
        self.attention = attention
        self.qkv = _linears([resolve(layer, p) for p in layout.qkv], "q/k/v")
        self.o = _linears([resolve(layer, layout.o)], "output")[0]
        self.gate_up = _linears([resolve(layer, p) for p in layout.gate_up], "gate/up")
        self.down = _linears([resolve(layer, layout.down)], "down")[0]
        self.act_module = resolve(layer, layout.act)
        act = type(self.act_module).__name__
        self.act = "silu" if act in _SILU else "gelu_tanh" if act in TANH_GELU else None
        if self.act is None:
            raise NotImplementedError(f"an MLP activation the fused step does not compute ({act})")
        self.head_dim = int(attention.head_dim)
        q_width = self.o.in_features
        total = sum(m.out_features for m in self.qkv)
        self.heads, self.kv_heads = q_width // self.head_dim, (total - q_width) // (2 * self.head_dim)
        self.widths = (q_width, *(((total - q_width) // 2,) * 2))
        intermediate = self.down.in_features
        self.mlp_widths = (intermediate, intermediate) if layout.gated else (intermediate,)
        self.scaling = float(attention.scaling)
        window = getattr(attention, "sliding_window", None)
        if not hasattr(attention, "sliding_window") and layout.config_window:
            window = getattr(config, "sliding_window", None)
        self.window = int(window) if window is not None else None
        softcap = getattr(attention, "attn_logit_softcapping", None)
        self.softcap = float(softcap) if softcap is not None else None
        self.q_norm, self.k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        if (self.q_norm is None) != (self.k_norm is None):
            raise NotImplementedError("a q norm without a k norm, or the reverse")
        if self.q_norm is not None:
            _check_norm(self.q_norm, "q/k")
            _check_norm(self.k_norm, "q/k")
            if _RMS_NORMS[type(self.q_norm).__name__] != _RMS_NORMS[type(self.k_norm).__name__]:
                raise NotImplementedError("q and k norms of different kinds")
            self.per_head = self.q_norm.weight.shape[0] == self.head_dim
            if not self.per_head and self.q_norm.weight.shape[0] != q_width:
                raise NotImplementedError("a q norm over neither one head nor the whole projection")
        layer_type = getattr(attention, "layer_type", getattr(attention, "attention_type", None))
        self.rotary, self.freq_name = rotary, "inv_freq"
        self.scale_name = "attention_scaling"
        if isinstance(layer_type, str) and hasattr(rotary, f"{layer_type}_inv_freq"):
            self.freq_name, self.scale_name = f"{layer_type}_inv_freq", f"{layer_type}_attention_scaling"
        freq = getattr(rotary, self.freq_name, None)
        if not isinstance(freq, torch.Tensor) or 2 * freq.shape[0] > self.head_dim:
            raise NotImplementedError("a rotary embedding without inverse frequencies the fused step can read")
        self.use_rope = bool(getattr(attention, "use_rope", True))  # SmolLM3's NoPE layers have none
        self.interleaved = layout.interleaved_rotary
        if layout.multipliers and not hasattr(layer, "residual_multiplier"):
            raise NotImplementedError("a layer without the residual multiplier its layout names")
        self.multiplier = float(getattr(layer, "residual_multiplier", 1.0)) if layout.multipliers else 1.0
        if self.multiplier != 1.0 and any(self.norms[w] is not None for w in ("post_attention", "post_mlp")):
            raise NotImplementedError("a residual multiplier with post-norms")

    def norm(self, where: str) -> decode.RMSNorm | decode.Norm | None:
        module = self.norms[where]
        return _norm_spec(module) if module is not None else None

    def rope(self) -> decode.Rotary:
        freq = getattr(self.rotary, self.freq_name)
        scale = float(getattr(self.rotary, self.scale_name, 1.0))
        return decode.Rotary(freq if self.use_rope else freq[:0], scale, self.interleaved)

    def qk_norm(self) -> tuple[decode.RMSNorm, decode.RMSNorm, bool] | None:
        if self.q_norm is None:
            return None
        return _rms_norm(self.q_norm), _rms_norm(self.k_norm), self.per_head

    def qkv_product(self, stream: _Stream) -> torch.Tensor:
        """(N, (H + 2 Hkv) D): the pre-attention norm and the q, k, v products as one."""
        (wq, bq), *rest = _parts(self.qkv, self.widths)
        x, pending = stream.take()
        return decode.linear(
            x, wq, bq, transposed=True, norm=self.norm("pre_attention"), parts=tuple(rest), pending=pending
        )  # fmt: skip

    def mlp(self, stream: _Stream) -> None:
        """The residual stream += the MLP's output (post-normed where the layer has that norm)."""
        (wg, bg), *gated = _parts(self.gate_up, self.mlp_widths)
        up = gated[0] if gated else None
        x, pending = stream.take()
        f = decode.linear(
            x, wg, bg, transposed=True, norm=self.norm("pre_mlp"), act=self.act, up=up, pending=pending
        )  # fmt: skip
        self.residual(self.down, f, stream, "post_mlp")

    def residual(self, proj: nn.Linear, a: torch.Tensor, stream: _Stream, post: str) -> None:
        """The residual stream += post_norm(proj(a)) (owed to the next product), or += proj(a) in place without a
        post-norm."""
        norm = self.norm(post)
        if norm is None:
            decode.linear(
                a, proj.weight, proj.bias, transposed=True, residual=stream.settle(), scale=self.multiplier
            )  # fmt: skip
        else:
            assert isinstance(norm, decode.RMSNorm)  # post-norms are RMSNorms (checked in __init__)
            stream.owe(decode.linear(a, proj.weight, proj.bias, transposed=True), norm)


class LlamaDecodeStep(FusedStep):
    """The fused decode step of a Llama-shaped model (``base.DecodeStep``): (tokens, positions, state) -> next-token
    logits."""

    layout = LlamaLayout()

    def __init__(self, base: nn.Module, head: Any):
        layout, config = self.layout, base.config
        check_one_device(base)
        self.base = base
        self.embed: nn.Embedding = resolve(base, layout.embed)
        rotary = resolve(base, layout.rotary)
        rope_type = getattr(rotary, "rope_type", "default")
        kinds = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        if any(any(d in str(kind) for d in _DYNAMIC_ROPE) for kind in kinds):
            raise NotImplementedError(f"a rotary embedding whose frequencies change at run time ({rope_type})")
        self.layers = [_Layer(layer, layout, rotary, config) for layer in resolve(base, layout.layers)]
        self.final_norm = resolve(base, layout.final_norm)
        _check_norm(self.final_norm, "final", layer_norm=True)
        self.head: Any = head.get_output_embeddings()
        if type(self.head) is not nn.Linear:
            raise NotImplementedError("an LM head that is not nn.Linear")
        softcap = getattr(config, "final_logit_softcapping", None)
        self.final_softcap = float(softcap) if softcap is not None else None
        self.embed_scale = self._embed_scale(self.embed)
        multipliers: Any = (base, config) if layout.multipliers else None
        self.embed_multiplier = float(multipliers[0].embedding_multiplier) if multipliers else 1.0
        self.logit_divide = float(multipliers[1].logits_scaling) if multipliers else 1.0
        self.module_ids = [id(m) for m in self._modules(head)]

    @staticmethod
    def _embed_scale(embed: nn.Module) -> float:
        """Gemma's scaled embedding multiplies by sqrt(hidden) in the weights' dtype; others by 1."""
        if type(embed) is nn.Embedding:
            return 1.0
        scale: Any = getattr(embed, "scalar_embed_scale", None)
        buffer = getattr(embed, "embed_scale", None)
        if scale is None and isinstance(buffer, torch.Tensor):
            scale = float(buffer)
        if scale is None or not isinstance(embed, nn.Embedding):
            raise NotImplementedError(f"an embedding the fused step does not know ({type(embed).__name__})")
        return float(scale)

    def _modules(self, head: Any) -> list[Any]:
        layout = self.layout
        modules: list[Any] = [resolve(self.base, layout.embed), resolve(self.base, layout.final_norm)]
        modules.append(head.get_output_embeddings())
        for layer in resolve(self.base, layout.layers):
            attention = resolve(layer, layout.attention)
            modules += [attention, *(resolve(layer, p) for p in layout.qkv), resolve(layer, layout.o)]
            modules += [*(resolve(layer, p) for p in layout.gate_up), resolve(layer, layout.down)]
            modules.append(resolve(layer, layout.act))
            norms = (layout.pre_attention, layout.post_attention, layout.pre_mlp, layout.post_mlp)
            modules += [resolve(layer, p) if p is not None else None for p in norms]
            modules += [getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)]
        return modules

    def head_options(self) -> dict[str, Any]:
        return {"norm": _norm_spec(self.final_norm), "softcap": self.final_softcap, "divide": self.logit_divide}

    def new_cache(self, batch: int, slots: int) -> list[torch.Tensor]:
        """Zeroed per-layer key/value buffers (2, batch, Hkv, slots, head_dim), in layer order."""
        weight = self.embed.weight
        return [weight.new_zeros(2, batch, layer.kv_heads, slots, layer.head_dim) for layer in self.layers]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight
        scale = self.embed_scale
        if scale != 1.0:  # Gemma's scale as the weights' dtype holds it
            scale = float(torch.tensor(scale, dtype=weight.dtype))
        return decode.embed(tokens, None, weight, None, scale * self.embed_multiplier)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, state: DecodeState, packing: Packing) -> torch.Tensor:
        """Run the prompts (B, L) on their real tokens only (``packing``); write their keys/values into ``state.kv``
        at their columns. Returns the (B, V) fp32 logits of each row's last token. No host synchronisation."""
        stream = _Stream(self._embed(ids.reshape(-1)[packing.flat]))
        where = positions.reshape(-1)[packing.flat]
        tokens = stream.x.shape[0]
        for layer, kv in zip(self.layers, state.kv, strict=True):
            qkv = layer.qkv_product(stream)  # our kernels up to 16 tokens (as a step's), cuBLAS beyond
            q, k, v = decode.rope_into_cache(
                qkv, kv, packing.rows, packing.columns, where, heads=layer.heads, rotary=layer.rope(),
                qk_norm=layer.qk_norm(),
            )  # fmt: skip
            a = packed_attention(
                q, k, v, packing.info, scale=layer.scaling, causal=True, window=layer.window, softcap=layer.softcap
            )  # fmt: skip
            layer.residual(layer.o, a.reshape(tokens, -1), stream, "post_attention")
            layer.mlp(stream)
        return self._logits(stream.settle()[packing.last], kernels=False)

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState) -> torch.Tensor:
        stream = _Stream(self._embed(tokens[:, 0]))
        where = positions[:, 0]
        for layer, kv in zip(self.layers, state.kv, strict=True):
            a = decode.rope_attention(
                layer.qkv_product(stream), kv, state.mask, state.slot, where, heads=layer.heads, scale=layer.scaling,
                rotary=layer.rope(), qk_norm=layer.qk_norm(), window=layer.window, softcap=layer.softcap,
                counters=state.buffers.counters,
            )  # fmt: skip
            layer.residual(layer.o, a, stream, "post_attention")
            layer.mlp(stream)
        return stream.settle()


def _variant(name: str, layout: LlamaLayout, doc: str) -> type[LlamaDecodeStep]:
    """The Llama step over another layout: a class of its own, which the registry names."""
    return type(name, (LlamaDecodeStep,), {"layout": layout, "__doc__": doc, "__module__": __name__})


Gemma2DecodeStep = _variant("Gemma2DecodeStep", GEMMA2_LAYOUT, "Gemma 2 and 3: a norm before and after each sublayer.")
Olmo2DecodeStep = _variant(
    "Olmo2DecodeStep", OLMO2_LAYOUT, "OLMo 2 and 3: norms after each sublayer only (and over the whole q and k)."
)
MistralDecodeStep = _variant("MistralDecodeStep", MISTRAL_LAYOUT, "Mistral: the config's window in every layer.")
GraniteDecodeStep = _variant(
    "GraniteDecodeStep", GRANITE_LAYOUT, "Granite: multipliers on the embeddings, sublayer outputs and logits."
)
HeliumDecodeStep = _variant("HeliumDecodeStep", HELIUM_LAYOUT, "Helium: interleaved rotary pairs.")
GlmDecodeStep = _variant("GlmDecodeStep", GLM_LAYOUT, "GLM: interleaved partial rotary, fused gate|up.")
Glm4DecodeStep = _variant("Glm4DecodeStep", GLM4_LAYOUT, "GLM-4: as GLM, with a norm after each sublayer too.")
Phi3DecodeStep = _variant("Phi3DecodeStep", PHI3_LAYOUT, "Phi-3: fused qkv and gate|up projections.")
Starcoder2DecodeStep = _variant(
    "Starcoder2DecodeStep", STARCODER2_LAYOUT, "StarCoder2: LayerNorms, biases, a plain GELU MLP, the config's window."
)
