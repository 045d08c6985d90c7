"""Render a saved encoder_gpu.json (from benchmarks/encoder_gpu.py --out) as the README's chart.

Run: ``python benchmarks/plot_results.py benchmarks/results/encoder_gpu_h100_2026-11-25.json docs/encoder_gpu.png``
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    with open(src) as f:
        result = json.load(f)
    rows = [r for r in result["rows"] if "," not in r["variant"]]  # the main variants, not the ablations
    names = [
        r["variant"]
        .replace("torch nn.TransformerEncoder nested fast path", "PyTorch nested fast path")
        .replace("stock transformers ", "stock ")
        for r in rows
    ]
    ms = [r["ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3))
    bars = ax.barh(names[::-1], ms[::-1], color=["#d62728" if "better" in n else "#7f7f7f" for n in names[::-1]])
    ax.bar_label(bars, labels=[f"{m:.1f} ms" for m in ms[::-1]], padding=3)
    ax.axvline(result["floor_ms"], color="black", linestyle=":", label=f"floor {result['floor_ms']:.1f} ms")
    ax.set_xlabel("ms per forward (median, lower is better)")
    ax.set_title(
        f"BERT-base fp16, batch 64, lengths 16-512 ({result['padding_fraction']:.0%} padding)\n"
        f"{result['device']}, torch {result['torch'].split('+')[0]}, transformers {result['transformers']}, "
        f"{result['date']}",
        fontsize=9,
    )
    ax.set_xlim(0, max(ms) * 1.2)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
