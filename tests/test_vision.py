"""Vision transformers and image-text towers (issue 13): ViT, DeiT, ViT-MAE, ViT-MSN, DINOv2, YOLOS, CLIP's text and
vision towers, SigLIP's, ViLT. Images have no padding: their layers run our fused path on every token; CLIP's text
tower is padding-free with causal attention, SigLIP's bidirectional (and stock where its pooled position is a pad);
ViLT is padding-free over its text and image patches together. Tiny random-weight models, fp32 on the CPU, against
the stock model."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_error_within_stock, half_precision_trio
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    CLIPConfig,
    CLIPModel,
    SiglipConfig,
    SiglipModel,
)

from bettertransformer import BetterTransformer, call_counts, reverse

_SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8,
    num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
)  # fmt: skip
_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
_CLIP_TEXT = dict(_TOWER, vocab_size=99, max_position_embeddings=24, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_CLIP_VISION = dict(_TOWER, image_size=32, patch_size=8)
_VILT = dict(_SMALL, vocab_size=99, max_position_embeddings=24)
VISION_CONFIGS: dict[str, dict] = {
    "clip_text_model": _CLIP_TEXT,
    "clip_vision_model": _CLIP_VISION,
    "deit": _SMALL,
    "dinov2": dict(_SMALL, mlp_ratio=2),
    "siglip_vision_model": _CLIP_VISION,
    "vilt": _VILT,
    "vit": _SMALL,
    "vit_mae": dict(_SMALL, mask_ratio=0.5),
    "vit_msn": _SMALL,
    "yolos": dict(_SMALL, image_size=[32, 32], num_detection_tokens=5, use_mid_position_embeddings=True),
}
_IMAGE_TYPES = ("clip_vision_model", "deit", "dinov2", "siglip_vision_model", "vit", "vit_mae", "vit_msn", "yolos")
_HEADS = {"deit", "dinov2", "vit", "vit_msn"}  # types with an image-classification head
# Parameters initialised to a constant (DINOv2's LayerScale: 1) or to zeros (YOLOS's mid-position embeddings), under
# which a layout that skipped them would still match stock: random values here.
_CONSTANT_INIT = ("lambda1", "mid_position_embeddings")


def make_vision_model(model_type: str, auto_class=AutoModel, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**VISION_CONFIGS[model_type], **overrides})
    model = auto_class.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.rpartition(".")[2] in _CONSTANT_INIT:
                parameter.normal_()
    return model.eval()


def _images(batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 32, 32)


@pytest.mark.parametrize("model_type", _IMAGE_TYPES)
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


def _captions(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Four captions of 12, 7, 3 and 9 tokens, each ending in the end-of-text id (2), padded on ``side``."""
    torch.manual_seed(2)
    ids, mask = torch.zeros(4, 12, dtype=torch.long), torch.zeros(4, 12, dtype=torch.long)
    for row, length in enumerate([12, 7, 3, 9]):
        real = slice(0, length) if side == "right" else slice(12 - length, 12)
        ids[row, real] = torch.randint(3, 99, (length,))
        ids[row, real.stop - 1] = 2
        mask[row, real] = 1
    return ids, mask


# Image-text models: their config and model classes, and each one's config arguments beyond the two towers.
_IMAGE_TEXT = {
    "clip": (CLIPConfig, CLIPModel, dict(projection_dim=16)),
    "siglip": (SiglipConfig, SiglipModel, {}),
}


