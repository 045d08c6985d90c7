"""Encoder-decoders (BART, T5 and their kin): the encoder padding-free, generate's decoder steps on static buffers
(issue 13).

Tiny random-weight models of every registered encoder-decoder type, fp32 on the CPU, against the stock model on
padded batches: encoder outputs at real tokens, the whole model's logits, and ``generate`` token for token (the
static-cache loop runs eagerly on the CPU here; the GPU replays the same step from a CUDA graph).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartForCausalLM
from helpers import assert_close_at, assert_error_within_stock, half_precision_trio
from zoo import LAYOUTS, VOCAB, make_batch

from bettertransformer import BetterTransformer, call_counts, is_transformed, reverse

_COMMON = dict(
    vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0,
    activation_dropout=0.0,
)  # fmt: skip

_T5 = dict(
    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0, pad_token_id=0,
    eos_token_id=2, decoder_start_token_id=0,
)  # fmt: skip

# Per model type: its config. Post-LayerNorm layers (bart, marian, blenderbot-small, plbart), pre-LayerNorm ones
# with a norm after the loop (mbart, pegasus, m2m_100, blenderbot), and T5's pre-RMS-norm blocks with a relative
# position bias (t5 with the ReLU feed-forward, mt5 with the gated GELU one).
SEQ2SEQ_CONFIGS: dict[str, dict] = {
    "bart": _COMMON,
    "blenderbot": _COMMON,
    "blenderbot-small": _COMMON,
    # FSMT: fairseq's layout (sequence first), its own vocabularies; its decoder has no attention interface (its
    # modules are routed through ours). Weights of std 0.2: at its default 0.02 this tiny model's greedy tokens are
    # the same whatever the input, and equal tokens would say little.
    "fsmt": dict(_COMMON, langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, init_std=0.2),
    "m2m_100": _COMMON,
    "marian": dict(_COMMON, activation_function="swish"),
    "mbart": _COMMON,
    "mt5": dict(_T5, feed_forward_proj="gated-gelu"),
    "pegasus": _COMMON,
    "plbart": _COMMON,
    # ProphetNet: BERT-like post-LayerNorm encoder layers; its n-gram decoder computes attention itself (eager): its
    # decode steps are a forward of ours. Weights of std 0.2, as FSMT's (at 0.02 every input gives one token and the
    # end); 128 positions, so that a runner's 64 slots fit its table.
    "prophetnet": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        num_encoder_layers=2,
        num_decoder_layers=2,
        num_encoder_attention_heads=4,
        num_decoder_attention_heads=4,
        max_position_embeddings=128,
        init_std=0.2,
        ngram=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    ),
    "t5": _T5,
}


def _assert_same_at_real_tokens(fast, stock, ids, mask, output="last_hidden_state"):
    """``fast``'s ``output`` equals ``stock``'s at the real tokens (fp32) and is finite at the padding."""
    with torch.no_grad():
        expected = getattr(stock(input_ids=ids, attention_mask=mask), output)
        actual = getattr(fast(input_ids=ids, attention_mask=mask), output)
    assert_close_at(actual, expected, mask, atol=1e-5, rtol=1e-5, what=output)


def make_seq2seq(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**SEQ2SEQ_CONFIGS[model_type], **overrides})
    return AutoModelForSeq2SeqLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["bart", "fsmt", "prophetnet"])
def test_generate_of_a_model_made_under_inference_mode_matches_stock(model_type, fast_loop_on_cpu):
    # Parameters made under torch.inference_mode are inference tensors (no version counter): a benchmark that copies
    # its model inside inference_mode made the encoder's fused-projection cache raise.
    stock = make_seq2seq(model_type)
    ids, mask = make_batch(*LAYOUTS["right"])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, num_beams=1)
    with torch.inference_mode():
        fast = BetterTransformer.transform(copy.deepcopy(stock))
        assert next(fast.parameters()).is_inference()
        assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs))
    assert call_counts(fast)["fast generate"] == 1


@pytest.mark.parametrize("layout", ["none", "right", "left", "length1", "empty_row"])
@pytest.mark.parametrize("model_type", sorted(SEQ2SEQ_CONFIGS))
def test_encoder_outputs_logits_and_generate_match_stock(model_type, layout, fast_loop_on_cpu):
    stock = make_seq2seq(model_type)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    lengths, side = LAYOUTS[layout]
    ids, mask = make_batch(lengths, side)
    _assert_same_at_real_tokens(fast.get_encoder(), stock.get_encoder(), ids, mask)
    with torch.no_grad():
        decoder = ids[:, :7].clamp(min=3)
        logits = fast(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        expected = stock(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        # A row with no input at all: T5's and ProphetNet's cross-attention (an additive mask) then averages the
        # encoder's states at pad positions, stock's pad-token states against our zeros; both meaningless. Every other
        # row must agree.
        rows = mask.any(1) if model_type in ("t5", "mt5", "prophetnet") else slice(None)
        torch.testing.assert_close(logits[rows], expected[rows])
    if layout != "empty_row":  # a row with no input at all: stock's own encoder output there is arbitrary
        # Greedy (FSMT's config asks for beam search, which runs stock: see test_beam_search_runs_stock_generate).
        kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1)
        assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs))
        counts = call_counts(fast)
        # Blenderbot's config bans repeating the input's 3-grams (encoder_no_repeat_ngram_size): stock
        fast_loop = model_type != "blenderbot"
        assert counts["fast generate"] == fast_loop and counts["stock generate"] == 1 - fast_loop
    assert call_counts(fast)["fast"] >= 2 and call_counts(fast)["stock"] == 0


@pytest.mark.parametrize("model_type", ["bart", "mbart", "t5"])
def test_generate_settings_match_stock(model_type, fast_loop_on_cpu):
    """Length limits, minimum lengths, a repetition penalty, forced first and last tokens (BART's config forces
    the end-of-sequence id as the last token), a row that finishes early, and repeated calls of other shapes (the
    runners' buckets)."""
    stock = make_seq2seq(model_type)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    # An end-of-sequence id that row 0 produces as its third new token, so that it stops early.
    early = int(stock.generate(ids, attention_mask=mask, max_new_tokens=3)[0, -1])
    cases = [
        dict(max_new_tokens=9), dict(max_length=6), dict(max_new_tokens=1), dict(max_new_tokens=7, min_new_tokens=5),
        dict(max_new_tokens=7, min_length=4), dict(max_new_tokens=9, repetition_penalty=1.5),
        dict(max_new_tokens=6, forced_bos_token_id=7), dict(max_new_tokens=6, forced_eos_token_id=[5]),
        dict(max_new_tokens=10, eos_token_id=early), dict(max_new_tokens=10, eos_token_id=early, forced_eos_token_id=None),
    ]  # fmt: skip
    for kwargs in cases:
        expected = stock.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(fast.generate(ids, attention_mask=mask, **kwargs), expected), kwargs
    short_ids, short_mask = make_batch([3, 2], "right")
    expected = stock.generate(short_ids, attention_mask=short_mask, max_new_tokens=5)
    assert torch.equal(fast.generate(short_ids, attention_mask=short_mask, max_new_tokens=5), expected)
    counts = call_counts(fast)
    assert counts["fast generate"] == len(cases) + 1 and counts["stock generate"] == 0, counts


def test_arguments_the_loop_does_not_plan_for_run_stock_generate(fast_loop_on_cpu):
    """A decoder prompt of the user's, encoder outputs computed beforehand, several sequences per input: stock
    generate, with stock's tokens."""
    stock = make_seq2seq("t5")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    prompt = torch.zeros(4, 3, dtype=torch.long).index_fill_(1, torch.tensor([1, 2]), 7)
    with torch.no_grad():
        encoded = stock.get_encoder()(input_ids=ids, attention_mask=mask)
    cases = [
        dict(decoder_input_ids=prompt),
        dict(encoder_outputs=encoded),
        dict(num_return_sequences=2, num_beams=2),
    ]
    for kwargs in cases:
        expected = stock.generate(ids, attention_mask=mask, max_new_tokens=5, **kwargs)
        assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=5, **kwargs), expected), kwargs
    assert call_counts(fast)["stock generate"] == len(cases) and call_counts(fast)["fast generate"] == 0


