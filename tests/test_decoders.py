"""Decoders against the stock model on CPU in fp32: generate token for token, logits at real positions, caches,
packed-sequence training, the fast generate loop (its static-cache step run eagerly on the CPU) and its fallbacks."""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
from decoder_zoo import ALL, EOS, PAD, decoder_config, left_padded_batch, make_decoder, supported
from helpers import assert_close_at, assert_grads_close
from transformers import DynamicCache

from bettertransformer import BetterTransformer, call_counts, is_transformed
from bettertransformer.registry import support_for
from bettertransformer.switches import SWITCHES

LENGTHS = (20, 5, 13, 1)  # longer than the sliding windows (8) of the zoo


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("name", ALL)
def test_generate_and_logits_match_stock(name):
    stock = make_decoder(name)
    if not supported(name):
        with pytest.raises(NotImplementedError, match="model type|attention interface|alibi=True is not supported"):
            BetterTransformer.transform(stock)
        return
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    expected = stock.generate(ids, **kwargs)
    with torch.no_grad():
        expected_logits = stock(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    model = BetterTransformer.transform(stock, keep_original_model=True)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert call_counts(model)["fast generate"] == 1
    before = call_counts(model)["fast"]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    assert call_counts(model)["fast"] == before + 1  # the padded batch ran padding-free
    assert_close_at(logits, expected_logits, mask, atol=2e-5, what=name)
    # One prompt, no padding.
    single = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids[:1], **single), stock.generate(ids[:1], **single))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("name", ALL)
def test_direct_forward_on_padded_batch_matches_stock(name, padding, attn_implementation):
    """A plain forward on a padded batch, as a user writes it (no position_ids, so no padding-free prefill): the
    logits at real tokens are stock's, and finite wherever stock's are. Left padding gives padded query rows that
    may attend to no key at all; their NaN once reached every real token of the row (Gemma 2, issue 10)."""
    if not supported(name):
        pytest.skip("transform refuses this configuration (checked in test_generate_and_logits_match_stock)")
    stock = make_decoder(name, attn_implementation=attn_implementation)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)
    model = BetterTransformer.transform(stock, keep_original_model=True)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert_close_at(got, expected, mask, atol=2e-5, what=f"{name}, {padding} padding")
    counts = call_counts(model)  # BLOOM takes no position_ids: its left-padded batch runs padding-free
    assert counts["fast"] + counts["stock"] == 1


@pytest.mark.parametrize("name", ["gpt2", "llama", "bloom"])  # fused steps, and the generic step
def test_generate_of_a_model_made_under_inference_mode_matches_stock(name, fast_loop_on_cpu):
    stock = make_decoder(name)
    ids, mask = left_padded_batch(stock.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD)
    with torch.inference_mode():
        fast = BetterTransformer.transform(copy.deepcopy(stock))  # inference tensors as parameters
        assert next(fast.parameters()).is_inference()
        assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert call_counts(fast)["fast generate"] == 1


