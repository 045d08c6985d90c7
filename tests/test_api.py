"""transform / reverse / save_pretrained / register: the one-line API and its promises."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification
from zoo import LAYOUTS, make_batch, make_model

import bettertransformer
from bettertransformer import BetterTransformer, EncoderLayout, Support, call_counts, is_transformed, register


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _has_instance_forward(model):
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def test_in_place_transform_shares_parameters_and_reverse_restores_stock():
    model = make_model("bert")
    before = _state(model)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    classes = {n: type(m) for n, m in model.named_modules()}

    out = BetterTransformer.transform(model)
    assert out is model and is_transformed(model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert list(model.state_dict()) == list(before)
    assert _has_instance_forward(model) == ["", "encoder"]

    back = BetterTransformer.reverse(model)
    assert back is model and not is_transformed(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == hooks
    assert _has_instance_forward(model) == []
    _assert_state_equal(_state(model), before)


def test_keep_original_model_returns_a_transformed_copy():
    model = make_model("bert")
    before = _state(model)
    copy_ = BetterTransformer.transform(model, keep_original_model=True)
    assert copy_ is not model
    assert is_transformed(copy_) and not is_transformed(model)
    assert _has_instance_forward(model) == []
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), copy_.parameters()))
    _assert_state_equal(_state(model), before)
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        torch.testing.assert_close(
            copy_(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None],
            model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None],
        )


def test_a_model_made_under_inference_mode_transforms_and_matches_stock():
    # Parameters made (or copied) under torch.inference_mode are inference tensors, with no version counter.
    model = make_model("bert")
    with torch.inference_mode():
        stock = copy.deepcopy(model)
        fast = BetterTransformer.transform(copy.deepcopy(model))
        assert next(fast.parameters()).is_inference()
        ids, mask = make_batch(*LAYOUTS["right"])
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
        got = fast(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    assert call_counts(fast)["fast"] == 1
    torch.testing.assert_close(got, expected)


def test_reverse_keeps_fine_tuned_weights():
    model = BetterTransformer.transform(make_model("bert", AutoModelForSequenceClassification).train())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids, mask = make_batch(*LAYOUTS["left"])
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
    assert call_counts(model)["fast"] == 2
    tuned = _state(model)
    assert not torch.equal(
        tuned["bert.encoder.layer.0.attention.self.query.weight"],
        _state(make_model("bert", AutoModelForSequenceClassification))[
            "bert.encoder.layer.0.attention.self.query.weight"
        ],
    )
    BetterTransformer.reverse(model)
    _assert_state_equal(_state(model), tuned)


def test_save_pretrained_writes_a_stock_checkpoint(tmp_path):
    model = BetterTransformer.transform(make_model("roberta", AutoModelForSequenceClassification))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not is_transformed(loaded) and _has_instance_forward(loaded) == []
    expected = _state(BetterTransformer.reverse(model))
    _assert_state_equal(_state(loaded), expected)


def test_double_transform_and_bad_reverse_raise_value_error():
    model = BetterTransformer.transform(make_model("bert"))
    with pytest.raises(ValueError, match="already transformed"):
        BetterTransformer.transform(model)
    BetterTransformer.reverse(model)
    with pytest.raises(ValueError, match="not transformed"):
        BetterTransformer.reverse(model)
    with pytest.raises(ValueError, match="not transformed"):
        BetterTransformer.reverse(make_model("bert"))


def _tiny_umt5():
    from transformers import UMT5Config, UMT5Model

    return UMT5Model(UMT5Config(d_model=32, num_layers=1, num_heads=2, d_ff=37, d_kv=8, vocab_size=99))


def test_unsupported_model_type_names_it_and_lists_supported():
    model = _tiny_umt5()  # an encoder-decoder we do not serve
    with pytest.raises(NotImplementedError) as info:
        BetterTransformer.transform(model)
    assert "'umt5'" in str(info.value)
    for model_type in bettertransformer.supported_model_types():
        assert model_type in str(info.value)
    assert not is_transformed(model)


def test_unsupported_configuration_is_a_clear_error():
    model = make_model("bert", is_decoder=True)
    with pytest.raises(NotImplementedError, match="is_decoder"):
        BetterTransformer.transform(model)
    assert _has_instance_forward(model) == []


def test_module_level_functions_and_supported_types():
    assert bettertransformer.transform is BetterTransformer.transform
    assert bettertransformer.reverse is BetterTransformer.reverse
    types = bettertransformer.supported_model_types()
    for required in [
        "bert",
        "roberta",
        "xlm-roberta",
        "camembert",
        "electra",
        "distilbert",
        "albert",
        "ernie",
        "data2vec-text",
        "mpnet",
    ]:
        assert required in types


class _TinyEncoderLayer(nn.Module):
    """A BERT-shaped layer with its own attribute names, as a user's architecture might have."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act = nn.GELU()

    def forward(self, x, mask):  # x (B, S, d), mask (B, 1, 1, S) bool
        b, s, d = x.shape
        q, k, v = (lin(x).view(b, s, self.heads, -1).transpose(1, 2) for lin in (self.wq, self.wk, self.wv))
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, d)
        x = self.norm1(self.wo(a) + x)
        return self.norm2(self.down(self.act(self.up(x))) + x)


