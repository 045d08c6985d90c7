"""Tiny random-weight models, one per registered model type, built from configs (no hub access)."""

from __future__ import annotations

import torch
from transformers import AutoConfig

VOCAB = 99
SEQ = 24

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    pad_token_id=0,
)

# Per model type: config overrides (on top of _COMMON unless the type names its own sizes).
CONFIGS: dict[str, dict] = {
    "albert": dict(embedding_size=16, num_hidden_groups=1, inner_group_num=1, num_hidden_layers=3),
    "bert": {},
    "camembert": {},
    "data2vec-text": {},
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, pad_token_id=0),
    "electra": dict(embedding_size=16),
    "ernie": {},
    "layoutlm": {},
    "markuplm": {},
    "megatron-bert": {},
    "mpnet": dict(relative_attention_num_buckets=32),
    "roberta": {},
    "roberta-prelayernorm": {},
    "roc_bert": {},
    "splinter": {},
    "xlm-roberta": {},
    "xlm-roberta-xl": {},
    "bert-generation": {},
    "rembert": dict(input_embedding_size=16, output_embedding_size=16),
    "roformer": dict(embedding_size=32),
}

_OWN_SIZES = {"distilbert"}


def config_for(model_type: str, **overrides):
    """A tiny config of ``model_type`` with dropout off (so train-mode gradients are deterministic)."""
    kwargs = dict(CONFIGS[model_type]) if model_type in _OWN_SIZES else {**_COMMON, **CONFIGS[model_type]}
    kwargs.update(
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.0,
        classifier_dropout_prob=0.0,
        seq_classif_dropout=0.0,
        qa_dropout=0.0,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_model(model_type: str, auto_class=None, seed: int = 0, **overrides):
    """A tiny random-weight model in eval mode, fp32, on the CPU."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    auto_class = auto_class or AutoModel
    return auto_class.from_config(config_for(model_type, **overrides)).eval()


# Padding layouts: name -> per-row real lengths and which side the padding is on.
LAYOUTS: dict[str, tuple[list[int], str]] = {
    "none": ([SEQ] * 4, "right"),
    "right": ([SEQ, 17, 5, 11], "right"),
    "left": ([SEQ, 17, 5, 11], "left"),
    "length1": ([1, SEQ, 1, 9], "right"),
    "one_long": ([SEQ, 2, 3, 2], "right"),
    "empty_row": ([SEQ, 0, 5, 11], "left"),  # a row with no real token: finite, and no NaN reaches the others
}


def make_batch(lengths: list[int], side: str = "right", seq: int = SEQ, seed: int = 1):
    """(input_ids, attention_mask), both (B, seq) int64; padded slots hold token 0 and mask 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        if side == "right":
            mask[row, :length] = 1
        else:
            mask[row, seq - length :] = 1
    return ids * mask, mask
