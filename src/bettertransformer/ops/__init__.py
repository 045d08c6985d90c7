"""Tensor operations with no knowledge of transformers: packing, packed attention, fused layer pieces."""
