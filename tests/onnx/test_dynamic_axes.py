"""Dynamic axes of an ONNX export: an axis the model fixes (xLSTM's and CPM-Ant's sequence) is
refused in one line naming it, instead of failing with torch.export's report."""

import pytest
import torch
import torch.nn as nn

from sparsify.errors import CaptureError
from sparsify.onnx.export import capture_onnx

D = torch.export.Dim.DYNAMIC


class FixedLength(nn.Module):
    """Reshapes its input into two halves of 3: the length must be 6."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.reshape(x.shape[0], 2, 3))


def test_axis_the_model_fixes_is_refused_by_name():
    with pytest.raises(CaptureError, match=r"fixes the size of x axis 1.*static"):
        capture_onnx(FixedLength().eval(), dict(x=torch.randn(2, 6)), dict(x={0: D, 1: D}))
