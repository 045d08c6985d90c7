"""bettertransformer: make a transformers model faster with one line, and undo it with one line.

    from bettertransformer import BetterTransformer
    model = BetterTransformer.transform(model)
    ...
    model = BetterTransformer.reverse(model)
"""

from ._compat import check_versions

check_versions()

from .adapters.encoder import EncoderLayout  # noqa: E402
from .registry import Support, register, supported_model_types  # noqa: E402
from .transform import BetterTransformer, call_counts, is_transformed, reverse, transform  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BetterTransformer",
    "EncoderLayout",
    "Support",
    "call_counts",
    "is_transformed",
    "register",
    "reverse",
    "supported_model_types",
    "transform",
]