def test_cache_info_counts_the_cross_attention_buffers(fast_loop_on_cpu):
    """A runner's bytes include its cross-attention keys/values and the encoder's states (the memory bound on the
    runners kept, ``SWITCHES.max_graph_bytes``, counts them)."""
    stock = make_seq2seq("bart")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")  # 4 rows, 24 encoder positions: buckets of 4 and 64
    fast.generate(ids, attention_mask=mask, max_new_tokens=5)
    config = stock.config
    cross = config.decoder_layers * 2 * 4 * 64 * config.d_model * 4  # layers x (k, v) x rows x positions x width x fp32
    states = 4 * 64 * config.d_model * 4
    info = BetterTransformer.cache_info(fast)
    assert info["runners"] == 1 and info["buffer_bytes"] >= cross + states


def test_sampling_runs_the_fast_loop(fast_loop_on_cpu):
    """Sampling draws from the same distribution as stock (not the same draws): top_k=1 is the greedy choice, and
    a seed gives the same tokens twice."""
    stock = make_seq2seq("bart")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    greedy = stock.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(fast.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=2.0))
    assert torch.equal(runs[0], runs[1]) and call_counts(fast)["fast generate"] == 3


def test_a_decoder_off_our_attention_runs_stock_generate(fast_loop_on_cpu):
    """An eager model keeps its attention (the user's choice): its decoder's attention never reaches the static
    buffers, which the first step notices; stock generate runs, with the same tokens."""
    for model_type in ("bart", "t5"):
        stock = make_seq2seq(model_type, attn_implementation="eager")
        fast = BetterTransformer.transform(stock, keep_original_model=True)
        ids, mask = make_batch([24, 17, 5, 11], "right")
        expected = stock.generate(ids, attention_mask=mask, max_new_tokens=6)
        assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=6), expected)
        assert call_counts(fast)["stock generate"] == 1 and call_counts(fast)["fast generate"] == 0


