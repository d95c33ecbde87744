"""An example suite: what memgauge measures per test, and a limit that holds."""

import pytest


def build_index(n):
    return {f"key-{i}": i for i in range(n)}


def test_build_index():
    index = build_index(50_000)
    assert len(index) == 50_000


def test_temporary_buffer_is_freed():
    for _ in range(5):
        buffer = bytearray(8 * 2**20)
        del buffer


@pytest.mark.memlimit("16 MiB")
def test_within_its_limit():
    rows = [(i, str(i)) for i in range(20_000)]
    assert len(rows) == 20_000


@pytest.mark.parametrize("size_mib", [1, 4])
def test_parametrized(size_mib):
    data = bytes(size_mib * 2**20)
    assert len(data) == size_mib * 2**20
