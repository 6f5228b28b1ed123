"""Kernel tests: without a GPU the Triton kernels run in Triton's CPU interpreter.

The interpreter must be switched on before any kernel is defined; the triton backend imports its
kernels on first use, which is after this file runs.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (the CPU backend's expert-parallel path needs two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