@pytest.mark.parametrize("model_type", ["fsmt", "prophetnet"])
def test_beam_search_runs_stock_generate(model_type, fast_loop_on_cpu, caplog):
    """Beam search runs stock generate, logged, with stock's tokens (FSMT's configs ask for it: num_beams=5)."""
    stock = make_seq2seq(model_type)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    beams = {} if model_type == "fsmt" else dict(num_beams=5)
    assert model_type != "fsmt" or stock.generation_config.num_beams == 5
    with caplog.at_level(logging.INFO, logger="bettertransformer"):
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=6, **beams)
    assert torch.equal(got, stock.generate(ids, attention_mask=mask, max_new_tokens=6, **beams))
    assert "num_beams=5" in caplog.text
    assert call_counts(fast)["stock generate"] == 1 and call_counts(fast)["fast generate"] == 0


@pytest.mark.parametrize(
    "model_type, overrides", [("fsmt", {}), ("prophetnet", {}), ("prophetnet", dict(ngram=3, num_buckets=8))]
)
def test_routed_decoders_generate_settings_match_stock(model_type, overrides, fast_loop_on_cpu):
    """Greedy FSMT and ProphetNet (2 and 3 predict streams, fewer position buckets) over calls of several shapes and
    settings (FSMT's config forces the end-of-sequence id last), a row finishing early, and sampling with a seed twice:
    all on the fast loop, greedy tokens equal to stock's."""
    stock = make_seq2seq(model_type, **overrides)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "left")
    early = int(stock.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=1)[0, -1])
    cases = [
        dict(max_new_tokens=12), dict(max_new_tokens=7, min_new_tokens=5), dict(max_new_tokens=9, repetition_penalty=1.5),
        dict(max_new_tokens=10, eos_token_id=early, forced_eos_token_id=None), dict(max_length=5),
    ]  # fmt: skip
    for kwargs in cases:
        expected = stock.generate(ids, attention_mask=mask, num_beams=1, **kwargs)
        assert torch.equal(fast.generate(ids, attention_mask=mask, num_beams=1, **kwargs), expected), kwargs
    sampled = []
    for _ in range(2):
        torch.manual_seed(3)
        sampled.append(fast.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=1, do_sample=True))
    assert torch.equal(sampled[0], sampled[1])
    counts = call_counts(fast)
    assert counts["fast generate"] == len(cases) + 2 and counts["stock generate"] == 0, counts


