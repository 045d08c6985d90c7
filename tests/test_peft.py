"""PEFT LoRA models: transform, train, merge and reverse; outputs and gradients equal the stock PEFT model's
(issue 16)."""

from __future__ import annotations

import copy

import pytest
import torch
from decoder_zoo import PAD, left_padded_batch, make_decoder
from helpers import assert_close_at
from transformers import AutoModelForSequenceClassification
from zoo import LAYOUTS, make_batch, make_model

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.switches import SWITCHES

peft = pytest.importorskip("peft")


def _lora(model, targets, seed=0):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def test_lora_encoder_trains_like_stock_peft_then_merges_and_reverses():
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    encoder = make_model("bert", auto_class=AutoModelForSequenceClassification, **no_dropout)
    stock = _lora(encoder, ["query", "value", "dense"])
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    ids, mask = make_batch(*LAYOUTS["right"])  # the classifier reads position 0: a real token with right padding
    labels = torch.tensor([0, 1, 1, 0])
    for m in (stock, fast):
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert call_counts(fast)["fast"] == 1 and call_counts(fast)["stock"] == 0
    grads, expected = _lora_grads(fast), _lora_grads(stock)
    assert grads.keys() == expected.keys() and grads
    for name in expected:
        assert torch.allclose(grads[name], expected[name], atol=1e-6), name
    # Merged: the adapters fold into plain Linears, which the fast path re-reads and fuses.
    merged_stock, merged_fast = stock.eval().merge_and_unload(), fast.eval().merge_and_unload()
    with torch.no_grad():
        expected_out = merged_stock(input_ids=ids, attention_mask=mask).logits
        out = merged_fast(input_ids=ids, attention_mask=mask).logits
    assert call_counts(fast)["fast"] == 2
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    before = {k: v.clone() for k, v in merged_fast.state_dict().items()}
    BetterTransformer.reverse(fast)
    for key, value in merged_fast.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_lora_applied_after_transform_keeps_the_fast_path():
    model = BetterTransformer.transform(make_model("bert"))
    stock = make_model("bert")
    lora_fast, lora_stock = _lora(model, ["query", "key"]), _lora(stock, ["query", "key"])
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        out = lora_fast(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = lora_stock(input_ids=ids, attention_mask=mask).last_hidden_state
    assert call_counts(model)["fast"] == 1
    assert_close_at(out, expected, mask, atol=1e-5, what="LoRA after transform")


def test_lora_decoder_generates_and_trains_like_stock_peft(monkeypatch):
    monkeypatch.setattr(SWITCHES, "generate_devices", frozenset({"cpu", "cuda"}))
    stock = _lora(make_decoder("llama"), ["q_proj", "v_proj"])
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    ids, mask = left_padded_batch(stock.config.vocab_size, (11, 4, 7))
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert call_counts(fast)["fast generate"] == 1
    labels = ids.masked_fill(mask == 0, -100)
    for m in (stock, fast):
        m.train()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads, expected = _lora_grads(fast), _lora_grads(stock)
    assert grads.keys() == expected.keys() and grads
    for name in expected:
        assert torch.allclose(grads[name], expected[name], atol=1e-6), name
