"""Several threads calling one transformed model at once get what each call gets alone (issue 15)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from decoder_zoo import PAD, make_decoder
from zoo import make_model

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.switches import SWITCHES


def _requests(vocab: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) of random shapes: batch 1-4, prompts of 4-19 tokens, some rows left-padded."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        batch, width = rng.randint(1, 4), rng.randint(4, 19)
        ids = torch.randint(3, vocab, (batch, width), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(batch):
            mask[row, : rng.choice([0, 0, rng.randint(1, width - 1)])] = 0
        out.append((ids.masked_fill(mask == 0, PAD), mask))
    return out


def _in_threads(fn, items, threads: int = 4):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])
def test_concurrent_generate_gives_each_request_its_own_tokens(name, monkeypatch):
    monkeypatch.setattr(SWITCHES, "generate_devices", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(SWITCHES, "max_graphs", 2)  # fewer runners than shapes: runners are dropped under load
    model = BetterTransformer.transform(make_decoder(name))
    requests = _requests(model.config.vocab_size, 12, seed=0)

    def generate(request):
        ids, mask = request
        return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)

    alone = [generate(r) for r in requests]
    for round_ in range(2):
        together = _in_threads(generate, requests)
        wrong = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if not torch.equal(a, b)]
        assert not wrong, f"round {round_}: requests {wrong} differ from the same request run alone"
    assert call_counts(model)["fast generate"] == 3 * len(requests)


def test_concurrent_generate_and_direct_forwards_mix(monkeypatch):
    """Forwards on one thread while generate runs on others: a BLOOM forward builds the stock mask its modules
    expect, whatever the decode steps of other threads do."""
    monkeypatch.setattr(SWITCHES, "generate_devices", frozenset({"cpu", "cuda"}))
    stock = make_decoder("bloom")
    model = BetterTransformer.transform(stock, keep_original_model=True)
    requests = _requests(model.config.vocab_size, 8, seed=1)
    with torch.no_grad():
        expected = [stock(ids, attention_mask=mask).logits for ids, mask in requests]

    def work(item):
        index, (ids, mask) = item
        if index % 2:
            return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits

    for _ in range(2):
        results = _in_threads(work, list(enumerate(requests)))
        for index in range(0, len(requests), 2):
            keep = requests[index][1].bool()
            assert torch.allclose(results[index][keep], expected[index][keep], atol=2e-5), index


def test_concurrent_encoder_forwards_match_alone():
    model = BetterTransformer.transform(make_model("bert"))
    requests = _requests(model.config.vocab_size, 24, seed=2)

    def forward(request):
        ids, mask = request
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    alone = [forward(r) for r in requests]
    for _ in range(3):
        together = _in_threads(forward, requests)
        for index, (a, b) in enumerate(zip(alone, together, strict=True)):
            assert torch.equal(a, b), index
    assert call_counts(model)["fast"] == 4 * len(requests)
