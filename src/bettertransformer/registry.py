"""The registry: one table from ``config.model_type`` to the adapter and the data it needs.

An entry is data. Adding an architecture whose layers have a known shape is one line; ``register`` does the
same for users' own architectures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .adapters.attention_modules import (
    ModuleAttention,
    bloom_alibi_slopes,
    bloom_attention,
    falcon_attention,
    fsmt_attention,
    fsmt_positions,
    gpt_neo_attention,
    prophetnet_decoder,
    scaled_attention,
)
from .adapters.decode_steps import (
    DecodeStep,
    Gemma2DecodeStep,
    Glm4DecodeStep,
    GlmDecodeStep,
    GPT2DecodeStep,
    GraniteDecodeStep,
    HeliumDecodeStep,
    LlamaDecodeStep,
    MistralDecodeStep,
    Olmo2DecodeStep,
    Phi3DecodeStep,
    Starcoder2DecodeStep,
)
from .adapters.decoder import CausalDecoder
from .adapters.encoder import EncoderLayout, PackedEncoder, T5Layer
from .adapters.interface_encoder import InterfaceEncoder


@dataclass(frozen=True)
class Support:
    """How one model type is made faster. An entry with an ``encoder`` layout is a padding-free encoder
    (``PackedEncoder``); an entry without one is a causal LM (``CausalDecoder``).

    encoder:     where a BERT-shaped encoder keeps its modules (attribute paths).
    interface_encoder: an encoder whose attention goes through transformers' attention interface (ModernBERT): its
                 own forward runs on the packed tokens (``InterfaceEncoder``), nothing to describe.
    attention:   for a causal LM whose attention modules compute attention themselves (no attention interface):
                 which modules, and the forward that routes them through ours.
    decode_step: for a causal LM, the family of its fused decode step (a file in ``adapters/decode_steps/``);
                 None: the generic step (the model's own forward, replayed in a CUDA graph).
    fast_paths:  what the user gets, for the docs.
    notes:       anything a user of this model type should know, for the docs.
    refused:     why ``transform`` refuses this model type (an architecture looked at and found out of reach);
                 empty for the types it accepts.
    """

    encoder: EncoderLayout | None = None
    interface_encoder: bool = False
    attention: ModuleAttention | None = None
    decode_step: type[DecodeStep] | None = None
    fast_paths: tuple[str, ...] = ("padding-free encoder",)
    notes: str = ""
    refused: str = ""

    def attach(self, base: nn.Module, root: nn.Module) -> PackedEncoder | InterfaceEncoder | CausalDecoder:
        """The adapter for ``base`` (a base model inside ``root``, the model passed to ``transform``), attached."""
        adapter: PackedEncoder | InterfaceEncoder | CausalDecoder
        if self.refused:
            raise NotImplementedError(f"{getattr(base.config, 'model_type', '?')} is not supported: {self.refused}")
        if self.encoder is not None:
            adapter = PackedEncoder(base, self.encoder, root)
        elif self.interface_encoder:
            adapter = InterfaceEncoder(base, root)
        else:
            adapter = CausalDecoder(base, self.attention, self.decode_step, root)
        adapter.attach()
        return adapter


def _albert_layer_order(encoder: Any) -> list[nn.Module]:
    # ALBERT runs num_hidden_layers steps over num_hidden_groups shared groups of inner_group_num layers.
    config = encoder.config
    order = []
    for i in range(config.num_hidden_layers):
        group = encoder.albert_layer_groups[int(i / (config.num_hidden_layers / config.num_hidden_groups))]
        order.extend(group.albert_layers)
    return order


def _mpnet_relative_bias(encoder: Any, positions: torch.Tensor) -> torch.Tensor:
    """MPNet's bucketed relative-position bias for tokens at ``positions`` (B, L) -> (B, H, L, L)."""
    relative = positions[:, None, :] - positions[:, :, None]  # (B, L, L): key position - query position
    buckets = encoder.relative_position_bucket(relative)
    return encoder.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # (B, H, L, L)


def _roformer_rotary(encoder: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """RoFormer's sinusoids of the tokens' positions: the table's first half is sin, the second cos."""
    table = encoder.embed_positions.weight[positions]  # (T, D)
    sin, cos = table.chunk(2, dim=-1)
    return sin, cos, bool(encoder.config.rotary_value)


BERT = EncoderLayout()

# RoFormer: BERT's layers with rotary positions on queries and keys (and values with rotary_value).
ROFORMER = EncoderLayout(rotary=_roformer_rotary)

DISTILBERT = EncoderLayout(
    encoder="transformer",
    q="attention.q_lin",
    k="attention.k_lin",
    v="attention.v_lin",
    attn_dropout="attention.dropout",
    o="attention.out_lin",
    o_dropout=None,
    ln1="sa_layer_norm",
    ffn_in="ffn.lin1",
    act="ffn.activation",
    ffn_out="ffn.lin2",
    ffn_dropout="ffn.dropout",
    ln2="output_layer_norm",
    num_heads="n_heads",
    requires=(),
)

ALBERT = EncoderLayout(
    layers="albert_layer_groups",
    q="attention.query",
    k="attention.key",
    v="attention.value",
    attn_dropout="attention.attention_dropout",
    o="attention.dense",
    o_dropout="attention.output_dropout",
    ln1="attention.LayerNorm",
    ffn_in="ffn",
    act="activation",
    ffn_out="ffn_output",
    ffn_dropout=None,
    ln2="full_layer_layer_norm",
    pre="embedding_hidden_mapping_in",
    layer_order=_albert_layer_order,
    requires=(),
)

MPNET = EncoderLayout(
    q="attention.attn.q",
    k="attention.attn.k",
    v="attention.attn.v",
    attn_dropout="attention.attn.dropout",
    o="attention.attn.o",
    o_dropout="attention.dropout",
    ln1="attention.LayerNorm",
    relative_bias=_mpnet_relative_bias,
    requires=(),
)

ROBERTA_PRELAYERNORM = EncoderLayout(
    pre_norm=True,
    ln1="attention.LayerNorm",
    ln2="intermediate.LayerNorm",
)

XLM_ROBERTA_XL = EncoderLayout(
    pre_norm=True,
    ffn_dropout=None,  # XLM-RoBERTa-XL has no dropout after its FFN
    ln1="attention.self_attn_layer_norm",
    ln2="LayerNorm",
    final_norm="LayerNorm",
)

# RemBERT: BERT's layers on embeddings projected up to the hidden size by the encoder.
REMBERT = EncoderLayout(pre="embedding_hidden_mapping_in")

MEGATRON_BERT = EncoderLayout(
    pre_norm=True,
    ln1="attention.ln",
    ln2="ln",
    final_norm="ln",
)

# Causal LMs: one adapter for every model whose attention goes through transformers' attention interface.
DECODER = Support(fast_paths=("padding-free prefill", "packed-sequence training", "static-cache CUDA-graph generate"))


def _fused(step: type[DecodeStep]) -> Support:
    """The decoder entry with a fused decode step family."""
    return replace(DECODER, decode_step=step, fast_paths=(*DECODER.fast_paths, "fused decode step"))


OLD_ATTN = "before transformers 5.24 this model has no attention interface: its _attn method is routed through ours"

_DEBERTA = Support(
    fast_paths=(),
    refused=(
        "its disentangled attention adds, for every pair of tokens, content-to-position and position-to-content "
        "terms gathered from relative-position embeddings; bettertransformer has no packed kernel for them yet, "
        "so every call would run the stock computation"
    ),
)

# The encoder of BART and its kin (encoder-decoders): its forward computes the embeddings, then loops over its
# layers (post-LayerNorm, as BERT's); the base model's mask also feeds the decoder, so the mask is taken at the
# encoder's own forward. generate runs the decoder's own steps on static buffers (``seq2seq_generation``).
BART = EncoderLayout(
    encoder="encoder", layers="layers", entry="encoder", loop=True, clamp_fp16="nonfinite",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", attn_dropout=None, o="self_attn.out_proj",
    o_dropout=None, ln1="self_attn_layer_norm", ffn_in="fc1", act="activation_fn", ffn_out="fc2", ffn_dropout=None,
    ln2="final_layer_norm", num_heads="encoder_attention_heads",
)  # fmt: skip
# mBART, Pegasus, M2M-100 (NLLB), Blenderbot, Whisper: the same with pre-LayerNorm layers (the norm after the loop
# stays the stock code's) and an unconditional fp16 clamp.
MBART = replace(BART, pre_norm=True, clamp_fp16="always")
# FSMT: BART's post-LayerNorm encoder layers in fairseq's sequence-first layout, with no fp16 clamp. Its decoder has
# no attention interface: its attention modules (one class for self- and cross-attention) get a forward of ours, and
# its sinusoidal positions one that reads a decode step's slot on the device.
FSMT = replace(
    BART, clamp_fp16=None, seq_first=True, layer_output=lambda hidden: (hidden, None),
    decoder_modules=(
        ModuleAttention("Attention", fsmt_attention), ModuleAttention("SinusoidalPositionalEmbedding", fsmt_positions)
    ),
)  # fmt: skip
# ProphetNet's encoder: BERT's post-LayerNorm layers under other names, looped over by the encoder's forward. Its
# n-gram decoder computes attention itself and cannot run a step on static buffers: in a decode step of ours its
# forward is ours (the main stream and the predict stream generate reads).
PROPHETNET = EncoderLayout(
    layers="layers", entry="encoder", loop=True, layer_output=lambda hidden: (hidden,),
    num_heads="num_encoder_attention_heads", q="self_attn.query_proj", k="self_attn.key_proj",
    v="self_attn.value_proj", attn_dropout=None, o="self_attn.out_proj", o_dropout=None, ln1="self_attn_layer_norm",
    ffn_in="feed_forward.intermediate", act="feed_forward.activation_fn", ffn_out="feed_forward.output",
    ffn_dropout=None, ln2="feed_forward_layer_norm", requires=(),
    decoder_modules=(ModuleAttention("ProphetNetDecoder", prophetnet_decoder),),
)  # fmt: skip
_SEQ2SEQ_NOTES = "the encoder padding-free (inference); beam search runs stock generate"


def _seq2seq(layout: EncoderLayout, notes: str = "") -> Support:
    """An encoder-decoder's entry: its encoder padding-free, its decoder's generate steps on static buffers."""
    return Support(
        encoder=layout, fast_paths=("padding-free encoder", "static-cache CUDA-graph generate"),
        notes=_SEQ2SEQ_NOTES + notes,
    )  # fmt: skip


# Speech encoders (wav2vec2 and kin): the encoder's forward zeroes the padded frames, adds its convolutional
# positions and a LayerNorm, then loops over post-LayerNorm layers; the frame-level mask comes to that forward.
WAV2VEC2 = EncoderLayout(
    encoder="encoder", layers="layers", entry="encoder", loop=True, keep_mask=True,
    q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", attn_dropout=None, o="attention.out_proj",
    o_dropout="dropout", ln1="layer_norm", ffn_in="feed_forward.intermediate_dense",
    act="feed_forward.intermediate_act_fn", ffn_out="feed_forward.output_dense", ffn_dropout="feed_forward.output_dropout",
    ln2="final_layer_norm", requires=(("do_stable_layer_norm", False), ("is_decoder", False)),
    gemm_convolutions="encoder.pos_conv_embed",
)  # fmt: skip
_SPEECH_NOTES = (
    "the transformer encoder, padding-free over the frames the mask marks (inference); the positional "
    "convolution as matrix products (CUDA, fp16/bf16); the pre-LayerNorm (do_stable_layer_norm) configurations are "
    "refused"
)


def _t5_bias(stack: Any, relative: torch.Tensor) -> torch.Tensor:
    """T5's bucketed relative-position bias (the first block's table, shared by all blocks of ``stack``) of key
    position - query position ``relative`` (..., Lq, Lk) -> (..., Lq, Lk, H); one-directional buckets in a decoder."""
    attention = stack.block[0].layer[0].SelfAttention
    buckets = attention._relative_position_bucket(
        relative, bidirectional=not attention.is_decoder, num_buckets=attention.relative_attention_num_buckets,
        max_distance=attention.relative_attention_max_distance,
    )  # fmt: skip
    return attention.relative_attention_bias(buckets)


def _t5_relative_bias(encoder: Any, positions: torch.Tensor) -> torch.Tensor:
    """T5's encoder bias for tokens at ``positions`` (B, L) -> (B, H, L, L)."""
    return _t5_bias(encoder, positions[:, None, :] - positions[:, :, None]).permute(0, 3, 1, 2)


def _t5_decoder_bias(decoder: Any, slot: torch.Tensor, slots: int) -> torch.Tensor:
    """T5's decoder bias for the token at ``slot`` (1,) over the cache slots (its positions) -> (1, H, 1, S)."""
    relative = torch.arange(slots, device=slot.device) - slot  # (S,)
    return _t5_bias(decoder, relative[None, :]).permute(2, 0, 1)[None]


# T5's encoder stack: pre-RMS-norm blocks with a relative-position bias and no attention scale (T5Layer), looped
# over by the stack's forward, which then applies its final norm; a block returns (hidden, bias, cross bias).
T5 = EncoderLayout(
    encoder="encoder", layers="block", entry="encoder", loop=True, layer_class=T5Layer,
    layer_output=lambda hidden: (hidden, None, None), relative_bias=_t5_relative_bias, num_heads="num_heads",
    decoder_bias=_t5_decoder_bias, rms_norms=("T5LayerNorm", "MT5LayerNorm"),
    q="layer.0.SelfAttention.q", k="layer.0.SelfAttention.k", v="layer.0.SelfAttention.v", attn_dropout=None,
    o="layer.0.SelfAttention.o", o_dropout=None, ln1="layer.0.layer_norm", ln2="layer.1.layer_norm", pre_norm=True,
)  # fmt: skip

# Vision transformers (ViT, DeiT, ViT-MAE, ViT-MSN): pre-LayerNorm layers the base model's own forward loops over
# (no encoder module), after the patch embeddings and before its final norm. Images have no padding: what runs
# faster is the layer itself (one QKV product, flash attention, GELU in the product's epilogue). Inference only
# (the attention dropout is a plain float).
VIT = EncoderLayout(
    encoder="", layers="layers", loop=True, pre_norm=True, q="attention.q_proj", k="attention.k_proj",
    v="attention.v_proj", attn_dropout=None, o="attention.o_proj", o_dropout=None, ln1="layernorm_before",
    ffn_in="mlp.fc1", act="mlp.activation_fn", ffn_out="mlp.fc2", ffn_dropout=None, ln2="layernorm_after", requires=(),
)  # fmt: skip
_VISION = Support(encoder=VIT, fast_paths=("fused encoder layers",), notes="images (no padding): inference")

# CLIP's towers and SigLIP's vision tower (each a base model of its own inside CLIPModel / SiglipModel):
# pre-LayerNorm layers in an encoder module, the attention dropout a plain float (training runs the stock layers).
# The text tower is causal within each sequence and padding-free; the vision towers have no padding. (SigLIP's text
# tower runs stock: measured slower transformed, BENCHMARKS.md.)
CLIP = EncoderLayout(
    layers="layers", pre_norm=True, q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    attn_dropout=None, o="self_attn.out_proj", o_dropout=None, ln1="layer_norm1", ffn_in="mlp.fc1",
    act="mlp.activation_fn", ffn_out="mlp.fc2", ffn_dropout=None, ln2="layer_norm2", requires=(), stock_training=True,
)  # fmt: skip

# DINOv2: pre-LayerNorm layers whose sublayer outputs are scaled (LayerScale) before each residual add, in an encoder
# module (a PreTrainedModel of its own). Its attention moved in transformers 5.24 (one module with q/k/v/o_proj;
# before: attention.attention.query... and attention.output.dense): both paths are named. The SwiGLU MLP
# (use_swiglu_ffn: no fc1) runs whole. The attention dropout is a plain float: training runs the stock layers. Its
# image classifier averages every patch: a batch with a padding mask (5.24 takes one) runs stock.
DINOV2 = EncoderLayout(
    layers="layer", pre_norm=True, q="attention.q_proj|attention.attention.query",
    k="attention.k_proj|attention.attention.key", v="attention.v_proj|attention.attention.value", attn_dropout=None,
    o="attention.o_proj|attention.output.dense", o_dropout=None, ln1="norm1", ffn_in="mlp.fc1",
    act="mlp.activation_fn|mlp.activation", ffn_out="mlp.fc2", ffn_dropout=None, ln2="norm2", ffn="mlp",
    attn_scale="layer_scale1", ffn_scale="layer_scale2", requires=(), stock_training=True, reads_padding=True,
)  # fmt: skip


def _yolos_mid_positions(encoder: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """YOLOS's mid-position embeddings, interpolated to the image's size -> (L - 1, S, hidden); None without them.
    The table is the encoder's before transformers 5.24, its interpolation module's since."""
    if not encoder.config.use_mid_position_embeddings:
        return None
    size = (kwargs["height"], kwargs["width"])
    table = getattr(encoder, "mid_position_embeddings", None)
    interpolated = encoder.interpolation(size) if table is None else encoder.interpolation(table, size)
    return interpolated[:, 0]  # (L - 1, 1, S, hidden) -> (L - 1, S, hidden)


# ViT's pre-LayerNorm layers under BERT's module names (YOLOS, ViLT), in an encoder module.
_VIT_BERT_NAMES = EncoderLayout(
    pre_norm=True, q="attention.attention.query", k="attention.attention.key", v="attention.attention.value",
    ln1="layernorm_before", ln2="layernorm_after",
)  # fmt: skip

# YOLOS: called with the image's size, the encoder adds its mid-position embeddings between layers
# (use_mid_position_embeddings). Training runs the stock layers (the attention dropout is a plain float).
YOLOS = replace(
    _VIT_BERT_NAMES, attn_dropout=None, requires=(), stock_training=True, encoder_kwargs=("height", "width"),
    mid_positions=_yolos_mid_positions,
)  # fmt: skip

# ViLT: a dropout module on the attention (the layers train packed), over text tokens and image patches together;
# its embeddings return the padding mask of both, which the packed layers take.
VILT = replace(_VIT_BERT_NAMES, attn_dropout="attention.attention.dropout", embedding_mask="embeddings")

# The table. Every entry has a model in the test zoo (tests/zoo.py) and is checked against the stock model (a
# refused entry: that transform refuses it, with its reason).
REGISTRY: dict[str, Support] = {
    "albert": Support(encoder=ALBERT, notes="shared layers run once per step, fused QKV cached once"),
    "bart": _seq2seq(BART),
    "bert": Support(encoder=BERT),
    "bert-generation": Support(encoder=BERT, notes="the encoder (BertGenerationEncoder)"),
    "blenderbot": _seq2seq(
        MBART, "; its configs ban repeating the input's 3-grams (encoder_no_repeat_ngram_size): stock generate"
    ),
    "blenderbot-small": _seq2seq(BART),
    "camembert": Support(encoder=BERT),
    "clip_text_model": Support(
        encoder=replace(CLIP, causal=True), notes="causal attention within each sequence; in CLIPModel too; inference"
    ),
    "clip_vision_model": Support(
        encoder=CLIP, fast_paths=("fused encoder layers",), notes="images (no padding); in CLIPModel too; inference"
    ),
    "data2vec-audio": Support(encoder=WAV2VEC2, notes=_SPEECH_NOTES),
    "data2vec-text": Support(encoder=BERT),
    "deberta": _DEBERTA,
    "deberta-v2": _DEBERTA,
    "deit": _VISION,
    "dinov2": Support(
        encoder=DINOV2,
        fast_paths=("fused encoder layers",),
        notes="images (no padding): inference; LayerScale; the SwiGLU MLP (use_swiglu_ffn) runs as its own module; "
        "a mask with padding runs stock (its classifier averages every patch)",
    ),  # fmt: skip
    "distilbert": Support(encoder=DISTILBERT),
    "electra": Support(encoder=BERT),
    "ernie": Support(encoder=BERT),
    "fsmt": _seq2seq(
        FSMT,
        "; its decoder's attention modules routed through ours; its configs ask for beam search (num_beams=5): "
        "num_beams=1 runs the fast loop",
    ),
    "hubert": Support(encoder=WAV2VEC2, notes=_SPEECH_NOTES),
    "layoutlm": Support(encoder=BERT),
    "m2m_100": _seq2seq(MBART),
    "marian": _seq2seq(BART),
    "markuplm": Support(encoder=BERT),
    "mbart": _seq2seq(MBART),
    "megatron-bert": Support(encoder=MEGATRON_BERT, notes="pre-LayerNorm"),
    "modernbert": Support(
        interface_encoder=True,
        notes="its own forward on the packed tokens (rotary by padded position; local layers' window within each "
        "sequence); a mask with holes runs stock",
    ),
    "mpnet": Support(
        encoder=MPNET, notes="relative position bias: attention runs on rows padded to the longest, others packed"
    ),
    "mt5": _seq2seq(T5, "; MT5EncoderModel too; relative-position bias; RMS norms as one kernel (CUDA, fp16/bf16)"),
    "pegasus": _seq2seq(MBART),
    "plbart": _seq2seq(BART),
    "prophetnet": _seq2seq(
        PROPHETNET,
        "; its n-gram decoder's steps computed by a forward of ours (the main stream and the first predict stream, "
        "whose logits generate reads)",
    ),
    "rembert": Support(encoder=REMBERT, notes="input embeddings projected up inside the encoder"),
    "roberta": Support(encoder=BERT),
    "roberta-prelayernorm": Support(
        encoder=ROBERTA_PRELAYERNORM, notes="pre-LayerNorm; the final LayerNorm (in the base model) runs on padding too"
    ),
    "roc_bert": Support(encoder=BERT),
    "roformer": Support(encoder=ROFORMER, notes="rotary positions"),
    "siglip_vision_model": Support(
        encoder=CLIP, fast_paths=("fused encoder layers",), notes="images (no padding); in SiglipModel too; inference"
    ),
    "splinter": Support(encoder=BERT),
    "t5": _seq2seq(T5, "; T5EncoderModel too; relative-position bias; RMS norms as one kernel (CUDA, fp16/bf16)"),
    "vilt": Support(
        encoder=VILT,
        notes="text tokens and image patches together, padding-free over the mask of both (the text's "
        "padding, pixel_mask)",
    ),
    "vit": _VISION,
    "vit_mae": _VISION,
    "vit_msn": _VISION,
    "wav2vec2": Support(encoder=WAV2VEC2, notes=_SPEECH_NOTES),
    "whisper": Support(
        encoder=MBART,
        fast_paths=("fused encoder layers", "static-cache CUDA-graph generate"),
        notes="Whisper's own generate prepares each call (language, task, suppressed tokens); the decoding loop is "
        "ours unless timestamps, beam search or the fallback thresholds (which need scores) ask for transformers' own",
    ),
    "xlm-roberta": Support(encoder=BERT),
    "xlm-roberta-xl": Support(encoder=XLM_ROBERTA_XL, notes="pre-LayerNorm"),
    "yolos": Support(
        encoder=YOLOS,
        fast_paths=("fused encoder layers",),
        notes="images (no padding): inference; the mid-position embeddings added between the packed layers",
    ),  # fmt: skip
    # Decoders (causal LMs)
    "bloom": replace(
        DECODER,
        attention=ModuleAttention(
            "BloomAttention", bloom_attention, requires=(("pretraining_tp", 1),), alibi=bloom_alibi_slopes
        ),
        fast_paths=("padding-free prefill", "static-cache CUDA-graph generate"),
        notes="ALiBi; attention modules routed through ours; no packed-row training (no position_ids input)",
    ),
    "codegen": replace(
        DECODER,
        attention=ModuleAttention("CodeGenAttention", scaled_attention, method="_attn", fallback=True),
        notes=OLD_ATTN,
    ),
    "falcon": replace(
        DECODER,
        attention=ModuleAttention("FalconAttention", falcon_attention, requires=(("alibi", False),)),
        notes="rotary configs (ALiBi ones are refused); attention modules routed through ours",
    ),
    "gemma": _fused(LlamaDecodeStep),
    "gemma2": replace(_fused(Gemma2DecodeStep), notes="attention and final logit softcapping; sliding-window layers"),
    "gemma3_text": replace(_fused(Gemma2DecodeStep), notes="sliding-window layers; q/k norms"),
    "glm": replace(_fused(GlmDecodeStep), notes="interleaved partial rotary; fused gate/up projection"),
    "glm4": replace(_fused(Glm4DecodeStep), notes="as glm, with post-norms"),
    "gpt2": _fused(GPT2DecodeStep),
    "gpt_bigcode": replace(DECODER, notes="multi-query attention"),
    "granite": replace(_fused(GraniteDecodeStep), notes="embedding, residual, attention and logit multipliers"),
    "gpt_neo": replace(
        DECODER,
        attention=ModuleAttention("GPTNeoSelfAttention", gpt_neo_attention),
        notes="attention modules routed through ours (they bypass the interface); local layers' sliding window",
    ),
    "gpt_neox": DECODER,
    "gptj": replace(
        DECODER,
        attention=ModuleAttention("GPTJAttention", scaled_attention, method="_attn", fallback=True),
        notes=OLD_ATTN,
    ),
    "helium": replace(_fused(HeliumDecodeStep), notes="interleaved rotary"),
    "llama": _fused(LlamaDecodeStep),
    "ministral": replace(_fused(LlamaDecodeStep), notes="sliding-window layers"),
    "mistral": replace(_fused(MistralDecodeStep), notes="sliding window"),
    "mixtral": replace(DECODER, notes="sliding window; mixture of experts"),
    "olmo2": replace(_fused(Olmo2DecodeStep), notes="post-norms; q/k norms over the whole projection"),
    "olmo3": replace(_fused(Olmo2DecodeStep), notes="as olmo2, with sliding-window layers"),
    "opt": DECODER,
    "phi3": replace(_fused(Phi3DecodeStep), notes="fused qkv and gate/up projections"),
    "qwen2": replace(_fused(LlamaDecodeStep), notes="q/k/v bias; sliding-window layers"),
    "qwen3": replace(_fused(LlamaDecodeStep), notes="per-head q/k norms; sliding-window layers"),
    "seed_oss": replace(_fused(LlamaDecodeStep), notes="q/k/v (and output) bias"),
    "smollm3": replace(_fused(LlamaDecodeStep), notes="layers without rotary positions (NoPE)"),
    "starcoder2": replace(_fused(Starcoder2DecodeStep), notes="sliding window; LayerNorms and biases"),
}


def support_for(base: nn.Module, root: nn.Module) -> Support | None:
    """The registry entry for base model ``base`` inside ``root``; causal LMs of unlisted types that use the
    attention interface get the general decoder entry (not verified by our tests)."""
    model_type = getattr(base.config, "model_type", None) or ""
    support = REGISTRY.get(model_type)
    if support is not None and support.encoder is not None and support.encoder.entry is not None:
        if getattr(base.config, "is_decoder", False):
            support = None  # the decoder of an encoder-decoder type alone (BartForCausalLM): see below
    if support is not None:
        return support
    if getattr(base.config, "is_encoder_decoder", False):
        return None
    is_lm_head = any(
        type(m).__name__.endswith("ForCausalLM") and getattr(m, "base_model", None) is base for m in root.modules()
    )
    if is_lm_head and getattr(type(base), "_can_set_attn_implementation", lambda: False)():
        return replace(DECODER, notes="general decoder path, not verified by bettertransformer's tests")
    return None


def register(model_type: str, support: Support, *, overwrite: bool = False) -> None:
    """Add an architecture of your own (or replace one with ``overwrite=True``).

    Example, for a BERT-shaped encoder whose layers name their projections differently::

        register("my-encoder", Support(encoder=EncoderLayout(q="attn.wq", k="attn.wk", v="attn.wv", o="attn.wo")))
    """
    if model_type in REGISTRY and not overwrite:
        raise ValueError(f"model type {model_type!r} is already registered; pass overwrite=True to replace it")
    REGISTRY[model_type] = support


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values ``transform`` accepts, sorted."""
    return sorted(t for t, support in REGISTRY.items() if not support.refused)


def supported_models_markdown() -> str:
    """The README's supported-model table, generated from the registry (a test keeps the README current); refused
    types last, with the reason."""
    lines = ["| model type | fast path | notes |", "|---|---|---|"]
    for model_type in supported_model_types():
        support = REGISTRY[model_type]
        lines.append(f"| `{model_type}` | {', '.join(support.fast_paths)} | {support.notes} |")
    for model_type in sorted(t for t, support in REGISTRY.items() if support.refused):
        lines.append(f"| `{model_type}` | none: refused | {REGISTRY[model_type].refused} |")
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> None:
    """Rewrite the supported-model table between the README's markers (``make readme-table``)."""
    with open(path) as f:
        text = f.read()
    start = text.index("\n", text.index("<!-- supported-models:start")) + 1
    end = text.index("<!-- supported-models:end -->")
    with open(path, "w") as f:
        f.write(text[:start] + supported_models_markdown() + "\n" + text[end:])


if __name__ == "__main__":
    update_readme()