@pytest.mark.parametrize(
    "name",
    ["llama", "gpt2", "mistral", "gpt_bigcode", "qwen2", "gemma3_text", "gpt_neo-local", "bloom", "falcon", "gptj"],
)
def test_fast_generate_loop_matches_stock(name, fast_loop_on_cpu):
    stock = make_decoder(name)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    model = BetterTransformer.transform(stock, keep_original_model=True)
    implementation = model.config._attn_implementation  # decode steps of BLOOM, Falcon, GPT-Neo switch it briefly
    base = dict(attention_mask=mask, do_sample=False, pad_token_id=PAD)
    reference = stock.generate(ids, max_new_tokens=12, **base)
    stop = int(reference[0, ids.shape[1] + 3])  # row 0's 4th new token: stopping on it ends row 0 there
    cases = [
        dict(max_new_tokens=12),
        dict(max_new_tokens=12, eos_token_id=stop),
        dict(max_new_tokens=12, eos_token_id=[EOS, stop], min_new_tokens=6),
        dict(max_length=ids.shape[1] + 5),
        dict(max_new_tokens=12, repetition_penalty=1.5),
        dict(max_new_tokens=9, do_sample=True, top_k=1),  # sampling from one candidate is greedy
        dict(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=1e-6),  # so is top-p keeping one token
    ]
    for case in cases:
        expected = stock.generate(ids, **{**base, **case, "do_sample": False, "top_k": None, "top_p": None})
        got = model.generate(ids, **{**base, **case})
        assert got.shape == expected.shape and torch.equal(got, expected), case
    assert call_counts(model)["fast generate"] == len(cases)
    assert model.config._attn_implementation == implementation
    # Every row stopping early stops the whole call where stock stops.
    expected = stock.generate(ids[:1], max_new_tokens=12, eos_token_id=stop, pad_token_id=PAD)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=12, eos_token_id=stop, pad_token_id=PAD), expected)
    assert expected.shape[1] <= ids.shape[1] + 4  # the stop token may come earlier too


def test_fast_generate_sampling_is_reproducible(fast_loop_on_cpu):
    model = BetterTransformer.transform(make_decoder("llama"))
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
    torch.manual_seed(1)
    first = model.generate(ids, **kwargs)
    torch.manual_seed(1)
    assert torch.equal(model.generate(ids, **kwargs), first)
    assert call_counts(model)["fast generate"] == 2


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_forced_first_and_last_tokens_match_stock(name, fast_loop_on_cpu):
    """forced_eos_token_id (the token that reaches the length limit) and forced_bos_token_id (the first new token
    after a one-token prompt) run in the fast loop, as generate's processors force them; the fused step (GPT-2,
    Llama) included."""
    stock = make_decoder(name)
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    cases = [
        (ids, dict(attention_mask=mask, max_new_tokens=7, forced_eos_token_id=5)),
        (ids, dict(attention_mask=mask, max_new_tokens=7, forced_bos_token_id=6)),  # a longer prompt: not forced
        (ids[:, -1:], dict(max_new_tokens=5, forced_bos_token_id=6, forced_eos_token_id=5)),
        (ids[:, -1:], dict(max_new_tokens=1, forced_bos_token_id=6, forced_eos_token_id=5)),  # both: eos wins
    ]
    for prompt, kwargs in cases:
        kwargs = dict(kwargs, pad_token_id=PAD)
        assert torch.equal(model.generate(prompt, **kwargs), stock.generate(prompt, **kwargs)), kwargs
    assert call_counts(model)["fast generate"] == len(cases)


def test_unsupported_settings_run_stock_generate(fast_loop_on_cpu, caplog):
    stock = make_decoder("llama")
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    beams = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD)
    with caplog.at_level(logging.INFO, logger="bettertransformer"):
        assert torch.equal(model.generate(ids, **beams), stock.generate(ids, **beams))
    assert "num_beams" in caplog.text
    static = dict(attention_mask=mask, max_new_tokens=6, cache_implementation="static", pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **static), stock.generate(ids, **static))
    chunked = dict(attention_mask=mask, max_new_tokens=6, prefill_chunk_size=8, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **chunked), stock.generate(ids, **chunked))
    assert call_counts(model)["stock generate"] == 3


def test_cache_continues_after_packed_prefill():
    """A user-driven prefill then decode steps with the returned cache (dynamic, sliding-window layers)."""
    stock = make_decoder("mistral")
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    results = []
    for m in (stock, model):
        with torch.no_grad():
            out = m(ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
            cache = out.past_key_values
            step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position = _positions(mask)[:, -1:] + 1
            step = m(ids[:, -1:], attention_mask=step_mask, position_ids=position, past_key_values=cache)
        results.append(step.logits)
    assert_close_at(results[1], results[0], None, atol=2e-5)


@pytest.mark.parametrize("name", ["llama", "bloom", "gpt_neo-local", "falcon", "gptj", "codegen"])
def test_output_attentions_are_exact(name):
    eager = make_decoder(name, attn_implementation="eager")
    model = BetterTransformer.transform(make_decoder(name))
    ids, mask = left_padded_batch(eager.config.vocab_size, LENGTHS)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask, output_attentions=True).attentions
        got = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        keep = (mask[:, None, :, None] * mask[:, None, None, :]).bool().expand_as(e)
        assert torch.allclose(g[keep], e[keep], atol=1e-6)
    assert call_counts(model)["fast"] == 0


