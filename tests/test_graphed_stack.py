"""Captured training graphs of a packed encoder stack (``adapters.graphed_stack``): the padding to a graph's shapes
changes no real token's output or gradient (any device); on a GPU, graphed training steps equal eager ones."""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormModel,
)

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.adapters.encoder import PackedEncoder, _Stack
from bettertransformer.adapters.graphed_stack import MIN_TOKENS, _capturing, ROW_STEP, Padded, run_padded, token_bucket
from bettertransformer.ops.padding import pack, pack_info
from bettertransformer.registry import BERT, ROBERTA_PRELAYERNORM
from bettertransformer.switches import switched

from helpers import assert_grads_close

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128)


def test_token_buckets_waste_at_most_an_eighth():
    for tokens in [1, 7, 127, 128, 129, 500, 4095, 4096, 4097, 8450, 100_003]:
        bucket = token_bucket(tokens)
        assert bucket >= tokens
        assert bucket - tokens <= max(MIN_TOKENS, tokens / 8), tokens
    assert token_bucket(8450) == token_bucket(8500)  # nearby counts share a graph


def test_padded_layout_depends_on_batch_size_and_bucket_only():
    rng = random.Random(0)
    shapes: dict[tuple[int, int], int] = {}
    for _ in range(2000):
        batch = rng.randint(1, 40)
        lengths = torch.tensor([rng.randint(0, 300) for _ in range(batch)])
        padded = Padded.of(lengths)
        assert int(padded.lengths.sum()) == padded.tokens == token_bucket(int(lengths.sum()))
        assert padded.lengths.numel() == padded.rows and (padded.rows + 1) % ROW_STEP == 0
        assert torch.equal(padded.lengths[:batch], lengths)  # real rows first, as they were
        assert int(padded.lengths.max()) <= padded.max_len
        assert shapes.setdefault((batch, padded.tokens), padded.rows) == padded.rows


def _packed_batch(hidden: int, lengths: list[int]):
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    info = pack_info(mask, len(lengths), max(lengths), torch.device("cpu"))
    x = pack(torch.randn(len(lengths), max(lengths), hidden), info).requires_grad_()
    return x, info


@pytest.mark.parametrize("lengths", [[5, 17, 1, 30], [64, 64], [3, 0, 9]])
def test_padding_to_a_graph_shape_changes_no_output_or_gradient(lengths):
    torch.manual_seed(0)
    base = BertModel(BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    stack = _Stack(PackedEncoder(base, BERT).layers)
    x, info = _packed_batch(base.config.hidden_size, lengths)
    params = [p for p in base.encoder.parameters()]
    weight = torch.randn(x.shape)  # a loss that reads every output element differently
    results = []
    for run in (stack.run, lambda x, info: run_padded(stack.run, x, info)):
        out = run(x, info)
        grads = torch.autograd.grad((out * weight).sum(), [x, *params])
        results.append((out, grads))
    (out, grads), (padded_out, padded_grads) = results
    torch.testing.assert_close(padded_out, out, rtol=1e-5, atol=1e-5)
    for name, actual, expected in zip(["x"] + [n for n, _ in base.encoder.named_parameters()], padded_grads, grads):
        assert_grads_close(actual, expected, name)


def test_stack_casts_each_projection_once_into_stacked_copies():
    """The copies a captured stack's layers read: q, k and v stacked in one block, every projection's weight and
    bias rounded to bf16 as autocast rounds them, all in one buffer."""
    torch.manual_seed(0)
    base = BertModel(BertConfig(**TINY)).train()
    stack = _Stack(PackedEncoder(base, BERT).layers)
    copies = stack._half_parameters(torch.bfloat16)
    assert len(copies) == len(stack.layers)
    storages = {t.untyped_storage().data_ptr() for layer in copies for pair in layer.values() for t in pair}
    assert len(storages) == 1
    for packed, layer in zip(stack.layers, copies, strict=True):
        assert set(layer) == {"qkv", "o", "ffn_in", "ffn_out"}
        q, k, v = packed.q, packed.k, packed.v
        weight, bias = layer["qkv"]
        assert torch.equal(weight, torch.cat([q.weight, k.weight, v.weight]).to(torch.bfloat16))
        assert torch.equal(bias, torch.cat([q.bias, k.bias, v.bias]).to(torch.bfloat16))
        for name in ("o", "ffn_in", "ffn_out"):
            module = getattr(packed, name)
            assert torch.equal(layer[name][0], module.weight.to(torch.bfloat16))
            assert torch.equal(layer[name][1], module.bias.to(torch.bfloat16))


@pytest.mark.parametrize("pre_norm", [False, True], ids=["bert", "roberta-prelayernorm"])
def test_captured_layers_products_compute_what_autocast_computes(pre_norm, monkeypatch):
    """While captured, the layers take ``half_linear`` (a backward written for the GPU) on the copies the stack cast
    once (every product, in the fused post-norm path and the plain pre-norm one): the same outputs and gradients as
    the eager layers under autocast, to bf16 rounding."""
    from bettertransformer.adapters import encoder

    torch.manual_seed(0)
    config = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if pre_norm:
        base = RobertaPreLayerNormModel(RobertaPreLayerNormConfig(**config)).train()
        stack = _Stack(PackedEncoder(base, ROBERTA_PRELAYERNORM).layers)
    else:
        base = BertModel(BertConfig(**config)).train()
        stack = _Stack(PackedEncoder(base, BERT).layers)
    copied = []
    real = encoder.half_linear
    monkeypatch.setattr(encoder, "half_linear", lambda *a, **k: copied.append(a[4] is not None) or real(*a, **k))
    x, info = _packed_batch(base.config.hidden_size, [5, 17, 1, 30])
    params = list(base.encoder.parameters())
    weight = torch.randn(x.shape)
    results = []
    for capture in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), _capturing(torch.bfloat16) if capture else nullcontext():
            out = stack.run(x, info)
        results.append((out, torch.autograd.grad((out.float() * weight).sum(), [x, *params])))
    assert copied == [True] * 4 * len(stack.layers)  # q|k|v, o, FFN in and out of every layer
    (out, grads), (captured, captured_grads) = results
    torch.testing.assert_close(captured, out, rtol=2e-2, atol=2e-2)
    for actual, expected in zip(captured_grads, grads, strict=True):
        assert_grads_close(actual, expected, "gradient", rel=3e-2)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _classifier(dropout: float = 0.0, config_class: type = BertConfig):
    torch.manual_seed(0)
    config = config_class(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=1000,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2,
    )  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").cuda()


