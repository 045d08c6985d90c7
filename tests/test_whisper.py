"""Whisper (issue 13): the encoder's layers on our fused path, and Whisper's own generate (which prepares the
decoder's prompt, its suppressed tokens and the encoder's states) with our decoding loop. Tiny random-weight models,
fp32 on the CPU, against the stock model, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from bettertransformer import BetterTransformer, call_counts, reverse

WHISPER = dict(
    vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8, max_source_positions=50,
    max_target_positions=64, decoder_start_token_id=100, eos_token_id=101, pad_token_id=101, bos_token_id=101,
    begin_suppress_tokens=[5, 101], suppress_tokens=[7, 8], init_std=0.5, dropout=0.0, attention_dropout=0.0,
    activation_dropout=0.0,
)  # fmt: skip


def make_whisper(**overrides) -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**{**WHISPER, **overrides})).eval()
    model.generation_config.no_timestamps_token_id = 110  # what return_timestamps needs
    return model


def _features(batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 8, 100)  # 100 frames: 50 encoder positions


def test_encoder_matches_stock():
    stock = make_whisper()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    with torch.no_grad():
        expected, actual = (m.get_encoder()(_features()).last_hidden_state for m in (stock, fast))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert call_counts(fast)["fast"] == 1


def test_generate_runs_our_loop_inside_whispers_generate(fast_loop_on_cpu):
    """Suppressed tokens (always, and at the first step), minimum lengths, a repetition penalty, sampling; the
    tokens equal stock's."""
    stock = make_whisper()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    features = _features()
    cases = [
        dict(max_new_tokens=9), dict(max_new_tokens=12, min_new_tokens=10), dict(max_new_tokens=9, repetition_penalty=1.3),
        dict(max_length=6),
    ]  # fmt: skip
    for kwargs in cases:
        assert torch.equal(fast.generate(features, **kwargs), stock.generate(features, **kwargs)), kwargs
    greedy = stock.generate(features[:1], max_new_tokens=8)
    assert torch.equal(fast.generate(features[:1], max_new_tokens=8, do_sample=True, top_k=1), greedy)
    counts = call_counts(fast)
    assert counts["fast generate"] == len(cases) + 1 and counts["stock generate"] == 0, counts


def test_language_and_task_prompts(fast_loop_on_cpu):
    """A multilingual configuration: the decoder's prompt is the start, language, task and no-timestamps tokens
    (four tokens), given or with the language detected first; the tokens equal stock's."""
    stock = make_whisper()
    config = stock.generation_config
    config.is_multilingual = True
    config.lang_to_id = {"<|en|>": 102, "<|de|>": 103}
    config.task_to_id = {"transcribe": 104, "translate": 105}
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    cases = [dict(language="en", task="transcribe"), dict(language="de", task="translate"), dict(task="transcribe")]
    for kwargs in cases:
        expected = stock.generate(_features(), max_new_tokens=8, **kwargs)
        assert torch.equal(fast.generate(_features(), max_new_tokens=8, **kwargs), expected), kwargs
    assert call_counts(fast)["fast generate"] == len(cases)


def test_suppressed_tokens_are_never_chosen(fast_loop_on_cpu):
    """The tokens stock chooses most, suppressed: neither model chooses them, and both choose the same."""
    stock = make_whisper()
    features = _features()
    first = stock.generate(features, max_new_tokens=9)
    common = torch.mode(first.flatten()).values.item()
    stock.generation_config.suppress_tokens = [7, 8, common]
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    expected, actual = (m.generate(features, max_new_tokens=9) for m in (stock, fast))
    assert torch.equal(actual, expected) and not (actual == common).any()
    assert call_counts(fast)["fast generate"] == 1


def test_timestamps_beams_and_an_eager_decoder_run_transformers_loops(fast_loop_on_cpu):
    stock = make_whisper()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    features = _features()
    for kwargs in (dict(max_new_tokens=7, return_timestamps=True), dict(max_new_tokens=7, num_beams=2)):
        assert torch.equal(fast.generate(features, **kwargs), stock.generate(features, **kwargs)), kwargs
    assert call_counts(fast)["stock generate"] == 2 and call_counts(fast)["fast generate"] == 0
    eager = make_whisper(attn_implementation="eager")
    fast = BetterTransformer.transform(eager, keep_original_model=True)
    assert torch.equal(fast.generate(features, max_new_tokens=6), eager.generate(features, max_new_tokens=6))
    assert call_counts(fast)["stock generate"] == 1
    reverse(fast)
    assert "generate" not in vars(fast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_generate_replays_captured_steps_on_cuda(no_tf32):
    stock = make_whisper().cuda()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    for batch, new in ((3, 12), (1, 9), (3, 12)):
        features = _features(batch).cuda()
        assert torch.equal(fast.generate(features, max_new_tokens=new), stock.generate(features, max_new_tokens=new))
    assert call_counts(fast)["fast generate"] == 3
    assert BetterTransformer.cache_info(fast)["graphs"] >= 2
