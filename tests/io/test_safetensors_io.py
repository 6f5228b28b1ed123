"""The safetensors writer and reader on tensors of every rank, 0-d ones included (BatchNorm's
num_batches_tracked, which the coverage sweep found CvT's upcycle crashing on)."""

import pytest
import torch
from safetensors.torch import load_file

from sparsify.io.safetensors_io import OutputTensor, SafetensorsFile, write_shards

TENSORS = {
    "scalar_long": torch.tensor(7, dtype=torch.int64),
    "scalar_half": torch.tensor(1.5, dtype=torch.float16),
    "vector": torch.arange(5, dtype=torch.float32),
    "matrix": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
    "empty": torch.zeros(0, 3),
}


@pytest.mark.parametrize("shard_size", ["1KB", "5GB"])
def test_round_trip_of_every_rank(tmp_path, shard_size):
    outs = [OutputTensor(k, t.dtype, tuple(t.shape), lambda t=t: [t]) for k, t in TENSORS.items()]
    weight_map = write_shards(tmp_path, outs, shard_size)
    for name, t in TENSORS.items():
        path = tmp_path / weight_map[name]
        assert torch.equal(load_file(path)[name], t)  # the safetensors library reads what we wrote
        assert torch.equal(SafetensorsFile(path).read(name), t)  # and so does our reader