def test_register_a_user_architecture():
    from transformers import BertConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput

    class TinyConfig(BertConfig):
        model_type = "tiny-user-encoder"

    class TinyEncoder(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.blocks = nn.ModuleList(
                _TinyEncoderLayer(config.hidden_size, config.num_attention_heads)
                for _ in range(config.num_hidden_layers)
            )

        def forward(self, hidden_states, attention_mask=None) -> BaseModelOutput:
            for block in self.blocks:
                hidden_states = block(hidden_states, attention_mask)
            return BaseModelOutput(last_hidden_state=hidden_states)

    class TinyModel(PreTrainedModel):
        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.body = TinyEncoder(config)

        def forward(self, input_ids, attention_mask=None):
            mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
            return self.body(self.embed(input_ids), mask)

    torch.manual_seed(0)
    model = TinyModel(TinyConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)).eval()
    layout = EncoderLayout(
        encoder="body",
        layers="blocks",
        q="wq",
        k="wk",
        v="wv",
        o="wo",
        ln1="norm1",
        ffn_in="up",
        act="act",
        ffn_out="down",
        ln2="norm2",
        attn_dropout=None,
        o_dropout=None,
        ffn_dropout=None,
    )
    register("tiny-user-encoder", Support(encoder=layout))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register("tiny-user-encoder", Support(encoder=layout))
        ids, mask = make_batch(*LAYOUTS["left"])
        with torch.no_grad():
            expected = model(ids, mask).last_hidden_state
            BetterTransformer.transform(model)
            actual = model(ids, mask).last_hidden_state
        assert call_counts(model)["fast"] == 1
        keep = mask.bool()
        torch.testing.assert_close(actual[keep], expected[keep], atol=1e-5, rtol=0)
    finally:
        bettertransformer.registry.REGISTRY.pop("tiny-user-encoder")


def test_nested_model_is_found():
    """A module holding a transformers model (as sentence-transformers does) is transformed inside."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model("distilbert")

        def forward(self, **kw):
            return self.inner(**kw)

    stock = Wrapper()
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        torch.testing.assert_close(
            fast(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None],
            stock(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None],
        )
    assert call_counts(fast)["fast"] == 1
    BetterTransformer.reverse(fast)
    assert _has_instance_forward(fast) == []


def test_from_config_auto_model_types_round_trip():
    for model_type in ["albert", "mpnet", "distilbert"]:
        model = make_model(model_type)
        before = _state(model)
        BetterTransformer.reverse(BetterTransformer.transform(model))
        _assert_state_equal(_state(model), before)
        assert isinstance(model, type(AutoModel.from_config(model.config)))


def test_readme_supported_models_table_is_current():
    from pathlib import Path

    from bettertransformer.registry import supported_models_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("<!-- supported-models:start")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- supported-models:end -->")
    assert readme[start:end].strip() == supported_models_markdown(), "regenerate the README table"


def test_readme_switches_section_names_every_switch():
    import dataclasses
    from pathlib import Path

    from bettertransformer.switches import Switches

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Switches") :]
    section = section[: section.index("\n#", 1)]
    missing = [f.name for f in dataclasses.fields(Switches) if f"`{f.name}`" not in section]
    assert not missing, f"README's Switches section does not name {missing}"
