"""Colour quantization (kmeans_dask/quantize.py and jobs/quantize.py) on scikit-learn's photo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from kmeans_dask import quantize
from kmeans_dask.errors import ImageError

CHINA = Path(os.path.dirname(sklearn.datasets.__file__)) / "images" / "china.jpg"
JOB = Path(__file__).resolve().parents[1] / "jobs" / "quantize.py"


def test_palette_beats_a_random_one_and_the_png_holds_k_colours(tmp_path):
    record = quantize.quantize_file(CHINA, tmp_path / "out", k=8, sample_pixels=20_000)
    original = quantize.read_image(CHINA)
    assert record["colours_before"] == quantize.distinct_colours(original.reshape(-1, 3)) > 50_000
    assert record["colours_after"] <= 8 and record["bits_per_pixel_after"] == 3
    assert 0 < record["mse"] < 0.7 * record["random_palette_mse"]
    with Image.open(tmp_path / "out" / "quantized.png") as im:
        assert im.mode == "P" and im.size == (640, 427)
        back = np.asarray(im.convert("RGB"))
    assert quantize.distinct_colours(back.reshape(-1, 3)) == record["colours_after"]
    # The stored error is the error of the stored picture.
    diff = back.astype(np.float64) - original
    assert (diff * diff).mean() == pytest.approx(record["mse"], rel=1e-9)
    assert record["bytes_quantized_png"] == (tmp_path / "out" / "quantized.png").stat().st_size
    assert json.loads((tmp_path / "out" / "quantization.json").read_text()) == record
    with Image.open(tmp_path / "out" / "comparison.png") as im:
        assert im.size[0] >= 800


def test_same_seed_same_palette_and_more_colours_less_error():
    image = quantize.read_image(CHINA)[::4, ::4]
    a = quantize.quantize(image, 4, sample_pixels=5_000, random_state=1)
    b = quantize.quantize(image, 4, sample_pixels=5_000, random_state=1)
    np.testing.assert_array_equal(a.palette, b.palette)
    more = quantize.quantize(image, 32, sample_pixels=5_000, random_state=1)
    assert more.record["mse"] < a.record["mse"]


def test_bad_images_and_sizes_are_named(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.png is not an image"):
        quantize.read_image(text)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(CHINA.read_bytes()[:20_000])
    with pytest.raises(ImageError, match="cut.jpg: the image is damaged or truncated"):
        quantize.read_image(cut)
    with pytest.raises(ImageError, match="missing.png: no such file"):
        quantize.read_image(tmp_path / "missing.png")
    two = np.zeros((4, 4, 3), dtype=np.uint8)
    two[2:] = 255
    with pytest.raises(ValueError, match="--k 3 is more than the 2 distinct colours"):
        quantize.quantize(two, 3)
    with pytest.raises(ValueError, match="raise --sample-pixels"):
        quantize.quantize(two, 2, sample_pixels=1)
    for k, sample, message in ((0, 10, "--k must be a positive integer, got 0"),
                               (2, 0, "--sample-pixels must be a positive integer, got 0")):
        with pytest.raises(ValueError, match=message):
            quantize.check(two, k, sample)


def _job(*args, cwd):
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_job_writes_all_or_nothing_and_refuses_bad_input(tmp_path):
    out = tmp_path / "china"
    res = _job("--image", CHINA, "--k", "6", "--sample-pixels", "5000", "--out", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "colours -> 6" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "kmeans-dask.json",
                                                    "quantization.json", "quantized.png"]
    again = _job("--image", CHINA, "--out", out, cwd=tmp_path)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    res = _job("--image", bad, "--out", tmp_path / "x", cwd=tmp_path)
    assert res.returncode == 2 and "bad.jpg" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