def test_softcap_matches_eager():
    # Large query weights and a small cap, so the cap changes the result.
    eager = make_decoder("gemma2", attn_implementation="eager", attn_logit_softcapping=2.0)
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
    model = BetterTransformer.transform(eager, keep_original_model=True)
    ids, mask = left_padded_batch(eager.config.vocab_size, LENGTHS)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask, position_ids=_positions(mask)).logits
        uncapped = make_decoder("gemma2", attn_implementation="eager", attn_logit_softcapping=None)
        uncapped.load_state_dict(eager.state_dict())
        assert (uncapped(ids, attention_mask=mask).logits - expected)[mask.bool()].abs().max() > 1e-3
        got = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    assert_close_at(got, expected, mask, atol=2e-5)
    assert call_counts(model)["fast"] == 1


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "gpt_neo-local", "falcon", "qwen3", "gemma2", "olmo2"])
def test_packed_rows_train_like_separate_sequences(name):
    """One row holding three sequences, position_ids restarting at 0 (DataCollatorWithFlattening)."""
    stock = make_decoder(name).train()
    model = BetterTransformer.transform(stock, keep_original_model=True).train()
    torch.manual_seed(0)
    lengths = [7, 12, 4]
    sequences = [torch.randint(3, stock.config.vocab_size, (1, n)) for n in lengths]
    row = torch.cat(sequences, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    weights = torch.randn(1, sum(lengths), stock.config.vocab_size)
    packed = model(row, position_ids=positions).logits
    (packed * weights).sum().backward()
    separate = torch.cat([stock(s).logits for s in sequences], dim=1)
    (separate * weights).sum().backward()
    assert_close_at(packed, separate, None, atol=2e-5)
    assert call_counts(model)["fast"] == 1
    for (pname, p), q in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert_grads_close(q.grad, p.grad, pname)


@pytest.mark.parametrize("name", ["llama", "gemma2", "olmo2"])
def test_training_norms_run_the_fused_op(name, monkeypatch):
    """With a gradient needed, every RMSNorm runs PyTorch's fused RMSNorm op (one kernel forward on CUDA; its
    composite on the CPU): each of the model's norms once a forward, in each stock form; without one, none does."""
    from bettertransformer.adapters import decoder

    ran = []

    def counted(*args, **kwargs):
        out = fused(*args, **kwargs)
        ran.append(out is not None)
        return out

    fused = decoder.rms_norm_with_grad
    monkeypatch.setattr(decoder, "rms_norm_with_grad", counted)
    stock = make_decoder(name).train()
    model = BetterTransformer.transform(stock, keep_original_model=True).train()
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    ids = torch.randint(3, stock.config.vocab_size, (2, 9))
    model(ids).logits.sum().backward()
    assert len(ran) == len(norms) > 0 and all(ran)
    with torch.no_grad():
        model(ids)
    assert len(ran) == len(norms)


def test_padded_training_gradients_match_stock():
    stock = make_decoder("llama").train()
    model = BetterTransformer.transform(stock, keep_original_model=True).train()
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    labels = ids.masked_fill(mask == 0, -100)
    for m in (stock, model):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    for (pname, p), q in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert_grads_close(q.grad, p.grad, pname)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on_packed_rows_gives_stock_gradients(reentrant):
    """Packed-sequence training (position_ids restarting per sequence) with gradient checkpointing: the recomputed
    forward runs our attention again, under the call state of the original forward (without it the recomputation
    attended across the whole row: gradients off by up to 36 with reentrant checkpoints, an error without)."""
    stock = make_decoder("llama").train()
    model = BetterTransformer.transform(stock, keep_original_model=True).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    lengths = [11, 4, 7]
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, stock.config.vocab_size, (1, n), generator=gen) for n in lengths]
    row = torch.cat(sequences, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    weights = torch.randn(1, sum(lengths), stock.config.vocab_size, generator=gen)
    (model(row, position_ids=positions).logits * weights).sum().backward()
    separate = torch.cat([stock(s).logits for s in sequences], dim=1)
    (separate * weights).sum().backward()
    assert call_counts(model)["fast"] >= 1
    for (pname, p), q in zip(stock.named_parameters(), model.parameters(), strict=True):
        assert_grads_close(q.grad, p.grad, pname)
    BetterTransformer.reverse(model)  # the layers get transformers' own checkpoint function back
    functions = [vars(m).get("_gradient_checkpointing_func") for m in model.modules()]
    assert any(functions) and not any(type(f).__name__ == "CarriedCheckpoint" for f in functions)


def test_reverse_restores_stock_decoder(fast_loop_on_cpu):
    stock = make_decoder("gpt2")
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    implementation = stock.config._attn_implementation
    model = BetterTransformer.transform(stock)
    assert model.config._attn_implementation == "bettertransformer"
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)
    assert call_counts(model)["fast generate"] == 1
    reversed_model = BetterTransformer.reverse(model)
    assert not is_transformed(reversed_model)
    assert reversed_model.config._attn_implementation == implementation
    assert "generate" not in vars(reversed_model) and "forward" not in vars(reversed_model.transformer)
    for key, value in reversed_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unlisted_causal_lm_uses_the_general_path(monkeypatch):
    stock = make_decoder("llama")
    monkeypatch.setattr(stock.config, "model_type", "my-llama")
    support = support_for(stock.model, stock)
    assert support is not None and "not verified" in support.notes
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_direct_forward_cache_argument_name():
    """Passing the user's own DynamicCache to the prefill fills it (the name differs between 5.17 and 5.24)."""
    stock = make_decoder("llama")
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    caches = []
    for m in (stock, model):
        cache = DynamicCache(config=decoder_config("llama"))
        name = "cache" if "cache" in inspect.signature(type(m.model).forward).parameters else "past_key_values"
        with torch.no_grad():
            m(ids, attention_mask=mask, position_ids=_positions(mask), **{name: cache})
        caches.append(cache)
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert a.keys.shape == b.keys.shape
        assert_close_at(b.keys.transpose(1, 2), a.keys.transpose(1, 2), mask, atol=1e-5)


