"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch

from bettertransformer.switches import SWITCHES


@pytest.fixture
def fast_loop_on_cpu(monkeypatch):
    """Run generate's static-cache loop on the CPU (eagerly; CUDA replays it as a graph)."""
    monkeypatch.setattr(SWITCHES, "generate_devices", frozenset({"cuda", "cpu"}))


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full precision on the GPU, so fp32 comparisons with the stock model are meaningful."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
