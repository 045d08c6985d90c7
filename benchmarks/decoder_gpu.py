"""The canonical decoder workloads (shared/DESIGN.md, issues 3 and 4) on a CUDA GPU, side by side in one process.

Prefill (issue 3): GPT-2 124M and a Llama-architecture ~1.1B config (TinyLlama shapes), random weights, fp16,
batch 16, prompt lengths ``torch.manual_seed(0); torch.randint(16, 1025, (16,))`` left-padded. One prefill is the
forward generate makes first: ``model(ids, attention_mask, position_ids, cache=DynamicCache, logits_to_keep=1)``.

Decode (issue 4): GPT-2 124M, fp16, greedy, 128 new tokens (``min_new_tokens=128``): batch 1 with a 16-token
prompt; batch 16 with 64-token prompts, row i left-padded by 4*i. Stock ``generate`` against the transformed
model's, plus the transformed model with the static-cache loop switched off (our prefill, stock decode steps).
Also the Llama config at batch 1, with the fraction of HBM bandwidth reached.

Run: ``PYTHONPATH=src python benchmarks/decoder_gpu.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, LlamaConfig

from bettertransformer import BetterTransformer, call_counts
from bettertransformer.switches import switched
from encoder_gpu import bench as cuda_ms  # median CUDA-event milliseconds


def hbm_bytes_per_s() -> float:
    """Peak HBM bandwidth of the card (datasheet): H100 SXM 3.35 TB/s, H200 4.8 TB/s."""
    return 4.8e12 if "H200" in torch.cuda.get_device_name() else 3.35e12


def llama_1b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048,
    )  # fmt: skip


def build(config, dtype=torch.float16, attn="sdpa"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.cuda().eval()


def wall_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def left_padded(lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, vocab, (length,))
        mask[row, width - length :] = 1
    return ids.cuda(), mask.cuda()


def prefill_rows(name: str, config, results: list) -> None:
    torch.manual_seed(0)
    lengths = torch.randint(16, 1025, (16,)).tolist()
    ids, mask = left_padded(lengths, config.vocab_size)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    padding = 1 - sum(lengths) / (len(lengths) * max(lengths))

    def prefill(model):
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache(config=config),
                use_cache=True, logits_to_keep=1,
            )  # fmt: skip
        return out.logits[:, -1].float()

    stock = build(config)
    reference = prefill(build(config, torch.float32))  # fp32 stock reference for the error
    ms_stock = cuda_ms(lambda: prefill(stock))
    err_stock = (prefill(stock) - reference).abs().max().item()
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    ms_fast = cuda_ms(lambda: prefill(fast))
    err_fast = (prefill(fast) - reference).abs().max().item()
    counts = call_counts(fast)
    torch.cuda.empty_cache()
    results.append(
        dict(
            workload=f"prefill {name} b16 len 16-1024 ({padding:.0%} padding)",
            stock_ms=ms_stock,
            bt_ms=ms_fast,
            speedup=ms_stock / ms_fast,
            err_stock=err_stock,
            err_bt=err_fast,
            counts=counts,
        )  # fmt: skip
    )


def decode_rows(name: str, config, batch: int, prompt: int, pad_step: int, results: list, new: int = 128) -> None:
    torch.manual_seed(0)
    lengths = [prompt - pad_step * i for i in range(batch)]
    ids, mask = left_padded(lengths, config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    stock = build(config)
    fast = BetterTransformer.transform(stock, keep_original_model=True)
    first_ms = wall_ms(lambda: fast.generate(ids, **kwargs))  # includes the capture of a new shape
    second_ms = wall_ms(lambda: fast.generate(ids, **kwargs))  # includes the capture of the prefill
    bt_ms = min(wall_ms(lambda: fast.generate(ids, **kwargs)) for _ in range(3))
    stock_ms = min(wall_ms(lambda: stock.generate(ids, **kwargs)) for _ in range(3))
    ours = fast.generate(ids, **kwargs)
    ref = stock.generate(ids, **kwargs)
    same_rows = int((ours == ref).all(dim=1).sum())
    with switched(generate_devices=()):  # our prefill, stock decode steps
        prefill_only_ms = min(wall_ms(lambda: fast.generate(ids, **kwargs)) for _ in range(3))
    params = sum(p.numel() * p.element_size() for p in stock.parameters())
    tokens = batch * new
    row = dict(
        workload=f"decode {name} b{batch} prompt {prompt}" + (f" left-padded by {pad_step}*i" if pad_step else ""),
        stock_tok_s=tokens / stock_ms * 1e3, bt_tok_s=tokens / bt_ms * 1e3,
        bt_prefill_only_tok_s=tokens / prefill_only_ms * 1e3, speedup=stock_ms / bt_ms,
        first_call_extra_ms=first_ms - bt_ms, second_call_extra_ms=second_ms - bt_ms,
        identical_rows=f"{same_rows}/{batch}",
        weight_bytes_per_token_step_fraction_of_hbm=params / (bt_ms / new * 1e-3) / hbm_bytes_per_s(),
        counts=call_counts(fast),
    )  # fmt: skip
    results.append(row)
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for results.json")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    args = parser.parse_args()
    results: list = []
    gpt2 = GPT2Config()
    if not args.skip_prefill:
        prefill_rows("GPT-2 124M", gpt2, results)
        if not args.skip_llama:
            prefill_rows("Llama 1.1B", llama_1b(), results)
    if not args.skip_decode:
        decode_rows("GPT-2 124M", gpt2, 1, 16, 0, results)
        decode_rows("GPT-2 124M", gpt2, 16, 64, 4, results)
        if not args.skip_llama:
            decode_rows("Llama 1.1B", llama_1b(), 1, 16, 0, results)
    meta = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip
    if args.out:
        with open(f"{args.out}/decoder_results.json", "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    print(json.dumps(meta))
    for row in results:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))


if __name__ == "__main__":
    main()
