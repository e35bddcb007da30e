"""Property: the IDX parser fails only with IDXFormatError, and what it returns matches the header."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmeans_dask import datasets
from kmeans_dask.errors import IDXFormatError


def _valid(kind: str, n: int) -> bytes:
    if kind == "images":
        head = struct.pack(">IIII", 0x803, n, 28, 28)
        return head + bytes(range(256)) * (n * 784 // 256) + bytes(n * 784 % 256)
    return struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))


@st.composite
def mutated_idx(draw):
    kind = draw(st.sampled_from(["images", "labels"]))
    data = bytearray(_valid(kind, draw(st.integers(0, 3))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "extend", "header"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(max_size=40))
        elif op == "header" and len(data) >= 8:
            i = draw(st.integers(0, min(len(data), 16) - 4))
            data[i:i + 4] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return kind, bytes(data)


def _check(kind: str, data: bytes) -> None:
    try:
        arr = datasets.parse_idx_bytes(data, kind, name="fuzz")
    except IDXFormatError as exc:
        assert str(exc).startswith("fuzz: ")
        return
    ndim = 3 if kind == "images" else 1
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    assert data[:4] == struct.pack(">I", 0x800 | ndim)
    assert arr.shape == dims and arr.dtype == np.uint8
    assert arr.tobytes() == data[4 + 4 * ndim:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_idx())
def test_mutated_files_never_crash_or_lie(case):
    _check(*case)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["images", "labels"]), st.binary(max_size=64))
def test_random_bytes_never_crash_or_lie(kind, data):
    _check(kind, data)