@pytest.mark.parametrize("model_type", ["fsmt", "prophetnet"])
def test_routed_decode_steps_read_nothing_on_the_host(model_type, fast_loop_on_cpu, monkeypatch):
    """A decode step that turns a tensor into a Python value would synchronise with the GPU, which a CUDA graph cannot
    capture (stock FSMT's positions do, from transformers 5.24: they check the step's position against their table on
    the host; stock ProphetNet's decoder branches on the cache's length). On the CPU: no such conversion happens inside
    these decode steps."""
    from bettertransformer.adapters import seq2seq_generation

    conversions: list[str] = []
    step = seq2seq_generation.Seq2SeqRunner._decode_step

    def watched(runner):
        with monkeypatch.context() as m:
            for name in ("__bool__", "__int__", "__index__", "__float__", "item", "tolist"):
                stock_method = getattr(torch.Tensor, name)

                def record(tensor, *args, _name=name, _stock=stock_method, **kwargs):
                    conversions.append(_name)
                    return _stock(tensor, *args, **kwargs)

                m.setattr(torch.Tensor, name, record)
            step(runner)

    monkeypatch.setattr(seq2seq_generation.Seq2SeqRunner, "_decode_step", watched)
    fast = BetterTransformer.transform(make_seq2seq(model_type))
    ids, mask = make_batch([24, 17, 5, 11], "right")
    fast.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=1)
    assert call_counts(fast)["fast generate"] == 1 and conversions == []


def test_fsmt_positions_past_its_table_run_that_call_stock(fast_loop_on_cpu, caplog):
    """From transformers 5.24 FSMT's decoder embeds its positions after the cache's length, and its stock forward
    grows its sinusoidal table when a position passes the end. A call whose static buffers would outrun the table runs
    stock generate (logged; it grows the table), and only that call: calls after it run the fast loop. (In 5.17 every
    decode step embeds the first position: no call outruns it.)"""
    stock = make_seq2seq("fsmt")  # a table of 65 rows: 64 positions after the padding index 0
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    with caplog.at_level(logging.INFO, logger="bettertransformer"):
        for new in (8, 70, 8):
            kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, num_beams=1)
            assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs)), new
    grown = stock.model.decoder.embed_positions.weight.shape[0] > 65  # stock positions past the table (5.24)
    counts = call_counts(fast)
    assert counts["fast generate"] == 3 - grown and counts["stock generate"] == grown, counts
    assert ("sinusoidal table" in caplog.text) == grown


def test_prophetnet_positions_past_its_table_run_that_call_stock(fast_loop_on_cpu, caplog):
    """ProphetNet's positions are a learned table (128 rows here; the predict stream reads one past the main stream's):
    a call whose static buffers would outrun it runs stock generate (logged), and only that call."""
    stock = make_seq2seq("prophetnet")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "left")
    with caplog.at_level(logging.INFO, logger="bettertransformer"):
        for new in (8, 70, 8):  # 70 new tokens: 128 slots
            kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
            assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs)), new
    counts = call_counts(fast)
    assert counts["fast generate"] == 2 and counts["stock generate"] == 1, counts
    assert "past its table of 128" in caplog.text


def test_fsmt_decoder_attention_weights_and_masks_are_stocks():
    """FSMT's decoder modules run our forwards: with a causal mask and a padding mask in the decoder (use_cache=False
    makes stock build them), the logits, and the attention weights asked for, are stock's."""
    stock = make_seq2seq("fsmt")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    decoder = ids[:, :7].clamp(min=3)
    decoder[1, 4:] = 0  # padding in the decoder's inputs
    with torch.no_grad():
        for use_cache, weights in ((False, False), (False, True), (True, True)):
            kwargs = dict(
                input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=use_cache,
                output_attentions=weights,
            )  # fmt: skip
            expected, actual = stock(**kwargs), fast(**kwargs)
            torch.testing.assert_close(actual.logits, expected.logits)
            for name in ("decoder_attentions", "cross_attentions") if weights else ():
                got, want = getattr(actual, name), getattr(expected, name)
                assert len(got) == len(want) == 2
                for a, e in zip(got, want, strict=True):
                    torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


