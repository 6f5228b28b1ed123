"""Forms of computation that the ONNX export must keep as torch computes them, each run in ONNX
Runtime on real inputs and compared with torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sparsify.onnx.export import capture_onnx, lower_onnx


def _run(model, path, feeds):
    import onnx_ir as ir

    ir.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: v for i, v in zip(session.get_inputs(), feeds)})[0]


class PostNorm(torch.nn.Module):
    """An RMSNorm with an eps of 1e-8 (MuseGlimmer's post-norms) after a scale by (1 + 1e-6)."""

    def forward(self, x):
        x = x * (1 + 1e-6)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8) - 5e-9


def test_near_identity_scalars_survive_the_optimizer(tmp_path):
    # rows whose mean square is near eps: an eps dropped as "x + 0" changes them by far more than 1e-4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g) * torch.logspace(-6, -3, 5).view(1, 5, 1)
    d = torch.export.Dim.DYNAMIC
    model = capture_onnx(PostNorm(), {"x": x}, {"x": {0: d, 1: d}})
    lower_onnx(model, "standard")
    other = torch.randn(3, 7, 16, generator=g) * torch.logspace(-6, -3, 7).view(1, 7, 1)
    got = _run(model, tmp_path / "norm.onnx", [other.numpy()])
    want = PostNorm()(other.double()).numpy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel


class PoolUpsample(torch.nn.Module):
    """SEW's shape: pool pairs of frames, upsample, and pad back a frame lost to an odd length."""

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
        up = pooled.repeat_interleave(2, dim=1)
        if up.shape[1] < x.shape[1]:
            up = torch.nn.functional.pad(up, (0, 0, 0, x.shape[1] - up.shape[1]))
        return up.mean(dim=1)


def test_a_graph_that_holds_only_at_some_sizes_is_refused_as_dynamic():
    from sparsify.errors import CaptureError

    d = torch.export.Dim.DYNAMIC
    even, odd = torch.randn(2, 8, 4), torch.randn(3, 9, 4)
    with pytest.raises(CaptureError, match=r"export with static shapes \(--static"):
        capture_onnx(PoolUpsample(), {"x": even}, {"x": {0: d, 1: d}}, others=[{"x": odd}])
    # traced at the odd length, it is as wrong at even ones
    with pytest.raises(CaptureError, match="holds only for some input sizes"):
        capture_onnx(PoolUpsample(), {"x": odd}, {"x": {0: d, 1: d}}, others=[{"x": even}])


def test_a_graph_without_size_branches_exports_dynamic_and_holds_at_other_sizes(tmp_path):
    d = torch.export.Dim.DYNAMIC
    x, other = torch.randn(2, 8, 16), torch.randn(3, 9, 16)
    model = capture_onnx(PostNorm(), {"x": x}, {"x": {0: d, 1: d}}, others=[{"x": other}, {"x": torch.randn(3, 10, 16)}])
    lower_onnx(model, "standard")
    got = _run(model, tmp_path / "norm.onnx", [other.numpy()])
    assert np.abs(got - PostNorm()(other).numpy()).max() < 1e-5


class Histogram(torch.nn.Module):
    def __init__(self, bins, low, high):
        super().__init__()
        self.bins, self.low, self.high = bins, low, high

    def forward(self, x):
        return torch.histc(x, bins=self.bins, min=self.low, max=self.high)


@pytest.mark.parametrize("bins, low, high", [(1, 0, 0), (4, 0, 0), (7, -1.5, 2.0), (4, 0, 3)])
def test_histc_translation_matches_torch_in_onnx_runtime(tmp_path, bins, low, high):
    # (4, 0, 3): transformers' grouped-matmul experts count tokens per expert id (float) so;
    # (1, 0, 0): the same with one expert, where the range comes from the data
    from sparsify.onnx.torch_op import TRANSLATIONS

    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(50, generator=g) * 2, torch.randint(0, 4, (6, 5), generator=g).float(), torch.zeros(9),
             torch.tensor([-1.5, 2.0, 0.25, 3.0, -2.0, float("nan")])]
    d = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(Histogram(bins, low, high).eval(), (torch.randn(8, 3),), dynamic_shapes=({0: d, 1: d},),
                                dynamo=True, custom_translation_table=TRANSLATIONS, verbose=False)
    program.save(str(tmp_path / "h.onnx"))
    session = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    for x in cases:
        if low == high and torch.isnan(x).any():
            continue  # torch refuses a data range with NaNs
        x = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        want = torch.histc(x, bins=bins, min=low, max=high).numpy()
        assert np.array_equal(got, want), (x, got, want)


def test_native_experts_of_transformers_export_and_match_torch(tmp_path):
    # HunYuan-MoE keeps its own experts block (4 experts, top 2 here); its default grouped_mm
    # implementation calls a custom op with no ONNX translation, so the export switches it
    from transformers import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

    from sparsify.onnx.export import export_onnx

    config = HunYuanMoEV1Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                num_local_experts=4, moe_topk=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = HunYuanMoEV1ForCausalLM(config).eval()
    assert model.config._experts_implementation == "grouped_mm"
    export_onnx(model, tmp_path / "m.onnx", target="standard")
    assert model.config._experts_implementation == "grouped_mm"  # restored
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


class Positions(torch.nn.Module):
    """Absolute positions from a table of 8: the traced graph declares sequences of at most 8."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(8, 4)
        self.register_buffer("ids", torch.arange(8))

    def forward(self, x):
        return x + self.table(self.ids[: x.shape[1]])


def test_an_example_at_the_models_size_limit_still_exports_dynamic():
    d = torch.export.Dim.DYNAMIC
    # sizes past the limit lie outside the program's declared range: not a branch to refuse
    capture_onnx(Positions().eval(), {"x": torch.randn(2, 8, 4)}, {"x": {0: d, 1: d}},
                 others=[{"x": torch.randn(3, 9, 4)}, {"x": torch.randn(3, 10, 4)}])
