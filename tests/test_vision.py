"""Vision transformers (issue 13): ViT, DeiT, ViT-MAE, ViT-MSN. Images have no padding: the layers run our fused path
on every token. Tiny random-weight models, fp32 on the CPU, against the stock model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from bettertransformer import BetterTransformer, call_counts, reverse

_SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8,
    num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
)  # fmt: skip
VISION_CONFIGS: dict[str, dict] = {
    "deit": _SMALL,
    "vit": _SMALL,
    "vit_mae": dict(_SMALL, mask_ratio=0.5),
    "vit_msn": _SMALL,
}
_HEADS = {"deit", "vit", "vit_msn"}  # types with an image-classification head


def make_vision_model(model_type: str, auto_class=AutoModel, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**VISION_CONFIGS[model_type], **overrides})
    return auto_class.from_config(config).eval()


def _images(batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 32, 32)


@pytest.mark.parametrize("model_type", sorted(VISION_CONFIGS))
def test_outputs_match_stock(model_type):
    stock = make_vision_model(model_type)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    images = _images()
    with torch.no_grad():
        if model_type == "vit_mae":  # its embeddings keep a random half of the patches: the same noise for both
            noise = torch.rand(3, 16)
            expected, actual = (m(images, noise=noise).last_hidden_state for m in (stock, fast))
        else:
            expected, actual = (m(images).last_hidden_state for m in (stock, fast))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert call_counts(fast) == {"fast": 1, "stock": 0}


@pytest.mark.parametrize("model_type", sorted(_HEADS))
def test_classification_heads_match_stock(model_type):
    head = {"deit": "DeiTForImageClassification"}.get(model_type)  # DeiT has two: name one
    stock = make_vision_model(model_type, AutoModelForImageClassification, architectures=[head] if head else None)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(_images()).logits, stock(_images()).logits, atol=1e-5, rtol=1e-5)
    assert call_counts(fast)["fast"] == 1


def test_training_hidden_states_and_reverse_run_the_stock_layers():
    """Training runs the stock layers (the attention dropout is a plain float); so do hidden-state requests."""
    stock = make_vision_model("vit", AutoModelForImageClassification, attention_probs_dropout_prob=0.1)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    images = _images()
    with torch.no_grad():
        states = fast(images, output_hidden_states=True).hidden_states
        expected = stock(images, output_hidden_states=True).hidden_states
    assert len(states) == len(expected) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(states, expected))
    fast.train()
    fast(images, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert fast.vit.layers[0].attention.q_proj.weight.grad is not None
    assert call_counts(fast)["stock"] == 2 and call_counts(fast)["fast"] == 0
    reverse(fast)
    assert "forward" not in vars(fast.vit) and "forward" not in vars(fast.vit.layers[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_a_small_multiple_of_stock_on_cuda(dtype):
    from helpers import max_error_at

    reference = make_vision_model("vit").cuda()
    stock = make_vision_model("vit").to("cuda", dtype)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    images = _images(4).cuda()
    with torch.no_grad():
        expected = reference(images).last_hidden_state
        stock_out, ours = (m(images.to(dtype)).last_hidden_state for m in (stock, fast))
    everywhere = torch.ones(expected.shape[:2], dtype=torch.bool, device="cuda")
    assert max_error_at(ours, expected, everywhere) <= 4 * max_error_at(stock_out, expected, everywhere) + 1e-3
    assert call_counts(fast)["fast"] == 1