def test_gpt2_generates_through_the_fused_decode_step(fast_loop_on_cpu, monkeypatch):
    stock = make_decoder("gpt2")
    model = BetterTransformer.transform(stock, keep_original_model=True)
    (patch,) = model._bettertransformer_state.patches
    fused = patch.generation.fused
    assert fused is not None
    steps = []
    original = type(fused)._step
    monkeypatch.setattr(type(fused), "_step", lambda self, *a: steps.append(1) or original(self, *a))
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert len(steps) == 9  # every token after the first (which comes from the prefill)
    counts = call_counts(model)
    assert counts["fast"] + counts["stock"] == 0  # the prefill ran the fused layers too, not the model's forward
    # A row with no real token: the prefill falls back to the model's own forward, the result is still stock's.
    empty_ids, empty_mask = left_padded_batch(stock.config.vocab_size, (6, 0, 3))
    empty = dict(kwargs, attention_mask=empty_mask)
    assert torch.equal(model.generate(empty_ids, **empty), stock.generate(empty_ids, **empty))
    # A module swapped in after transform (an adapter, say) is not one the fused step knows: stock generate runs.
    model.transformer.h[0].mlp.c_fc = torch.nn.Sequential(model.transformer.h[0].mlp.c_fc)
    model.generate(ids, **kwargs)
    assert call_counts(model)["stock generate"] == 1 and call_counts(model)["fast generate"] == 2
    # Swapped back, the fused step runs again; a weight moved off the device after that (the module tree unchanged)
    # is still seen at the next call.
    model.transformer.h[0].mlp.c_fc = model.transformer.h[0].mlp.c_fc[0]
    assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert call_counts(model)["fast generate"] == 3
    (patch,) = model._bettertransformer_state.patches
    model.transformer.h[1].mlp.c_proj.to("meta")
    plan = patch.generation._plan((ids,), kwargs)
    assert isinstance(plan, str) and "split across devices" in plan


