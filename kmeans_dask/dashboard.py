"""A live K-Means page on the Dask dashboard: ``/kmeans`` on the scheduler's HTTP server.

* :class:`KMeansPage` is a scheduler plugin.  When registered (the engine
  does it at the start of every fit on a cluster) it adds two routes to the
  scheduler's HTTP server, beside ``/status``:

  - ``/kmeans``: a Bokeh page (BokehJS inlined in it, so it works with no
    internet access) with the inertia, the centre shift, the share of
    distances the bounds skipped and the rows moved per iteration, the
    current centroids as an image grid, and the elbow of a sweep;
  - ``/kmeans/data/<source>.json``: the columns those plots poll every second
    (``iterations``, ``centroids``, ``elbow``).

* Fits publish :func:`iteration_message` s (the engine sends each with the
  next pass's task) and sweeps :func:`publish_sweep`: ``log_event`` messages
  on the ``kmeans-dask`` topic (batched, they do not wait for the scheduler), which
  the plugin receives through its ``log_event`` hook and keeps: the
  iterations of the latest fit, its latest centroids, the latest sweep.
"""

from __future__ import annotations

import base64
import logging
import math
import time

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin

log = logging.getLogger(__name__)

TOPIC = "kmeans-dask"
NAME = "kmeans-dask-page"
ROUTE = "/kmeans"
# Centres drawn in the grid at most (the first ones), and the poll interval.
MAX_TILES = 64
POLL_MS = 1000
ITERATION_COLUMNS = ("iteration", "inertia", "center_shift", "skipped", "changed", "seconds",
                     "elapsed")


def tiles(centers: np.ndarray, max_tiles: int = MAX_TILES) -> np.ndarray | None:
    """The first centres as one grid image (rows of square tiles, float64), or None
    when a centre is not a square image (d is not a perfect square)."""
    k, d = centers.shape
    side = math.isqrt(d)
    if side * side != d or side < 4:
        return None
    k = min(k, max_tiles)
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    # Gaps are 0, white like the images' background.
    grid = np.zeros((rows * (side + 1), cols * (side + 1)))
    for j in range(k):
        r, c = divmod(j, cols)
        # Row 0 of an image is its top; the page draws grid row 0 at the bottom.
        grid[r * (side + 1):r * (side + 1) + side, c * (side + 1):c * (side + 1) + side] = (
            centers[j].reshape(side, side))
    return grid[::-1]


class KMeansPage(SchedulerPlugin):
    """Keeps what fits publish and serves the ``/kmeans`` page (a scheduler plugin)."""

    name = NAME
    idempotent = True

    def __init__(self):
        self.run = None
        self.meta: dict = {}
        self.iterations: dict = {c: [] for c in ITERATION_COLUMNS}
        self.centroids = None
        self.elbow: dict = {"k": [], "inertia": []}
        self.sweep = None

    async def start(self, scheduler):
        from tornado import web

        page = self

        class Page(web.RequestHandler):
            def get(self):
                self.set_header("Content-Type", "text/html; charset=utf-8")
                self.write(page.html())

        class Data(web.RequestHandler):
            def get(self, source):
                self.set_header("Content-Type", "application/json")
                self.set_header("Cache-Control", "no-store")
                self.write(page.data(source))

        app = getattr(scheduler, "http_application", None)
        if app is None:
            log.warning("the scheduler serves no HTTP: no %s page", ROUTE)
            return
        app.add_handlers(r".*", [(rf"{ROUTE}/?", Page),
                                 (rf"{ROUTE}/data/(iterations|centroids|elbow|meta)\.json", Data)])

    # ------------------------------------------------------------------ state

    def log_event(self, topic, msg):
        if topic != TOPIC or not isinstance(msg, dict):
            return
        kind = msg.get("kind")
        if kind == "iteration":
            if msg.get("run") != self.run:
                self.run = msg.get("run")
                self.meta = {k: msg.get(k) for k in ("run", "n_clusters", "n_rows", "max_iter")}
                self.meta["started"] = time.time()
                self.iterations = {c: [] for c in ITERATION_COLUMNS}
                self.centroids = None
            for c in ITERATION_COLUMNS:
                self.iterations[c].append(msg.get(c))
            if msg.get("tiles") is not None:
                self.centroids = msg["tiles"]
                self._grid = None
        elif kind == "sweep":
            if msg.get("sweep") != self.sweep:
                self.sweep = msg.get("sweep")
                self.elbow = {"k": [], "inertia": []}
            self.elbow["k"].append(msg["k"])
            self.elbow["inertia"].append(msg["inertia"])

    def data(self, source: str) -> dict:
        if source == "iterations":
            return dict(self.iterations)
        if source == "centroids":
            # One rect per lit pixel: plain columns, which every Bokeh glyph reads.
            if self.centroids is None:
                return {"x": [], "y": [], "v": []}
            if getattr(self, "_grid", None) is None:
                h, w = self.centroids["shape"]
                raw = np.frombuffer(base64.b64decode(self.centroids["b64"]), dtype=np.uint8)
                grid = raw.reshape(h, w)
                y, x = np.nonzero(grid > 4)
                self._grid = {"x": x.tolist(), "y": y.tolist(),
                              "v": np.round(grid[y, x] / 255.0, 3).tolist()}
            return dict(self._grid)
        if source == "elbow":
            return dict(self.elbow)
        return dict(self.meta)

    # ------------------------------------------------------------------ page

    def html(self) -> str:
        if getattr(self, "_html", None) is None:
            self._html = _page()
        return self._html


