"""What a fused decode step is, and the pieces every family's step shares.

A fused decode step runs one whole model's layers for one new token per row, reading the stock modules' weights
through attribute paths, in a few kernels per layer (``ops.decode``) instead of the model's own forward. A
family's step is one file in this folder, named by one registry field (``Support.decode_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..._compat import is_distributed_tensor
from ...ops import decode
from ...ops.padding import PackInfo, pack_info
from ..decode_state import DecodeState


# Activations computed inside the matrix product before them: the tanh GELU (GPT-2's "gelu_new" in eight
# PyTorch kernels, the same formula in none).
TANH_GELU = frozenset({"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"})


class DecodeStep(Protocol):
    """A fused decode step of one model family.

    ``__init__(base, head)`` reads the base model's modules (and the LM head's output embedding); it raises
    ``NotImplementedError`` (with the reason) when a module or a config setting is one the step cannot compute,
    and the generic step (the model's own forward under our attention) runs instead.
    """

    prefill_capturable: bool
    """Whether ``prefill`` can be captured in a CUDA graph (no host synchronisation)."""

    def __init__(self, base: nn.Module, head: Any) -> None: ...

    def is_current(self, head: Any) -> bool:
        """False once modules were swapped since (adapters, quantization): the step would run stale ones."""
        ...

    def new_cache(self, batch: int, slots: int) -> list[torch.Tensor]:
        """Zeroed per-layer key/value buffers (2, batch, Hkv, slots, D), in layer order."""
        ...

    def pack(self, mask: torch.Tensor) -> Packing | None:
        """How the prompts' real tokens pack (``pack_prompts``), or None to prefill through the model's forward."""
        ...

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, state: DecodeState, packing: Packing) -> torch.Tensor:
        """Run left-padded prompts (B, L) on their real tokens, writing their keys/values into ``state.kv`` at their
        columns; returns each row's last-token logits (B, V) in fp32. No host synchronisation (a CUDA graph holds it)."""
        ...

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One token per row: tokens, positions (B, 1) -> next-token logits (B, V) fp32; writes its keys/values at
        ``state.slot``."""
        ...

    def greedy(
        self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState, eos_penalty: torch.Tensor | None
    ) -> torch.Tensor:
        """The step with the greedy choice fused in: (B,) argmax of (logits + ``eos_penalty``), chosen from logits
        rounded as a stock LM head rounds them."""
        ...


class FusedStep:
    """What every family's fused step shares (``DecodeStep``): the check that its modules are still the model's,
    the prompts' packing, and the LM head, for logits and for the greedy choice. A family supplies ``_modules``
    (every module it reads, resolved afresh from the model, in a fixed order), ``_step`` (its layers for one token
    per row, returning the residual stream) and ``head_options`` (the final norm and what the head's epilogue
    applies), and sets ``head`` and ``module_ids`` in ``__init__``."""

    head: Any
    module_ids: list[int]
    prefill_capturable = True

    def _modules(self, head: Any) -> list[Any]:
        raise NotImplementedError

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState) -> torch.Tensor:
        raise NotImplementedError

    def head_options(self) -> dict[str, Any]:
        """``decode.linear`` keyword arguments of the LM head: ``norm`` and optional epilogue settings."""
        raise NotImplementedError

    def is_current(self, head: Any) -> bool:
        """False if modules were swapped since (e.g. adapters added): the step would run stale modules."""
        return [id(m) for m in self._modules(head)] == self.module_ids

    def pack(self, mask: torch.Tensor) -> Packing | None:
        """Where the prompts' real tokens are (``pack_prompts``)."""
        return pack_prompts(mask)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """tokens, positions: (B, 1). Returns (B, V) fp32 logits."""
        return self._logits(self._step(tokens, positions, state))

    def greedy(
        self, tokens: torch.Tensor, positions: torch.Tensor, state: DecodeState, eos_penalty: torch.Tensor | None
    ) -> torch.Tensor:
        """The step with a greedy choice: the (B,) argmax of (logits + ``eos_penalty`` (V,)), chosen as stock
        generate chooses it from the fp16/bf16 logits."""
        head = self.head
        return decode.greedy_head(
            self._step(tokens, positions, state), head.weight, head.bias, transposed=True, eos_penalty=eos_penalty,
            counters=state.buffers.counters, **self.head_options(),
        )  # fmt: skip

    def _logits(self, x: torch.Tensor, kernels: bool = True) -> torch.Tensor:
        """(N, V) fp32 logits of the residual stream's rows ``x`` (N, E): final norm, LM head and its epilogue."""
        head = self.head
        return decode.linear(
            x, head.weight, head.bias, transposed=True, out_dtype=torch.float32, kernels=kernels,
            **self.head_options(),
        )  # fmt: skip


def check_one_device(base: nn.Module) -> None:
    """Raise ``NotImplementedError`` unless every parameter of ``base`` lives on one real device: a fused step
    launches its kernels over all of them at once (a model split across GPUs by ``device_map``, or offloaded, runs
    the generic step, whose modules move their inputs themselves)."""
    devices = {p.device for p in base.parameters()}
    if len(devices) > 1 or any(d.type == "meta" for d in devices):
        names = ", ".join(sorted(str(d) for d in devices))
        raise NotImplementedError(f"parameters on several devices or offloaded ({names})")
    if any(is_distributed_tensor(p) for p in base.parameters()):
        raise NotImplementedError("sharded (DTensor) parameters: tensor parallelism or FSDP")


@dataclass(frozen=True)
class Packing:
    """The real tokens of a left-padded prompt batch: ``info`` (``ops.padding.PackInfo``); ``flat`` (T,) their
    flat positions, ``rows`` and ``columns`` their coordinates; ``last`` (B,) each row's last token in the packed
    order."""

    info: PackInfo
    flat: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    last: torch.Tensor


def pack_prompts(mask: torch.Tensor) -> Packing | None:
    """Where the real tokens of left-padded prompts (mask (B, L)) are; None when a row has no real token (the
    model's own forward then runs the prefill). Waits for the GPU (the row lengths)."""
    batch, length = mask.shape
    info = pack_info(mask, batch, length, mask.device)
    if int(info.host_lengths.min()) == 0:
        return None
    flat = info.indices if info.indices is not None else torch.arange(batch * length, device=mask.device)
    return Packing(info, flat, flat // length, flat % length, info.cu_seqlens[1:].long() - 1)


@dataclass(frozen=True)
class Projection:
    """A linear map as (weight, bias, transposed): ``nn.Linear`` stores (out, in), transformers' Conv1D (in, out)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool

    @staticmethod
    def of(module: Any) -> Projection | None:
        """The projection of an ``nn.Linear`` or ``Conv1D``; None for anything else (an adapter, a quantized layer)."""
        if type(module) is nn.Linear:
            return Projection(module.weight, module.bias, True)
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            return Projection(module.weight, module.bias, False)
        return None

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: decode.Norm | None = None,
        residual: torch.Tensor | None = None,
        gelu_tanh: bool = False,
        kernels: bool = True,
    ) -> torch.Tensor:
        return decode.linear(
            x, self.weight, self.bias, transposed=self.transposed, norm=norm, residual=residual, gelu_tanh=gelu_tanh,
            kernels=kernels,
        )  # fmt: skip