# Model type -> the fused decode step family that runs it.
LLAMA_FAMILY = {
    "llama": "LlamaDecodeStep", "mistral": "MistralDecodeStep", "qwen2": "LlamaDecodeStep", "qwen3": "LlamaDecodeStep",
    "gemma": "LlamaDecodeStep", "gemma2": "Gemma2DecodeStep", "gemma3_text": "Gemma2DecodeStep",
    "phi3": "Phi3DecodeStep", "olmo2": "Olmo2DecodeStep", "olmo3": "Olmo2DecodeStep", "ministral": "LlamaDecodeStep",
    "seed_oss": "LlamaDecodeStep", "smollm3": "LlamaDecodeStep", "granite": "GraniteDecodeStep",
    "helium": "HeliumDecodeStep", "glm": "GlmDecodeStep", "glm4": "Glm4DecodeStep",
    "starcoder2": "Starcoder2DecodeStep",
}  # fmt: skip
_ROPE = dict(rope_theta=10000.0, original_max_position_embeddings=16)


@pytest.mark.parametrize(
    "name, rope",
    [(name, None) for name in LLAMA_FAMILY]
    + [
        ("llama", dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
        ("llama", dict(rope_type="yarn", factor=4.0, **_ROPE)),  # attention factor 1.14: cos and sin scaled
        ("llama", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, **_ROPE)),
        ("phi3", dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),  # half the features turn
    ],
)
def test_llama_family_generates_through_the_fused_decode_step(name, rope, fast_loop_on_cpu, monkeypatch):
    """Greedy (the choice fused into the LM head) and sampling with a repetition penalty (the step's logits) are
    token for token stock's, through the fused prefill and step: the reference path of the CUDA kernels."""
    stock = make_decoder(name, **({"rope_parameters": rope} if rope else {}))
    model = BetterTransformer.transform(stock, keep_original_model=True)
    (patch,) = model._bettertransformer_state.patches
    fused = patch.generation.fused
    assert type(fused).__name__ == LLAMA_FAMILY[name]
    assert fused.prefill_capturable  # Gemma 2's softcapped prefill too: the dense layout needs no host sync
    steps = []
    original = type(fused)._step
    monkeypatch.setattr(type(fused), "_step", lambda self, *a: steps.append(1) or original(self, *a))
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    greedy = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=PAD, do_sample=False)
    assert torch.equal(model.generate(ids, **greedy), stock.generate(ids, **greedy))
    sampling = dict(greedy, do_sample=True, top_k=20, repetition_penalty=1.3)
    torch.manual_seed(5)
    expected = stock.generate(ids, **sampling)
    torch.manual_seed(5)
    assert torch.equal(model.generate(ids, **sampling), expected)
    assert len(steps) == 22  # every token after the first of each call
    counts = call_counts(model)
    assert counts["fused steps"] == 2 and counts["generic steps"] == 0
    assert counts["fast"] + counts["stock"] == 0  # the prefill ran the fused layers too
    # A row with no real token: the model's own forward runs the prefill into the same buffers, then the fused step.
    empty_ids, empty_mask = left_padded_batch(stock.config.vocab_size, (9, 0, 4))
    empty = dict(greedy, attention_mask=empty_mask)
    assert torch.equal(model.generate(empty_ids, **empty), stock.generate(empty_ids, **empty))
    assert call_counts(model)["fused steps"] == 3


