"""Speech encoders (wav2vec2, HuBERT, data2vec-audio): the transformer encoder skips the frames the mask marks as
padding (issue 13). Tiny random-weight models, fp32 on the CPU, against stock on padded and unpadded audio."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_at, assert_error_within_stock, half_precision_trio
from transformers import AutoConfig, AutoModel, AutoModelForCTC, AutoModelForAudioClassification

from bettertransformer import BetterTransformer, call_counts, reverse

_SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, conv_dim=(16, 16),
    conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
    layerdrop=0.0, vocab_size=12, num_labels=3, mask_time_prob=0.0,
)  # fmt: skip
AUDIO_CONFIGS: dict[str, dict] = {
    "wav2vec2": dict(feat_extract_norm="layer"),
    "hubert": dict(feat_extract_norm="layer"),
    "data2vec-audio": {},
}


def make_audio_model(model_type: str, auto_class=AutoModel, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**_SMALL, **AUDIO_CONFIGS[model_type], **overrides})
    return auto_class.from_config(config).eval()


def _clips(lengths: list[int], width: int = 1600) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    audio = torch.randn(len(lengths), width, generator=gen)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return audio * mask, mask


@pytest.mark.parametrize("lengths", [[1600, 900, 300], [1600, 1600]])
@pytest.mark.parametrize("model_type", sorted(AUDIO_CONFIGS))
def test_encoder_and_heads_match_stock_on_real_frames(model_type, lengths):
    audio, mask = _clips(lengths)
    for auto_class in (AutoModel, AutoModelForCTC, AutoModelForAudioClassification):
        stock = make_audio_model(model_type, auto_class)
        fast = BetterTransformer.transform(stock, keep_original_model=True)
        with torch.no_grad():
            expected, actual = stock(audio, attention_mask=mask), fast(audio, attention_mask=mask)
        out = "last_hidden_state" if auto_class is AutoModel else "logits"
        e, a = getattr(expected, out), getattr(actual, out)
        # Per frame: compare the real frames (padded ones hold zeros here, stock's states there).
        frames = stock._get_feature_vector_attention_mask(e.shape[1], mask) if e.dim() == 3 else None
        assert_close_at(a, e, frames, atol=1e-5, rtol=1e-5)
        counts = call_counts(fast)
        if auto_class is AutoModelForAudioClassification:
            # transformers 5.24+ makes this head ask for every layer's hidden states (and drop them): stock layers.
            assert counts["fast"] + counts["stock"] == 1
        else:
            assert counts["fast"] == 1 and counts["stock"] == 0, auto_class


def test_no_mask_and_training_and_reverse():
    stock = make_audio_model("wav2vec2")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    audio, _ = _clips([1600, 1600])
    with torch.no_grad():
        torch.testing.assert_close(fast(audio).last_hidden_state, stock(audio).last_hidden_state, atol=1e-5, rtol=1e-5)
    fast.train()
    stock.train()
    torch.testing.assert_close(fast(audio).last_hidden_state, stock(audio).last_hidden_state)  # stock layers ran
    assert call_counts(fast)["fast"] == 1 and call_counts(fast)["stock"] == 1
    reverse(fast)
    assert "forward" not in vars(fast.encoder) and "forward" not in vars(fast.encoder.layers[0])
    assert "forward" not in vars(fast.encoder.pos_conv_embed.conv)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "groups"),
    [(1, 10, 5, 0, 1), (8, 3, 2, 0, 1), (8, 2, 2, 0, 1), (4, 1, 1, 0, 1), (8, 16, 1, 8, 4), (8, 5, 1, 2, 8), (6, 3, 2, 1, 2)],
)  # fmt: skip
def test_convolutions_as_matrix_products(channels, kernel, stride, padding, groups, bias):
    """``conv1d_gemm`` (the positional convolution of wav2vec2 and its kin on CUDA in fp16/bf16) computes conv1d, for
    a (B, C, T) input and for a transposed (B, T, C) one, in chunks of batch rows too; the transformed model routes
    the positional convolution (weight-normed, padded, grouped) through it, not the feature encoder's."""
    from bettertransformer.ops.fused import conv1d_gemm

    torch.manual_seed(0)
    x = torch.randn(3, channels, 57, dtype=torch.float64)
    weight = torch.randn(16, channels // groups, kernel, dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64) if bias else None
    expected = torch.nn.functional.conv1d(x, weight, b, stride=stride, padding=padding, groups=groups)
    for given, chunk in ((x, 1 << 30), (x.transpose(1, 2).contiguous().transpose(1, 2), 1)):
        got = conv1d_gemm(given, weight, b, stride, padding, groups, chunk_bytes=chunk)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    fast = BetterTransformer.transform(make_audio_model("hubert"))
    assert "forward" in vars(fast.encoder.pos_conv_embed.conv)
    assert not any("forward" in vars(layer.conv) for layer in fast.feature_extractor.conv_layers)


def test_pre_layernorm_configurations_are_refused_with_the_reason():
    model = make_audio_model("wav2vec2", do_stable_layer_norm=True)
    with pytest.raises(NotImplementedError, match="do_stable_layer_norm"):
        BetterTransformer.transform(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_a_small_multiple_of_stock_on_cuda(dtype):
    reference, stock, fast = half_precision_trio(lambda: make_audio_model("wav2vec2"), dtype)
    audio, mask = (t.cuda() for t in _clips([1600, 900, 300]))
    with torch.no_grad():
        expected = reference(audio, attention_mask=mask).last_hidden_state
        frames = reference._get_feature_vector_attention_mask(expected.shape[1], mask)
        stock_out, ours = (m(audio.to(dtype), attention_mask=mask).last_hidden_state for m in (stock, fast))
    assert_error_within_stock(ours, stock_out, expected, frames)
    assert call_counts(fast)["fast"] == 1
    assert "forward" in vars(fast.encoder.pos_conv_embed.conv)  # its matrix products ran
