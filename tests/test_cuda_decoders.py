"""Decoders on a CUDA GPU (skipped elsewhere): the CUDA-graph generate loop, fp16 accuracy, packed training."""

from __future__ import annotations

import pytest
import torch
from decoder_zoo import ALL, PAD, left_padded_batch, make_decoder, supported
from helpers import assert_finite_where_expected, max_error_at

from bettertransformer import BetterTransformer, call_counts

LENGTHS_LONG = (40, 9, 27, 1)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("no_tf32"),
]


def _runners(model):
    (patch,) = model._bettertransformer_state.patches
    return patch.generation.runners


@pytest.mark.parametrize(
    "name",
    ["gpt2", "llama", "mistral", "gpt_bigcode", "gemma3_text", "mixtral", "gemma2", "bloom", "falcon", "gpt_neo-local"],
)
def test_graph_generate_matches_stock_fp32(name):
    stock = make_decoder(name).cuda()
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = (t.cuda() for t in left_padded_batch(stock.config.vocab_size, LENGTHS_LONG))
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD)
    expected = stock.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    stop = int(expected[1, ids.shape[1] + 5])
    stopping = dict(kwargs, eos_token_id=stop)
    assert torch.equal(model.generate(ids, **stopping), stock.generate(ids, **stopping))
    assert call_counts(model)["fast generate"] == 2
    # Every runner replays a graph; only mixtral's expert routing (a copy to the host) cannot be captured.
    for runner in _runners(model).values():
        assert (runner.graph is None and not runner.capturable) if name == "mixtral" else runner.graph is not None


def test_graph_generate_reuses_memory_and_reverse_frees_it():
    model = BetterTransformer.transform(make_decoder("llama").cuda())
    ids, mask = (t.cuda() for t in left_padded_batch(model.config.vocab_size, LENGTHS_LONG))
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=10, pad_token_id=PAD)
    model.generate(ids, **kwargs)
    torch.manual_seed(3)
    first = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    after_first = torch.cuda.memory_allocated()
    for _ in range(4):
        model.generate(ids, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, **kwargs), first)  # sampling is reproducible under the graph
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= after_first
    assert len(_runners(model)) == 1
    # Fewer rows and a shorter prompt fall in the same buckets (batch 4, length 64): the same graph serves them.
    model.generate(ids[:3, 4:], **dict(kwargs, attention_mask=mask[:3, 4:]))
    runners = _runners(model)
    assert len(runners) == 1
    BetterTransformer.reverse(model)
    assert not runners and "generate" not in vars(model)