@pytest.mark.parametrize("name", [*sorted(LLAMA_FAMILY), "gpt2"])
def test_fused_step_logits_match_the_stock_forward(name, fast_loop_on_cpu, monkeypatch):
    """Every logit the fused prefill and step compute (fp32, CPU: the kernels' reference path) against the stock
    forward over the final sequences, position by position. Tiny random models soon repeat one token, so equal
    tokens alone would let a wrong position encoding through (a NoPE layer given rotary positions, say)."""
    from bettertransformer.adapters.generation import Runner

    stock = make_decoder(name)
    model = BetterTransformer.transform(stock, keep_original_model=True)
    seen: list[torch.Tensor] = []
    original = Runner._select
    monkeypatch.setattr(Runner, "_select", lambda self, logits: seen.append(logits.clone()) or original(self, logits))
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    # A repetition penalty makes the step return its logits (not the fused greedy choice); both models apply it.
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, do_sample=False, repetition_penalty=1.01)
    out = model.generate(ids, **kwargs)
    assert torch.equal(out, stock.generate(ids, **kwargs))
    assert call_counts(model)["fused steps"] == 1 and len(seen) == 10
    full = torch.cat([mask, torch.ones_like(out[:, ids.shape[1] :])], dim=1)
    with torch.no_grad():
        expected = stock(out, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
    ours = torch.stack(seen, dim=1)[: out.shape[0]]  # (B, new, V): the logits token i was chosen from
    torch.testing.assert_close(ours, expected[:, ids.shape[1] - 1 : -1], atol=1e-4, rtol=1e-4)


def test_a_model_on_several_devices_takes_the_generic_step(caplog):
    """A fused step launches its kernels over all the weights at once: a model split across devices (accelerate's
    device_map) or offloaded (weights on "meta" until a hook loads them) must not build one."""
    stock = make_decoder("llama")
    stock.model.layers[1].mlp.down_proj.to("meta")
    with caplog.at_level(logging.INFO, logger="bettertransformer"):
        model = BetterTransformer.transform(stock)
    (patch,) = model._bettertransformer_state.patches
    assert patch.generation.fused is None and "several devices" in caplog.text
    # Nor does the fast loop run: its static buffers would live on one device (here a layer cannot even run).
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    plan = patch.generation._plan((ids,), dict(attention_mask=mask, max_new_tokens=4, pad_token_id=PAD))
    assert isinstance(plan, str) and "split across devices" in plan


def test_rotary_frequencies_that_change_at_run_time_take_the_generic_step(fast_loop_on_cpu, caplog):
    stock = make_decoder("llama", rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))
    with caplog.at_level(logging.INFO, logger="bettertransformer"):
        model = BetterTransformer.transform(stock, keep_original_model=True)
    assert "change at run time" in caplog.text
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    counts = call_counts(model)
    assert counts["fast generate"] == 1 and counts["generic steps"] == 1 and counts["fused steps"] == 0


def test_generic_steps_attend_with_cudnn_sdpa_off(fast_loop_on_cpu, monkeypatch):
    """A generic step's attention runs with SDPA's repeatable backends only: on an H200 (torch 2.11), with cuDNN's
    on, 10 identical batch-16 generate calls of a GPT-NeoX-shaped model gave 9 different outputs; with it off, one."""
    from bettertransformer.adapters import decode_state

    states = []
    original = decode_state.attention

    def spy(*args, **kwargs):
        states.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_state, "attention", spy)
    stock = make_decoder("gpt_neox")
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert call_counts(model)["generic steps"] == 1
    assert states and not any(states) and torch.backends.cuda.cudnn_sdp_enabled()


