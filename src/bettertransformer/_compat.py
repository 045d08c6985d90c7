"""The one place that knows which torch and transformers versions we support, and their differences."""

from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from packaging.version import Version

MIN_TORCH = Version("2.10")
MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS_MAJOR = 5

TORCH_VERSION = Version(torch.__version__.split("+")[0])
TRANSFORMERS_VERSION = Version(transformers.__version__)


def check_versions() -> None:
    """Raise ImportError with a clear message on an unsupported torch or transformers."""
    if TORCH_VERSION < MIN_TORCH:
        raise ImportError(f"bettertransformer needs torch >= {MIN_TORCH}, found {torch.__version__}")
    if not (MIN_TRANSFORMERS <= TRANSFORMERS_VERSION and TRANSFORMERS_VERSION.major == MAX_TRANSFORMERS_MAJOR):
        raise ImportError(
            f"bettertransformer supports transformers >= {MIN_TRANSFORMERS}, < {MAX_TRANSFORMERS_MAJOR + 1}; "
            f"found {transformers.__version__}"
        )


_collector: Any
try:  # transformers 5.x records output_hidden_states / output_attentions through hooks on the layers
    from transformers.utils.output_capturing import _active_collector as _collector
except ImportError:  # pragma: no cover - a release that moved it: rely on the explicit flags alone
    _collector = None


def output_capture_active() -> bool:
    """True while a transformers model up the call stack is recording per-layer outputs.

    Our packed encoder does not call the stock layer modules, so their capture hooks would not fire: such a call
    must run the stock computation.
    """
    if _collector is None:
        return False
    collected = _collector.get()
    return bool(collected)


def capturing(key: str) -> bool:
    """True while a transformers model up the call stack records ``key`` ("attentions", "hidden_states")."""
    if _collector is None:
        return False
    collected = _collector.get()
    return bool(collected) and key in collected


def register_attention(name: str, attention: Any, mask: Any) -> None:
    """Make ``name`` a valid ``attn_implementation``: its attention function and its mask function.

    A name with no mask function of its own would silently get ``attention_mask=None`` on padded batches.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def set_attention(model: Any, name: Any) -> bool:
    """Switch ``model`` (a PreTrainedModel) to attention implementation ``name``; False if the model cannot switch.

    Models whose layers do not read the attention interface (e.g. gptj before transformers 5.24) only warn and keep
    their implementation.
    """
    if model.config._attn_implementation == name:
        return True
    if not model._can_set_attn_implementation():
        return False
    model.config._attn_implementation = name
    return model.config._attn_implementation == name


@functools.cache
def repetition_penalty_skips_left_padding() -> bool:
    """Whether generate's repetition penalty ignores each row's left padding (newer 5.x; 5.17 counts the pad ids)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length=padding_lengths" in inspect.getsource(GenerationMixin._get_logits_processor)


def is_distributed_tensor(t: torch.Tensor) -> bool:
    """A DTensor (tensor parallelism, FSDP2 outside its forward): each process holds a shard, not the tensor."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch built without distributed
        return False
    return isinstance(t, DTensor)


def fsdp_module_type() -> type | None:
    """The class every module wrapped by FSDP2's ``fully_shard`` is an instance of (its parameters are gathered by
    hooks around each forward); None for a torch built without distributed."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch built without distributed
        return None
    return FSDPModule
