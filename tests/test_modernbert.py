"""ModernBERT (issue 13): its own forward on the packed real tokens, rotary positions by padded position, the local
layers' bidirectional window inside each sequence. Tiny random-weight models, fp32 on the CPU, against stock."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification
from helpers import assert_close_at, assert_error_within_stock, half_precision_trio
from zoo import LAYOUTS, VOCAB, make_batch

from bettertransformer import BetterTransformer, call_counts, reverse

MODERNBERT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
    local_attention=8, global_attn_every_n_layers=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, cls_token_id=1, sep_token_id=2, embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0,
    classifier_dropout=0.0,
)  # fmt: skip


def make_modernbert(auto_class=AutoModel, **overrides):
    torch.manual_seed(0)
    return auto_class.from_config(AutoConfig.for_model("modernbert", **{**MODERNBERT, **overrides})).eval()


@pytest.mark.parametrize("layout", ["right", "left", "length1", "one_long", "empty_row"])
def test_hidden_states_match_stock_at_real_tokens(layout):
    """Rows of 24 tokens against a local window of 8: the window matters, within each sequence."""
    stock = make_modernbert()
    assert "sliding_attention" in stock.config.layer_types
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch(*LAYOUTS[layout])
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_at(actual, expected, mask, atol=1e-5, rtol=1e-5)
    assert (actual[~mask.bool()] == 0).all()
    assert call_counts(fast)["fast"] == 1


@pytest.mark.parametrize("auto_class", [AutoModelForMaskedLM, AutoModelForSequenceClassification])
def test_task_heads_match_stock(auto_class):
    stock = make_modernbert(auto_class, classifier_pooling="mean")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    with torch.no_grad():
        expected, actual = (
            stock(input_ids=ids, attention_mask=mask).logits,
            fast(input_ids=ids, attention_mask=mask).logits,
        )
    assert_close_at(actual, expected, mask if expected.dim() == 3 else None, atol=1e-5, rtol=1e-5)
    assert call_counts(fast)["fast"] == 1


def test_calls_it_does_not_cover_run_stock(caplog):
    stock = make_modernbert()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    holes = mask.clone()
    holes[0, 3:6] = 0
    with torch.no_grad():
        for kwargs in (dict(attention_mask=holes), dict(attention_mask=mask, output_hidden_states=True), dict()):
            expected = stock(input_ids=ids, **kwargs).last_hidden_state
            actual = fast(input_ids=ids, **kwargs).last_hidden_state
            torch.testing.assert_close(actual, expected)
    assert call_counts(fast) == {"fast": 0, "stock": 3}


def test_left_padding_under_a_cls_pooler_warns(caplog):
    fast = BetterTransformer.transform(make_modernbert(AutoModelForSequenceClassification))
    ids, mask = make_batch([24, 17, 5, 11], "left")
    with caplog.at_level(logging.WARNING, logger="bettertransformer"), torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    assert "reads position 0" in caplog.text


def test_training_gradients_match_stock_and_reverse():
    stock = make_modernbert(AutoModelForSequenceClassification, classifier_pooling="mean").train()
    fast = BetterTransformer.transform(stock, keep_original_model=True).train()
    ids, mask = make_batch([24, 17, 5, 11], "right")
    labels = torch.tensor([0, 1, 0, 1])
    stock(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    fast(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(stock.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    reverse(fast)
    assert fast.config._attn_implementation == stock.config._attn_implementation
    assert "forward" not in vars(fast.model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_a_small_multiple_of_stock_on_cuda(dtype):
    """On the GPU the packed attention is flash varlen, with a bidirectional window in the local layers."""
    reference, stock, fast = half_precision_trio(make_modernbert, dtype)
    ids, mask = (t.cuda() for t in make_batch([24, 17, 5, 11], "right"))
    with torch.no_grad():
        expected, stock_out, ours = (
            m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (reference, stock, fast)
        )
    assert_error_within_stock(ours, stock_out, expected, mask)
    assert call_counts(fast)["fast"] == 1
