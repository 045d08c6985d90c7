"""The padding-free encoder against the stock model, over the zoo, padding layouts, heads, dtypes and modes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from helpers import assert_close_at, assert_grads_close, max_error_at
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertModel,
)
from decoder_zoo import DECODER_CONFIGS
from zoo import CONFIGS, LAYOUTS, make_batch, make_model

from bettertransformer import BetterTransformer, call_counts, supported_model_types

MODEL_TYPES = sorted(CONFIGS)


def _inputs(model_type: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hidden_states_match_stock(model_type, layout):
    model = make_model(model_type)
    ids, mask = make_batch(*LAYOUTS[layout])
    with torch.no_grad():
        expected = model(**_inputs(model_type, ids, mask)).last_hidden_state
        BetterTransformer.transform(model)
        actual = model(**_inputs(model_type, ids, mask)).last_hidden_state
    assert call_counts(model) == {"fast": 1, "stock": 0}
    assert_close_at(actual, expected, mask, atol=1e-5, what=f"{model_type}/{layout}")
    # Padded positions are zeros.
    assert actual[~mask.bool()].abs().max().item() == 0 if (mask == 0).any() else True


def test_no_mask_and_all_ones_mask_match_stock():
    model = make_model("bert")
    ids, mask = make_batch(*LAYOUTS["none"])
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        BetterTransformer.transform(model)
        no_mask = model(input_ids=ids).last_hidden_state
        ones = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert call_counts(model)["fast"] == 2
    assert_close_at(no_mask, expected, None, atol=1e-5, what="no mask")
    assert_close_at(ones, expected, None, atol=1e-5, what="all-ones mask")


def test_mask_with_holes_and_empty_rows():
    """Any 0/1 key mask is a set of real tokens per row; rows with no real token give zeros."""
    model = make_model("bert")
    ids, mask = make_batch(*LAYOUTS["right"])
    mask[0, 3] = 0
    mask[0, 9] = 0
    mask[2] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        BetterTransformer.transform(model)
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert call_counts(model)["fast"] == 1
    assert_close_at(actual, expected, mask, atol=1e-5, what="holes")
    assert actual[2].abs().max().item() == 0


def test_mpnet_relative_bias_with_holes():
    model = make_model("mpnet")
    ids, mask = make_batch(*LAYOUTS["left"])
    mask[0, 4] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        BetterTransformer.transform(model)
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert call_counts(model)["fast"] == 1
    assert_close_at(actual, expected, mask, atol=1e-5, what="mpnet holes")


@pytest.mark.parametrize(
    "auto_class", [AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoModelForMaskedLM]
)
@pytest.mark.parametrize(
    "model_type", ["bert", "roberta", "distilbert", "albert", "electra", "mpnet", "roberta-prelayernorm"]
)
def test_task_heads_match_stock(model_type, auto_class):
    model = make_model(model_type, auto_class)
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        BetterTransformer.transform(model)
        actual = model(input_ids=ids, attention_mask=mask).logits
    assert call_counts(model)["fast"] == 1
    # Sequence heads read position 0 (a real token with right padding); token heads are compared on real tokens.
    per_token = actual.dim() == 3
    assert_close_at(actual, expected, mask if per_token else None, atol=1e-5, what=auto_class.__name__)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
def test_any_attn_implementation(attn_implementation):
    """Whatever attention the model was loaded with, the fast path gives the stock (sdpa) result.

    The reference is the same weights under sdpa: stock flex_attention on the CPU itself returned non-finite
    values at real tokens of left-padded batches in 5 of 36 runs here (torch 2.13, transformers 5.24).
    """
    model = make_model("bert", attn_implementation=attn_implementation)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    ids, mask = make_batch(*LAYOUTS["left"])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        BetterTransformer.transform(model)
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert call_counts(model)["fast"] == 1
    assert_close_at(actual, expected, mask, atol=1e-5, what=attn_implementation)


# -- calls the fast path cannot honour run the stock computation -----------------------------------------------
def _pair(model_type="bert"):
    stock = make_model(model_type, attn_implementation="eager")
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    return stock, fast


def _both(stock, fast, **inputs):
    """(transformed output, stock output): last_hidden_state of both models on the same inputs."""
    with torch.no_grad():
        return fast(**inputs).last_hidden_state, stock(**inputs).last_hidden_state


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "mpnet"])
def test_output_attentions_and_hidden_states_run_stock(model_type):
    stock, fast = _pair(model_type)
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        exp = stock(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        act = fast(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert call_counts(fast) == {"fast": 0, "stock": 1}
    assert len(act.attentions) == len(exp.attentions) > 0
    for a, e in zip(act.attentions, exp.attentions):
        torch.testing.assert_close(a, e)
    for a, e in zip(act.hidden_states, exp.hidden_states):
        torch.testing.assert_close(a, e)
    # The next ordinary call is fast again.
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    assert call_counts(fast) == {"fast": 1, "stock": 1}


def test_output_hidden_states_from_config_runs_stock():
    stock, fast = _pair()
    fast.config.output_hidden_states = True
    stock.config.output_hidden_states = True
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        exp = stock(input_ids=ids, attention_mask=mask)
        act = fast(input_ids=ids, attention_mask=mask)
    assert call_counts(fast)["stock"] == 1
    assert len(act.hidden_states) == len(exp.hidden_states)


def test_head_model_output_hidden_states_runs_stock():
    stock = make_model("bert", AutoModelForSequenceClassification)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        exp = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        act = fast(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert call_counts(fast) == {"fast": 0, "stock": 1}
    torch.testing.assert_close(act.hidden_states[-1], exp.hidden_states[-1])


def test_4d_mask_runs_stock():
    stock, fast = _pair()
    ids, mask = make_batch(*LAYOUTS["right"])
    mask4d = mask[:, None, None, :].expand(-1, 1, ids.shape[1], -1).bool()
    act, exp = _both(stock, fast, input_ids=ids, attention_mask=mask4d)
    assert call_counts(fast) == {"fast": 0, "stock": 1}
    torch.testing.assert_close(act, exp)


def test_encoder_called_directly_runs_stock():
    stock, fast = _pair()
    hidden = torch.randn(2, 7, 32)
    with torch.no_grad():
        exp = stock.encoder(hidden).last_hidden_state
        act = fast.encoder(hidden).last_hidden_state
    assert call_counts(fast) == {"fast": 0, "stock": 1}
    torch.testing.assert_close(act, exp)


# -- training ------------------------------------------------------------------------------------------------
def _grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("model_type", ["bert", "distilbert", "albert", "mpnet", "xlm-roberta-xl", "megatron-bert"])
def test_train_mode_gradients_match_stock(model_type, checkpointing, monkeypatch):
    if checkpointing and model_type in ("albert", "mpnet"):
        pytest.skip(f"{model_type} does not support gradient checkpointing in transformers")
    stock = make_model(model_type, AutoModelForTokenClassification).train()
    fast = copy.deepcopy(stock)
    if checkpointing:
        stock.gradient_checkpointing_enable()
        fast.gradient_checkpointing_enable()
    BetterTransformer.transform(fast)
    ids, mask = make_batch(*LAYOUTS["left"])
    labels = torch.randint(0, 2, ids.shape).masked_fill(mask == 0, -100)
    from bettertransformer.adapters import encoder

    checkpointed = []
    real_checkpoint = encoder.checkpoint
    monkeypatch.setattr(encoder, "checkpoint", lambda *a, **k: checkpointed.append(1) or real_checkpoint(*a, **k))
    loss_s, grads_s = _grads(stock, ids, mask, labels)
    loss_f, grads_f = _grads(fast, ids, mask, labels)
    assert call_counts(fast)["fast"] == 1
    # With checkpointing on, every packed layer is recomputed in the backward pass rather than kept.
    assert len(checkpointed) == (fast.config.num_hidden_layers if checkpointing else 0)
    torch.testing.assert_close(loss_f, loss_s, atol=1e-6, rtol=1e-5)
    assert grads_f.keys() == grads_s.keys()
    for name, expected in grads_s.items():
        assert_grads_close(grads_f[name], expected, name)


def test_train_mode_with_dropout_runs_fast_and_drops():
    """With dropout on, outputs are random but the fast path runs and masks out padding."""
    model = make_model("bert", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    BetterTransformer.transform(model)
    ids, mask = make_batch(*LAYOUTS["right"])
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert call_counts(model)["fast"] == 2
    assert not torch.allclose(a, b)
    assert a[~mask.bool()].abs().max().item() == 0


def test_fused_qkv_cache_follows_weight_updates():
    """After an in-place weight change (an optimiser step, load_state_dict), outputs follow the new weights."""
    stock, fast = _pair()
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)  # builds the fused-QKV cache
        for model in (stock, fast):
            model.encoder.layer[0].attention.self.key.weight.mul_(1.5)
            model.encoder.layer[1].attention.self.value.bias.add_(0.25)
        exp = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        act = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_at(act, exp, mask, atol=1e-5, what="after update")
    fast.load_state_dict(make_model("bert", seed=7).state_dict())
    stock.load_state_dict(make_model("bert", seed=7).state_dict())
    act, exp = _both(stock, fast, input_ids=ids, attention_mask=mask)
    assert_close_at(act, exp, mask, atol=1e-5, what="after load_state_dict")


# -- low precision (CPU) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_is_a_small_multiple_of_stock(dtype):
    reference = make_model("bert", num_hidden_layers=4, hidden_size=64, intermediate_size=128)
    ids, mask = make_batch(*LAYOUTS["left"])
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        stock = copy.deepcopy(reference).to(dtype)
        stock_err = max_error_at(stock(input_ids=ids, attention_mask=mask).last_hidden_state, ref, mask)
        fast = BetterTransformer.transform(stock)
        fast_err = max_error_at(fast(input_ids=ids, attention_mask=mask).last_hidden_state, ref, mask)
    assert call_counts(fast)["fast"] == 1
    assert fast_err <= 3 * stock_err + 1e-3, (fast_err, stock_err)


def test_zoo_covers_the_registry():
    """Every registered type has a tiny model: the encoders here, the decoders in tests/decoder_zoo.py, the
    encoder-decoders in tests/test_seq2seq.py, the speech encoders in tests/test_audio.py, the vision transformers
    in tests/test_vision.py, ModernBERT in tests/test_modernbert.py."""
    from test_audio import AUDIO_CONFIGS
    from test_seq2seq import SEQ2SEQ_CONFIGS
    from test_vision import VISION_CONFIGS

    zoo = set(CONFIGS) | set(DECODER_CONFIGS) | set(SEQ2SEQ_CONFIGS) | set(AUDIO_CONFIGS) | set(VISION_CONFIGS)
    zoo |= {"modernbert", "whisper"}  # tests/test_modernbert.py, tests/test_whisper.py
    assert set(supported_model_types()) <= zoo
    assert set(CONFIGS) <= set(supported_model_types())


def test_forward_called_directly_is_fast():
    """Callers that use ``model.forward(...)`` rather than ``model(...)`` (sentence-transformers does) get it too."""
    model = BetterTransformer.transform(make_model("bert"))
    ids, mask = make_batch(*LAYOUTS["right"])
    with torch.no_grad():
        model.forward(input_ids=ids, attention_mask=mask)
    assert call_counts(model) == {"fast": 1, "stock": 0}


def test_unknown_tensor_kwargs_run_stock():
    """A tensor argument the packed path does not know (flash-attention packing metadata, say) runs stock."""
    stock, fast = _pair()
    ids, mask = make_batch(*LAYOUTS["right"])
    extra = dict(cu_seq_lens_q=torch.tensor([0, 24, 48, 72, 96], dtype=torch.int32))
    with torch.no_grad():
        act = fast(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        exp = stock(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
    assert call_counts(fast) == {"fast": 0, "stock": 1}
    torch.testing.assert_close(act, exp)


class _ScaledLinear(torch.nn.Linear):
    """Stands in for an adapter (LoRA) or quantized linear: a Linear subclass with its own forward."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_modules_swapped_after_transform_are_honoured():
    stock, fast = _pair()
    ids, mask = make_batch(*LAYOUTS["right"])
    # A plain replacement Linear is picked up by the fast path.
    for model in (stock, fast):
        torch.manual_seed(3)
        old = model.encoder.layer[1].attention.self.value
        model.encoder.layer[1].attention.self.value = torch.nn.Linear(old.in_features, old.out_features)
    act, exp = _both(stock, fast, input_ids=ids, attention_mask=mask)
    assert call_counts(fast) == {"fast": 1, "stock": 0}
    assert_close_at(act, exp, mask, atol=1e-5, what="plain swap")
    # A Linear with its own forward (an adapter, a quantized layer) runs that forward on the packed tokens.
    for model in (stock, fast):
        old = model.encoder.layer[0].attention.self.query
        new = _ScaledLinear(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        model.encoder.layer[0].attention.self.query = new
    act, exp = _both(stock, fast, input_ids=ids, attention_mask=mask)
    assert call_counts(fast) == {"fast": 2, "stock": 0}
    assert_close_at(act, exp, mask, atol=1e-5, what="a linear with its own forward")
    # Something that is not a projection at all cannot run packed: the call runs stock and stays correct.
    for model in (stock, fast):
        model.encoder.layer[1].output.dense = torch.nn.Sequential(model.encoder.layer[1].output.dense)
    act, exp = _both(stock, fast, input_ids=ids, attention_mask=mask)
    assert call_counts(fast) == {"fast": 2, "stock": 1}
    torch.testing.assert_close(act, exp)


def test_projections_with_their_own_forward_run_it():
    stock = make_model("bert")
    old = stock.encoder.layer[0].output.dense
    new = _ScaledLinear(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    stock.encoder.layer[0].output.dense = new
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch(*LAYOUTS["left"])
    act, exp = _both(stock, fast, input_ids=ids, attention_mask=mask)
    assert call_counts(fast) == {"fast": 1, "stock": 0}
    assert_close_at(act, exp, mask, atol=1e-5, what="ffn_out with its own forward")


def test_transform_refuses_modules_that_are_not_projections():
    model = make_model("bert")
    model.encoder.layer[0].output.dense = torch.nn.Sequential(model.encoder.layer[0].output.dense)
    with pytest.raises(NotImplementedError, match="ffn_out is a Sequential, not a linear projection"):
        BetterTransformer.transform(model)


def test_torch_compile_of_a_transformed_model():
    """torch.compile of a transformed model gives the same result; the base model's forward (embeddings, packed
    layers, pooler) runs outside the compiler's graphs, a head around it inside them."""
    model = make_model("bert")
    ids, mask = make_batch(*LAYOUTS["left"])
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(BetterTransformer.transform(model), backend=recording)
        actual = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    assert call_counts(model) == {"fast": 1, "stock": 0}
    assert_close_at(actual, expected, mask, atol=1e-5, what="compiled")
    assert graphs == []  # the base model's forward is the whole model here

    head = _Head(model)
    with torch.no_grad():
        torch._dynamo.reset()
        out = torch.compile(head, backend=recording)(ids)
    assert out.shape == (ids.shape[0], ids.shape[1], 2)
    assert graphs and all("embeddings" not in str(g.code) for g in graphs)


def test_torch_compile_of_a_transformed_model_trains():
    """A training step through torch.compile of a transformed classifier (dynamic shapes, two batch shapes): the
    loss and every gradient of the same step uncompiled (fp32, no dropout)."""
    from transformers import AutoModelForSequenceClassification

    model = make_model(
        "bert", AutoModelForSequenceClassification, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).train()
    fast = BetterTransformer.transform(model)
    torch._dynamo.reset()
    compiled = torch.compile(fast, dynamic=True)
    for lengths, side in (LAYOUTS["right"], LAYOUTS["left"]):
        ids, mask = make_batch(lengths, side)
        labels = torch.tensor([0, 1, 1, 0])
        results = []
        for run in (fast, compiled):
            loss = run(input_ids=ids, attention_mask=mask, labels=labels).loss
            grads = torch.autograd.grad(loss, list(fast.parameters()), allow_unused=True)
            results.append((loss, grads))
        (loss, grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
        for (name, _), got, want in zip(fast.named_parameters(), compiled_grads, grads, strict=True):
            if want is None:
                assert got is None, name
            else:
                assert_grads_close(got, want, name)


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.linear = model, nn.Linear(model.config.hidden_size, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.model(ids).last_hidden_state)


def test_dtype_change_after_transform():
    """model.to(...) / .half() after transform: the fast path follows the converted weights."""
    stock, fast = _pair()
    ids, mask = make_batch(*LAYOUTS["left"])
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)  # fills the fused-QKV cache in float32
        stock.to(torch.float64)
        fast.to(torch.float64)
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert actual.dtype == torch.float64
    assert call_counts(fast) == {"fast": 2, "stock": 0}
    assert_close_at(actual, expected, mask, atol=1e-10, what="float64")


def test_left_padding_under_a_pooler_warns_once(caplog):
    """A pooler reads position 0, which left padding makes a pad: stock and we give different meaningless values
    there, so the first such batch warns (and a right-padded one does not)."""
    model = BetterTransformer.transform(make_model("bert"))
    assert model.pooler is not None
    right = make_batch(*LAYOUTS["right"])
    left = make_batch(*LAYOUTS["left"])
    with caplog.at_level(logging.WARNING, logger="bettertransformer"), torch.no_grad():
        model(*right)
        assert not caplog.records
        model(*left)
        model(*left)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "reads position 0" in warnings[0].getMessage()
    # An encoder whose output nobody reads at position 0 (no pooler, no task head) has nothing to warn about.
    caplog.clear()
    bare = BertModel(make_model("bert").config, add_pooling_layer=False).eval()
    BetterTransformer.transform(bare)
    with caplog.at_level(logging.WARNING, logger="bettertransformer"), torch.no_grad():
        bare(*left)
    assert not caplog.records


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_output_attentions_returns_exact_weights(model_type):
    """Stock SDPA returns no attention weights; a transformed encoder returns the exact ones, as eager does (the
    call runs the stock forward, with our attention function where the model was on SDPA)."""
    eager = make_model(model_type, attn_implementation="eager")
    fast = BetterTransformer.transform(make_model(model_type))
    ids, mask = make_batch(*LAYOUTS["left"])
    with torch.no_grad():
        expected = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        got = fast(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(expected) == eager.config.num_hidden_layers
    keep = (mask[:, None, :, None] * mask[:, None, None, :]).bool()
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g[keep.expand_as(e)], e[keep.expand_as(e)], atol=1e-6)
    assert call_counts(fast) == {"fast": 0, "stock": 1}
    BetterTransformer.reverse(fast)
    assert fast.config._attn_implementation == make_model(model_type).config._attn_implementation


@pytest.mark.parametrize("model_type", ["deberta", "deberta-v2"])
def test_deberta_is_refused_with_the_reason(model_type):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        model_type, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    model = AutoModel.from_config(config)
    with pytest.raises(NotImplementedError, match=f"{model_type} is not supported: its disentangled attention"):
        BetterTransformer.transform(model)
    assert model_type not in supported_model_types()


def test_roformer_rotary_values_match_stock():
    """RoFormer with rotary_value: the values are rotated too; left padding keeps each token's padded position."""
    stock = make_model("roformer", rotary_value=True)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch(*LAYOUTS["left"])
    act, exp = _both(stock, fast, input_ids=ids, attention_mask=mask)
    assert call_counts(fast) == {"fast": 1, "stock": 0}
    assert_close_at(act, exp, mask, atol=1e-5, what="roformer rotary_value")
