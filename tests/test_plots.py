"""Pictures are valid PNGs of the expected size and layout (plots.py)."""

from __future__ import annotations

import stat

import numpy as np
import pytest
from PIL import Image

from kmeans_dask import plots, store


def png_size(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("k, layout", [(10, (2, 5)), (36, (6, 6)), (16, (4, 4)), (7, (2, 4)),
                                       (256, (16, 16)), (400, (20, 20)), (3, (1, 3))])
def test_grid_shape(k, layout):
    assert plots.grid_shape(k) == layout


@pytest.mark.parametrize("k, rows, cols", [(10, 2, 5), (36, 6, 6)])
def test_centroid_grid_layout(tmp_path, k, rows, cols):
    rng = np.random.default_rng(0)
    path = plots.centroid_grid(rng.random((k, 784)), tmp_path / "c.png",
                               titles=[f"c{j}" for j in range(k)])
    assert png_size(path) == (cols * 120, rows * 145)
    titled = plots.centroid_grid(rng.random((k, 784)), tmp_path / "t.png", title="x")
    assert png_size(titled) == (cols * 120, rows * 145 + 40)


def test_other_pictures(tmp_path):
    rng = np.random.default_rng(1)
    conf = plots.confusion_matrix(rng.integers(0, 50, (10, 10)), [str(i) for i in range(10)],
                                  tmp_path / "conf.png")
    assert png_size(conf) == (800, 520)
    strips = plots.member_strips([rng.random((10, 784))] * 3 + [np.empty((0, 784))],
                                 tmp_path / "m.png")
    assert png_size(strips) == (700, 290)
    rows = [{"k": k, "train_inertia": 100.0 / k, "n_train": 10, "test_inertia": 20.0 / k,
             "n_test": 2, "accuracy": 0.5, "nmi": 0.4, "homogeneity": 0.3} for k in (2, 4, 8)]
    assert png_size(plots.elbow(rows, tmp_path / "e.png")) == (1100, 420)
    X = rng.random((20, 2))
    b = plots.blobs(X, np.repeat([0, 1], 10), X[:2], np.repeat([1, 0], 10), X[2:4], tmp_path / "b.png")
    assert png_size(b) == (1000, 460)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "conf.png", "e.png", "m.png"]
    assert stat.S_IMODE(b.stat().st_mode) == store.file_mode()  # not mkstemp's 0600


def test_no_images():
    with pytest.raises(ValueError, match="at least one image"):
        plots.grid_shape(0)


def test_large_k_pictures_stay_bounded(tmp_path):
    rng = np.random.default_rng(2)
    conf = plots.confusion_matrix(rng.integers(0, 50, (400, 10)), [str(i) for i in range(10)],
                                  tmp_path / "conf.png")
    assert png_size(conf) == (800, 1480)
    strips = plots.member_strips([rng.random((3, 784))] * 256, tmp_path / "m.png",
                                 titles=[str(j) for j in range(256)])
    assert png_size(strips) == (700, 2630)