# The decoder modules whose forwards are ours while transformed (paths inside the decoder).
_ROUTED = {
    "fsmt": sorted([f"layers.{i}.{a}" for i in range(2) for a in ("self_attn", "encoder_attn")] + ["embed_positions"]),
    "prophetnet": [""],  # the decoder itself: its decode steps
}


@pytest.mark.parametrize("model_type", ["fsmt", "prophetnet"])
def test_routed_decoders_reverse_to_the_stock_decoder(model_type, fast_loop_on_cpu):
    """transform routes FSMT's and ProphetNet's decoder modules through ours (forwards on the stock modules, their
    parameters untouched); reverse gives back the stock classes and forwards with the very same parameters and equal
    weights."""
    model = make_seq2seq(model_type)
    classes = {name: type(m) for name, m in model.named_modules()}
    parameters = dict(model.named_parameters())
    weights = {name: t.clone() for name, t in model.state_dict().items()}
    fast = BetterTransformer.transform(model)
    routed = [name for name, m in fast.get_decoder().named_modules() if "forward" in vars(m)]
    assert sorted(routed) == _ROUTED[model_type]
    ids, mask = make_batch([24, 17, 5, 11], "right")
    fast.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=1)
    assert call_counts(fast)["fast generate"] == 1
    reverse(fast)
    assert not any("forward" in vars(m) or "generate" in vars(m) for m in fast.modules())
    assert {name: type(m) for name, m in fast.named_modules()} == classes
    assert all(p is parameters[name] for name, p in fast.named_parameters())
    state = fast.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)


def test_reverse_restores_the_decoders_attention():
    stock = make_seq2seq("t5")
    fast = BetterTransformer.transform(stock)
    assert fast.decoder.config._attn_implementation == "bettertransformer"
    reverse(fast)
    assert fast.decoder.config._attn_implementation == "sdpa" and fast.config._attn_implementation == "sdpa"
    assert "generate" not in vars(fast)


def test_sampling_and_beam_search_generate_match_stock():
    stock = make_seq2seq("bart")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    for kwargs in (dict(do_sample=True, top_k=5), dict(num_beams=3, do_sample=False)):
        torch.manual_seed(0)
        expected = stock.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs)
        torch.manual_seed(0)
        assert torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs), expected), kwargs