@pytest.mark.parametrize(
    "family, side, counts",
    [
        ("clip", "right", {"fast": 2, "stock": 0}),
        ("clip", "left", {"fast": 2, "stock": 0}),
        ("siglip", "left", {"fast": 1, "stock": 0}),  # the vision tower; the text tower is not transformed
        ("siglip", "right", {"fast": 1, "stock": 0}),
    ],
)
def test_image_text_models_match_stock(family, side, counts):
    """CLIPModel and SiglipModel: each tower is a base model of its own. CLIP's text tower is padding-free with causal
    attention inside each caption; SigLIP's text tower is left stock (measured slower transformed, BENCHMARKS.md)."""
    config_class, model_class, extra = _IMAGE_TEXT[family]
    torch.manual_seed(0)
    stock = model_class(config_class(text_config=_CLIP_TEXT, vision_config=_CLIP_VISION, **extra)).eval()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = _captions(side)
    with torch.no_grad():
        expected, actual = (m(input_ids=ids, attention_mask=mask, pixel_values=_images(4)) for m in (stock, fast))
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(
        actual.text_model_output.last_hidden_state[real], expected.text_model_output.last_hidden_state[real],
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    assert call_counts(fast) == counts


def test_clip_text_tower_alone_training_and_reverse():
    stock = make_vision_model("clip_text_model")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = _captions("right")
    with torch.no_grad():
        expected, actual = (m(input_ids=ids, attention_mask=mask).pooler_output for m in (stock, fast))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    fast.train()
    fast(input_ids=ids, attention_mask=mask).pooler_output.sum().backward()  # the stock layers: a float dropout
    assert call_counts(fast) == {"fast": 1, "stock": 1}
    reverse(fast)
    assert "forward" not in vars(fast) and "forward" not in vars(fast.encoder)


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_layer_scale_and_both_mlps_match_stock(swiglu):
    """DINOv2's LayerScale (random, per channel) on both sublayers; the plain MLP through our fused products, the
    SwiGLU MLP (its own module: gate/up/down projections in 5.24, one fused input product before) run whole. Its
    attention's modules moved in 5.24: the layout names both paths (this test runs on 5.17 and the newest 5.x)."""
    stock = make_vision_model("dinov2", use_swiglu_ffn=swiglu)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    with torch.no_grad():
        expected, actual = (m(_images()) for m in (stock, fast))
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    assert call_counts(fast) == {"fast": 1, "stock": 0}
    # Its encoder module is a PreTrainedModel, a base model of its own: covered by the model's entry, not given one.
    assert "forward" in vars(fast) and "forward" in vars(fast.encoder)
    reverse(fast)
    assert "forward" not in vars(fast) and "forward" not in vars(fast.encoder)


def test_dinov2_training_and_hidden_states_run_the_stock_layers():
    stock = make_vision_model("dinov2", AutoModelForImageClassification, drop_path_rate=0.1)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    with torch.no_grad():
        states, expected = (m(_images(), output_hidden_states=True).hidden_states for m in (fast, stock))
    assert len(states) == len(expected) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(states, expected))
    fast.train()
    fast(_images(), labels=torch.tensor([0, 1, 2])).loss.backward()
    assert call_counts(fast) == {"fast": 0, "stock": 2}


def _yolos_images(height: int, width: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, height, width)


@pytest.mark.parametrize("mid", [True, False])
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_yolos_detection_matches_stock(mid, size):
    """YolosForObjectDetection: with its mid-position embeddings (random here) added between the packed layers, or
    without them; at the configured image size and at another (both tables interpolated)."""
    stock = make_vision_model("yolos", AutoModelForObjectDetection, use_mid_position_embeddings=mid)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    images = _yolos_images(*size)
    with torch.no_grad():
        expected, actual = (m(images) for m in (stock, fast))
    for name in ("last_hidden_state", "logits", "pred_boxes"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
    assert call_counts(fast) == {"fast": 1, "stock": 0}


@pytest.mark.parametrize(
    "model_type, auto_class", [("dinov2", AutoModelForImageClassification), ("yolos", AutoModelForObjectDetection)]
)
def test_image_models_given_a_padding_mask_run_stock(model_type, auto_class):
    """A mask with padding on these images runs stock. DINOv2's classifier averages every patch, padded ones too (5.24
    takes a mask; 5.17's forward does not name one and ignores it); YOLOS's forward ignores one. Stock's outputs, not
    the packed path's zeros at padding nor a mask the stock model would not apply."""
    stock = make_vision_model(model_type, auto_class)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    tokens = {"dinov2": 17, "yolos": 22}[model_type]  # the patches (16), the class token, YOLOS's 5 detection tokens
    mask = torch.ones(3, tokens, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected, actual = (m(_images(), attention_mask=mask) for m in (stock, fast))
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-6, rtol=1e-6)
    assert call_counts(fast) == {"fast": 0, "stock": 1}


def test_yolos_hidden_states_and_training_run_stock():
    stock = make_vision_model("yolos")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    images = _yolos_images(32, 32)
    with torch.no_grad():
        states, expected = (m(images, output_hidden_states=True).hidden_states for m in (fast, stock))
    assert len(states) == len(expected) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(states, expected))
    fast.train()
    fast(images).last_hidden_state.sum().backward()
    assert call_counts(fast) == {"fast": 0, "stock": 2}


