"""``encode`` of a transformed sentence-transformers model: the same embeddings, end to end faster.

Stock ``SentenceTransformer.encode`` tokenizes a batch, runs it, copies the embeddings to the host, then
tokenizes the next: the device waits for the tokenizer and the tokenizer for the device, and each batch is as many
sentences as ``batch_size`` however short they are. Once the model skips padding, this loop is most of the time on a
GPU. Here:

- Tokenization runs ahead in a background thread (fast tokenizers release the GIL), two batches deep.
- Batches are formed by a token budget: sentences sorted by length, as many per batch as keep the padded batch
  within ``batch_size x max_seq_length`` tokens (the most stock ever pads to), at most ``8 x batch_size``. Padding
  costs no compute in the transformed encoder, so short sentences travel in large batches. On the CPU the budget
  is at most 4,096 tokens: there the work is compute-bound, and larger batches only leave the caches (batch_size
  128 measured 193 sentences/s against 224 at 32 before the cap, BENCHMARKS.md).
- The encoder reads the padding mask from the tokenizer's host copy (``call_state.host_mask``): the forward needs no
  device-to-host copy, and the host queues the next batch while the device runs this one. Embeddings stay on the
  device until the end (one copy to the host, not one per batch).

Calls it does not cover (prompts, other outputs, quantized precision, several devices, pair or non-text inputs, extra
model arguments) run the stock ``encode``, logged once.
"""

from __future__ import annotations

import collections
import copy
import inspect
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from .call_state import host_mask
from .patching import Calls, InstanceForward, LogOnce, bind

_PREFETCH = 2  # batches tokenized ahead of the one running
_MAX_BATCH_FACTOR = 8  # at most this many times batch_size sentences per batch
_CPU_BATCH_TOKENS = 4096  # padded tokens per batch on the CPU at most


class RustTokenizer:
    """A text batch tokenized straight by the Rust tokenizer under a model's fast tokenizer, padded in numpy.

    The transformers call that sentence-transformers makes builds Python lists per sentence and converts them to
    tensors: on a 2-core CPU 5,500 sentences/s, where the Rust tokenizer itself encodes 12,000-17,000 (measured on
    the corpus, BENCHMARKS.md); on a GPU that conversion sets the pace of ``encode``. This gives the same tensors;
    ``FastEncode`` checks that on each call (``same_as``) before trusting it."""

    _PROBES = (" Leading and trailing spaces.  ", "MiXeD CaSe, accents: naïve café; digits 1234567890.", "word " * 600)

    def __init__(self, tokenizer: Any, max_length: int | None):
        backend = copy.deepcopy(tokenizer._tokenizer)  # its own truncation and padding settings
        backend.no_padding()
        limits = [n for n in (max_length, getattr(tokenizer, "model_max_length", None)) if n and n < 1_000_000]
        if limits:
            backend.enable_truncation(min(limits), direction=getattr(tokenizer, "truncation_side", "right"))
        else:
            backend.no_truncation()
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        self.types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())

    @staticmethod
    def usable(tokenizer: Any) -> bool:
        return bool(getattr(tokenizer, "is_fast", False)) and hasattr(tokenizer, "_tokenizer")

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encodings = self._encode(texts)
        count = len(encodings)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=count)
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64, int(lengths.sum()))
        width = int(lengths.max()) if count else 0
        columns = np.arange(width)[None, :]
        real = columns >= (width - lengths)[:, None] if self.left else columns < lengths[:, None]
        ids = np.full((count, width), self.pad_id, dtype=np.int64)
        ids[real] = flat  # row-major: each row's tokens in order
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
        if self.types:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out

    def same_as(self, preprocess: Callable[[list[str]], dict[str, Any]], texts: list[str]) -> dict[str, Any] | None:
        """``preprocess(texts)`` if this tokenizer gives the same tensors on them and on probes (whitespace, case,
        accents, truncation), else None."""
        reference = preprocess(texts)
        for batch, expected in ((texts, reference), (list(self._PROBES), preprocess(list(self._PROBES)))):
            got = self(batch)
            tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
            if tensors.keys() != got.keys() or not all(torch.equal(got[k], v) for k, v in tensors.items()):
                return None
        return reference


