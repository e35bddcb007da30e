"""Shared fixtures: the real data sets in ../shared/datasets and stores ingested from them."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from kmeans_dask import datasets, store

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KMEANS_DASK_SHARED", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real MNIST and Fashion-MNIST IDX files (read-only)."""
    if not (SHARED / "mnist").is_dir() or not (SHARED / "fashion-mnist").is_dir():
        pytest.fail(f"the real data sets are expected in {SHARED} (set KMEANS_DASK_SHARED)")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_sources(monkeypatch, tmp_path_factory):
    """No test reads the user's cache or environment, and none reaches the network."""
    monkeypatch.delenv("KMEANS_DASK_DATA", raising=False)
    monkeypatch.setenv("KMEANS_DASK_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def data_root(shared_datasets, tmp_path_factory) -> Path:
    """Both data sets, every split, ingested once per session (chunks of 10,000 rows)."""
    out = tmp_path_factory.mktemp("stores")
    for name in datasets.DATASETS:
        sources = datasets.resolve(name, shared_datasets, download=False)
        store.ingest(name, out, sources)
    return out


@pytest.fixture(scope="session")
def fashion_store(data_root) -> Path:
    return data_root / "fashion-mnist.zarr"


@pytest.fixture(scope="session")
def mnist_store(data_root) -> Path:
    return data_root / "mnist.zarr"


def raw_payload(path: Path) -> bytes:
    with gzip.open(path, "rb") as fh:
        return fh.read()


def write_gz(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(payload)
    return path


def leftovers(directory: Path) -> list[str]:
    """Everything in ``directory``: an aborted write must leave it empty."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="session")
def fashion_rows(fashion_store):
    """All 70,000 Fashion-MNIST images (train then test) as one uint8 Dask array."""
    import dask.array as da

    parts = [store.open_data(fashion_store, s).images for s in ("train", "test")]
    return da.concatenate(parts)


@pytest.fixture(scope="session")
def fashion_float(fashion_rows):
    """The same rows as float64 in [0, 1], in memory, for scikit-learn."""
    return fashion_rows.compute() / 255.0
