"""Fast ``generate``: a static key/value cache and the per-token step captured in a CUDA graph.

The user's ``model.generate(...)`` call is unchanged. When its settings are ones the fast loop covers (greedy or
sampling with temperature / top-k / top-p / repetition penalty, end-of-sequence ids, length limits, a left-padded
batch), it runs here:

1. Prefill: the model's own forward on the prompt (padding-free when padded), into a plain dynamic cache.
2. The keys/values are copied into preallocated per-layer buffers ``(B, Hkv, S, D)``; ``S`` (prompt + new tokens)
   and the batch are rounded up to buckets, so one captured graph serves many calls.
3. Each new token is one replay of a CUDA graph of the whole step: the model forward (our attention writes the new
   key/value into the buffers and attends over them), the choice of the next token, the end-of-sequence
   bookkeeping. The host only checks every few tokens whether all rows have finished.

Anything else (beam search, streamers, custom processors, ...) runs transformers' own generate, with one log line.
"""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .._compat import repetition_penalty_skips_left_padding
from ..ops.sampling import Sampling, advance, next_tokens
from .decode_step import FusedDecodeStep
from .decoder import DecodeState, decode_context

logger = logging.getLogger("bettertransformer")

# Generation settings the fast loop implements; any other difference from the defaults runs stock generate.
_SETTINGS = frozenset(
    {
        "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
        "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "_from_model_config",
        "transformers_version",
        # Beam-search settings, without effect at num_beams=1 (which _NEUTRAL requires); pipelines set them.
        "early_stopping", "length_penalty",
    }
)  # fmt: skip
# Settings that may appear in a config with these values only: the values that switch them off. (Some pipelines
# and older configs spell every setting out with its neutral value.)
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "use_cache": (True,), "num_beams": (1,), "num_return_sequences": (1,), "output_attentions": (False,),
    "output_hidden_states": (False,), "output_scores": (False,), "output_logits": (False,),
    "return_dict_in_generate": (False,), "cache_implementation": (None,), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "remove_invalid_values": (None, False),
    "diversity_penalty": (None, 0.0), "num_beam_groups": (None, 1),
}  # fmt: skip
# Settings of assisted decoding, which only an assistant model or prompt lookup (both run stock) would use.
_ASSISTANT = frozenset(
    {
        "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
        "assistant_lookbehind", "target_lookbehind",
    }
)  # fmt: skip
_CHECK_EVERY = 8  # tokens between host checks for "all rows finished"
_MAX_RUNNERS = 4  # captured graphs kept per model (least recently used dropped)

# Devices the fast loop runs on. CUDA replays graphs; the CPU runs the same static-cache step eagerly, which measured
# 1.05-1.19x stock generate on 2 cores (BENCHMARKS.md). Remove a device to get transformers' generate there.
DEVICES: set[str] = {"cuda", "cpu"}


@functools.cache
def _default_settings() -> dict[str, Any]:
    from transformers import GenerationConfig

    return vars(GenerationConfig())


def _bucket_batch(batch: int) -> int:
    return batch if batch > 64 else 1 << (batch - 1).bit_length()


