"""Fast ``generate``: a static key/value cache and the per-token step captured in a CUDA graph.

The user's ``model.generate(...)`` call is unchanged. When its settings are ones the fast loop covers (greedy or
sampling with temperature / top-k / top-p / repetition penalty, end-of-sequence ids, length limits, a left-padded
batch), it runs here:

1. Prefill: the prompt through the fused step's prefill (``decode_steps/``) or the model's own forward
   (padding-free when padded), its keys/values into preallocated per-layer buffers ``(B, Hkv, S, D)``. ``S``
   (prompt + new tokens) and the batch are rounded up to buckets, so one runner serves many calls.
2. Each new token is one replay of a CUDA graph of the whole step (the model forward or the fused step, the choice
   of the next token, the end-of-sequence bookkeeping). The host only checks every few tokens whether all rows
   have finished. On the CPU the same step runs eagerly.

Anything else (beam search, streamers, custom processors, ...) runs transformers' own generate, with one log line.

Concurrency: calls on one model from several threads queue on the model's lock (one call at a time uses its static
buffers), so each gets the tokens it would get alone. Captures run one at a time in the process, in CUDA's
thread-local capture mode, so work other threads launch meanwhile neither fails nor spoils a capture.

Memory: a model keeps at most ``SWITCHES.max_graphs`` runners holding at most ``SWITCHES.max_graph_bytes`` of
static buffers, dropping the least recently used; its graphs share one memory pool. ``api.cache_info`` reports it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .._compat import fsdp_module_type, is_distributed_tensor, repetition_penalty_skips_left_padding
from ..ops.compile_ahead import compiling_ahead
from ..ops.sampling import Sampling, advance, next_tokens
from ..ops.step_buffers import StepBuffers
from ..switches import SWITCHES
from .call_state import decoding
from .capture import capture
from .decode_state import DecodeState, DecodeUnsupported
from .decode_steps import DecodeStep
from .patching import Calls, InstanceForward, LogOnce

# Generation settings the fast loop implements; any other difference from the defaults runs stock generate.
_SETTINGS = frozenset(
    {
        "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
        "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "_from_model_config",
        "transformers_version", "forced_bos_token_id", "forced_eos_token_id", "decoder_start_token_id",
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
_PREFILL_GRAPHS = 4  # prefill graphs kept per runner (least recently used dropped)


@functools.cache
def _default_settings() -> dict[str, Any]:
    from transformers import GenerationConfig

    return vars(GenerationConfig())


def _bucket_batch(batch: int) -> int:
    return batch if batch > 64 else 1 << (batch - 1).bit_length()


def _bucket_length(length: int) -> int:
    return -(-length // 64) * 64


class _Plan:
    """One generate call the fast loop will run.

    ``input_ids``/``mask``: the prompts the decoder continues (an encoder-decoder's: its start token), and what
    ``generate`` returns them followed by the new tokens; ``encoder``: an encoder-decoder's inputs and their mask.
    ``forced_bos``/``forced_eos``: ids generate's processors force as the first token (after a one-token prompt) and
    as the token that reaches the length limit. ``encoder``'s first tensor may be the encoder's states already
    computed (B, S, hidden), when the model's own generate ran the encoder."""

    def __init__(
        self, input_ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, ban_steps: int, config: Any,
        encoder: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):  # fmt: skip
        self.input_ids, self.mask, self.encoder = input_ids, mask, encoder
        self.new_tokens, self.ban_steps = new_tokens, ban_steps
        self.forced_bos: int | None = config.forced_bos_token_id if input_ids.shape[1] == 1 else None
        forced_eos = config.forced_eos_token_id
        self.forced_eos: int | None = forced_eos[0] if isinstance(forced_eos, list) else forced_eos
        # Ids never chosen, and ids not chosen as the first new token (Whisper's suppressed tokens).
        self.suppress: tuple[int, ...] = ()
        self.begin_suppress: tuple[int, ...] = ()
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


class _Captured:
    """A CUDA graph of ``run()``, captured after ``warmups`` eager calls on a side stream.

    ``result``: the last warm-up's result; ``graph`` and ``output`` (the captured call's output): None if the
    capture failed.

    The capture runs as ``capture.capture`` runs it (one at a time, the cycle collector paused, cleaned up on
    failure).
    """

    def __init__(self, run: Callable[[], Any], warmups: int, pool: Any, log: LogOnce, what: str):
        self.result: Any = None
        self.graph: Any = None
        self.output: Any = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                self.result = run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with capture(graph, pool):
                output = run()
        except Exception as problem:  # e.g. a host sync in the model's step (data-dependent expert routing)
            log(f"capture {what}", "%s not capturable (%s); it runs eagerly", what, problem)
            return
        self.graph, self.output = graph, output


def _tree(head: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.Tensor]]:
    """Every module under ``head`` (itself first, breadth first) and their parameters, from the module dictionaries
    directly: ``modules()`` and ``parameters()`` build names and sets (~2 ms per call on a 22-layer model), a walk
    with a stack and a list per module ~0.3 ms; this one ~0.08 ms (2-core CPU, 293 modules). A module or parameter
    shared between places comes once per place."""
    modules: list[Any] = [head]
    params: list[Any] = []
    for module in modules:  # the list grows as the walk goes
        found = module._parameters
        if found:
            params.extend(found.values())
        children = module._modules
        if children:
            modules.extend(children.values())
    if None in modules:  # registered as None (an absent submodule or bias)
        modules = [m for m in modules if m is not None]
    return modules, [p for p in params if p is not None]