def _by_token_count(features: dict[str, Any], batch: list[int]) -> tuple[dict[str, Any], list[int]]:
    """The batch's rows ordered by their token counts, longest first (stable), with its indices in that order; as
    they were unless the features are (rows, ...) tensors and a 2-D attention mask only. Sentences of one token
    count then lie side by side, and the packed attention on the CPU runs each such run as one batched call
    (``ops.attention``'s loop backend) instead of one call per sentence."""
    mask = features.get("attention_mask")
    rows = len(batch)
    tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
    per_row = any(isinstance(v, (list, tuple)) and len(v) == rows for v in features.values())  # would stay put
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dim() != 2
        or per_row
        or any(v.shape[:1] != (rows,) for v in tensors.values())
    ):
        return features, batch
    order = torch.sort(-mask.sum(1), stable=True).indices
    if bool((order == torch.arange(rows)).all()):
        return features, batch
    moved = {k: v.index_select(0, order) for k, v in tensors.items()}
    return {**features, **moved}, [batch[i] for i in order.tolist()]


def is_sentence_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a sentence-transformers ``SentenceTransformer`` (checked by class name and methods, so
    that sentence-transformers need not be imported)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return "SentenceTransformer" in names and callable(getattr(model, "encode", None))


class FastEncode:
    """Replaces ``encode`` on one ``SentenceTransformer`` (an instance attribute; ``detach`` restores it)."""

    def __init__(self, model: nn.Module):
        self.model: Any = model
        self.calls = Calls()
        self.counted = ("fast encode", "stock encode")  # the keys call_counts always shows
        self.log = LogOnce()
        self._patch: InstanceForward | None = None
        self._signature = inspect.signature(model.encode)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._rust: tuple[tuple, RustTokenizer] | None = None

    def attach(self) -> None:
        self._patch = InstanceForward(self.model, self.encode, method="encode")

    def detach(self) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None

    # -- the call ------------------------------------------------------------------------------------------------
    def encode(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """``SentenceTransformer.encode``: ours when the call is one we cover, else ``stock``."""
        plan = self._plan(args, kwargs)
        if isinstance(plan, str):
            self.calls.add("stock encode")
            self.log(plan, "sentence-transformers' encode runs for %s", plan)
            return stock(*args, **kwargs)
        self.calls.add("fast encode")
        return self._encode(**plan)

    def _plan(self, args: tuple, kwargs: dict) -> dict[str, Any] | str:
        bound = bind(self._signature, args, kwargs)
        if bound is None:
            return "arguments encode does not take"
        bound.apply_defaults()
        a = dict(bound.arguments)
        extra = a.pop("kwargs", {}) or {}
        if extra:
            return f"encode arguments {sorted(extra)}"
        inputs = a.get("inputs", a.get("sentences"))
        single = isinstance(inputs, str)
        texts = [inputs] if single else inputs
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return "inputs other than a string or a list of strings"
        if a.get("prompt") is not None or a.get("prompt_name") is not None or self._default_prompt():
            return "a prompt"
        if a.get("output_value", "sentence_embedding") != "sentence_embedding":
            return f"output_value={a.get('output_value')!r}"
        if a.get("precision", "float32") not in (None, "float32"):
            return f"precision={a.get('precision')!r}"
        if a.get("pool") is not None or isinstance(a.get("device"), list):
            return "several processes or devices"
        device = self.model.device
        if a.get("device") is not None and torch.device(a["device"]) != device:
            return "a device other than the model's"
        batch_size = a.get("batch_size", 32)
        if not isinstance(batch_size, int) or batch_size <= 0:
            return "a batch_size that is not a positive integer"  # stock raises the error the user expects
        if not callable(getattr(self.model, "preprocess", None)):
            return "a sentence-transformers release without preprocess"
        convert_to_tensor = bool(a.get("convert_to_tensor", False))
        return dict(
            texts=texts, single=single, batch_size=batch_size, device=device,
            progress=a.get("show_progress_bar"), normalize=bool(a.get("normalize_embeddings", False)),
            truncate_dim=a.get("truncate_dim") if a.get("truncate_dim") is not None else getattr(self.model, "truncate_dim", None),
            to_tensor=convert_to_tensor, to_numpy=bool(a.get("convert_to_numpy", True)) and not convert_to_tensor,
        )  # fmt: skip

    def _rust_tokenizer(self, first: list[str]) -> tuple[RustTokenizer, dict[str, Any]] | None:
        """The Rust tokenizer shortcut and sentence-transformers' features of the first batch, when the shortcut
        gives sentence-transformers' tensors on that batch and on probes; else None (logged once)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if not RustTokenizer.usable(tokenizer):
            return None
        key = (id(tokenizer), getattr(self.model, "max_seq_length", None))
        if self._rust is None or self._rust[0] != key:  # built once: copying the Rust tokenizer takes ~50 ms
            self._rust = (key, RustTokenizer(tokenizer, key[1]))
        rust = self._rust[1]
        reference = rust.same_as(self.model.preprocess, first)
        if reference is None:
            self.log("tokenizer", "sentence-transformers tokenizes this model otherwise than its Rust tokenizer does "
                     "alone: its own preprocess runs")  # fmt: skip
            return None
        return rust, reference

    def _default_prompt(self) -> bool:
        name = getattr(self.model, "default_prompt_name", None)
        return bool(name and (getattr(self.model, "prompts", None) or {}).get(name))

    def _batches(self, texts: list[str], batch_size: int, device: torch.device | None = None) -> list[list[int]]:
        """Indices of ``texts`` in batches: longest first, each batch within the token budget."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        max_len = getattr(self.model, "max_seq_length", None) or 512
        budget = batch_size * max_len
        if device is not None and device.type == "cpu":
            budget = min(budget, max(_CPU_BATCH_TOKENS, max_len))

        def tokens(i: int) -> int:
            # A generous estimate (about one token per two characters of prose, plus the special tokens).
            return min(max_len, len(texts[i]) // 2 + 4)

        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            # The longest sentence of a batch comes first: its tokens bound the padded size.
            if current and (
                len(current) >= _MAX_BATCH_FACTOR * batch_size or (len(current) + 1) * tokens(current[0]) > budget
            ):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def _encode(
        self, texts: list[str], single: bool, batch_size: int, device: torch.device, progress: bool | None,
        normalize: bool, truncate_dim: int | None, to_tensor: bool, to_numpy: bool,
    ) -> Any:  # fmt: skip
        model = self.model
        if progress is None:
            progress = logging.getLogger("sentence_transformers").getEffectiveLevel() <= logging.INFO
        batches = self._batches(texts, batch_size, device)
        chunks: list[torch.Tensor] = []
        model.eval()

        rust = self._rust_tokenizer([texts[i] for i in batches[0]]) if len(batches) > 1 else None

        def tokenize(batch: list[int]) -> tuple[dict[str, Any], list[int]]:
            """The batch's features, and its indices in the order of their rows."""
            if rust is not None and batch is batches[0]:
                features = rust[1]  # sentence-transformers' own output for the first batch (the check's)
            elif rust is not None:
                features = {**rust[1], **rust[0]([texts[i] for i in batch])}  # plus its non-tensor entries
            else:
                features = model.preprocess([texts[i] for i in batch])
            if device.type == "cpu":
                features, batch = _by_token_count(features, batch)
            if device.type == "cuda":  # pinned, so the copy up does not wait for the device's queue
                features = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            return features, batch

        from tqdm.auto import tqdm

        rows: list[list[int]] = []  # each batch's indices in the order of its rows
        with self._lock, ThreadPoolExecutor(1, thread_name_prefix="bettertransformer-tokenize") as pool:
            pending: collections.deque[Future] = collections.deque()
            ahead = iter(batches)
            for batch in ahead:
                pending.append(pool.submit(tokenize, batch))
                if len(pending) > _PREFETCH:
                    break
            with tqdm(total=len(texts), desc="Batches", disable=not progress) as bar, torch.inference_mode():
                for _ in range(len(batches)):
                    features, batch = pending.popleft().result()
                    rows.append(batch)
                    following = next(ahead, None)
                    if following is not None:
                        pending.append(pool.submit(tokenize, following))
                    mask = features.get("attention_mask")
                    moved = {
                        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in features.items()
                    }
                    with host_mask(mask if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" else None):
                        out = model(moved)
                    embeddings = out["sentence_embedding"]
                    if truncate_dim is not None:
                        embeddings = embeddings[..., :truncate_dim]
                    if normalize:
                        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
                    chunks.append(embeddings)
                    bar.update(len(batch))
        order = torch.tensor([i for batch in rows for i in batch], device=device)
        stacked = torch.cat(chunks) if chunks else torch.empty(0, device=device)
        embeddings = torch.empty_like(stacked).index_copy_(0, order, stacked) if chunks else stacked
        if to_tensor:
            result: Any = embeddings
        elif to_numpy:
            result = (
                embeddings.float().cpu().numpy() if embeddings.dtype == torch.bfloat16 else embeddings.cpu().numpy()
            )
        else:
            result = list(embeddings)
        return result[0] if single and len(texts) else result
