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


def test_mimi_encoder_upcycles_through_the_cli(tmp_path, sparsify_cli):
    """The CLI path (a saved checkpoint, captured from its meta skeleton) of a codec whose every
    convolution pads by a size computed from its integer buffers."""
    import transformers

    import sparsify
    from sparsify.verify import compare
    from tests.coverage.registry import family
    from tests.coverage.tiny import tiny_config

    cls_name = family("mimi_encoder").class_name
    torch.manual_seed(0)
    dense = getattr(transformers, cls_name)(tiny_config("mimi_encoder", [cls_name])).eval()
    dense.save_pretrained(tmp_path / "dense")
    code, _, err = sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", "-o", tmp_path / "moe")
    assert code == 0, err
    c = compare(dense, sparsify.load(tmp_path / "moe"))
    assert c.max_abs <= 1e-5 * c.max_ref, (c.max_abs, c.max_ref)


def test_onnx_program_of_mimi_keeps_its_integer_buffers():
    """ONNX export traces the real model with torch.export, which fakes its buffers again: Mimi's
    paddings (its encoder's and decoder's, computed from them) must still be numbers there."""
    import transformers

    from sparsify.inputs import example_inputs_for
    from sparsify.onnx.export import _export_program
    from tests.coverage.tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.MimiModel(tiny_config("mimi", ["MimiModel"])).eval()
    kwargs = example_inputs_for(model)
    program = _export_program(model, kwargs, None)
    with torch.no_grad():
        got, want = program.module()(**kwargs), model(**kwargs)
    torch.testing.assert_close(got.audio_values, want.audio_values)


def test_dynamic_onnx_program_of_mimi_says_to_export_static():
    """With a dynamic audio length, Mimi's paddings are tensors computed from the length, which
    no trace can size: refused in one line that says what to do (the static export above works)."""
    import pytest
    import transformers
    from torch.export import Dim

    from sparsify.errors import CaptureError
    from sparsify.inputs import example_inputs_for
    from sparsify.onnx.export import _export_program
    from tests.coverage.tiny import tiny_config

    model = transformers.MimiModel(tiny_config("mimi", ["MimiModel"])).eval()
    kwargs = example_inputs_for(model)
    dynamic = {"input_values": {0: Dim("batch", min=1), 2: Dim("length", min=2000)}}
    with pytest.raises(CaptureError, match=r"export with static shapes \(--static"):
        _export_program(model, kwargs, dynamic)