class _PrefillGraph:
    """``run(ids, positions) -> logits`` (device work only) captured in a CUDA graph over static inputs. The
    warm-up before the capture computes this call's result; ``graph`` stays None if the capture failed."""

    def __init__(self, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: torch.Tensor,
                 positions: torch.Tensor, pool: Any, log: LogOnce):  # fmt: skip
        self.ids, self.positions = ids.clone(), positions.clone()
        self.run = run  # the graph reads the tensors ``run`` holds (the packing): they must outlive it
        captured = _Captured(lambda: run(self.ids, self.positions), 1, pool, log, "prefill")
        self.logits, self.graph, self.static_logits = captured.result, captured.graph, captured.output

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.static_logits


class Runner:
    """Static buffers and the captured step for one (batch bucket, length bucket, sampling) key."""

    def __init__(self, owner: FastGenerate, batch: int, length: int, plan: _Plan, step: DecodeStep | None, bans: bool):
        head = owner.head
        self.head, self.cache_name, self.fused = head, owner.cache_name, step
        self.owner, self.pool, self.log = owner, owner.pool, owner.log
        self.batch, self.length = batch, length
        self.sampling, self.eos_ids = plan.sampling, plan.eos
        weight = head.get_output_embeddings().weight
        self.device = weight.device
        self.buffers = StepBuffers.allocate(
            batch, length, weight.shape[0], plan.eos, weight.dtype, self.device,
            penalty=plan.sampling.repetition_penalty != 1.0, bans=bans,
        )  # fmt: skip
        self.ones = torch.ones(batch, 1, dtype=torch.long, device=self.device)  # the step's attention mask
        self.state: DecodeState | None = None  # key/value buffers, made at the first prefill
        # Prefill graphs by (prompt shape, mask bytes), and the keys seen once (captured when seen again).
        self.prefills: OrderedDict[tuple, _PrefillGraph] = OrderedDict()
        self.prefills_seen: OrderedDict[tuple, None] = OrderedDict()
        # A prefill that cannot be captured is never tried: a failed capture can leave later captures failing.
        self.prefill_capturable = step is not None and step.prefill_capturable
        self.graph: Any = None
        # A tensor-parallel model (DTensor weights, the collectives inside its own forward) steps eagerly from the
        # start and compiles nothing ahead: a capture or a dry run that failed on one rank only would leave the
        # ranks stepping differently around their collectives.
        self.sharded = any(is_distributed_tensor(p) for p in head.parameters())
        self.capturable = not self.sharded  # False once a capture failed: the steps then run eagerly
        self.compiled_ahead = False  # whether its first call's kernels were compiled ahead
        self.signature = inspect.signature(head.forward).parameters

    @property
    def nbytes(self) -> int:
        """Device bytes of its static buffers (key/values and loop state)."""
        return self.state.nbytes if self.state is not None else self.buffers.nbytes

    @property
    def graphs(self) -> int:
        return (self.graph is not None) + len(self.prefills)

    # -- one call ----------------------------------------------------------------------------------------------
    def run(self, plan: _Plan) -> torch.Tensor:
        """Generate for one planned call; returns the prompts followed by the new tokens, as stock generate."""
        ids, mask = plan.input_ids, plan.mask
        batch, prompt = ids.shape
        b = self.buffers
        if not self.compiled_ahead and self.device.type == "cuda" and not self.sharded:
            self.compiled_ahead = True
            self._compile_ahead(ids, mask)
        logits = self._prefill(ids, mask)
        b.pad.fill_(plan.pad)
        b.ban_steps.fill_(plan.ban_steps)
        if b.eos_penalty is not None:  # -inf at the ids banned now: end-of-sequence ids (for a while), suppressed ids
            b.eos_penalty.zero_()
            if plan.ban_steps > 0:
                b.eos_penalty.index_fill_(0, b.eos, float("-inf"))
            if plan.suppress:
                b.eos_penalty.index_fill_(0, torch.tensor(plan.suppress, device=self.device), float("-inf"))
        b.unfinished.zero_()
        b.unfinished[:batch] = True  # the bucket's extra rows count as finished
        b.out.fill_(plan.pad)
        b.step.zero_()
        b.active.zero_()
        if b.seen is not None:  # the tokens the repetition penalty counts, as this transformers counts them
            b.seen.zero_()
            counted = ids
            if repetition_penalty_skips_left_padding():
                lead = (mask != 0).int().argmax(dim=1)  # left-padding length of each row
                skipped = torch.arange(prompt, device=ids.device)[None, :] < lead[:, None]
                counted = ids.masked_fill(skipped, b.seen.shape[1])  # an extra column, dropped below
            seen = torch.zeros(batch, b.seen.shape[1] + 1, dtype=torch.bool, device=ids.device)
            b.seen[:batch] = seen.scatter_(1, counted, True)[:, :-1]
        # The first new token, from the prefill, unless a processor forces it (forced eos wins when it is both, as
        # it comes last among generate's processors).
        forced = plan.forced_eos if plan.new_tokens == 1 and plan.forced_eos is not None else plan.forced_bos
        if plan.begin_suppress:
            logits = logits.index_fill(1, torch.tensor(plan.begin_suppress, device=logits.device), float("-inf"))
        if forced is not None:
            self._force(forced)
        else:
            self._select(logits)
        if self.graph is None and self.capturable and self.device.type == "cuda":
            self._capture()
        produced = 1
        last = plan.new_tokens - (plan.forced_eos is not None)  # a forced last token needs no step
        while produced < last:
            if self.graph is not None:
                self.graph.replay()
            else:
                self._decode_step()
            produced += 1
            # No row can finish while end-of-sequence ids are banned (min_new_tokens): no check, no sync.
            check = self.eos_ids and produced % _CHECK_EVERY == 0 and produced > plan.ban_steps
            if check and not bool(b.unfinished.any()):
                break
        if plan.forced_eos is not None and produced == last and last > 0:
            self._force(plan.forced_eos)
        count = min(int(b.active), plan.new_tokens)
        return torch.cat([ids, b.out[:batch, :count]], dim=1)

    def _compile_ahead(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Compile the Triton kernels of this runner's first call (prefill, choice, decode step) together, on
        threads (``ops.compile_ahead``): a dry run of the three, whose launches only start compilations, on state
        the call itself sets again (the prefill writes the key/value buffers afresh) or restored here."""
        try:
            with compiling_ahead(self.device) as ahead:
                if ahead:
                    seen = self.prefills_seen.copy()
                    try:
                        with self._restored(self.buffers.tensors()):
                            self._select(self._prefill(ids, mask))
                            self._decode_step()
                    finally:
                        self.prefills_seen = seen
        except DecodeUnsupported:  # the call itself finds this out, and falls back
            pass
        except Exception as error:  # the kernels compile at their first launches instead
            self.log("compile ahead", "compiling the first call's kernels ahead failed (%s)", error)

    @contextlib.contextmanager
    def _restored(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Run the block on scratch state: ``tensors`` and the device's random state (draws in the block must not
        shift the user's random stream) are as they were after it, whatever it wrote."""
        saved = [t.clone() for t in tensors]
        rng = torch.cuda.get_rng_state(self.device)
        try:
            yield
        finally:
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
            torch.cuda.set_rng_state(rng, self.device)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts, fill the buffers with their keys/values; returns the last tokens' (B, V) logits."""
        batch, prompt = ids.shape
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = None
        if self.fused is not None:
            if self.state is None:
                self.state = DecodeState(self.fused.new_cache(self.batch, self.length), self.buffers)
            logits = self._fused_prefill(ids, mask, positions)
        if logits is None:
            logits = self._model_prefill(ids, mask, positions)
        b = self.buffers
        b.valid.zero_()
        b.valid[:batch, :prompt] = mask.bool()
        b.mask.copy_(torch.where(b.valid, 0.0, float("-inf")))
        b.tokens.fill_(0)
        b.positions.zero_()
        b.positions[:batch] = positions[:, -1:]
        b.slot.fill_(prompt - 1)
        return logits

    def _fused_prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The fused step's prefill; replayed from a CUDA graph for a prompt shape and padding seen before (a
        prefill's Python and launch time exceeds its GPU time many times over for short prompts)."""
        assert self.fused is not None and self.state is not None
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
        fused, state = self.fused, self.state.rows(ids.shape[0])

        def run(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            for buffer in state.kv:
                buffer.zero_()
            return fused.prefill(ids, positions, state, packing)

        if key is None or key not in self.prefills_seen:
            if key is not None:
                self.prefills_seen[key] = None
                while len(self.prefills_seen) > 4 * _PREFILL_GRAPHS:
                    self.prefills_seen.popitem(last=False)
            return run(ids, positions)
        graph = _PrefillGraph(run, ids, positions, self.pool, self.log)  # the second time this shape comes
        if graph.graph is None:
            self.prefill_capturable = False
            self._new_pool()
        else:
            self.prefills[key] = graph
            while len(self.prefills) > _PREFILL_GRAPHS:
                self.prefills.popitem(last=False)
        return graph.logits

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
            kv = [k.new_zeros(2, self.batch, k.shape[1], self.length, k.shape[3]) for k, _ in layers]
            self.state = DecodeState(kv, self.buffers)
        for buffer, (keys, values) in zip(self.state.kv, layers, strict=True):
            buffer.zero_()
            buffer[0, :batch, :, :prompt] = keys
            buffer[1, :batch, :, :prompt] = values
        return out.logits[:, -1].float()

    def _select(self, logits: torch.Tensor) -> None:
        """Choose and record the next token from (B, V) logits; advance the inputs of the next step."""
        b = self.buffers
        batch = logits.shape[0]
        if batch < self.batch:
            logits = torch.cat([logits, logits.new_zeros(self.batch - batch, logits.shape[1])])
        self._record(next_tokens(logits, self.sampling, seen=b.seen, eos_penalty=b.eos_penalty))

    def _force(self, token: int) -> None:
        """Record ``token`` for every unfinished row, as a processor that forces it (all other logits -inf)."""
        self._record(torch.full((self.batch,), token, dtype=torch.long, device=self.device))

    def _record(self, chosen: torch.Tensor) -> None:
        """Record the chosen tokens (B,); advance the inputs of the next step."""
        if self.buffers.seen is not None:
            self.buffers.seen.scatter_(1, chosen[:, None], True)
        advance(chosen, self.buffers)

    def _decode_step(self) -> None:
        state, b = self.state, self.buffers
        assert state is not None
        if self.fused is not None:
            if not self.sampling.do_sample and b.seen is None:  # the choice runs in the LM head's kernel
                self._record(self.fused.greedy(b.tokens, b.positions, state, b.eos_penalty))
            else:
                self._select(self.fused(b.tokens, b.positions, state))
            return
        kwargs: dict[str, Any] = {"use_cache": False}
        if "logits_to_keep" in self.signature:
            kwargs["logits_to_keep"] = 1
        if "position_ids" in self.signature:
            kwargs["position_ids"] = b.positions
        with decoding(state):
            out = self.head(input_ids=b.tokens, attention_mask=self.ones, **kwargs)
        self._select(out.logits[:, -1].float())

    def _capture(self) -> None:
        """Record ``_decode_step`` in a CUDA graph. Warm-up steps run first; ``run`` resets every input after."""
        assert self.state is not None
        with self._restored(self.buffers.tensors() + self.state.kv):  # what the warm-up steps write
            captured = _Captured(self._decode_step, 2, self.pool, self.log, "decode step")
        self.graph = captured.graph
        self.capturable = self.graph is not None
        if not self.capturable:
            self._new_pool()

    def _new_pool(self) -> None:
        """After a failed capture, later captures of this model go to a fresh memory pool: PyTorch can leave the
        failed capture's pool marked as being recorded to (``capture._end_failed_capture`` undoes that for device memory,
        but pinned host memory keeps its mark), and a capture into a pool so marked fails."""
        self.owner.pool = self.pool = torch.cuda.graph_pool_handle()


class FastGenerate:
    """Replaces ``generate`` on one causal LM head (an instance attribute; ``detach`` restores it)."""

    runner_class: type[Runner] = Runner  # what holds one bucket's buffers and graphs

    def __init__(self, head: Any, cache_name: str, calls: Calls, step: DecodeStep | None = None):
        self.head, self.cache_name, self.fused = head, cache_name, step
        self.calls = calls  # shared with the decoder adapter, for ``call_counts``
        self.runners: OrderedDict[tuple, Runner] = OrderedDict()
        self.log = LogOnce()
        self.lock = threading.Lock()  # one call at a time uses the static buffers
        self.pool: Any = None  # the memory pool this model's graphs share (they never run at the same time)
        self.unsupported: str | None = None  # why decode steps cannot run on the static buffers, once seen
        self._patch: InstanceForward | None = None
        self._stock_params = frozenset(inspect.signature(head.generate).parameters)
        self._current_tree: tuple[int, ...] = ()  # the module tree (ids) the fused step last found current

    def attach(self) -> None:
        """Install the fast ``generate`` on the head (an instance attribute)."""
        self._patch = InstanceForward(self.head, self.generate, method="generate")

    def detach(self) -> None:
        """Restore the head's ``generate``; drop the buffers and captured graphs."""
        if self._patch is not None:
            self._patch.restore()
            self._patch = None
        with self.lock:
            self.runners.clear()  # frees the buffers and graphs
            self.pool = None

    def cache_info(self) -> dict[str, int]:
        """What the static-cache loop holds now: runners, captured graphs, and the bytes of their static buffers."""
        with self.lock:
            runners = list(self.runners.values())
        return {
            "runners": len(runners),
            "graphs": sum(r.graphs for r in runners),
            "buffer_bytes": sum(r.nbytes for r in runners),
        }

    def generate(self, stock: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run ``stock`` (transformers' generate) unless the fast loop covers this call."""
        out = self._attempt(self._plan(args, kwargs))
        if isinstance(out, torch.Tensor):
            return out
        self.calls.add("stock generate")
        self.log(out, "transformers' generate runs for %s", out)
        return stock(*args, **kwargs)

    def _attempt(self, plan: _Plan | str) -> torch.Tensor | str:
        """Run ``plan`` on the fast loop: the prompts followed by the new tokens, or why the stock loop must run."""
        if not isinstance(plan, _Plan):
            return plan
        with self.lock, torch.no_grad():
            try:
                out = self._run(plan)
            except DecodeUnsupported as problem:
                if problem.this_call:
                    return f"a call the decode buffers cannot serve ({problem})"
                self.unsupported = f"decode steps this model's buffers cannot serve ({problem})"
                self.runners.clear()
                return self.unsupported
        self.calls.add("fast generate")
        self.calls.add("fused steps" if self.fused is not None else "generic steps")
        return out

    def _run(self, plan: _Plan) -> torch.Tensor:
        batch, prompt = plan.input_ids.shape
        # Room for the warm-up steps of a graph capture past the last token.
        bans = (plan.ban_steps > 0 and bool(plan.eos)) or bool(plan.suppress)
        key: tuple[Any, ...] = (
            _bucket_batch(batch),
            _bucket_length(prompt + plan.new_tokens + 4),
            plan.sampling,
            plan.eos,
            bans,
        )
        if plan.encoder is not None:  # an encoder-decoder's runner also holds the encoder's states: their length
            key += (_bucket_length(plan.encoder[0].shape[1]),)
        runner = self.runners.pop(key, None)
        if runner is None:
            if self.pool is None and plan.input_ids.is_cuda:
                self.pool = torch.cuda.graph_pool_handle()
            runner = self.runner_class(self, key[0], key[1], plan, self.fused, bans)
        self.runners[key] = runner  # most recently used last
        try:
            return runner.run(plan)
        except DecodeUnsupported:
            del self.runners[key]  # a runner that cannot finish its calls holds memory for nothing
            raise
        finally:
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used runners beyond ``SWITCHES.max_graphs`` runners or
        ``SWITCHES.max_graph_bytes`` of buffers (the one just used stays)."""
        while len(self.runners) > 1 and (
            len(self.runners) > SWITCHES.max_graphs
            or sum(r.nbytes for r in self.runners.values()) > SWITCHES.max_graph_bytes
        ):
            self.runners.popitem(last=False)

    def _plan(self, args: tuple, kwargs: dict) -> _Plan | str:
        """The fast loop's plan for this call, or why stock generate must run it."""
        head = self.head
        device = next(head.parameters()).device
        problem = self._model_problem()
        if problem is not None:
            return problem
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
        batch, length = inputs.shape
        if mask is None:
            mask = torch.ones_like(inputs)
        elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length):
            return "an attention_mask that is not a (batch, length) padding mask"
        inputs, mask = inputs.to(device), mask.to(device)
        decoder = self._decoder_prompt(inputs, config)
        if isinstance(decoder, str):
            return decoder
        if isinstance(config.forced_eos_token_id, list) and len(config.forced_eos_token_id) != 1:
            return "several forced end-of-sequence ids"
        prompt = decoder.shape[1]
        if config.max_new_tokens is not None:
            new_tokens = config.max_new_tokens
        else:
            new_tokens = (config.max_length if config.max_length is not None else 20) - prompt
        if new_tokens <= 0:
            return "no tokens to generate"
        ban_steps = max(config.min_new_tokens or 0, (config.min_length or 0) - prompt)
        if decoder is inputs:
            return _Plan(inputs, mask, new_tokens, ban_steps, config)
        return _Plan(decoder, torch.ones_like(decoder), new_tokens, ban_steps, config, encoder=(inputs, mask))

    def _model_problem(self) -> str | None:
        """Why the model as it is now cannot run the fast loop, or None. Checked at every call, on one walk of the
        module tree (``_tree``); the fused step's own check of its modules only when the tree changed."""
        head = self.head
        modules, params = _tree(head)
        device = params[0].device
        if device.type not in SWITCHES.generate_devices:
            return f"a model on {device.type}"
        if any(p.device != device for p in params):
            return "a model split across devices or offloaded (its static buffers would live on one device)"
        fsdp = fsdp_module_type()
        if fsdp is not None and any(isinstance(m, fsdp) for m in modules):
            return "a model sharded by FSDP (its parameters are gathered around each forward)"
        if head.training:
            return "a model in train mode"
        if self.unsupported is not None:
            return self.unsupported
        if self.fused is not None:
            tree = tuple(map(id, modules))
            if tree != self._current_tree:
                if not self.fused.is_current(head):
                    return "modules replaced after transform"
                self._current_tree = tree
        return None

    def _decoder_prompt(self, inputs: torch.Tensor, config: Any) -> torch.Tensor | str:
        """The prompts the decoder continues (a causal LM's: the inputs), or why the fast loop cannot run."""
        return inputs
