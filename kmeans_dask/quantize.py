"""Colour quantization: an image's RGB pixels clustered into a K-colour palette.

The palette is a :class:`~kmeans_dask.KMeans` fit (k-means++) on a uniform
sample of the pixels, as scikit-learn's colour-quantization example does;
every pixel is then mapped to its nearest palette colour chunk by chunk as
a Dask array, so the image's size only limits the decoded picture, never
the clustering.  The error of a random palette of the same size (K pixels of
the image) is reported beside it, for scale.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from .errors import ImageError

log = logging.getLogger(__name__)

QUANTIZE_FORMAT = "kmeans-dask/quantization"
# Pixels per chunk of the mapping pass (3 MiB of RGB).
PIXEL_CHUNK = 1 << 20


def read_image(path) -> np.ndarray:
    """The image at ``path`` as (height, width, 3) uint8 RGB (Pillow: PNG, JPEG, ...)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: the image is damaged or truncated ({exc})") from None


def distinct_colours(pixels: np.ndarray) -> int:
    """Number of different RGB triples among ``pixels`` (n, 3) uint8."""
    return len(np.unique(_packed(pixels)))


def _packed(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(np.uint32)
    return (p[:, 0] << 16) | (p[:, 1] << 8) | p[:, 2]


def _nearest(block: np.ndarray, palette: np.ndarray) -> np.ndarray:
    x = block.astype(np.float32)
    d = (x * x).sum(1)[:, None] - 2 * x @ palette.T + (palette * palette).sum(1)[None, :]
    return d.argmin(1).astype(np.int32)


def _squared_error(pixels: da.Array, palette: np.ndarray) -> float:
    """Mean squared error per channel (in 0-255 units) of mapping ``pixels`` to ``palette``."""
    pal = palette.astype(np.float32)

    def chunk(block):
        labels = _nearest(block, pal)
        diff = block.astype(np.float64) - pal[labels]
        return np.array([(diff * diff).sum()])

    total = pixels.map_blocks(chunk, chunks=((1,) * pixels.numblocks[0],), drop_axis=1,
                              dtype=np.float64).sum().compute()
    return float(total) / pixels.size


@dataclass
class Quantized:
    """The quantized image (``labels`` into ``palette``) and what it cost."""

    image: np.ndarray
    labels: np.ndarray
    palette: np.ndarray
    record: dict

    @property
    def quantized(self) -> np.ndarray:
        return self.palette[self.labels]


def check(image: np.ndarray, k, sample_pixels) -> int:
    """Refuse a palette size the image cannot fill; returns its number of distinct colours."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"--k must be a positive integer, got {k!r}")
    if not (isinstance(sample_pixels, int) and sample_pixels >= 1):
        raise ValueError(f"--sample-pixels must be a positive integer, got {sample_pixels!r}")
    colours = distinct_colours(image.reshape(-1, 3))
    if k > colours:
        raise ValueError(f"--k {k} is more than the {colours} distinct colours of the image")
    return colours


def quantize(image: np.ndarray, k: int = 16, *, sample_pixels: int = 100_000,
             random_state: int = 0) -> Quantized:
    """Cluster the pixels of ``image`` (h, w, 3) uint8 into a palette of ``k`` colours.

    Raises ``ValueError`` when ``k`` exceeds the number of distinct colours
    of the image (or of its sample: raise ``sample_pixels`` then).
    """
    from .kmeans import KMeans

    before = check(image, k, sample_pixels)
    h, w, _ = image.shape
    pixels = np.ascontiguousarray(image.reshape(-1, 3))
    n = len(pixels)
    rng = np.random.RandomState(random_state)
    sample = pixels[rng.choice(n, size=sample_pixels, replace=False)] if sample_pixels < n \
        else pixels
    in_sample = distinct_colours(sample)
    if k > in_sample:
        raise ValueError(f"--k {k} is more than the {in_sample} distinct colours of the "
                         f"{len(sample)} sampled pixels; raise --sample-pixels")
    start = time.perf_counter()
    km = KMeans(k, init="k-means++", n_init=1, random_state=random_state).fit(sample)
    palette = np.clip(np.rint(km.cluster_centers_.astype(np.float64) * 255), 0, 255)
    palette = palette.astype(np.uint8)
    X = da.from_array(pixels, chunks=(PIXEL_CHUNK, 3))
    pal32 = palette.astype(np.float32)
    labels = X.map_blocks(_nearest, pal32, drop_axis=1, dtype=np.int32).compute()
    seconds = time.perf_counter() - start
    diff = pixels.astype(np.float64) - palette[labels]
    mse = float((diff * diff).mean())
    random_palette = pixels[rng.choice(n, size=k, replace=False)]
    record = {
        "format": QUANTIZE_FORMAT,
        "width": int(w), "height": int(h), "pixels": int(n),
        "k": int(k), "sample_pixels": int(len(sample)), "seed": int(random_state),
        "colours_before": int(before),
        "colours_after": int(len(np.unique(_packed(palette[np.unique(labels)])))),
        "bits_per_pixel_before": 24,
        "bits_per_pixel_after": max(1, math.ceil(math.log2(k))),
        "mse": mse,
        "psnr_db": float(10 * math.log10(255**2 / mse)) if mse > 0 else None,
        "random_palette_mse": _squared_error(X, random_palette),
        "fit_and_map_seconds": seconds,
        "kmeans_iterations": int(km.n_iter_),
    }
    return Quantized(image=image, labels=labels.reshape(h, w), palette=palette, record=record)


def write_png(q: Quantized, path: Path) -> Path:
    """The quantized image as a PNG: indexed (a palette of K entries) when K <= 256."""
    from PIL import Image

    if len(q.palette) <= 256:
        im = Image.fromarray(q.labels.astype(np.uint8), mode="P")
        im.putpalette(q.palette.ravel().tolist())
    else:
        im = Image.fromarray(q.quantized)
    im.save(path, format="PNG", optimize=True)
    return path


def quantize_file(image_path, out, *, k: int = 16, sample_pixels: int = 100_000,
                  random_state: int = 0, overwrite: bool = False) -> dict:
    """Quantize the image file ``image_path`` and write the output directory ``out``.

    ``out`` gets ``quantized.png``, ``comparison.png`` (original, quantized,
    palette) and ``quantization.json``, all or nothing.  Returns the record.
    """
    from . import plots, store

    image_path = Path(image_path)
    image = read_image(image_path)
    store.check_output(out, QUANTIZE_FORMAT, overwrite=overwrite, inputs=[image_path])
    q = quantize(image, k, sample_pixels=sample_pixels, random_state=random_state)
    record = {"image": str(image_path.resolve()), **q.record,
              "bytes_original": image_path.stat().st_size}
    with store.output_dir(out, QUANTIZE_FORMAT, overwrite=overwrite, inputs=[image_path]) as tmp:
        tmp = Path(tmp)
        write_png(q, tmp / "quantized.png")
        record["bytes_quantized_png"] = (tmp / "quantized.png").stat().st_size
        plots.quantization(image, q.quantized, q.palette, tmp / "comparison.png",
                           title=f"{image_path.name}: {record['colours_before']:,} colours "
                                 f"-> {k}, MSE {record['mse']:.1f} (random palette "
                                 f"{record['random_palette_mse']:.1f})")
        (tmp / "quantization.json").write_text(json.dumps(record, indent=1))
    log.info("%s: %d colours -> %d, MSE %.2f (random palette %.2f)", image_path.name,
             record["colours_before"], k, record["mse"], record["random_palette_mse"])
    return record