def test_calls_the_packed_encoder_cannot_compute_run_its_layers():
    """Hidden states per layer, and training (the layers' dropouts are plain floats): the stock layers run."""
    stock = make_seq2seq("mbart")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    out = fast.get_encoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected = stock.get_encoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(expected.hidden_states) == 3
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)
    fast.train()
    stock.train()
    labels = ids[:, :6].clamp(min=3)
    loss = fast(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, stock(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert call_counts(fast)["stock"] == 2 and call_counts(fast)["fast"] == 0


def test_an_encoder_alone_and_reverse():
    stock = make_seq2seq("pegasus")
    encoder = copy.deepcopy(stock.get_encoder())
    fast = BetterTransformer.transform(encoder, keep_original_model=True)
    _assert_same_at_real_tokens(fast, encoder, *make_batch([24, 17, 5, 11], "left"))
    assert call_counts(fast)["fast"] == 1
    reverse(fast)
    assert not is_transformed(fast) and "forward" not in vars(fast) and "forward" not in vars(fast.layers[0])


def test_a_t5_encoder_model_alone():
    """T5EncoderModel (the encoder-only T5 that embedding models use) runs packed."""
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    stock = T5EncoderModel(AutoConfig.for_model("t5", **_T5)).eval()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    _assert_same_at_real_tokens(fast, stock, *make_batch([24, 17, 5, 11], "left"))
    assert call_counts(fast)["fast"] == 1


def test_fp16_overflow_guards_are_the_stock_layers():
    """The three guards the packed layers apply in fp16, as the stock layers of each family do (fp32 passes)."""
    from bettertransformer.adapters.encoder import _clamp_fp16

    top = torch.finfo(torch.float16).max
    guarded = torch.tensor([1.0, -3.0, -(top - 1000), top], dtype=torch.float16)
    clamped = guarded.clamp(-(top - 1000), top - 1000)
    infinite = torch.tensor([1.0, -3.0, float("inf"), top], dtype=torch.float16)
    half = lambda *v: torch.tensor(v, dtype=torch.float16)  # noqa: E731
    assert torch.equal(_clamp_fp16(guarded, "always"), clamped)  # mBART's kin: always
    assert torch.equal(_clamp_fp16(guarded, "nonfinite"), guarded)  # BART's kin: only when something is not finite
    assert torch.equal(_clamp_fp16(infinite, "nonfinite"), half(1.0, -3.0, top - 1000, top - 1000))
    assert torch.equal(_clamp_fp16(guarded, "inf"), guarded)  # T5: to the fp16 range, less 1000 with an inf
    assert torch.equal(_clamp_fp16(infinite, "inf"), half(1.0, -3.0, top - 1000, top - 1000))
    fp32 = torch.tensor([float("inf")])
    assert all(torch.equal(_clamp_fp16(fp32, form), fp32) for form in ("always", "nonfinite", "inf"))


def test_t5_relative_bias_with_holes_in_the_mask():
    """A mask with holes: the bias follows each token's position in its padded row, as stock's does."""
    stock = make_seq2seq("t5")
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    mask[0, 3:6] = 0
    mask[2, 1] = 0
    _assert_same_at_real_tokens(fast.get_encoder(), stock.get_encoder(), ids, mask)
    assert call_counts(fast)["fast"] == 1


def test_the_decoder_alone_is_not_taken_for_an_encoder():
    """BartForCausalLM (the decoder with a language-model head) has cross-attention layers: it takes the general
    decoder path, never the encoder layout."""
    config = AutoConfig.for_model("bart", **_COMMON)
    torch.manual_seed(0)
    stock = BartForCausalLM(config).eval()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    _assert_same_at_real_tokens(fast, stock, *make_batch([24, 17, 5, 11], "left"), output="logits")


def test_output_attentions_returns_exact_weights():
    """The stock layers run for that call, through our attention function (the model was on SDPA), which returns
    the weights SDPA does not."""
    stock = make_seq2seq("bart")
    eager = copy.deepcopy(stock)
    eager.config._attn_implementation = "eager"
    for module in eager.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = make_batch([24, 17, 5, 11], "right")
    with torch.no_grad():
        out = fast.get_encoder()(input_ids=ids, attention_mask=mask, output_attentions=True)
        expected = eager.get_encoder()(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(expected.attentions) == 2
    for a, e in zip(out.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("model_type", ["bart", "mbart", "t5", "mt5"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_encoder_error_is_a_small_multiple_of_stock_on_cuda(model_type, dtype):
    """The packed encoder on the GPU (our kernels, the dense layout for T5's bias): its error against the fp32 model
    at real tokens stays within a small multiple of the stock model's own error in the same dtype."""
    reference, stock, fast = half_precision_trio(lambda: make_seq2seq(model_type), dtype)
    ids, mask = (t.cuda() for t in make_batch([24, 17, 5, 11], "right"))
    with torch.no_grad():
        expected, stock_out, ours = (
            m.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state for m in (reference, stock, fast)
        )
    assert_error_within_stock(ours, stock_out, expected, mask)
    assert call_counts(fast)["fast"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("model_type", ["bart", "mbart", "t5", "mt5", "fsmt", "prophetnet"])
def test_generate_replays_captured_steps_on_cuda(model_type, no_tf32):
    """On the GPU the decoder's step is captured in a CUDA graph and replayed: fp32 tokens equal stock's, over
    calls of several shapes (new runners, and a runner used again). (num_beams=1: FSMT's config asks for beams.)"""
    stock = make_seq2seq(model_type).cuda()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    for lengths, new in (([24, 17, 5, 11], 12), ([3, 9], 7), ([24, 17, 5, 11], 12)):
        ids, mask = (t.cuda() for t in make_batch(lengths, "right"))
        kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, num_beams=1)
        assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs)), lengths
    assert call_counts(fast)["fast generate"] == 3
    assert BetterTransformer.cache_info(fast)["graphs"] >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_fsmt_graphs_survive_its_position_table_growing_on_cuda(no_tf32):
    """A captured FSMT step reads the decoder's sinusoidal table. From transformers 5.24 a call longer than the table
    runs stock generate, which replaces the table with a longer one; the graph captured before it must still give
    stock's tokens when replayed after (its runner holds the table it reads)."""
    stock = make_seq2seq("fsmt").cuda()  # a table of 65 rows
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = (t.cuda() for t in make_batch([24, 17, 5, 11], "right"))
    table = stock.model.decoder.embed_positions.weight.shape[0]
    filler = []
    for new in (12, 70, 12):
        kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, num_beams=1)
        assert torch.equal(fast.generate(ids, **kwargs), stock.generate(ids, **kwargs)), new
        # Blocks of the table's size, which would take the memory of a replaced table were it freed.
        filler += [torch.full((table, stock.config.d_model), 1e3, device="cuda") for _ in range(64)]
    grown = stock.model.decoder.embed_positions.weight.shape[0] > table  # 5.24: stock grew it
    assert call_counts(fast)["fast generate"] == 3 - grown
    assert BetterTransformer.cache_info(fast)["graphs"] >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rms_norm_reference_is_t5s_norm(dtype):
    """``ops.fused.rms_norm`` (the reference of the fused kernel T5's norms run on CUDA) computes what T5's own norm
    computes, bit for bit; T5's norms are routed through it while transformed, and restored by reverse."""
    from bettertransformer.ops.fused import rms_norm

    model = make_seq2seq("t5").to(dtype)
    norm = model.decoder.block[0].layer[0].layer_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(5, 7, norm.weight.shape[0], dtype=dtype) * 3
        assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    fast = BetterTransformer.transform(model)
    assert "forward" in vars(norm) and "forward" in vars(fast.encoder.final_layer_norm)
    reverse(fast)
    assert "forward" not in vars(norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_fused_rms_norm_kernel_on_cuda(dtype):
    """The Triton kernel against T5's norm: at most one rounding step apart (its fp32 sum runs in another order)."""
    from bettertransformer.ops import triton_kernels

    norm = make_seq2seq("t5").decoder.final_layer_norm.to("cuda", dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3, 33, norm.weight.shape[0], device="cuda", dtype=dtype) * 3
        expected, got = norm(x), triton_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    ulp = torch.finfo(dtype).eps * expected.float().abs().clamp(min=1e-3)
    assert ((got.float() - expected.float()).abs() <= 2 * ulp).all()
    assert (got == expected).float().mean() > 0.95


@pytest.mark.parametrize("model_type", ["t5", "bart", "fsmt"])
def test_training_gradients_equal_stock(model_type):
    """The decoder runs our attention function after transform (for its decode steps): in training too, with T5's
    relative-position bias folded into the mask and FSMT's modules routed through ours, the gradients are stock's
    (the bias table's included)."""
    stock, fast = make_seq2seq(model_type), BetterTransformer.transform(make_seq2seq(model_type))
    if model_type == "fsmt":  # the path under test: its attention modules carry our forwards
        assert "forward" in vars(fast.model.decoder.layers[0].self_attn)
    else:
        assert fast.get_decoder().config._attn_implementation == "bettertransformer"
    ids, mask = make_batch([24, 17, 5, 11], "right")
    labels = ids[:, :9].clamp(min=3)
    # FSMT makes its decoder's inputs from input_ids, not from the labels: given here, as the others make them.
    shifted = torch.cat([torch.full_like(labels[:, :1], 2), labels[:, :-1]], 1)
    given = dict(decoder_input_ids=shifted) if model_type == "fsmt" else {}
    for model in (stock, fast):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels, **given).loss.backward()
    expected = dict(stock.named_parameters())
    for name, parameter in fast.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_t5_decoder_attention_weights_are_eagers():
    """T5's decoder runs our attention function (for its decode steps): asked for attention weights, it returns
    eager's, self-attention (with the relative-position bias folded in) and cross-attention alike."""
    eager = make_seq2seq("t5", attn_implementation="eager")
    fast = BetterTransformer.transform(make_seq2seq("t5"))
    ids, mask = make_batch([24, 17, 5, 11], "right")
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :7].clamp(min=3), output_attentions=True)
    with torch.no_grad():
        expected, actual = eager(**kwargs), fast(**kwargs)
    for name in ("decoder_attentions", "cross_attentions"):
        for got, want in zip(getattr(actual, name), getattr(expected, name), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
