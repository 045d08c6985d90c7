"""Fused decode steps, one file per model family (``gpt2.py``, ``llama.py``), each named by one registry field.

``base.DecodeStep`` is what a family's step provides; ``README.md``'s "Adding an architecture" walks through adding
one.
"""

from .base import DecodeStep, Packing, Projection, pack_prompts
from .gpt2 import GPT2DecodeStep, GPT2Layout
from .llama import (
    Gemma2DecodeStep,
    Glm4DecodeStep,
    GlmDecodeStep,
    GraniteDecodeStep,
    HeliumDecodeStep,
    LlamaDecodeStep,
    LlamaLayout,
    MistralDecodeStep,
    Olmo2DecodeStep,
    Phi3DecodeStep,
    Starcoder2DecodeStep,
)

__all__ = [
    "DecodeStep", "GPT2DecodeStep", "GPT2Layout", "Gemma2DecodeStep", "Glm4DecodeStep", "GlmDecodeStep",
    "GraniteDecodeStep", "HeliumDecodeStep", "LlamaDecodeStep", "LlamaLayout",
    "MistralDecodeStep", "Olmo2DecodeStep", "Packing", "Phi3DecodeStep", "Projection", "Starcoder2DecodeStep",
    "pack_prompts",
]  # fmt: skip