def _vilt_inputs(pixel_mask: bool) -> dict[str, torch.Tensor]:
    """Three captions of 10, 6 and 3 tokens right-padded to 10, three 32 x 32 images; with ``pixel_mask``, the second
    image padded on the right (its last 12 columns) and the third at the bottom (its last 16 rows)."""
    torch.manual_seed(2)
    ids, mask = torch.randint(3, 99, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    inputs = dict(input_ids=ids * mask, attention_mask=mask, pixel_values=_images(3))
    if pixel_mask:
        pixels = torch.ones(3, 32, 32, dtype=torch.long)
        pixels[1, :, 20:], pixels[2, 16:, :] = 0, 0
        inputs["pixel_mask"] = pixels
    return inputs


def _vilt_run(model, inputs: dict[str, torch.Tensor]):
    """The model on ``inputs``, and the padding mask its embeddings made (text and image patches). ViLT's embeddings
    draw the padding patches at random: the same seed for every model."""
    masks = []
    embeddings = model.get_submodule("vilt.embeddings" if hasattr(model, "vilt") else "embeddings")
    hook = embeddings.register_forward_hook(lambda module, args, out: masks.append(out[1]))
    torch.manual_seed(3)
    try:
        return model(**inputs), masks[-1]
    finally:
        hook.remove()


@pytest.mark.parametrize("pixel_mask", [False, True])
def test_vilt_matches_stock_padding_free_over_text_and_patches(pixel_mask):
    """ViltModel: the packed layers take the mask its embeddings make of the text's padding and the image's
    (pixel_mask); the pooler reads the first text token."""
    stock = make_vision_model("vilt")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    inputs = _vilt_inputs(pixel_mask)
    with torch.no_grad():
        (expected, combined), (actual, _) = (_vilt_run(m, inputs) for m in (stock, fast))
    real = combined.bool()
    assert bool((~real[:, 10:]).any()) == pixel_mask  # image patches padded only where the pixel mask says
    torch.testing.assert_close(actual.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)
    assert call_counts(fast) == {"fast": 1, "stock": 0}


def test_vilt_question_answering_head_and_training_match_stock():
    """ViltForQuestionAnswering: its logits, and in training (its attention dropout is a module: the packed layers
    train) the loss and every gradient equal stock's."""
    from transformers import AutoModelForVisualQuestionAnswering

    stock = make_vision_model("vilt", AutoModelForVisualQuestionAnswering)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    inputs = _vilt_inputs(pixel_mask=True)
    with torch.no_grad():
        torch.testing.assert_close(
            _vilt_run(fast, inputs)[0].logits, _vilt_run(stock, inputs)[0].logits, atol=1e-5, rtol=1e-5
        )
    labels = torch.rand(3, 3)
    for model in (stock, fast):
        model.train()
        _vilt_run(model, dict(inputs, labels=labels))[0].loss.backward()
    assert call_counts(fast) == {"fast": 2, "stock": 0}
    for (name, ours), theirs in zip(fast.named_parameters(), stock.parameters()):
        if theirs.grad is not None:
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_vilt_attention_weights_run_stock():
    stock = make_vision_model("vilt")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    inputs = _vilt_inputs(pixel_mask=True)
    with torch.no_grad():
        (expected, _), (actual, _) = (_vilt_run(m, dict(inputs, output_attentions=True)) for m in (stock, fast))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(actual.attentions, expected.attentions))
    assert call_counts(fast) == {"fast": 0, "stock": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_is_a_small_multiple_of_stock_on_cuda(dtype):
    reference, stock, fast = half_precision_trio(lambda: make_vision_model("vit"), dtype)
    images = _images(4).cuda()
    with torch.no_grad():
        expected = reference(images).last_hidden_state
        stock_out, ours = (m(images.to(dtype)).last_hidden_state for m in (stock, fast))
    everywhere = torch.ones(expected.shape[:2], dtype=torch.bool, device="cuda")
    assert_error_within_stock(ours, stock_out, expected, everywhere)
    assert call_counts(fast)["fast"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("side", ["right", "left"])
def test_clip_text_tower_in_half_precision_on_cuda(side):
    """The causal packed attention on the GPU (our kernels): error at real tokens within a small multiple of stock's."""
    reference, stock, fast = half_precision_trio(lambda: make_vision_model("clip_text_model"), torch.float16)
    ids, mask = (t.cuda() for t in _captions(side))
    with torch.no_grad():
        expected, stock_out, ours = (
            m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (reference, stock, fast)
        )
    assert_error_within_stock(ours, stock_out, expected, mask)
    assert call_counts(fast)["fast"] == 1


# The new types of issue 13 on the GPU: what each one's packed path adds (DINOv2's LayerScale, YOLOS's mid-position
# embeddings, ViLT's mask with holes between its text and its image patches).
_HALF_PRECISION_INPUTS = {
    "dinov2": lambda: dict(pixel_values=_images(4)),
    "vilt": lambda: _vilt_inputs(pixel_mask=True),
    "yolos": lambda: dict(pixel_values=_yolos_images(40, 56)),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("model_type", sorted(_HALF_PRECISION_INPUTS))
def test_new_types_in_half_precision_on_cuda(model_type):
    """Our kernels on the packed tokens: the error at real positions within a small multiple of stock's."""
    reference, stock, fast = half_precision_trio(lambda: make_vision_model(model_type), torch.float16)
    inputs = {name: value.cuda() for name, value in _HALF_PRECISION_INPUTS[model_type]().items()}
    states, real = [], inputs.get("attention_mask")
    with torch.no_grad():
        for model, dtype in ((reference, torch.float32), (stock, torch.float16), (fast, torch.float16)):
            given = {name: v.to(dtype) if v.is_floating_point() else v for name, v in inputs.items()}
            out, real = _vilt_run(model, given) if model_type == "vilt" else (model(**given), real)
            states.append(out.last_hidden_state)
    expected, stock_out, ours = states
    real = torch.ones(expected.shape[:2], dtype=torch.bool, device="cuda") if real is None else real
    assert_error_within_stock(ours, stock_out, expected, real)
    assert call_counts(fast) == {"fast": 1, "stock": 0}