def test_save_pretrained_writes_a_stock_checkpoint(tmp_path):
    stock = make_decoder("llama")
    model = BetterTransformer.transform(stock, keep_original_model=True)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert "bettertransformer" not in config
    loaded = type(stock).from_pretrained(tmp_path)
    assert loaded.config._attn_implementation != "bettertransformer"
    for key, value in stock.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
def test_right_padding_runs_stock_and_matches(name):
    """Right padding (a training-style batch) is not a prefill layout: the call runs the stock forward, exactly."""
    stock = make_decoder(name)
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    ids, mask = ids.flip(1), mask.flip(1)  # padded on the right
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask).logits
    assert_close_at(got, expected, mask, atol=2e-5)
    counts = call_counts(model)
    assert counts["fast"] == 0 and counts["stock"] == 1


def test_decode_buffers_are_found_by_layer_index():
    """A decode step writes each layer's key/value into that layer's buffer, whatever order the calls come in;
    a call it cannot place (no layer index, cross-attention) is refused, never written into a wrong buffer."""
    from types import SimpleNamespace

    from bettertransformer.adapters.decode_state import DecodeState, DecodeUnsupported
    from bettertransformer.ops.step_buffers import StepBuffers

    buffers = StepBuffers.allocate(2, 5, 11, (2,), torch.float32, torch.device("cpu"), penalty=False, bans=False)
    buffers.valid[:, :3] = True
    buffers.mask.copy_(torch.where(buffers.valid, 0.0, float("-inf")))
    buffers.slot.fill_(2)
    state = DecodeState([torch.zeros(2, 2, 1, 5, 4) for _ in range(3)], buffers)
    q, k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    for index in (2, 0):
        state.attend(SimpleNamespace(layer_idx=index), q, k, v, 0.5, None, None)
        assert torch.equal(state.kv[index][0, :, :, 2], k[:, :, 0]) and torch.equal(
            state.kv[index][1, :, :, 2], v[:, :, 0]
        )
    assert state.kv[1].abs().sum() == 0
    with pytest.raises(DecodeUnsupported, match="layer index"):
        state.attend(SimpleNamespace(), q, k, v, 0.5, None, None)
    with pytest.raises(DecodeUnsupported, match="cross-attention"):
        state.attend(SimpleNamespace(layer_idx=0, is_cross_attention=True), q, k, v, 0.5, None, None)


def test_generate_runs_stock_when_decode_steps_cannot_use_the_buffers(fast_loop_on_cpu, caplog):
    stock = make_decoder("mixtral")  # the generic step: the model's own forward, our attention
    model = BetterTransformer.transform(stock, keep_original_model=True)
    for layer in model.model.layers:
        layer.self_attn.is_cross_attention = True  # as if it attended to an encoder: no static buffer serves it
    ids, mask = left_padded_batch(stock.config.vocab_size, LENGTHS)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with caplog.at_level(logging.INFO, logger="bettertransformer"):
        for _ in range(2):
            assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert "cross-attention" in caplog.text
    assert call_counts(model)["stock generate"] == 2 and call_counts(model)["fast generate"] == 0


def test_runners_are_bounded_and_reported(fast_loop_on_cpu, monkeypatch):
    from bettertransformer import cache_info

    model = BetterTransformer.transform(make_decoder("llama"))
    assert cache_info(model) == {"runners": 0, "graphs": 0, "buffer_bytes": 0}
    monkeypatch.setattr(SWITCHES, "max_graphs", 2)
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS)
    for rows in (1, 2, 4):  # three batch buckets
        model.generate(ids[:rows], attention_mask=mask[:rows], max_new_tokens=4, pad_token_id=PAD)
    info = cache_info(model)
    assert info["runners"] == 2 and info["buffer_bytes"] > 0
    monkeypatch.setattr(SWITCHES, "max_graph_bytes", 1)  # only the runner in use is kept
    model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    assert cache_info(model)["runners"] == 1
    BetterTransformer.reverse(model)
