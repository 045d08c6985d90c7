"""bettertransformer: make a transformers model faster with one line, and undo it with one line.

    from bettertransformer import BetterTransformer
    model = BetterTransformer.transform(model)
    ...
    model = BetterTransformer.reverse(model)

The public names load on first use, so that ``bettertransformer.ops`` (pure tensor code) imports without
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "BetterTransformer": "api",
    "transform": "api",
    "reverse": "api",
    "is_transformed": "api",
    "call_counts": "api",
    "cache_info": "api",
    "register": "registry",
    "supported_model_types": "registry",
    "Support": "registry",
    "EncoderLayout": "adapters.encoder",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bettertransformer' has no attribute {name!r}")
    from ._compat import check_versions

    check_versions()
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
