"""Tiny random-weight causal LMs, one per decoder model type plus named variants, built from configs (no hub access)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
WINDOW = 8  # sliding window, well under the ~20-token sequences the tests use

_IDS = dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
# GPT-2 style names (n_embd, n_layer, ...); the *_pdrop keys are its dropouts.
_GPT2 = dict(
    vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=37, n_positions=128,
    attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **_IDS,
)  # fmt: skip
# Llama style names; head_dim 16.
_LLAMA = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    max_position_embeddings=128, attention_dropout=0.0, **_IDS,
)  # fmt: skip
_GQA = dict(num_key_value_heads=2)
_SWA = dict(sliding_window=WINDOW)
# Gemma's default head_dim and query scale are 256, not hidden_size // heads.
_GEMMA = dict(**_LLAMA, **_GQA, head_dim=16)

# Per model type: kwargs for AutoConfig.for_model (every dropout 0, special ids inside the vocab).
# fmt: off
DECODER_CONFIGS: dict[str, dict] = {
    "gpt2": dict(**_GPT2, summary_first_dropout=0.0),
    "gpt_neo": dict(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=37,
        max_position_embeddings=128, attention_types=[[["global"], 2]], window_size=WINDOW,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, classifier_dropout=0.0, **_IDS,
    ),
    "gptj": dict(**_GPT2, rotary_dim=8),
    "gpt_neox": dict(**_LLAMA, hidden_dropout=0.0, classifier_dropout=0.0),  # partial rotary (0.25)
    "opt": dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
        max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
        **_IDS,
    ),
    "bloom": dict(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0, **_IDS
    ),
    "codegen": dict(**_GPT2, n_ctx=128, rotary_dim=8),
    "llama": dict(**_LLAMA, **_GQA),
    "mistral": dict(**_LLAMA, **_GQA, **_SWA),
    # Experts run through torch grouped_mm, which needs 16-byte strides: intermediate 32, not 37.
    "mixtral": dict(**{**_LLAMA, "intermediate_size": 32}, **_GQA, **_SWA, num_local_experts=4, num_experts_per_tok=2),
    # Qwen keeps sliding_window only with use_sliding_window; layers >= max_window_layers slide: [full, sliding].
    "qwen2": dict(**_LLAMA, **_GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(**_LLAMA, **_GQA, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma": dict(_GEMMA),
    # layer_types default to [sliding, full]; attn (50) and final (30) logit softcapping stay at their defaults.
    "gemma2": dict(**_GEMMA, **_SWA, query_pre_attn_scalar=16),
    "gemma3_text": dict(
        **_GEMMA, **_SWA, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi3": dict(**_LLAMA, **_GQA, **_SWA, original_max_position_embeddings=128, embd_pdrop=0.0, resid_pdrop=0.0),
    # Falcon-7B layout: rotary, multi-query, parallel attention/MLP.
    "falcon": dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=37,
        max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0, **_IDS,
    ),
    "gpt_bigcode": dict(_GPT2),  # multi-query by default
    "starcoder2": dict(**_LLAMA, **_GQA, **_SWA, embedding_dropout=0.0, residual_dropout=0.0),
    "olmo2": dict(**_LLAMA, **_GQA),
    "olmo3": dict(**_LLAMA, **_GQA, **_SWA, layer_types=["sliding_attention", "full_attention"]),
    "ministral": dict(**_LLAMA, **_GQA, **_SWA, head_dim=16, layer_types=["sliding_attention", "full_attention"]),
    # No sliding window: its attention ignores the config's (stock generate's cache would still apply it).
    "granite": dict(
        **_LLAMA, **_GQA, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
        logits_scaling=8.0,
    ),
    "helium": dict(**_LLAMA, **_GQA, head_dim=16),
    "glm": dict(**_LLAMA, **_GQA, head_dim=16, attention_bias=True),  # partial rotary 0.5 by default
    "glm4": dict(**_LLAMA, **_GQA, head_dim=16, attention_bias=True),
    # NoPE every second layer: layer 1 has no rotary positions.
    "smollm3": dict(**_LLAMA, **_GQA, no_rope_layers=[1, 0], use_sliding_window=False),
    "seed_oss": dict(**_LLAMA, **_GQA, sliding_window=None, attention_bias=True, attention_out_bias=True, head_dim=16),
}
# fmt: on

# Extra named variants: name -> (model type, overrides on top of DECODER_CONFIGS[model type]).
DECODER_VARIANTS: dict[str, tuple[str, dict]] = {
    "falcon-alibi": ("falcon", dict(alibi=True)),
    "falcon-new-arch": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),  # Falcon-40B style GQA
    "gpt_bigcode-mha": ("gpt_bigcode", dict(multi_query=False)),
    "gpt_neo-local": ("gpt_neo", dict(attention_types=[[["global", "local"], 1]])),  # layer 1 windowed
    # Post-LN with a narrower embedding projected in and out, like opt-350m.
    "opt-pre-ln-off": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
}

# The class flag that says whether a model supports each attention implementation.
_SUPPORT_FLAG = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


def decoder_config(model_type_or_variant: str, **overrides):
    """The tiny config of a model type (a DECODER_CONFIGS key) or variant (a DECODER_VARIANTS key)."""
    if model_type_or_variant in DECODER_VARIANTS:
        model_type, extra = DECODER_VARIANTS[model_type_or_variant]
    else:
        model_type, extra = model_type_or_variant, {}
    return AutoConfig.for_model(model_type, **{**DECODER_CONFIGS[model_type], **extra, **overrides})


def _attn_for(config, attn_implementation: str) -> str:
    """``attn_implementation``, or "eager" where the model can't run it.

    No sdpa: bloom and gpt_neo (5.17 and 5.24), gptj and codegen (5.17 only), gemma2 (5.24 only).
    Softcapping (gemma2) also gets eager for sdpa: 5.24 refuses it, 5.17 silently drops the softcap.
    """
    flag = _SUPPORT_FLAG.get(attn_implementation)
    if flag is not None and not getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], flag, False):
        return "eager"
    if attn_implementation == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
        return "eager"
    return attn_implementation


def make_decoder(
    model_type_or_variant: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **overrides
) -> PreTrainedModel:
    """A tiny random-weight causal LM in eval mode, on the CPU (seeded, so the same name gives the same weights)."""
    config = decoder_config(model_type_or_variant, **overrides)
    torch.manual_seed(0)
    attn_implementation = _attn_for(config, attn_implementation)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype).eval()


def left_padded_batch(
    vocab_size: int, lengths: tuple[int, ...] = (12, 5, 9, 1), pad_id: int = PAD, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max(lengths)) int64, padded on the left; real tokens avoid ids 0-2."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, vocab_size, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, seq - length :] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


ALL = sorted(DECODER_CONFIGS) + sorted(DECODER_VARIANTS)


def supported(name: str) -> bool:
    """Whether ``transform`` accepts this zoo entry (some configurations and releases are refused by design)."""
    from bettertransformer.registry import REGISTRY

    model_type = DECODER_VARIANTS[name][0] if name in DECODER_VARIANTS else name
    if model_type not in REGISTRY:
        return False
    routed = REGISTRY[model_type].attention
    if routed is not None:  # routed module by module, for the configurations it covers
        config = decoder_config(name)
        return all(getattr(config, flag) == value for flag, value in routed.requires)
    model = make_decoder(name)
    return type(model.base_model)._can_set_attn_implementation()
