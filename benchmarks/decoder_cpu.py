"""generate on the CPU: stock transformers against the transformed model (its static-cache loop, run eagerly),
interleaved in one process. Random weights, fp32, 8 prompts of 64 tokens left-padded by 4*i, 24 new tokens, greedy.

Run: ``PYTHONPATH=src python benchmarks/decoder_cpu.py``
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from bettertransformer import BetterTransformer, call_counts

CONFIGS = {
    "GPT-2 124M": GPT2Config(),
    "Llama-shaped 43M (hidden 512, 8 layers, 8 heads / 2 kv heads)": LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=32000,
    ),
}  # fmt: skip


def main() -> None:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        stock = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        fast = BetterTransformer.transform(stock, keep_original_model=True)
        ids = torch.randint(3, 30000, (8, 64))
        mask = torch.ones_like(ids)
        for row in range(8):
            mask[row, : 4 * row] = 0
        kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
        same = torch.equal(stock.generate(ids, **kwargs), fast.generate(ids, **kwargs))
        times: dict[str, list[float]] = {"stock": [], "bettertransformer": []}
        for _ in range(3):
            for label, model in (("stock", stock), ("bettertransformer", fast)):
                start = time.perf_counter()
                model.generate(ids, **kwargs)
                times[label].append((time.perf_counter() - start) * 1e3)
        s, f = (statistics.median(times[k]) for k in ("stock", "bettertransformer"))
        print(f"{name}: stock {s:.0f} ms, bettertransformer {f:.0f} ms ({s / f:.2f}x), identical {same}, "
              f"{call_counts(fast)}")  # fmt: skip


if __name__ == "__main__":
    main()
