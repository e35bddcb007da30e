"""Classifying a user's images (kmeans_dask/classify.py, jobs/classify.py)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kmeans_dask import classify, datasets, store, workflows
from kmeans_dask.errors import ImageError

JOB = Path(__file__).resolve().parents[1] / "jobs" / "classify.py"
N_IMAGES = 3000
# A seeded sample of the test split (its first rows are easier than the rest).
ROWS = np.sort(np.random.default_rng(0).choice(10_000, N_IMAGES, replace=False))


@pytest.fixture(scope="module")
def mnist_result(test_sources, tmp_path_factory):
    """K = 32 fitted on MNIST's 10,000 real test digits (no cluster: in this process)."""
    root = tmp_path_factory.mktemp("classify")
    sources = {"test": datasets.resolve_split("mnist", "test", test_sources, download=False)}
    data = store.open_data(store.ingest("mnist", root, sources).path, "test")
    params = {"algorithm": "lloyd", "n_clusters": 32, "random_state": 0, "init": "k-means||",
              "max_iter": 300, "tol": 1e-4, "n_init": "auto"}
    model, path = workflows.fit_store(data, root / "mnist-k32.zarr", params, with_report=False)
    return model, path, data


@pytest.fixture(scope="module")
def digit_pngs(mnist_result, tmp_path_factory):
    """Test digits as black-on-white 280 x 280 PNGs, as a user would draw them."""
    _, _, data = mnist_result
    out = tmp_path_factory.mktemp("digits")
    images = np.asarray(data.images.compute())[ROWS].reshape(-1, 28, 28)
    for i, img in enumerate(images):
        Image.fromarray(255 - img).resize((280, 280), Image.Resampling.BILINEAR).save(
            out / f"{i:04d}.png")
    return out


def test_drawn_digits_classify_as_the_test_split_does(mnist_result, digit_pngs):
    model, path, data = mnist_result
    rows = classify.classify(path, [digit_pngs])
    assert [Path(r["file"]).name for r in rows] == [f"{i:04d}.png" for i in range(N_IMAGES)]
    true = np.asarray(data.labels.compute())[ROWS]
    names = data.class_names
    drawn = np.mean([names.index(r["class"]) == t for r, t in zip(rows, true)])
    # The same model on the same digits as stored, with the same cluster classes.
    _, mapping, _, dataset = classify.cluster_classes(path)
    assert dataset == "mnist"
    stored = np.mean(mapping[np.asarray(model.labels_)[ROWS]] == true)
    split = np.mean(mapping[np.asarray(model.labels_)] == np.asarray(data.labels.compute()))
    print(f"accuracy: drawn {drawn:.4f}, same digits stored {stored:.4f}, test split {split:.4f}")
    assert abs(drawn - stored) <= 0.02 and abs(drawn - split) <= 0.02
    assert all(r["distance"] >= 0 for r in rows)


def test_mnist_form_of_a_drawing():
    # A thick dark bar on white, off-centre and wide: light on dark, at most 20 x 20 of ink,
    # centre of mass in the middle.
    page = np.full((300, 500), 250, dtype=np.uint8)
    page[40:100, 20:380] = 10
    img = classify.to_mnist(page)
    assert img.shape == (28, 28) and img.dtype == np.uint8
    ink = np.argwhere(img > 0)
    assert (ink.max(0) - ink.min(0) + 1).max() <= 21 and img.max() == 255
    from scipy import ndimage
    assert np.allclose(ndimage.center_of_mass(img.astype(float)), (14, 14), atol=0.6)
    # The same drawing in light ink on black gives the same image.
    np.testing.assert_array_equal(classify.to_mnist(255 - page), img)
    with pytest.raises(ImageError, match="blank"):
        classify.to_mnist(np.full((50, 50), 255, dtype=np.uint8))


def test_job_prints_and_writes_csv_and_refuses_bad_input(mnist_result, digit_pngs, tmp_path):
    _, path, _ = mnist_result
    files = [digit_pngs / "0000.png", digit_pngs / "0001.png"]
    out = tmp_path / "digits.csv"

    def run(*args):
        return subprocess.run([sys.executable, str(JOB), "--result", str(path),
                               *map(str, args)], capture_output=True, text=True, timeout=300)

    res = run(*files, "--out", out)
    assert res.returncode == 0, res.stderr
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [Path(r["file"]).name for r in table] == ["0000.png", "0001.png"]
    assert all(r["class"] in [str(d) for d in range(10)] for r in table)
    assert all(Path(r["file"]).name in res.stdout for r in table)
    again = run(*files, "--out", out)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    bad = tmp_path / "x.png"
    bad.write_text("no")
    res = run(bad)
    assert res.returncode == 2 and "x.png is not an image" in res.stderr
    assert "Traceback" not in res.stderr


def test_fashion_form_of_a_product_photo(test_sources):
    # Fashion-MNIST's own images, drawn dark on white at 10 x, come back close to themselves.
    src = datasets.resolve_split("fashion-mnist", "test", test_sources, download=False)
    images = datasets.read_idx(src.images, "images")[:200]
    back = np.stack([classify.to_fashion(np.asarray(
        Image.fromarray(255 - x).resize((280, 280), Image.Resampling.BILINEAR))) for x in images])
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(images.astype(float), back)]
    assert np.median(corr) > 0.9


def test_image_arguments_are_checked(tmp_path):
    with pytest.raises(ImageError, match="nope.png: no such file or directory"):
        classify.image_files([tmp_path / "nope.png"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageError, match="holds no image files"):
        classify.image_files([tmp_path])
    cut = tmp_path / "cut.png"
    img = Image.fromarray(np.zeros((50, 50), dtype=np.uint8))
    img.save(cut)
    cut.write_bytes(cut.read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png: the image is damaged or truncated"):
        classify.read_grey(cut)