def _bucket_length(length: int) -> int:
    return -(-length // 64) * 64


class _Plan:
    """One generate call the fast loop will run."""

    def __init__(self, input_ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, ban_steps: int, config: Any):
        self.input_ids, self.mask = input_ids, mask
        self.new_tokens, self.ban_steps = new_tokens, ban_steps
        eos = config.eos_token_id
        self.eos = tuple([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
        pad = config.pad_token_id
        self.pad = int(pad if pad is not None else (self.eos[0] if self.eos else 0))
        penalty = float(config.repetition_penalty if config.repetition_penalty is not None else 1.0)
        self.sampling = Sampling(repetition_penalty=penalty)  # greedy ignores the warpers: one runner key for it
        if config.do_sample:
            self.sampling = Sampling(
                do_sample=True,
                temperature=float(config.temperature if config.temperature is not None else 1.0),
                top_k=int(config.top_k) if config.top_k else None,
                top_p=float(config.top_p if config.top_p is not None else 1.0),
                repetition_penalty=penalty,
            )


def _captured(run: Callable[[], Any], warmups: int, what: str) -> tuple[Any, Any, Any]:
    """Run ``run`` ``warmups`` times on a side stream, then capture one more call in a CUDA graph. Returns (the last
    warm-up's result, the graph, the captured call's output); graph and output are None if the capture failed
    (logged as ``what``).

    Python's cycle collector is paused during the capture: a collection may free an unreachable model's CUDA graph
    (a transformed model is a reference cycle), and destroying a graph while a capture runs invalidates the
    capture."""
    result = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            result = run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            output = run()
    except Exception as problem:  # e.g. a host sync in the model's step (data-dependent expert routing)
        torch.cuda.synchronize()
        logger.info("bettertransformer: %s not capturable (%s); it runs eagerly", what, problem)
        return result, None, None
    finally:
        if enabled:
            gc.enable()
    return result, graph, output


class _PrefillGraph:
    """``run(ids, positions) -> logits`` (device work only) captured in a CUDA graph over static inputs. The
    warm-up before the capture computes this call's result; ``graph`` stays None if the capture failed."""

    def __init__(self, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: torch.Tensor,
                 positions: torch.Tensor):  # fmt: skip
        self.ids, self.positions = ids.clone(), positions.clone()
        self.run = run  # the graph reads the tensors ``run`` holds (the packing): they must outlive it
        self.logits, self.graph, self.static_logits = _captured(lambda: run(self.ids, self.positions), 1, "prefill")

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.static_logits


class _Runner:
    """Static buffers and the captured step for one (batch bucket, length bucket, sampling) key."""

    def __init__(
        self,
        head: Any,
        cache_name: str,
        batch: int,
        length: int,
        plan: _Plan,
        fused: FusedDecodeStep | None,
        bans: bool,
    ):
        self.head, self.cache_name, self.fused = head, cache_name, fused
        self.batch, self.length = batch, length
        self.sampling, self.eos_ids = plan.sampling, plan.eos
        device = next(head.parameters()).device
        self.device = device
        vocab = head.get_output_embeddings().weight.shape[0]
        new = functools.partial(torch.zeros, device=device)
        self.tok = new(batch, 1, dtype=torch.long)
        self.pos = new(batch, 1, dtype=torch.long)
        self.ones = torch.ones(batch, 1, dtype=torch.long, device=device)
        self.slot = new(1, dtype=torch.long)  # the buffer slot of the token being fed
        self.step = new(1, dtype=torch.long)  # index of the token being produced
        self.ban_steps = new((), dtype=torch.long)
        self.pad = new((), dtype=torch.long)
        self.valid = new(batch, length, dtype=torch.bool)
        self.unfinished = new(batch, dtype=torch.bool)
        self.active = new((), dtype=torch.long)  # tokens produced while some real row was unfinished
        self.seen = new(batch, vocab, dtype=torch.bool) if plan.sampling.repetition_penalty != 1.0 else None
        self.eos = torch.tensor(plan.eos, dtype=torch.long, device=device)
        # -inf at the end-of-sequence ids while min_new_tokens / min_length are not reached (advance lifts it).
        self.eos_penalty = new(vocab, dtype=torch.float32) if bans else None
        self.out = new(batch, length, dtype=torch.long)
        self.state: DecodeState | None = None
        # Prefill graphs by (prompt shape, mask bytes), and the keys seen once (captured when seen again).
        self.prefills: OrderedDict[tuple, _PrefillGraph] = OrderedDict()
        self.prefills_seen: OrderedDict[tuple, None] = OrderedDict()
        self.prefill_capturable = True
        self.graph: Any = None
        self.capturable = True  # False once a capture failed: the steps then run eagerly
        self.signature = inspect.signature(head.forward).parameters

    # -- one call ----------------------------------------------------------------------------------------------
    def run(self, plan: _Plan) -> torch.Tensor:
        """Generate for one planned call; returns the prompts followed by the new tokens, as stock generate."""
        ids, mask = plan.input_ids, plan.mask
        batch, prompt = ids.shape
        logits = self._prefill(ids, mask)
        self.pad.fill_(plan.pad)
        self.ban_steps.fill_(plan.ban_steps)
        if self.eos_penalty is not None:
            self.eos_penalty.zero_().index_fill_(0, self.eos, float("-inf"))
        self.unfinished.zero_()
        self.unfinished[:batch] = True  # the bucket's extra rows count as finished
        self.out.fill_(plan.pad)
        self.step.zero_()
        self.active.zero_()
        if self.seen is not None:  # the tokens the repetition penalty counts, as this transformers counts them
            self.seen.zero_()
            counted = ids
            if repetition_penalty_skips_left_padding():
                lead = (mask != 0).int().argmax(dim=1)  # left-padding length of each row
                skipped = torch.arange(prompt, device=ids.device)[None, :] < lead[:, None]
                counted = ids.masked_fill(skipped, self.seen.shape[1])  # an extra column, dropped below
            seen = torch.zeros(batch, self.seen.shape[1] + 1, dtype=torch.bool, device=ids.device)
            self.seen[:batch] = seen.scatter_(1, counted, True)[:, :-1]
        self._select(logits)  # the first new token, from the prefill
        if self.graph is None and self.capturable and self.device.type == "cuda":
            self._capture()
        produced = 1
        while produced < plan.new_tokens:
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_step()
            produced += 1
            # No row can finish while end-of-sequence ids are banned (min_new_tokens): no check, no sync.
            check = self.eos_ids and produced % _CHECK_EVERY == 0 and produced > plan.ban_steps
            if check and not bool(self.unfinished.any()):
                break
        count = min(int(self.active), plan.new_tokens)
        return torch.cat([ids, self.out[:batch, :count]], dim=1)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts, fill the buffers with their keys/values; returns the last tokens' (B, V) logits."""
        batch, prompt = ids.shape
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = None
        if self.fused is not None:
            if self.state is None:
                self.state = self._new_state(self.fused.new_cache(self.batch, self.length))
            logits = self._fused_prefill(ids, mask, positions)
        if logits is None:
            logits = self._model_prefill(ids, mask, positions)
        assert self.state is not None
        self.valid.zero_()
        self.valid[:batch, :prompt] = mask.bool()
        self.state.mask.copy_(torch.where(self.valid, 0.0, float("-inf")))
        self.tok.fill_(0)
        self.pos.zero_()
        self.pos[:batch] = positions[:, -1:]
        self.slot.fill_(prompt - 1)
        return logits

    def _fused_prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The fused step's prefill; replayed from a CUDA graph for a prompt shape and padding seen before (a
        prefill's Python and launch time exceeds its GPU time many times over for short prompts)."""
        assert self.fused is not None
        key = None
        if self.device.type == "cuda" and self.prefill_capturable:
            key = (ids.shape, mask.cpu().numpy().tobytes())
            graph = self.prefills.get(key)
            if graph is not None:
                self.prefills.move_to_end(key)
                return graph(ids, positions)
        packing = self.fused.pack(mask)
        if packing is None:
            return None
        fused, state = self.fused, self._rows(ids.shape[0])

        def run(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            for buffer in state.kv:
                buffer.zero_()
            return fused.prefill(ids, positions, state, packing)

        if key is None or key not in self.prefills_seen:
            if key is not None:
                self.prefills_seen[key] = None
                while len(self.prefills_seen) > 4 * _MAX_RUNNERS:
                    self.prefills_seen.popitem(last=False)
            return run(ids, positions)
        graph = _PrefillGraph(run, ids, positions)  # the second time this prompt shape and padding come
        if graph.graph is None:
            self.prefill_capturable = False
        else:
            self.prefills[key] = graph
            while len(self.prefills) > _MAX_RUNNERS:
                self.prefills.popitem(last=False)
        return graph.logits

    def _rows(self, batch: int) -> Any:
        """The decode state seen by the first ``batch`` rows (the runner's batch is bucketed)."""
        assert self.state is not None
        return DecodeState(kv=[kv[:, :batch] for kv in self.state.kv], slot=self.slot, valid=self.valid,
                           mask=self.state.mask)  # fmt: skip

    def _new_state(self, kv: list[torch.Tensor]) -> DecodeState:
        return DecodeState(kv=kv, slot=self.slot, valid=self.valid, mask=kv[0].new_zeros(self.batch, self.length))

    def _model_prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The prefill through the model's own forward (padding-free when padded), copied into the buffers."""
        from transformers import DynamicCache

        batch, prompt = ids.shape
        cache = DynamicCache()  # full keys/values for every layer; sliding windows are applied by the mask
        kwargs: dict[str, Any] = {self.cache_name: cache, "use_cache": True}
        if "logits_to_keep" in self.signature:
            kwargs["logits_to_keep"] = 1
        if "position_ids" in self.signature:
            kwargs["position_ids"] = positions
        out = self.head(input_ids=ids, attention_mask=mask, **kwargs)
        layers: list[tuple[Any, Any]] = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]
        if self.state is None:
            self.state = self._new_state(
                [k.new_zeros(2, self.batch, k.shape[1], self.length, k.shape[3]) for k, _ in layers]
            )
        for buffer, (keys, values) in zip(self.state.kv, layers, strict=True):
            buffer.zero_()
            buffer[0, :batch, :, :prompt] = keys
            buffer[1, :batch, :, :prompt] = values
        return out.logits[:, -1].float()

    def _select(self, logits: torch.Tensor) -> None:
        """Choose and record the next token from (B, V) logits; advance the inputs of the next step."""
        batch = logits.shape[0]
        if batch < self.batch:
            logits = torch.cat([logits, logits.new_zeros(self.batch - batch, logits.shape[1])])
        self._record(next_tokens(logits, self.sampling, seen=self.seen, eos_penalty=self.eos_penalty))

    def _record(self, chosen: torch.Tensor) -> None:
        """Record the chosen tokens (B,); advance the inputs of the next step."""
        if self.seen is not None:
            self.seen.scatter_(1, chosen[:, None], True)
        assert self.state is not None
        advance(
            chosen, unfinished=self.unfinished, eos=self.eos, pad=self.pad, out=self.out, tokens=self.tok,
            positions=self.pos, step=self.step, slot=self.slot, valid=self.valid, mask=self.state.mask,
            active=self.active, eos_penalty=self.eos_penalty, ban_steps=self.ban_steps,
        )  # fmt: skip

    def _decode_step(self) -> None:
        assert self.state is not None
        if self.fused is not None:
            if not self.sampling.do_sample and self.seen is None:  # the choice runs in the LM head's kernel
                self._record(self.fused.greedy(self.tok, self.pos, self.state, self.eos_penalty))
            else:
                self._select(self.fused(self.tok, self.pos, self.state))
            return
        kwargs: dict[str, Any] = {"use_cache": False}
        if "logits_to_keep" in self.signature:
            kwargs["logits_to_keep"] = 1
        if "position_ids" in self.signature:
            kwargs["position_ids"] = self.pos
        with decode_context(self.state):
            out = self.head(input_ids=self.tok, attention_mask=self.ones, **kwargs)
        self._select(out.logits[:, -1].float())

    def _capture(self) -> None:
        """Record ``_decode_step`` in a CUDA graph. Warm-up steps run first; ``run`` resets every input after."""
        saved = [t.clone() for t in self._mutable()]
        rng = torch.cuda.get_rng_state(self.device)  # warm-up draws must not shift the user's random stream
        _, self.graph, _ = _captured(self._decode_step, 2, "decode step")
        self.capturable = self.graph is not None
        for tensor, value in zip(self._mutable(), saved, strict=True):
            tensor.copy_(value)
        torch.cuda.set_rng_state(rng, self.device)

    def _mutable(self) -> list[torch.Tensor]:
        assert self.state is not None
        tensors = [self.tok, self.pos, self.slot, self.step, self.valid, self.unfinished, self.active, self.out]
        tensors += self.state.kv + [self.state.mask]
        tensors += [self.eos_penalty] if self.eos_penalty is not None else []
        return tensors + ([self.seen] if self.seen is not None else [])


class FastGenerate:
    """Replaces ``generate`` on one causal LM head (an instance attribute; ``detach`` restores it)."""

    def __init__(self, head: Any, cache_name: str, calls: Counter[str], fused: FusedDecodeStep | None = None):
        self.head, self.cache_name, self.fused = head, cache_name, fused
        self.calls = calls  # shared with the decoder adapter, for ``call_counts``
        self.runners: OrderedDict[tuple, _Runner] = OrderedDict()
        self._logged: set[str] = set()
        self._previous: Any = None
        self._stock_params = frozenset(inspect.signature(head.generate).parameters)

    def attach(self) -> None:
        """Install the fast ``generate`` on the head (an instance attribute)."""
        self._previous = self.head.__dict__.get("generate")
        stock = self.head.generate

        @functools.wraps(stock)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self.generate(stock, *args, **kwargs)

        self.head.generate = generate

    def detach(self) -> None:
        """Restore the head's ``generate``; drop the buffers and captured graphs."""
        if self._previous is not None:
            self.head.generate = self._previous
        else:
            self.head.__dict__.pop("generate", None)
        self.runners.clear()  # frees the buffers and graph pools

    def generate(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run ``stock`` (transformers' generate) unless the fast loop covers this call."""
        plan = self._plan(args, kwargs)
        if isinstance(plan, str):
            self.calls["stock generate"] += 1
            if plan not in self._logged:
                self._logged.add(plan)
                logger.info("bettertransformer: transformers' generate runs for %s", plan)
            return stock(*args, **kwargs)
        self.calls["fast generate"] += 1
        with torch.no_grad():
            return self._runner(plan).run(plan)

    def _runner(self, plan: _Plan) -> _Runner:
        batch, prompt = plan.input_ids.shape
        # Room for the warm-up steps of a graph capture past the last token.
        bans = plan.ban_steps > 0 and bool(plan.eos)
        key = (_bucket_batch(batch), _bucket_length(prompt + plan.new_tokens + 4), plan.sampling, plan.eos, bans)
        runner = self.runners.pop(key, None)
        if runner is None:
            while len(self.runners) >= _MAX_RUNNERS:
                self.runners.popitem(last=False)
            runner = _Runner(self.head, self.cache_name, key[0], key[1], plan, self.fused, bans)
        self.runners[key] = runner
        return runner

    def _plan(self, args: tuple, kwargs: dict) -> _Plan | str:
        """The fast loop's plan for this call, or why stock generate must run it."""
        head = self.head
        device = next(head.parameters()).device
        if device.type not in DEVICES:
            return f"a model on {device.type}"
        if head.training:
            return "a model in train mode"
        if self.fused is not None and not self.fused.is_current(head):
            return "modules replaced after transform"
        kwargs = dict(kwargs)
        inputs = args[0] if args else kwargs.pop("inputs", None)
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if len(args) > 1 or not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.shape[1] == 0:
            return "inputs other than a (batch, length) tensor of token ids"
        for name in self._stock_params - {"self", "inputs", "generation_config", "kwargs"}:
            if kwargs.get(name) is not None:
                return f"the {name} argument"
        # A shallow copy is enough: update only sets attributes. (deepcopy and to_diff_dict cost ~1 ms per call.)
        config = copy.copy(kwargs.pop("generation_config", None) or head.generation_config)
        mask = kwargs.pop("attention_mask", None)
        unused = config.update(**kwargs)
        if unused:
            return f"generate arguments {sorted(unused)}"
        defaults = _default_settings()
        for name, value in vars(config).items():
            if name in _SETTINGS or name in _ASSISTANT or name.startswith("_"):
                continue
            if (name in defaults and defaults[name] == value) or value in _NEUTRAL.get(name, ()):
                continue
            return f"generation setting {name}={value!r}"
        batch, prompt = inputs.shape
        if mask is None:
            mask = torch.ones_like(inputs)
        elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, prompt):
            return "an attention_mask that is not a (batch, length) padding mask"
        if config.max_new_tokens is not None:
            new_tokens = config.max_new_tokens
        else:
            new_tokens = (config.max_length if config.max_length is not None else 20) - prompt
        if new_tokens <= 0:
            return "no tokens to generate"
        ban_steps = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt)
        return _Plan(inputs.to(device), mask.to(device), new_tokens, ban_steps, config)