def test_fp16_prefill_error_is_stock_like():
    reference = make_decoder("llama", hidden_size=256, intermediate_size=512, num_attention_heads=8).cuda()
    stock = make_decoder("llama", dtype=torch.float16, hidden_size=256, intermediate_size=512, num_attention_heads=8)
    stock = stock.cuda()
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = (t.cuda() for t in left_padded_batch(stock.config.vocab_size, LENGTHS_LONG))
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
        stock_error = max_error_at(stock(ids, attention_mask=mask, position_ids=positions).logits, expected, mask)
        our_error = max_error_at(model(ids, attention_mask=mask, position_ids=positions).logits, expected, mask)
    assert call_counts(model)["fast"] == 1
    assert our_error <= 3 * stock_error + 1e-3, (our_error, stock_error)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_padded_forward_in_half_precision_is_finite_and_stock_like(name, dtype):
    """Every zoo decoder in fp16/bf16, a plain forward on left- and right-padded batches, with and without
    position_ids (the padding-free prefill and our attention inside the stock forward): finite wherever stock is,
    and the error at real tokens against an fp32 reference within a small multiple of stock's own."""
    if not supported(name):
        pytest.skip("transform refuses this configuration")
    reference = make_decoder(name).cuda()
    stock = make_decoder(name, dtype=dtype).cuda()
    model = BetterTransformer.transform(stock, keep_original_model=True)
    left = [t.cuda() for t in left_padded_batch(stock.config.vocab_size, LENGTHS_LONG)]
    for padding, (ids, mask) in (("left", left), ("right", [t.flip(1) for t in left])):
        for with_positions in (False, True):
            extra = {}
            if with_positions:
                extra["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            with torch.no_grad():
                expected = reference(ids, attention_mask=mask, **extra).logits
                stock_out = stock(ids, attention_mask=mask, **extra).logits
                ours = model(ids, attention_mask=mask, **extra).logits
            what = f"{name} {dtype} {padding} padding, position_ids={with_positions}"
            assert_finite_where_expected(ours, stock_out, what)
            stock_error = max_error_at(stock_out, expected, mask)
            our_error = max_error_at(ours, expected, mask)
            assert our_error <= 3 * stock_error + 1e-3, (what, our_error, stock_error)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2"])
def test_packed_rows_training_on_cuda_bf16(name):
    """Packed rows in bf16 (flash attention with grouped-query heads, PyTorch's fused RMSNorm in each stock form)
    against the sequences run one by one through stock."""
    stock = make_decoder(name, dtype=torch.bfloat16).cuda().train()
    model = BetterTransformer.transform(stock, keep_original_model=True).train()
    lengths = [30, 7, 19]
    sequences = [torch.randint(3, stock.config.vocab_size, (1, n), device="cuda") for n in lengths]
    row = torch.cat(sequences, dim=1)
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    packed = model(row, position_ids=positions).logits.float()
    separate = torch.cat([stock(s).logits for s in sequences], dim=1).float()
    packed.square().mean().backward()
    separate.square().mean().backward()
    assert (packed - separate).abs().max() < 0.05
    for p, q in zip(stock.parameters(), model.parameters(), strict=True):
        assert torch.allclose(p.grad.float(), q.grad.float(), atol=2e-2, rtol=5e-2)


def _assert_near_maximal(name, dtype, lengths, **size):
    """Generate with the fused step in ``dtype`` (Triton kernels, graphs): each chosen token's fp32-reference logit is
    within twice stock's own logit error (in ``dtype``) of the best one, so any difference from stock can only be a
    near-tie. Returns the transformed model."""
    reference = make_decoder(name, **size).cuda()
    stock = make_decoder(name, dtype=dtype, **size).cuda()
    model = BetterTransformer.transform(stock, keep_original_model=True)
    ids, mask = (t.cuda() for t in left_padded_batch(stock.config.vocab_size, lengths))
    new = 24
    kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=PAD)
    outputs = [model.generate(ids, **kwargs) for _ in range(3)]  # the second captures the prefill, the third replays
    (runner,) = _runners(model).values()
    # Every prefill is captured, Gemma 2's softcapped one too (its dense layout needs no host synchronisation).
    assert runner.fused is not None and runner.graph is not None and len(runner.prefills) == 1
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    out = outputs[0]
    full = torch.cat([mask, torch.ones_like(out[:, ids.shape[1] :])], dim=1)
    positions = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(out, attention_mask=full, position_ids=positions).logits.double()
        stock_logits = stock(out, attention_mask=full, position_ids=positions).logits.double()
    stock_error = max_error_at(stock_logits, expected, full)
    predicting = expected[:, ids.shape[1] - 1 : -1]  # (B, new, V): the logits each new token was chosen from
    chosen = out[:, ids.shape[1] :]
    gap = predicting.max(-1).values - predicting.gather(-1, chosen[..., None])[..., 0]
    assert gap.max().item() <= 2 * stock_error, (name, gap.max().item(), stock_error)
    return model


@pytest.mark.parametrize("lengths", [(16,), LENGTHS_LONG])
def test_fused_gpt2_fp16_generate_picks_only_near_maximal_tokens(lengths):
    # head_dim 32: our decode attention kernel runs
    _assert_near_maximal("gpt2", torch.float16, lengths, n_embd=128, n_inner=512, vocab_size=1000)


LLAMA_FAMILY = [
    "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "olmo3", "seed_oss",
    "smollm3", "granite", "helium", "glm", "glm4", "starcoder2",
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_fused_llama_family_generate_picks_only_near_maximal_tokens(name, dtype, monkeypatch):
    """The Llama-family step's kernels (RMSNorm + q|k|v product, rotary attention writing the cache, gated MLP,
    post-norms, softcaps) at batch 1 and 4, prompts longer than the sliding windows."""
    from bettertransformer.ops import decode_kernels

    launched = {"rope_attention": 0}
    original = decode_kernels.rope_attention

    def counted(*args, **kwargs):
        launched["rope_attention"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_kernels, "rope_attention", counted)
    size = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=32, vocab_size=1000)
    for lengths in [(16,), LENGTHS_LONG]:
        model = _assert_near_maximal(name, dtype, lengths, **size)
        assert call_counts(model)["fused steps"] == 3
    assert launched["rope_attention"] > 0  # the kernels ran (their launches are captured, then replayed)


