"""Kernel tests. Without a GPU the Triton kernels run in Triton's CPU interpreter; the root
conftest switches it on before any test module is collected."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (the CPU backend's expert-parallel path needs two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
