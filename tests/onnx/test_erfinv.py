"""erfinv has no ONNX operator; sparsify's translation (Giles' polynomials and one Newton step
on Erf) must agree with torch's erfinv, computed in float64, over the whole open interval and
give +-inf at +-1, run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from sparsify.onnx.torch_op import TRANSLATIONS


class Quantile(torch.nn.Module):
    def forward(self, x):
        return torch.erfinv(x) * 2.0


def test_erfinv_translation_matches_torch_in_onnx_runtime(tmp_path):
    edges = 1 - torch.logspace(-7, -1, 50)
    x = torch.cat([torch.linspace(-0.999, 0.999, 4001), edges, -edges, torch.tensor([-1.0, 1.0, 0.0])])
    program = torch.onnx.export(Quantile(), (x,), dynamo=True, custom_translation_table=TRANSLATIONS, verbose=False)
    assert "Erf" in {n.op_type for n in program.model.graph}  # the translation, not a decomposition
    program.save(str(tmp_path / "q.onnx"))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    want = (torch.erfinv(x.double()) * 2).numpy()
    finite = np.isfinite(want)
    assert np.array_equal(got[~finite], want[~finite]) and (~finite).sum() == 2
    rel = np.abs(got[finite] - want[finite]) / np.maximum(np.abs(want[finite]), 1e-30)
    assert rel.max() < 1e-6, rel.max()