def test_captures_run_with_the_cycle_collector_paused(monkeypatch):
    """A transformed model is a reference cycle; a collection during a capture could destroy its graphs, which
    invalidates the capture. Both captures (prefill and step) pause the collector."""
    import gc

    seen = []

    class Spy(torch.cuda.graph):
        def __enter__(self):
            seen.append(gc.isenabled())
            return super().__enter__()

    monkeypatch.setattr(torch.cuda, "graph", Spy)
    model = BetterTransformer.transform(make_decoder("gpt2", dtype=torch.float16).cuda())
    ids, mask = (t.cuda() for t in left_padded_batch(model.config.vocab_size, LENGTHS_LONG))
    for _ in range(2):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    assert len(seen) == 2 and not any(seen) and gc.isenabled()


def test_a_failed_capture_does_not_spoil_the_next_ones(monkeypatch):
    """A capture that fails inside its body (here a prefill that waits for the host) used to leave PyTorch's
    allocator recording into the model's graph pool, so every later capture of the model failed ("already
    recording to mempool_id") and its steps ran eagerly (Gemma 2 at batch 16: 1,590 instead of 3,870 tok/s), and the
    random generator in capture mode, so that every later random draw raised."""
    model = BetterTransformer.transform(make_decoder("llama", dtype=torch.float16).cuda())
    (patch,) = model._bettertransformer_state.patches
    step_class = type(patch.generation.fused)
    original = step_class.prefill

    def syncing(self, *args):
        logits = original(self, *args)
        logits.sum().item()  # a host synchronisation: no graph can hold it
        return logits

    monkeypatch.setattr(step_class, "prefill", syncing)
    ids, mask = (t.cuda() for t in left_padded_batch(model.config.vocab_size, LENGTHS_LONG))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    for _ in range(2):  # the second call tries to capture the prefill, and fails
        model.generate(ids, attention_mask=mask, **kwargs)
    (first,) = _runners(model).values()
    assert not first.prefill_capturable and first.graph is not None
    model.generate(ids[:1], attention_mask=mask[:1], **kwargs)  # batch bucket 1: a new runner, a new capture
    assert len(_runners(model)) == 2 and all(r.graph is not None for r in _runners(model).values())
    # The failed capture also left the random generator in capture mode: draws outside a graph raised.
    torch.randn(4, device="cuda")
    sampled = model.generate(ids, attention_mask=mask, **{**kwargs, "do_sample": True, "top_k": 5})
    assert sampled.shape == (ids.shape[0], ids.shape[1] + 6)


def test_fused_llama_step_with_a_head_size_that_is_not_a_power_of_two():
    """Phi-3-mini's head size is 96: the rotary attention kernel masks its 128-wide tiles."""
    size = dict(hidden_size=192, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2, vocab_size=1000)
    model = _assert_near_maximal("phi3", torch.float16, LENGTHS_LONG, **size)
    assert call_counts(model)["fused steps"] == 3


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_identical_generate_calls_give_one_output(family):
    """Greedy generate is a function of its inputs: ten identical batch-16 calls (64-token prompts left-padded by 4i,
    128 new tokens: 16 rows past 2,048 cache slots) give one output. With cuDNN's SDPA in the steps, a GPT-NeoX-shaped
    model's generic steps gave 9 different outputs in 10 such calls on an H200 (torch 2.11), and GPT-2's fused step
    1 row in 16 differing in some calls."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    if family == "gpt_neox":
        config = GPTNeoXConfig(
            vocab_size=50304, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
        )
    else:
        config = GPT2Config()
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float16).cuda().eval()
    model = BetterTransformer.transform(stock)
    ids, mask = (t.cuda() for t in left_padded_batch(config.vocab_size, tuple(64 - 4 * i for i in range(16))))
    kwargs = dict(attention_mask=mask, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=PAD)
    outputs = [model.generate(ids, **kwargs) for _ in range(10)]
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    counts = call_counts(model)
    assert counts["fast generate"] == 10 and counts["generic steps" if family == "gpt_neox" else "fused steps"] == 10