def _batch(seed: int, rows: int = 8):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 200, (rows,), generator=gen)
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
    ids = torch.randint(5, 1000, mask.shape, generator=gen) * mask
    labels = torch.randint(0, 2, (rows,), generator=gen)
    return {k: v.cuda() for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def _steps(model, batches, graphs: int):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, grads = [], []
    with switched(training_graphs=graphs):
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses, grads


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("config_class", [BertConfig, RobertaPreLayerNormConfig], ids=["bert", "pre-norm"])
def test_graphed_training_steps_equal_eager_ones(config_class):
    stock = _classifier(config_class=config_class)
    eager, graphed = (BetterTransformer.transform(copy.deepcopy(stock)) for _ in range(2))
    batches = [_batch(seed) for seed in (0, 1, 0, 2, 1)]  # shapes come back: graphs are replayed, not recaptured
    eager_losses, eager_grads = _steps(eager, batches, graphs=0)
    graphed_losses, graphed_grads = _steps(graphed, batches, graphs=8)
    assert call_counts(graphed)["graphed training"] == len(batches)
    assert call_counts(eager).get("graphed training", 0) == 0
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=2e-2, atol=2e-2)
    for step, (actual, expected) in enumerate(zip(graphed_grads, eager_grads)):
        assert actual.keys() == expected.keys()
        for name in expected:
            assert_grads_close(actual[name], expected[name], f"step {step} {name}", rel=3e-2)
    reversed_model = BetterTransformer.reverse(graphed)
    for (name, p), (_, q) in zip(
        reversed_model.named_parameters(), BetterTransformer.reverse(eager).named_parameters()
    ):
        if name.endswith("key.bias"):
            # Softmax is blind to a key bias (it adds one constant to each query's scores): its gradient is zero
            # but for rounding, which AdamW scales into steps of the full learning rate in either direction.
            continue
        torch.testing.assert_close(p, q, rtol=5e-2, atol=5e-3, msg=name)


@cuda
@pytest.mark.cuda
def test_second_forward_before_backward_runs_eagerly_and_stays_right():
    """Two forwards then one backward (contrastive losses do this): the second must not overwrite the first's
    captured activations."""
    stock = _classifier()
    model, reference = (BetterTransformer.transform(copy.deepcopy(stock)).train() for _ in range(2))
    first, second = _batch(0), _batch(1)

    def grads_of(m, graphs):
        with switched(training_graphs=graphs), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(**first).loss + m(**second).loss
        loss.backward()
        out = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        return out

    grads_of(model, 8)  # capture
    graphed, eager = grads_of(model, 8), grads_of(reference, 0)
    assert call_counts(model)["graphed training"] == 2  # one per step: the other forwards ran eagerly
    for name in eager:
        assert_grads_close(graphed[name], eager[name], name, rel=3e-2)


@cuda
@pytest.mark.cuda
def test_backward_after_an_overwriting_forward_raises():
    model = BetterTransformer.transform(_classifier()).train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**_batch(0)).loss
    loss.backward(retain_graph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**_batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match="overwritten"):
        loss.backward()


@cuda
@pytest.mark.cuda
def test_a_failed_capture_trains_eagerly_and_spoils_no_later_capture(monkeypatch, caplog):
    """A stack that cannot be captured (here: a host sync inside it) trains eagerly, says so once, and leaves the
    process able to capture other graphs."""
    stock = _classifier()
    broken, healthy, eager = (BetterTransformer.transform(copy.deepcopy(stock)) for _ in range(3))
    run = _Stack.run

    def syncing(self, x, info):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # not allowed while capturing
        return run(self, x, info)

    monkeypatch.setattr(_Stack, "run", syncing)
    batches = [_batch(0), _batch(1)]
    with caplog.at_level("WARNING", logger="bettertransformer"):
        broken_losses, _ = _steps(broken, batches, graphs=8)
    assert "training graphs failed" in caplog.text
    assert call_counts(broken).get("graphed training", 0) == 0
    monkeypatch.setattr(_Stack, "run", run)
    healthy_losses, _ = _steps(healthy, batches, graphs=8)
    eager_losses, _ = _steps(eager, batches, graphs=0)
    assert call_counts(healthy)["graphed training"] == len(batches)
    torch.testing.assert_close(broken_losses, eager_losses, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(healthy_losses, eager_losses, rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_replays_draw_new_dropout_masks(dropout):
    """The same batch and weights twice through the captured stack: with dropout the replays draw new masks (the
    seeds come from the device's generator inside the graph), without it they give the same loss."""
    stock = _classifier(dropout)
    stock.bert.embeddings.dropout.p = stock.dropout.p = 0.0  # only the layers' dropouts (in the graphs) draw
    model = BetterTransformer.transform(stock).train()
    batch = _batch(0)
    losses = []
    for _ in range(3):  # the first call captures; the next two replay
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert call_counts(model)["graphed training"] == 3
    if dropout:
        assert losses[1] != losses[2]
    else:
        assert losses[1] == losses[2]
