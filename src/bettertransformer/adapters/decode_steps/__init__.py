"""Fused decode steps, one file per model family (``gpt2.py``), each named by one registry field.

``base.DecodeStep`` is what a family's step provides; ``README.md``'s "Adding an architecture" walks through adding
one.
"""

from .base import DecodeStep, Packing, Projection, pack_prompts
from .gpt2 import GPT2DecodeStep, GPT2Layout

__all__ = ["DecodeStep", "GPT2DecodeStep", "GPT2Layout", "Packing", "Projection", "pack_prompts"]
