"""Capture of modules whose forward sizes tensors from small integer buffers.

Audio codecs (Mimi, EnCodec, WavTokenizer) keep a convolution's stride, kernel size and total
padding as integer buffers and compute the padding of every call from them. Faked without their
values, those sizes became unbacked symbols (a data-dependent guard) and, propagated for real,
absurd numbers; capture keeps such buffers' values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify.capture import capture
from sparsify.io.skeleton import params_on_meta


class PaddedConv(nn.Module):
    """A strided convolution padded so that its frames cover the whole input (EnCodec's rule),
    its padding computed from integer buffers as Mimi's convolutions do."""

    def __init__(self, channels: int = 4, kernel: int = 5, stride: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, stride)
        self.stride = nn.Buffer(torch.tensor(stride, dtype=torch.int64), persistent=False)
        self.kernel_size = nn.Buffer(torch.tensor(kernel, dtype=torch.int64), persistent=False)
        self.padding_total = nn.Buffer(self.kernel_size - self.stride, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        frames = torch.ceil((length - self.kernel_size + self.padding_total) / self.stride + 1).to(torch.int64) - 1
        extra = frames * self.stride + self.kernel_size - self.padding_total - length
        return self.conv(F.pad(x, (self.padding_total, extra)))


class Codec(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = PaddedConv()
        self.ffn = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.down(x).transpose(1, 2))


def _output_shape(captured) -> tuple[int, ...]:
    (out,) = [n for n in captured.graph.nodes if n.op == "output"][0].args[0]
    return tuple(out.meta["val"].shape)


def _expected_frames(length: int, kernel: int = 5, stride: int = 3) -> int:
    frames = math.ceil((length - kernel + (kernel - stride)) / stride + 1) - 1
    padded = frames * stride + kernel
    return (padded - kernel) // stride + 1


def test_padding_from_integer_buffers_captures_from_a_real_model():
    model = Codec().eval()
    x = torch.randn(2, 4, 50)
    captured = capture(model, (x,))
    assert _output_shape(captured) == tuple(model(x).shape) == (2, _expected_frames(50), 4)
    # the buffers are still the model's buffers (inputs of the graph), with their values
    buffers = {captured.param_name(n) for n in captured.graph.nodes if n.op == "placeholder"}
    assert {"down.stride", "down.kernel_size", "down.padding_total"} <= buffers
    assert model.down.padding_total.item() == 2 and model.down.stride.item() == 3


def test_padding_from_integer_buffers_captures_from_a_meta_skeleton():
    with params_on_meta():
        model = Codec().eval()
    assert model.down.conv.weight.device.type == "meta" and model.down.stride.device.type == "cpu"
    captured = capture(model, (torch.zeros(2, 4, 61),))
    assert _output_shape(captured) == (2, _expected_frames(61), 4)


def test_large_integer_buffers_stay_symbolic_inputs():
    """Only a few integers are kept as constants: a long integer table (position ids) still
    enters the graph as a buffer whose values the graph does not bake in."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(128, 4)
            self.position_ids = nn.Buffer(torch.arange(128).unsqueeze(0), persistent=False)

        def forward(self, x):
            return x + self.embed(self.position_ids[:, : x.shape[1]])

    captured = capture(Positions().eval(), (torch.zeros(2, 10, 4),))
    names = {captured.param_name(n) for n in captured.graph.nodes if n.op == "placeholder"}
    assert "position_ids" in names
    assert not any(n.op == "get_attr" for n in captured.graph.nodes)
