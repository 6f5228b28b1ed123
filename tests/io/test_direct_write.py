"""The output file writers produce exactly the bytes given, whatever the chunking."""

import os
import random

import pytest

from sparsify.io import direct_write
from sparsify.io.direct_write import open_output


def _chunks(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 7, 4095, 4096, 4097, 1 << 20, (32 << 20) - 3, (32 << 20) + 5]) for _ in range(12)]
    return [os.urandom(n) for n in sizes]


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("seed", [0, 1])
def test_written_bytes_are_exact(tmp_path, direct, seed):
    chunks = _chunks(seed)
    f = open_output(tmp_path / "x.bin", direct=direct)
    assert isinstance(f, direct_write._DirectFile) == direct  # /tmp allows O_DIRECT here
    for c in chunks:
        f.write(memoryview(c))
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(chunks)


def test_empty_file(tmp_path):
    f = open_output(tmp_path / "e.bin")
    f.close()
    assert (tmp_path / "e.bin").read_bytes() == b""
