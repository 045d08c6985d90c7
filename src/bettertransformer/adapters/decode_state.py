"""The state a one-token decode step runs against: static key/value buffers and the loop's step buffers.

A generate runner (``generation.py``) owns one ``DecodeState`` and passes it down: to a fused decode step as an
argument, or, when the model's own forward runs the step, through ``call_state.decoding`` to our attention
function, which calls ``DecodeState.attend`` from inside each attention module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from torch.nn.attention import sdpa_kernel

from ..ops.attention import REPEATABLE_SDPA, attention
from ..ops.step_buffers import StepBuffers


class DecodeUnsupported(NotImplementedError):
    """A decode step met something the static buffers cannot serve (the runner then lets stock generate run).

    ``this_call``: only this call's shape is out of reach (FSMT's positions past its table), not the model: later
    calls try the fast loop again."""

    def __init__(self, reason: str, this_call: bool = False):
        super().__init__(reason)
        self.this_call = this_call


def layer_index(module: Any) -> int:
    """The layer index of an attention module (``layer_idx``, GPT-Neo's ``layer_id``): it picks the module's
    key/value buffer."""
    for name in ("layer_idx", "layer_id"):
        index = getattr(module, name, None)
        if isinstance(index, int):
            return index
    raise DecodeUnsupported(f"{type(module).__name__} carries no layer index (layer_idx)")


def is_cross_attention(module: Any) -> bool:
    """Whether an attention module attends to an encoder's states rather than to its own sequence (FSMT's
    modules say so as ``encoder_decoder_attention``)."""
    return bool(getattr(module, "is_cross_attention", False) or getattr(module, "encoder_decoder_attention", False))


@dataclass
class DecodeState:
    """Static buffers of one runner.

    kv:         self-attention keys then values, one buffer per layer index: (2, B, Hkv, S, D).
    buffers:    the loop's step buffers; a step reads ``slot`` (where this token's key/value go), ``valid`` and
                ``mask`` (which slots it may see).
    cross_kv:   an encoder-decoder's cross-attention keys/values per layer index, (2, B, Hkv, S_encoder, D), written
                once per call by its prefill; the decoder's cross-attention modules receive ``cross_kv[i][0]`` and
                ``[1]`` themselves as their keys and values (``seq2seq_generation``). Empty for decoder-only models.
    cross_mask: (B, 1, 1, S_encoder) additive mask of the encoder positions (0 real, -inf padding).
    self_bias:  (state) -> (1, H, 1, S) additive bias of the current token's self-attention over the slots (T5's
                relative positions), computed once per step; None: none.
    attended:   attention calls this step (a check that every attention module of the model went through ``attend``).
    held:       tensors of the model a step reads that the model may replace later (FSMT's position table, which
                its stock forward grows), by module id: held as long as the runner, so that a captured step never
                reads freed memory.
    """

    kv: list[torch.Tensor]
    buffers: StepBuffers
    cross_kv: dict[int, torch.Tensor] = field(default_factory=dict)
    cross_mask: torch.Tensor | None = None
    self_bias: Callable[[DecodeState], torch.Tensor] | None = None
    attended: int = 0
    held: dict[int, torch.Tensor] = field(default_factory=dict)
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict)  # per step: masks by (window, dtype)

    @property
    def slot(self) -> torch.Tensor:
        return self.buffers.slot

    @property
    def mask(self) -> torch.Tensor:
        return self.buffers.mask

    def rows(self, batch: int) -> DecodeState:
        """The same state seen by the first ``batch`` rows (views: the runner's batch is a bucket)."""
        cross_mask = self.cross_mask[:batch] if self.cross_mask is not None else None
        cross_kv = {i: kv[:, :batch] for i, kv in self.cross_kv.items()}
        return DecodeState([kv[:, :batch] for kv in self.kv], self.buffers, cross_kv, cross_mask, self.self_bias)

    @property
    def nbytes(self) -> int:
        tensors = [*self.kv, *self.cross_kv.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + self.buffers.nbytes

    def begin_step(self) -> None:
        """Forget the masks of the previous step (a new slot became visible)."""
        self._masks.clear()
        self.attended = 0

    def additive_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, S): 0 for the keys the current token sees, -inf elsewhere; built once per step.

        A sliding window counts slots, as transformers' caches do (padding slots included)."""
        mask = self.buffers.mask
        if window is None and dtype == mask.dtype and self.self_bias is None:
            return mask[:, None, None, :]
        key = (window, dtype)
        if key not in self._masks and window is None and self.self_bias is not None:
            self._masks[key] = (mask[:, None, None, :] + self.self_bias(self)).to(dtype)  # (B, H, 1, S)
        if key not in self._masks:
            allowed = self.buffers.valid
            if window is not None:
                slots = torch.arange(allowed.shape[1], device=allowed.device)
                allowed = allowed & (slots > self.buffers.slot - window)
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            self._masks[key] = torch.where(allowed, zero, float("-inf"))[:, None, None, :]
        return self._masks[key]

    def attend(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        window: int | None,
        softcap: float | None,
        alibi_slopes: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write this token's key/value (B, Hkv, 1, D) into the buffer of ``module``'s layer; attend (B, H, 1, D)
        over that buffer.

        ALiBi (``alibi_slopes``, (H,)) adds slope * (key slot - current slot), relative so it stays small for the
        keys that matter (the stock absolute form differs by a per-row constant, which softmax ignores). ``bias``
        (B, H, 1, S): an additive bias over the slots that depends on the token (ProphetNet's relative positions).

        An encoder-decoder's cross-attention module passes the static buffers ``cross_kv`` as its keys and values:
        it attends over them with ``cross_mask`` and writes nothing."""
        self.attended += 1
        index = layer_index(module)
        cross = self.cross_kv.get(index)
        if cross is not None and key.data_ptr() == cross.data_ptr():  # cross-attention, on its static buffers
            assert self.cross_mask is not None
            return attention(query, key, value, self.cross_mask.to(query.dtype), scale=scale, softcap=softcap)
        if is_cross_attention(module) or cross is not None and key.shape[2] != 1:
            raise DecodeUnsupported(f"cross-attention in {type(module).__name__} without its static buffers")
        if index >= len(self.kv) or key.shape[2] != 1:
            raise DecodeUnsupported(f"an attention call the decode buffers do not describe (layer {index})")
        kv = self.kv[index]
        slot = self.buffers.slot
        kv[0].index_copy_(2, slot, key.to(kv.dtype))
        kv[1].index_copy_(2, slot, value.to(kv.dtype))
        mask = self.additive_mask(window, query.dtype)
        batch, heads, _, dim = query.shape
        if alibi_slopes is not None:
            slots = torch.arange(mask.shape[-1], device=mask.device, dtype=torch.float32)
            relative = alibi_slopes.float()[None, :, None, None] * (slots - slot.float())  # (1, H, 1, S)
            mask = (mask + relative).to(query.dtype)  # (B, H, 1, S)
        if bias is not None:
            mask = mask + bias.to(query.dtype)  # (B, H, 1, S)
        with sdpa_kernel(REPEATABLE_SDPA):  # as the fused steps' attention: repeatable from call to call
            if mask.shape[1] != 1:  # a bias per head (ALiBi, T5's and ProphetNet's relative positions)
                return attention(query, kv[0], kv[1], mask, scale=scale, softcap=softcap)
            kv_heads = kv.shape[2]
            # Grouped-query heads of one key/value head become the query rows of one attention call (no repeated
            # keys).
            grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
            out = attention(grouped, kv[0], kv[1], mask, scale=scale, softcap=softcap)
        return out.reshape(batch, heads, 1, dim)

    def attend_beside(
        self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attend (B, H, 1, D) over the slots of ``module``'s layer (this step's key already written by ``attend``)
        and one more key/value (B, H, 1, D) of the query's own, which goes into no buffer: ProphetNet's predict
        stream, which sees the main stream's keys and its own. ``bias`` (B, H, 1, S + 1): additive, over the slots
        then that key. The softmax in fp32, as ProphetNet's; no copy of the buffers (the extra key's score is
        computed beside them)."""
        kv = self.kv[layer_index(module)]
        slots = kv.shape[3]
        mask = self.additive_mask(None, torch.float32)  # (B, 1, 1, S)
        scores = torch.matmul(query, kv[0].transpose(-1, -2).to(query.dtype)).float() * scale  # (B, H, 1, S)
        own = (query * key).sum(-1, keepdim=True).float() * scale  # (B, H, 1, 1)
        logits = torch.cat([scores + mask, own], dim=-1) + bias.float()  # (B, H, 1, S + 1)
        weights = torch.softmax(logits, dim=-1).to(value.dtype)
        return torch.matmul(weights[..., :slots], kv[1].to(value.dtype)) + weights[..., slots:] * value
