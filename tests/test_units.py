"""Sizes and counts as the CLI prints them."""

import pytest

from sparsify.units import format_bytes, format_count


@pytest.mark.parametrize("n,text", [(3, "3 B"), (3400, "3.40 KB"), (3.4e6, "3.40 MB"), (7.91e9, "7.91 GB"),
                                    (8.5e12, "8.50 TB"), (0, "0 B")])
def test_bytes_print_in_their_own_unit(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("n,text", [(999, "999"), (560123, "560K"), (1234567, "1.23M"), (7.24e9, "7.24B")])
def test_counts_print_in_their_own_unit(n, text):
    assert format_count(n) == text
