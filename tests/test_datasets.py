"""IDX parsing, checksums and source resolution (datasets.py)."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from kmeans_dask import datasets
from kmeans_dask.errors import ChecksumError, IDXFormatError, SourceError

from conftest import raw_payload, write_gz


def idx_bytes(magic: int, dims, payload: bytes = None) -> bytes:
    head = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims)
    if payload is None:
        payload = bytes(int(np.prod(dims)))
    return head + payload


@pytest.mark.parametrize("name", sorted(datasets.DATASETS))
@pytest.mark.parametrize("split", datasets.SPLITS)
def test_real_files_match_published_checksums(shared_datasets, name, split):
    spec = datasets.get_spec(name)
    for kind, f in spec.files[split].items():
        header = datasets.decompress_idx(shared_datasets / name / f.name, kind, expected=f)
        assert header.shape[0] == f.n_items
        if kind == "images":
            assert header.shape[1:] == datasets.IMAGE_SHAPE


def test_bundled_test_splits_are_the_real_ones():
    for name, spec in datasets.DATASETS.items():
        for kind, f in spec.files["test"].items():
            datasets.decompress_idx(datasets.BUNDLED_DIR / name / f.name, kind, expected=f)


def test_parse_idx_bytes_reads_images_and_labels():
    pix = np.arange(2 * 784, dtype=np.uint8).reshape(2, 28, 28)
    got = datasets.parse_idx_bytes(idx_bytes(0x803, (2, 28, 28), pix.tobytes()), "images")
    np.testing.assert_array_equal(got, pix)
    labels = datasets.parse_idx_bytes(idx_bytes(0x801, (3,), b"\x01\x02\x09"), "labels")
    assert labels.tolist() == [1, 2, 9]


@pytest.mark.parametrize(
    "data, kind, message",
    [
        (idx_bytes(0x0803, (1, 28, 28))[:-1], "images", "x: truncated payload: header (1, 28, 28) needs 784 bytes, file holds 783"),
        (idx_bytes(0x0803, (1, 28, 28)) + b"\0\0", "images", "x: 2 trailing bytes after the payload of (1, 28, 28)"),
        (idx_bytes(0x0801, (2,), b"\0\0"), "images", "x: wrong magic number 0x00000801: 1 dimensions, expected 3 for images (0x00000803)"),
        (idx_bytes(0x0803, (1, 28, 28)), "labels", "x: wrong magic number 0x00000803: 3 dimensions, expected 1 for labels (0x00000801)"),
        (idx_bytes(0x0B03, (1, 28, 28)), "images", "x: wrong magic number 0x00000b03: type byte 0x0b is not 0x08 (unsigned byte); expected 0x00000803"),
        (idx_bytes(0x01000803, (1, 28, 28)), "images", "x: wrong magic number 0x01000803: expected 0x00000803 (IDX images); the first two bytes must be zero"),
        (idx_bytes(0x0803, (1, 32, 32)), "images", "x: wrong dimensions (1, 32, 32): expected (n, 28, 28) images"),
        (b"\0\0\x08", "labels", "x: truncated IDX header: 3 bytes, expected at least 4"),
        (b"\0\0\x08\x03\0\0", "images", "x: truncated IDX header: 6 bytes, expected 16"),
    ],
)
def test_malformed_idx_is_refused_with_exact_message(data, kind, message):
    with pytest.raises(IDXFormatError) as err:
        datasets.parse_idx_bytes(data, kind, name="x")
    assert str(err.value) == message


@pytest.mark.t10k
def test_corrupt_gzip_names_the_file(tmp_path, shared_datasets):
    good = (shared_datasets / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(good[:20] + bytes(b ^ 0xFF for b in good[20:60]) + good[60:])
    with pytest.raises(IDXFormatError, match=rf"^{bad}: corrupt gzip data"):
        datasets.decompress_idx(bad, "labels")


@pytest.mark.t10k
def test_truncated_gzip_names_the_file(tmp_path, shared_datasets):
    good = (shared_datasets / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(IDXFormatError, match=rf"^{bad}: corrupt gzip data: Compressed file ended"):
        datasets.decompress_idx(bad, "labels")


@pytest.mark.t10k
def test_checksum_mismatch_names_the_file(tmp_path, shared_datasets):
    spec = datasets.get_spec("mnist")
    f = spec.files["test"]["labels"]
    payload = bytearray(raw_payload(shared_datasets / "mnist" / f.name))
    payload[100] = (payload[100] + 1) % 10
    bad = write_gz(tmp_path / f.name, bytes(payload))
    with pytest.raises(ChecksumError) as err:
        datasets.decompress_idx(bad, "labels", expected=f)
    sha = hashlib.sha256(payload).hexdigest()
    assert str(err.value) == (
        f"{bad}: decompressed payload does not match the published {f.name}: SHA-256 {sha} "
        f"(10008 bytes), expected {f.raw_sha256} (10008 bytes)"
    )


@pytest.mark.t10k
def test_uncompressed_idx_is_accepted(tmp_path, shared_datasets):
    f = datasets.get_spec("mnist").files["test"]["labels"]
    raw = tmp_path / f.name[:-3]
    raw.write_bytes(raw_payload(shared_datasets / "mnist" / f.name))
    labels = datasets.read_idx(raw, "labels", expected=f)
    assert labels.shape == (10000,) and labels.max() == 9


# --------------------------------------------------------------------------- sources


def test_explicit_source_comes_first(shared_datasets):
    found = datasets.resolve("fashion-mnist", shared_datasets, download=False)
    assert set(found) == {"train", "test"}
    assert all(s.origin == "explicit" for s in found.values())
    assert found["train"].images == shared_datasets / "fashion-mnist" / "train-images-idx3-ubyte.gz"


def test_environment_variable_is_an_explicit_source(shared_datasets, monkeypatch):
    monkeypatch.setenv("KMEANS_DASK_DATA", str(shared_datasets))
    found = datasets.resolve("mnist", download=False)
    assert found["train"].origin == "explicit"


def test_bundled_test_split_when_nothing_else(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "DEBIAN_DIRS", {})
    found = datasets.resolve("fashion-mnist", download=False)
    assert list(found) == ["test"]
    assert found["test"].origin == "bundled"


@pytest.mark.t10k
def test_debian_location_before_bundled(monkeypatch, tmp_path, shared_datasets):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    debian.mkdir()
    for f in datasets.get_spec("fashion-mnist").files["test"].values():
        (debian / f.name).symlink_to(shared_datasets / "fashion-mnist" / f.name)
    monkeypatch.setattr(datasets, "DEBIAN_DIRS", {"fashion-mnist": debian})
    found = datasets.resolve_split("fashion-mnist", "test", download=False)
    assert found.origin == "debian" and found.images.parent == debian


def test_cached_files_are_a_source(tmp_path, shared_datasets):
    cache = tmp_path / "cache"
    for f in datasets.get_spec("mnist").files["train"].values():
        dest = cache / "mnist" / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(shared_datasets / "mnist" / f.name)
    found = datasets.resolve_split("mnist", "train", download=False, cache_dir=cache)
    assert found.origin == "cache"


@pytest.mark.t10k
def test_half_a_split_is_an_error(tmp_path, shared_datasets):
    d = tmp_path / "mnist"
    d.mkdir()
    (d / "t10k-images-idx3-ubyte.gz").symlink_to(shared_datasets / "mnist" / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(SourceError) as err:
        datasets.resolve_split("mnist", "test", tmp_path, download=False)
    assert str(err.value) == f"{d}: holds only part of the mnist test split: missing t10k-labels-idx1-ubyte.gz"


def test_missing_source_directory_is_an_error(tmp_path):
    with pytest.raises(SourceError, match=r"nowhere: data source directory does not exist"):
        datasets.resolve("mnist", tmp_path / "nowhere", download=False)


def test_unknown_dataset():
    with pytest.raises(SourceError, match=r"unknown data set 'cifar'"):
        datasets.get_spec("cifar")
