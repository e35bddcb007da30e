"""Pictures: NumPy arrays in, PNG files out (matplotlib's Agg canvas, no pyplot state).

Every function writes its PNG atomically (:func:`store.atomic_file`) and
returns the path.  Nothing here knows about Dask or the estimator.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

IMAGE_SHAPE = (28, 28)
DPI = 100
CELL_W, CELL_H = 1.2, 1.45  # inches per centroid cell (room for a title)
MAX_ROWS = 40  # clusters drawn one per row in the confusion matrix and member strips


def grid_shape(k: int) -> tuple[int, int]:
    """A near-square (rows, cols) layout for ``k`` images.

    An exact factorisation is used when its sides differ by at most a factor
    of 2.5 (2 x 5 for 10, 6 x 6 for 36); otherwise ``floor(sqrt(k))`` rows.

    Examples
    --------
    >>> grid_shape(10), grid_shape(36), grid_shape(7), grid_shape(1)
    ((2, 5), (6, 6), (2, 4), (1, 1))
    """
    if k < 1:
        raise ValueError(f"need at least one image, got {k}")
    best = max(r for r in range(1, int(math.isqrt(k)) + 1) if k % r == 0)
    if (k // best) / best <= 2.5:
        return best, k // best
    rows = max(1, math.isqrt(k))
    return rows, math.ceil(k / rows)


def _new_figure(figsize) -> Figure:
    # matplotlib is imported here, not with the module: it takes about a second,
    # which the jobs that draw nothing (ingest, fit, predict) need not pay.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig: Figure, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = store.absolute(path)  # a local path or a URL (uploaded in one PUT)
    FigureCanvasAgg(fig)
    with store.atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def centroid_grid(centroids: np.ndarray, path, titles=None, title: str | None = None) -> Path:
    """Every centre as a 28 x 28 grey image in a :func:`grid_shape` grid.

    The PNG is ``cols * 120`` by ``rows * 145`` pixels (plus 40 for a title).
    """
    k = len(centroids)
    rows, cols = grid_shape(k)
    extra = 0.4 if title else 0.0
    fig = _new_figure((cols * CELL_W, rows * CELL_H + extra))
    top = 1 - extra / (rows * CELL_H + extra)
    grid = fig.add_gridspec(rows, cols, left=0.02, right=0.98, bottom=0.02, top=top - 0.01,
                            wspace=0.1, hspace=0.35)
    for j in range(rows * cols):
        ax = fig.add_subplot(grid[j // cols, j % cols])
        ax.set_axis_off()
        if j < k:
            ax.imshow(np.asarray(centroids[j]).reshape(IMAGE_SHAPE), cmap="gray_r",
                      interpolation="nearest")
            ax.set_title(titles[j] if titles is not None else str(j), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.1 / (rows * CELL_H + extra))
    return _save(fig, path)


def confusion_matrix(table: np.ndarray, class_names, path, title: str = "") -> Path:
    """Clusters (rows) x true classes (columns), counts written in the cells."""
    k, c = table.shape
    # Past MAX_ROWS clusters the picture stops growing (a K = 400 matrix would be
    # 13,000 pixels tall); rows then share the height and only some are labelled.
    fig = _new_figure((max(5.0, 0.55 * c + 2.5),
                     max(4.0, 0.32 * min(k, MAX_ROWS) + 2.0)))
    ax = fig.add_subplot()
    im = ax.imshow(table, cmap="Blues", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), labels=class_names, rotation=45, ha="right", fontsize=8)
    ticks = range(0, k, max(1, math.ceil(k / MAX_ROWS)))
    ax.set_yticks(list(ticks), labels=[str(j) for j in ticks], fontsize=7 if k > 20 else 8)
    ax.set_xlabel("true label")
    ax.set_ylabel("cluster")
    if k * c <= 400:
        peak = table.max() or 1
        for (i, j), v in np.ndenumerate(table):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                        color="white" if v > peak / 2 else "black")
    ax.set_title(title or "clusters x true labels")
    fig.tight_layout()
    return _save(fig, path)


def member_strips(samples: list, path, titles=None, per_row: int = 10) -> Path:
    """One row per cluster: up to ``per_row`` member images side by side.

    Only the first ``MAX_ROWS`` clusters are drawn, so the picture stays
    readable (and small) for large K.
    """
    samples = samples[:MAX_ROWS]
    titles = None if titles is None else titles[:MAX_ROWS]
    k = len(samples)
    fig = _new_figure((per_row * 0.6 + 1.0, k * 0.65 + 0.3))
    grid = fig.add_gridspec(k, per_row + 1, left=0.01, right=0.99, bottom=0.01, top=0.99,
                            wspace=0.05, hspace=0.1, width_ratios=[1.6] + [1] * per_row)
    for j, members in enumerate(samples):
        label = fig.add_subplot(grid[j, 0])
        label.set_axis_off()
        label.text(0.0, 0.5, titles[j] if titles is not None else str(j), va="center", fontsize=7)
        for i in range(per_row):
            ax = fig.add_subplot(grid[j, i + 1])
            ax.set_axis_off()
            if i < len(members):
                ax.imshow(np.asarray(members[i]).reshape(IMAGE_SHAPE), cmap="gray_r",
                          interpolation="nearest")
    return _save(fig, path)


def elbow(table: list, path, title: str = "") -> Path:
    """Inertia per image against K (train and test), and accuracy, NMI and homogeneity against K.

    ``table`` rows need ``k``, ``train_inertia``, ``n_train``, ``test_inertia``
    (or None), ``n_test``, ``accuracy``, ``nmi`` and ``homogeneity``.
    """
    ks = [r["k"] for r in table]
    fig = _new_figure((11, 4.2))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    # Per image, so the train and test curves (60,000 and 10,000 rows) share a scale.
    left.plot(ks, [r["train_inertia"] / r["n_train"] for r in table], "o-", label="train")
    if any(r.get("test_inertia") is not None for r in table):
        left.plot(ks, [r["test_inertia"] / r["n_test"] for r in table], "s--", label="test")
    left.set_xlabel("K")
    left.set_ylabel("inertia per image (mean squared distance)")
    left.set_title("elbow")
    left.legend()
    for key, style in (("accuracy", "o-"), ("nmi", "s-"), ("homogeneity", "^-")):
        right.plot(ks, [r[key] for r in table], style, label=key)
    right.set_xlabel("K")
    right.set_ylim(0, 1)
    right.set_title("majority-label accuracy, NMI, homogeneity (test)")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if max(ks) / max(1, min(ks)) > 8:
            ax.set_xscale("log")
            ax.set_xticks(ks, labels=[str(k) for k in ks])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def blobs(X: np.ndarray, truth: np.ndarray, init: np.ndarray, labels: np.ndarray,
          centers: np.ndarray, path, title: str = "") -> Path:
    """Left: the data with the initial centres; right: the clustering with its centres."""
    fig = _new_figure((10, 4.6))
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.scatter(X[:, 0], X[:, 1], c=truth, cmap="coolwarm", s=14, alpha=0.7)
    a.scatter(init[:, 0], init[:, 1], marker="X", s=180, c="black", label="initial centres")
    a.set_title("data (colour: generating blob)")
    a.legend(loc="upper left")
    b.scatter(X[:, 0], X[:, 1], c=labels, cmap="viridis", s=14, alpha=0.7)
    b.scatter(centers[:, 0], centers[:, 1], marker="*", s=320, c="red", edgecolors="black",
              label="final centres")
    b.set_title("K-Means clusters")
    b.legend(loc="upper left")
    for ax in (a, b):
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def deformation_grid(originals: np.ndarray, deformed: np.ndarray, path, titles=None,
                     title: str = "") -> Path:
    """One row per original image: the original, a gap, then its deformations.

    ``originals`` is (n, 784) and ``deformed`` (n, m, 784), uint8 grey levels
    (0-255); ``titles`` (one per row) are written left of the originals.
    The PNG is about ``(m + 1.25) * 60`` by ``n * 60 + 30`` pixels, plus 60
    for row titles on the left and 30 for a title on top.
    """
    originals = np.asarray(originals)
    deformed = np.asarray(deformed)
    n, m = deformed.shape[:2]
    if len(originals) != n:
        raise ValueError(f"{len(originals)} originals but {n} rows of deformations")
    cell = 0.6
    head, left = 0.3 + (0.3 if title else 0.0), (0.6 if titles is not None else 0.05)
    width, height = (m + 1.25) * cell + left + 0.05, n * cell + head + 0.05
    fig = _new_figure((width, height))
    grid = fig.add_gridspec(n, m + 2, left=left / width, right=1 - 0.05 / width,
                            bottom=0.05 / height, top=1 - head / height, wspace=0.05,
                            hspace=0.05, width_ratios=[1] + [0.25] + [1] * m)
    top = []
    for i in range(n):
        cells = [(0, originals[i])] + [(j + 2, deformed[i, j]) for j in range(m)]
        for col, image in cells:
            ax = fig.add_subplot(grid[i, col])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(np.asarray(image).reshape(IMAGE_SHAPE), cmap="gray_r", vmin=0, vmax=255,
                      interpolation="nearest")
            if col == 0 and titles is not None:
                ax.set_ylabel(str(titles[i]), fontsize=7, rotation=0, ha="right", va="center")
            if i == 0:
                top.append(ax)
    y = 1 - (head - 0.04) / height
    first, last = top[0].get_position(), top[-1].get_position()
    fig.text((first.x0 + first.x1) / 2, y, "original", ha="center", va="bottom", fontsize=7)
    if m:
        x = (top[1].get_position().x0 + last.x1) / 2
        fig.text(x, y, "deformations", ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.05 / height, va="top")
    return _save(fig, path)


def quantization(original: np.ndarray, quantized: np.ndarray, palette: np.ndarray, path,
                 title: str = "") -> Path:
    """The original and quantized images side by side, and the palette's swatches."""
    h, w = original.shape[:2]
    aspect = h / w
    fig = _new_figure((10, 5 * aspect + 1.6))
    grid = fig.add_gridspec(2, 2, height_ratios=[5 * aspect, 0.6])
    for j, (img, name) in enumerate(((original, "original"), (quantized, "quantized"))):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    ax.imshow(palette[None, :, :], aspect="auto", interpolation="nearest")
    ax.set_title(f"palette ({len(palette)} colours)", fontsize=9)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