def _page() -> str:
    """The page: Bokeh figures over AjaxDataSources, BokehJS inlined (works offline)."""
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import AjaxDataSource, Div
    from bokeh.transform import linear_cmap
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    def source(name, columns):
        return AjaxDataSource(data_url=f"{ROUTE}/data/{name}.json", polling_interval=POLL_MS,
                              mode="replace", method="GET", name=name,
                              data={c: [] for c in columns})

    it = source("iterations", ITERATION_COLUMNS)
    cent = source("centroids", ("x", "y", "v"))
    elbow = source("elbow", ("k", "inertia"))
    kw = dict(height=260, width=420, tools="pan,wheel_zoom,box_zoom,reset,hover")

    f_inertia = figure(title="Inertia per iteration", x_axis_label="iteration", **kw)
    f_inertia.line("iteration", "inertia", source=it, line_width=2)
    f_inertia.scatter("iteration", "inertia", source=it, size=5)
    f_shift = figure(title="Centre shift (sum of squares)", x_axis_label="iteration",
                     y_axis_type="log", **kw)
    f_shift.line("iteration", "center_shift", source=it, line_width=2, color="darkorange")
    f_skip = figure(title="Share of distances the bounds skipped", x_axis_label="iteration",
                    y_range=(0, 1.05), **kw)
    f_skip.vbar(x="iteration", top="skipped", width=0.8, source=it, color="seagreen")
    f_moved = figure(title="Rows moved to another centre", x_axis_label="iteration", **kw)
    f_moved.vbar(x="iteration", top="changed", width=0.8, source=it, color="slategray")
    f_cent = figure(title="Current centroids (first 64)", height=420, width=420,
                    tools="pan,wheel_zoom,reset", match_aspect=True)
    f_cent.rect(x="x", y="y", width=1, height=1, source=cent, line_color=None,
                fill_color=linear_cmap("v", "Greys256", low=1, high=0))
    f_cent.axis.visible = False
    f_cent.grid.visible = False
    f_elbow = figure(title="Sweep: inertia against K (the elbow)", x_axis_label="K", **kw)
    f_elbow.line("k", "inertia", source=elbow, line_width=2, color="firebrick")
    f_elbow.scatter("k", "inertia", source=elbow, size=7, color="firebrick")
    head = Div(text="<h2>kmeans-dask</h2><p>The latest fit on this cluster, updated every "
                    "second. The iterations' tasks (<code>kmeans-lloyd</code>) are on the "
                    "<a href='status'>status page</a>.</p>")
    layout = column(head, row(f_inertia, f_shift), row(f_skip, f_moved), row(f_cent, f_elbow))
    return file_html(layout, INLINE, "kmeans-dask")


# --------------------------------------------------------------------- publishing


def register(client) -> bool:
    """Add the page to ``client``'s scheduler (once); False, logged, if it cannot be."""
    try:
        client.register_plugin(KMeansPage(), name=NAME)
        return True
    except Exception as exc:  # a scheduler without kmeans_dask installed, say
        log.warning("no K-Means dashboard page on this scheduler (%s: %s)",
                    type(exc).__name__, exc)
        return False


def page_link(client) -> str | None:
    """The page's address, from the client's dashboard link (None without a dashboard)."""
    try:
        link = client.dashboard_link
    except Exception:
        return None
    if not link:
        return None
    base = link.rsplit("/status", 1)[0] if link.endswith("/status") else link.rstrip("/")
    return base + ROUTE


def iteration_message(run: str, record: dict, centers: np.ndarray, *, n_rows: int,
                      max_iter: int) -> dict:
    """The page's message for one iteration: the record and the centroid grid.

    The grid travels as base64 of uint8 pixels: a nested list of floats costs
    ``distributed`` milliseconds to inspect before it is sent.
    """
    grid = tiles(np.asarray(centers, dtype=np.float64))
    msg = {"kind": "iteration", "run": run, "n_clusters": int(centers.shape[0]),
           "n_rows": int(n_rows), "max_iter": int(max_iter), "tiles": None}
    if grid is not None:
        g = np.clip(np.nan_to_num(grid), 0.0, 1.0)
        msg["tiles"] = {"shape": list(g.shape),
                        "b64": base64.b64encode(np.round(g * 255).astype(np.uint8).tobytes())
                        .decode("ascii")}
    for c in ITERATION_COLUMNS:
        value = record.get(c)
        msg[c] = float(value) if isinstance(value, (int, float, np.number)) else value
    return msg


def send(client, msg: dict) -> None:
    try:
        client.log_event(TOPIC, msg)
    except Exception as exc:  # the page is a view: never fail a fit for it
        log.debug("dashboard update not sent: %s", exc)


def publish_sweep(client, sweep: str, k: int, inertia: float) -> None:
    try:
        client.log_event(TOPIC, {"kind": "sweep", "sweep": sweep, "k": int(k),
                                 "inertia": float(inertia)})
    except Exception as exc:
        log.debug("dashboard update not sent: %s", exc)
