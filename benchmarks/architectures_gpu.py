"""Issue 13's representatives, stock against transformed, side by side in one process:

- ``bart``: BART-base config, random weights, fp16: 16 inputs of ``torch.manual_seed(0); torch.randint(16, 513, (16,))``
  tokens right-padded; the encoder alone, and greedy ``generate`` of 64 new tokens (``min_new_tokens`` too).
- ``t5``: T5-base config, the same inputs and generate.
- ``fsmt``: FSMT with wmt19-en-de's shapes (6 + 6 layers, 1024 wide, 16 heads), the same inputs and greedy generate
  (``num_beams=1``: FSMT's configs ask for beam search, which runs stock generate).
- ``prophetnet``: ProphetNet-large's shapes (12 + 12 layers, 1024 wide, 16 heads, 2-gram decoder), the same inputs and
  generate.
- ``modernbert``: ModernBERT-base config, 64 rows of ``randint(16, 513)`` tokens, right-padded.
- ``vit``: ViT-base config, random weights, fp16: 64 images of 224 x 224 (``torch.manual_seed(0); torch.randn``).
- ``clip``: CLIP ViT-B/32 config, fp16: 64 images and 64 captions of ``randint(5, 78)`` tokens, right-padded.
- ``dinov2``: DINOv2-base config (patch 14), fp16: 64 images of 224 x 224 (257 tokens each, no padding).
- ``yolos``: YOLOS-small config (384 wide, 6 heads, 100 detection tokens, mid-position embeddings), fp16: 8 images of
  800 x 1344 (4,300 tokens each), object detection (logits).
- ``vilt``: ViLT-B/32 config, fp16: 64 image-caption pairs, images on a 384 x 576 canvas whose real width
  ``randint(384, 577)`` the pixel mask marks, captions of ``randint(5, 41)`` tokens right-padded to 40.
- ``whisper``: Whisper-small config, fp16: 30 s of audio (random log-mel features), 128 new tokens, batch 1 and 16.
- ``wav2vec2``: wav2vec2-base config (post-LayerNorm), random weights, fp16: 16 clips of 2-15 s at 16 kHz
  (``torch.manual_seed(0); torch.randint(32_000, 240_001, (16,))`` samples), zero-padded, with the mask.

Medians of CUDA-event timings; the error at real positions against the fp32 stock model. ``--small`` runs tiny
configs (a check of the script on the CPU). Run: ``PYTHONPATH=src python benchmarks/architectures_gpu.py
[--only bart wav2vec2] [--small] [--device cpu]``
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import transformers
from transformers import (
    AutoModel,
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    Wav2Vec2Config,
)

from bettertransformer import BetterTransformer, call_counts


def timed(fn, device: torch.device, warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def forward_rows(workload: str, stock, fast, run, expected: torch.Tensor, keep: torch.Tensor, device) -> list[str]:
    """Table rows for ``run(model)`` (the last hidden states) of stock and transformed: median time and the largest
    error at the positions ``keep`` marks against the fp32 ``expected``."""
    rows = []
    for name, model in (("stock", stock), ("transformed", fast)):
        err = (run(model).float() - expected)[keep.bool()].abs().max().item()
        ms = timed(lambda model=model: run(model), device, warmup=5, iters=30)
        rows.append(f"| {workload} | {name} | {ms:.2f} ms | {err:.2e} |")
    return rows


def bench_bart(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """BART-base's shapes (6 + 6 layers, 768 wide, 12 heads, feed-forward 3072, vocab 50265); BartConfig's own
    defaults are BART-large's."""
    sizes = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000) if args.small else {}  # fmt: skip
    base = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
                encoder_ffn_dim=3072, decoder_ffn_dim=3072)  # fmt: skip
    config = BartConfig(**(sizes or base), dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(0)
    return bench_seq2seq("bart", BartForConditionalGeneration(config), device, dtype)


def bench_t5(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """T5-base's shapes (12 + 12 layers, 768 wide, 12 heads, ReLU feed-forward 3072, vocab 32128)."""
    sizes = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000) if args.small else {}
    config = T5Config(**sizes, dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(0)
    return bench_seq2seq("t5", T5ForConditionalGeneration(config), device, dtype)


def bench_fsmt(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """FSMT with facebook/wmt19-en-de's shapes (6 + 6 layers, 1024 wide, 16 heads, feed-forward 4096, vocabularies of
    42024, padding id 1, sinusoidal positions); its decoder's attention modules routed through ours."""
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    sizes = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, src_vocab_size=1000, tgt_vocab_size=1000)  # fmt: skip
    wmt19 = dict(d_model=1024, encoder_layers=6, decoder_layers=6, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, src_vocab_size=42024,
                 tgt_vocab_size=42024)  # fmt: skip
    config = FSMTConfig(
        langs=["en", "de"], **(sizes if args.small else wmt19), pad_token_id=1, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return bench_seq2seq("fsmt", FSMTForConditionalGeneration(config), device, dtype)


def bench_prophetnet(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """ProphetNet-large's shapes (12 + 12 layers, 1024 wide, 16 heads, feed-forward 4096, vocab 30522, 2-gram
    decoder, 512 positions)."""
    from transformers import ProphetNetConfig, ProphetNetForConditionalGeneration

    sizes = dict(hidden_size=64, num_encoder_layers=2, num_decoder_layers=2, num_encoder_attention_heads=4,
                 num_decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000)  # fmt: skip
    config = ProphetNetConfig(**sizes if args.small else {}, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(0)
    return bench_seq2seq("prophetnet", ProphetNetForConditionalGeneration(config), device, dtype)


def bench_seq2seq(kind: str, model, device: torch.device, dtype: torch.dtype) -> list[str]:
    config = model.config
    reference = model.to(device).eval()
    stock = copy.deepcopy(reference).to(dtype)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    torch.manual_seed(0)
    lengths = torch.randint(16, 513, (16,)).clamp(max=getattr(config, "max_position_embeddings", 4096) - 2)
    width = int(lengths.max())
    ids = torch.randint(4, config.vocab_size, (16, width))
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids, mask = (ids * mask).to(device), mask.to(device)
    keep = mask.bool()
    rows = []
    with torch.inference_mode():
        expected = reference.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        encode = lambda model: model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
        rows += forward_rows(f"{kind} encoder, 16 x randint(16, 513)", stock, fast, encode, expected, keep, device)
        one = ids[:1, : int(mask[0].sum())]
        inputs = {16: dict(inputs=ids, attention_mask=mask), 1: dict(inputs=one, attention_mask=torch.ones_like(one))}
        rows += generate_rows(kind, stock, fast, inputs, 64, device)
    print(kind, "calls", call_counts(fast), flush=True)
    return rows


def generate_rows(kind: str, stock, fast, inputs: dict[int, dict], new: int, device) -> list[str]:
    """Greedy generate of ``new`` tokens (``min_new_tokens`` too: every row runs every step) for each batch size's
    ``inputs`` (generate's arguments): stock, transformed (its first call includes the CUDA graph captures), and at
    batch 1 transformers' static cache with its automatic ``torch.compile`` (first call: the compilation)."""
    rows = []
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
    for batch, given in inputs.items():
        tokens = {}
        variants = [("stock", stock, {}), ("transformed", fast, {})]
        if batch == 1 and device.type == "cuda":
            variants.append(("stock, static cache + compile", stock, dict(cache_implementation="static")))
        for name, model, extra in variants:
            call = lambda model=model, extra=extra: model.generate(**given, **kwargs, **extra)  # noqa: E731
            try:
                first = timed(call, device, warmup=0, iters=1)
                tokens[name] = call()
                ms = timed(call, device, warmup=1, iters=3)
            except Exception as problem:  # the compiled baseline may fail on a transformers release
                rows.append(f"| {kind} generate, batch {batch} | {name} | failed: {type(problem).__name__} | |")
                continue
            rows.append(
                f"| {kind} generate, batch {batch}, {new} new tokens | {name} | {ms:.1f} ms (first call {first:.0f} ms) | |"
            )
        same = torch.equal(tokens["stock"], tokens["transformed"])
        rows.append(f"| {kind} generate, batch {batch}: tokens equal (fp16: near-ties may differ) | {same} | | |")
    return rows


def bench_whisper(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Whisper-small's shapes (12 + 12 layers, 768 wide, 12 heads, vocab 51865): 30 s of audio (80 x 3000 log-mel
    frames, ``torch.manual_seed(0); torch.randn``), 128 new tokens, at batch 1 and 16; the encoder alone at 16."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    sizes = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000, decoder_start_token_id=998,
                 eos_token_id=999, pad_token_id=999, bos_token_id=999, begin_suppress_tokens=[5, 999])  # fmt: skip
    small = dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)  # fmt: skip
    config = WhisperConfig(
        **(sizes if args.small else small), dropout=0.0, attention_dropout=0.0, activation_dropout=0.0
    )
    torch.manual_seed(0)
    reference = WhisperForConditionalGeneration(config).to(device).eval()
    stock = copy.deepcopy(reference).to(dtype)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    torch.manual_seed(0)
    features = torch.randn(16, config.num_mel_bins, 3000, device=device)
    rows = []
    with torch.inference_mode():
        expected = reference.get_encoder()(features).last_hidden_state
        keep = torch.ones(expected.shape[:2], dtype=torch.bool, device=device)
        encode = lambda model: model.get_encoder()(features.to(dtype)).last_hidden_state  # noqa: E731
        rows += forward_rows("whisper encoder, 16 x 30 s", stock, fast, encode, expected, keep, device)
        inputs = {1: dict(input_features=features[:1].to(dtype)), 16: dict(input_features=features.to(dtype))}
        rows += generate_rows("whisper", stock, fast, inputs, 16 if args.small else 128, device)
    print("whisper calls", call_counts(fast), flush=True)
    return rows


def bench_wav2vec2(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 conv_dim=(32,) * 7, num_conv_pos_embeddings=16) if args.small else {}  # fmt: skip
    config = Wav2Vec2Config(**sizes, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                            feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    reference = AutoModel.from_config(config).to(device).eval()
    stock = copy.deepcopy(reference).to(dtype)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    torch.manual_seed(0)
    lengths = torch.randint(32_000, 240_001, (16,)) // (8 if args.small else 1)  # --small: 8x shorter clips
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    audio = (torch.randn(16, width) * mask).to(device)
    mask = mask.to(device)
    rows = []
    with torch.inference_mode():
        expected = reference(audio, attention_mask=mask).last_hidden_state
        frames = reference._get_feature_vector_attention_mask(expected.shape[1], mask).bool()
        run = lambda model: model(audio.to(dtype), attention_mask=mask).last_hidden_state  # noqa: E731
        rows += forward_rows("wav2vec2, 16 clips of 2-15 s, padded", stock, fast, run, expected, frames, device)
    print("wav2vec2 calls", call_counts(fast), flush=True)
    return rows


def bench_modernbert(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """ModernBERT-base's shapes (22 layers, 768 wide, 12 heads, GLU MLP 1152, local window 128 every third layer
    global): 64 rows of ``torch.manual_seed(0); torch.randint(16, 513, (64,))`` tokens, right-padded."""
    from transformers import ModernBertConfig

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4) if args.small else {}
    config = ModernBertConfig(**sizes, embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    reference = AutoModel.from_config(config, attn_implementation="sdpa").to(device).eval()
    stock = copy.deepcopy(reference).to(dtype)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    torch.manual_seed(0)
    lengths = torch.randint(16, 513, (64,))
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = (torch.randint(5, config.vocab_size, (64, width)) * mask).to(device)
    mask = mask.to(device)
    keep = mask.bool()
    rows = []
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        run = lambda model: model(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
        rows += forward_rows("modernbert, 64 x randint(16, 513)", stock, fast, run, expected, keep, device)
    print("modernbert calls", call_counts(fast), flush=True)
    return rows


def bench_vit(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """ViT-base's shapes (12 layers, 768 wide, 12 heads, 3072 MLP, patch 16): 64 images of 224 x 224 (197 tokens
    each, no padding)."""
    from transformers import ViTConfig

    sizes = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if args.small else {}
    )
    config = ViTConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    reference = AutoModel.from_config(config, attn_implementation="sdpa").to(device).eval()
    stock = copy.deepcopy(reference).to(dtype)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    torch.manual_seed(0)
    images = torch.randn(64, 3, 224, 224, device=device)
    rows = []
    with torch.inference_mode():
        expected = reference(images).last_hidden_state
        keep = torch.ones(expected.shape[:2], dtype=torch.bool, device=device)
        run = lambda model: model(images.to(dtype)).last_hidden_state  # noqa: E731
        rows += forward_rows("vit-base, 64 images of 224 x 224", stock, fast, run, expected, keep, device)
    print("vit calls", call_counts(fast), flush=True)
    return rows


def bench_clip(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """CLIP ViT-B/32's shapes (vision: 12 layers, 768 wide, patch 32; text: 12 layers, 512 wide, 8 heads, 77
    positions): 64 images of 224 x 224 and 64 captions of ``torch.manual_seed(0); torch.randint(5, 78, (64,))``
    tokens (the last one the end-of-text id), right-padded; the whole CLIPModel forward (logits per image)."""
    from transformers import CLIPConfig, CLIPModel

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text = dict(small if args.small else {}, eos_token_id=49407)
    vision = dict(small if args.small else {}, patch_size=32)
    config = CLIPConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    reference = CLIPModel(config).to(device).eval()
    stock = copy.deepcopy(reference).to(dtype)
    fast = BetterTransformer.transform(copy.deepcopy(stock))
    torch.manual_seed(0)
    lengths = torch.randint(5, 78, (64,))
    mask = (torch.arange(77)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 49406, (64, 77)) * mask
    ids[torch.arange(64), lengths - 1] = 49407
    ids, mask = ids.to(device), mask.to(device)
    images = torch.randn(64, 3, 224, 224, device=device)
    rows = []
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=images).logits_per_image
        keep = torch.ones(expected.shape, dtype=torch.bool, device=device)
        run = lambda model: model(input_ids=ids, attention_mask=mask, pixel_values=images.to(dtype)).logits_per_image  # noqa: E731
        rows += forward_rows(
            "clip vit-b/32, 64 images + 64 captions of 5-77 tokens", stock, fast, run, expected, keep, device
        )
    print("clip calls", call_counts(fast), flush=True)
    return rows


def _random_model(config, device: torch.device, dtype: torch.dtype, build=AutoModel.from_config):
    """(fp32 reference, stock in ``dtype``, transformed copy of stock) of a random-weight ``config``, the model made
    by ``build(config)``."""
    torch.manual_seed(0)
    reference = build(config).to(device).eval()
    stock = copy.deepcopy(reference).to(dtype)
    return reference, stock, BetterTransformer.transform(copy.deepcopy(stock))


def bench_dinov2(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """DINOv2-base's shapes (12 layers, 768 wide, 12 heads, MLP 3072, patch 14, LayerScale): 64 images of 224 x 224
    (257 tokens each, no padding)."""
    from transformers import Dinov2Config

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4) if args.small else {}
    config = Dinov2Config(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference, stock, fast = _random_model(config, device, dtype)
    torch.manual_seed(0)
    images = torch.randn(64, 3, 224, 224, device=device)
    with torch.inference_mode():
        expected = reference(images).last_hidden_state
        keep = torch.ones(expected.shape[:2], dtype=torch.bool, device=device)
        run = lambda model: model(images.to(dtype)).last_hidden_state  # noqa: E731
        rows = forward_rows("dinov2-base, 64 images of 224 x 224", stock, fast, run, expected, keep, device)
    print("dinov2 calls", call_counts(fast), flush=True)
    return rows


def bench_yolos(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """YOLOS-small's shapes (12 layers, 384 wide, 6 heads, MLP 1536, patch 16, 100 detection tokens, mid-position
    embeddings): object detection on 8 images of 800 x 1344 (4,300 tokens each, no padding); the error of the logits."""
    from transformers import AutoModelForObjectDetection, YolosConfig

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 image_size=[64, 96], num_detection_tokens=10)  # fmt: skip
    yolos_small = dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, image_size=[800, 1344])
    config = YolosConfig(
        **(small if args.small else yolos_small), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    reference, stock, fast = _random_model(config, device, dtype, AutoModelForObjectDetection.from_config)
    torch.manual_seed(0)
    images = torch.randn(8, 3, *config.image_size, device=device)
    with torch.inference_mode():
        expected = reference(images).logits
        keep = torch.ones(expected.shape, dtype=torch.bool, device=device)
        run = lambda model: model(images.to(dtype)).logits  # noqa: E731
        size = "x".join(map(str, config.image_size))
        rows = forward_rows(f"yolos-small detection, 8 images of {size}", stock, fast, run, expected, keep, device)
    print("yolos calls", call_counts(fast), flush=True)
    return rows


def bench_vilt(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """ViLT-B/32's shapes (12 layers, 768 wide, 12 heads, MLP 3072, patch 32, 40 text positions): 64 image-caption
    pairs; each image on a 384 x 576 canvas, its real width ``torch.manual_seed(0); torch.randint(384, 577, (64,))``
    marked by the pixel mask; captions of ``torch.randint(5, 41, (64,))`` tokens right-padded to 40. The error at the
    real text and image positions (the mask ViLT's embeddings make)."""
    from transformers import ViltConfig

    sizes = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if args.small else {}
    )
    config = ViltConfig(**sizes, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference, stock, fast = _random_model(config, device, dtype)
    torch.manual_seed(0)
    widths, lengths = torch.randint(384, 577, (64,)), torch.randint(5, 41, (64,))
    pixel_mask = (torch.arange(576)[None, None, :] < widths[:, None, None]).expand(64, 384, 576).long()
    mask = (torch.arange(40)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, config.vocab_size, (64, 40)) * mask
    images = torch.randn(64, 3, 384, 576) * pixel_mask[:, None]
    given = dict(input_ids=ids, attention_mask=mask, pixel_values=images, pixel_mask=pixel_mask)
    given = {k: v.to(device) for k, v in given.items()}

    def run(model, dtype: torch.dtype = dtype) -> torch.Tensor:
        torch.manual_seed(0)  # ViLT's embeddings shuffle the image patches: the same draw for every model and call
        return model(**dict(given, pixel_values=given["pixel_values"].to(dtype))).last_hidden_state

    made = []
    hook = reference.embeddings.register_forward_hook(lambda module, inputs, out: made.append(out[1]))
    with torch.inference_mode():
        expected = run(reference, torch.float32)
        hook.remove()
        keep = made[0].bool()
        workload = f"vilt-b32, 64 captions of 5-40 tokens + images 384 x 384-576 ({keep.float().mean():.0%} real)"
        rows = forward_rows(workload, stock, fast, run, expected, keep, device)
    print("vilt calls", call_counts(fast), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["bart", "t5", "fsmt", "prophetnet", "wav2vec2", "modernbert", "vit", "clip", "whisper", "dinov2", "yolos",
             "vilt"]  # fmt: skip
    parser.add_argument("--only", nargs="+", default=parts, choices=parts)
    parser.add_argument("--small", action="store_true", help="tiny configs: a check of the script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    for part in args.only:
        bench = {
            "bart": bench_bart, "t5": bench_t5, "fsmt": bench_fsmt, "prophetnet": bench_prophetnet,
            "wav2vec2": bench_wav2vec2, "modernbert": bench_modernbert,
            "vit": bench_vit, "clip": bench_clip, "whisper": bench_whisper, "dinov2": bench_dinov2, "yolos": bench_yolos,
            "vilt": bench_vilt,
        }  # fmt: skip
        rows += bench[part](args, device, dtype)
    print(
        f"\n{card}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    print("| workload | model | time | max error vs fp32 at real positions |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
