"""Classify a user's own images with a fitted result: nearest centre, then its majority label.

Images are brought to the data set's form the way it was made.  MNIST
(LeCun et al.): grey levels with the ink light on a dark background, the
ink's bounding box scaled (anti-aliased, keeping its aspect ratio) to fit a
20 x 20 box, and placed in a 28 x 28 image with its centre of mass at the
centre.  Fashion-MNIST (Xiao et al. 2017): negated to light on dark, trimmed
to the object, its longest edge scaled to 28, and centred.
Each cluster's class is the most common true label of its members in the
split the result was fitted on, as :func:`kmeans_dask.workflows.evaluate_result`
learns it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .errors import ImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SIDE, BOX = 28, 20
# Grey levels above this share of the strongest count as ink for the bounding box.
INK = 0.3


def image_files(paths) -> list[Path]:
    """The image files named, directories expanded (sorted) to the images they hold."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageError(f"{p}: the directory holds no image files "
                                 f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ImageError(f"{p}: no such file or directory")
    return files


def read_grey(path) -> np.ndarray:
    """The image at ``path`` as 2-D uint8 grey levels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Transparent pixels are background: flatten onto white.
                back = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(back, im.convert("RGBA"))
            return np.asarray(im.convert("L"))
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: the image is damaged or truncated ({exc})") from None


def _border(g: np.ndarray) -> np.ndarray:
    return np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])


def to_mnist(grey: np.ndarray, *, where="the image") -> np.ndarray:
    """A (28, 28) uint8 image in MNIST's form from any 2-D grey image."""
    from scipy import ndimage

    out = _fit(_ink_box(_light_on_dark(grey), where), BOX)
    # Whole-pixel moves, as MNIST's centring: a sub-pixel one would blur the strokes.
    cy, cx = ndimage.center_of_mass(out)
    out = ndimage.shift(out, (round(SIDE / 2 - cy), round(SIDE / 2 - cx)), order=0,
                        mode="constant")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_fashion(grey: np.ndarray, *, where="the image") -> np.ndarray:
    """A (28, 28) uint8 image in Fashion-MNIST's form from any 2-D grey image."""
    g = _light_on_dark(grey)
    return np.clip(np.rint(_fit(_ink_box(g, where), SIDE)), 0, 255).astype(np.uint8)


def _light_on_dark(grey: np.ndarray) -> np.ndarray:
    g = np.asarray(grey, dtype=np.float64)
    if np.median(_border(g)) > 127:
        g = 255.0 - g  # dark on a light background: the data sets' objects are light
    # The background to 0 and the strongest ink to 255.
    g = np.clip(g - np.median(_border(g)), 0, None)
    if g.max() > 0:
        g *= 255.0 / g.max()
    return g


def _ink_box(g: np.ndarray, where) -> np.ndarray:
    ink = g > INK * 255
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        raise ImageError(f"{where}: nothing found (the image is blank)")
    return g[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _fit(crop: np.ndarray, box: int) -> np.ndarray:
    """``crop`` scaled (anti-aliased) so its longest edge is ``box``, centred in 28 x 28."""
    from PIL import Image

    h, w = crop.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F")
                       .resize(size, Image.Resampling.LANCZOS))
    out = np.zeros((SIDE, SIDE))
    top, left = (SIDE - small.shape[0]) // 2, (SIDE - small.shape[1]) // 2
    out[top:top + small.shape[0], left:left + small.shape[1]] = np.clip(small, 0, 255)
    return out


PREPARE = {"mnist": to_mnist, "fashion-mnist": to_fashion}


def cluster_classes(result_path, *, data_path=None) -> tuple:
    """The fitted model, each cluster's class index, and the class names."""
    from . import metrics, workflows
    from .kmeans import from_result

    result, fit_data, _ = workflows.open_evaluation_input(
        result_path, store_split(result_path), data_path)
    model = from_result(result)
    fit_pred = np.asarray(model.labels_)
    fit_true = np.asarray(fit_data.labels.compute())
    names = fit_data.class_names
    mapping = metrics.majority_mapping(fit_true, fit_pred, model.n_clusters, len(names))
    return model, mapping, names, fit_data.store_attrs.get("dataset")


def store_split(result_path) -> str:
    from . import store

    split = store.read_result(result_path).attrs["data"].get("split")
    if not split:
        raise ImageError(f"{result_path}: the result does not record which split it was "
                         f"fitted on, so its clusters have no classes")
    return split


def classify(result_path, paths, *, data_path=None) -> list[dict]:
    """One row per image: ``file``, ``class``, ``cluster`` and ``distance`` (in scaled units)."""
    files = image_files(paths)
    model, mapping, names, dataset = cluster_classes(result_path, data_path=data_path)
    prepare = PREPARE.get(dataset, to_mnist)
    images = np.stack([prepare(read_grey(f), where=str(f)) for f in files])
    if model.n_features_in_ != SIDE * SIDE:
        raise ImageError(f"{result_path}: the model has {model.n_features_in_} features, not "
                         f"the {SIDE * SIDE} pixels of a 28 x 28 image")
    dist = np.asarray(model.transform(images.reshape(len(files), -1)))
    cluster = dist.argmin(axis=1)
    return [{"file": str(f), "class": names[mapping[c]], "cluster": int(c),
             "distance": float(dist[i, c])} for i, (f, c) in enumerate(zip(files, cluster))]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["file", "class", "cluster", "distance"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
