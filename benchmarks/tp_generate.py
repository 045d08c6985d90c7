"""Tensor-parallel ``generate``: transformers' ``tp_plan="auto"`` over two processes, stock against transformed.

Rank 0 saves a random-weight Llama-family model (TinyLlama's shapes; ``--small``: a few layers of 256); every rank
loads it with ``tp_plan="auto"``; then greedy ``generate`` of 128 new tokens at batch 1 (16-token prompt) and batch
16 (64-token prompts, row i left-padded by 4*i), stock and transformed alternately, in tok/s; and whether the two gave
the same tokens. On two GPUs (NCCL) or, with ``--small``, on the CPU (gloo).
Run: ``torchrun --nproc_per_node 2 benchmarks/tp_generate.py [--small] [--rounds 3]`` with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_decode_gpu import shapes  # noqa: E402


def prompts(batch: int, length: int, pad_step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of ``llama_decode_gpu``, on the CPU: row i left-padded by ``pad_step * i``."""
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(length)[None] >= pad_step * torch.arange(batch)[:, None]).long()
    return ids * mask, mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a small model (the CPU)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from bettertransformer import BetterTransformer, call_counts
    from bettertransformer.switches import SWITCHES

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    config, dtype, _ = shapes()["tinyllama"]
    if args.small:
        config.update(dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=4000))  # fmt: skip
    if not cuda:
        dtype = torch.float32
        SWITCHES.generate_devices = frozenset({"cuda", "cpu"})
    directory = os.path.join(tempfile.gettempdir(), f"bt-tp-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    if int(os.environ["RANK"]) == 0:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(directory)
    stock = None
    while stock is None:  # rank 0 may still be writing: transformers starts the process group in from_pretrained
        try:
            stock = AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto", dtype=dtype).eval()
        except OSError:
            time.sleep(1)
    dist.barrier()
    device = next(stock.parameters()).device
    cases = [(1, 16, 0), (16, 64, 4)]
    rates: dict[tuple[int, str], float] = {}
    tokens: dict[tuple[int, str], torch.Tensor] = {}
    model = stock
    for name in ("stock", "transformed"):  # a sharded model cannot be copied: stock first, then transformed in place
        if name == "transformed":
            model = fast = BetterTransformer.transform(stock, keep_original_model=False)
        for batch, length, pad_step in cases:
            ids, mask = (t.to(device) for t in prompts(batch, length, pad_step, config.vocab_size))
            kwargs = dict(attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                          pad_token_id=0)  # fmt: skip
            best = 0.0
            for _ in range(args.rounds + 1):  # the first round warms up
                if cuda:
                    torch.cuda.synchronize()
                dist.barrier()
                start = time.perf_counter()
                with torch.no_grad():
                    tokens[batch, name] = model.generate(ids, **kwargs)
                if cuda:
                    torch.cuda.synchronize()
                best = max(best, batch * args.new / (time.perf_counter() - start))
            rates[batch, name] = best
    rows = [
        (batch, rates[batch, "stock"], rates[batch, "transformed"],
         torch.equal(tokens[batch, "stock"], tokens[batch, "transformed"]))
        for batch, _, _ in cases
    ]  # fmt: skip
    if dist.get_rank() == 0:
        card = torch.cuda.get_device_name() if cuda else "CPU (gloo)"
        print(f"{card} x2, torch {torch.__version__}, {'small' if args.small else 'TinyLlama'} shapes, {dtype}")
        print(
            "| batch | stock tensor-parallel tok/s | transformed tok/s | speedup | same tokens |\n|---|---|---|---|---|"
        )
        for batch, base, ours, same in rows:
            print(f"| {batch} | {base:,.0f} | {ours:,.0f} | {ours / base:.2f}x | {same} |")
        print("calls", call_counts(fast))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
