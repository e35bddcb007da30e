"""The K-Means page on the dashboard: its state, its routes on a real scheduler, a real browser."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster

from kmeans_dask import KMeans, dashboard, store


def _record(i, **kw):
    return {"iteration": i, "inertia": 100.0 - i, "center_shift": 1.0 / i, "skipped": 0.5,
            "changed": 10 * i, "seconds": 0.01, "elapsed": 0.01 * i, **kw}


def test_page_keeps_the_latest_fit_and_sweep():
    page = dashboard.KMeansPage()
    centers = np.random.default_rng(0).random((10, 784))
    for i in (1, 2, 3):
        page.log_event(dashboard.TOPIC, dashboard.iteration_message(
            "a", _record(i), centers, n_rows=100, max_iter=50))
    assert page.data("iterations")["iteration"] == [1, 2, 3]
    assert page.data("meta")["n_clusters"] == 10
    cent = page.data("centroids")
    # 10 centres: 3 rows of 4 tiles of 28 pixels, one blank pixel between tiles.
    assert 0 < len(cent["x"]) == len(cent["y"]) == len(cent["v"])
    assert max(cent["x"]) < 4 * 29 and max(cent["y"]) < 3 * 29 and max(cent["y"]) >= 2 * 29
    page.log_event(dashboard.TOPIC, {"kind": "iteration", "run": "b", **_record(1)})
    assert page.data("iterations")["iteration"] == [1]  # a new fit starts afresh
    for k in (2, 4):
        page.log_event(dashboard.TOPIC, {"kind": "sweep", "sweep": "s", "k": k, "inertia": 9.0 / k})
    assert page.data("elbow") == {"k": [2, 4], "inertia": [4.5, 2.25]}
    page.log_event("other-topic", {"kind": "sweep", "k": 8, "inertia": 1.0})
    assert page.data("elbow")["k"] == [2, 4]


def test_tiles_only_for_square_images():
    assert dashboard.tiles(np.zeros((3, 10))) is None
    grid = dashboard.tiles(np.arange(2 * 16, dtype=float).reshape(2, 16) / 32)
    # Two 4 x 4 tiles side by side, each followed by a one-pixel gap.
    assert grid.shape == (5, 10)
    # Row 0 of an image (its top) is the grid's last row, which Bokeh draws at the top.
    np.testing.assert_array_equal(grid[-1, :4], [0.0, 1 / 32, 2 / 32, 3 / 32])
    np.testing.assert_array_equal(grid[-1, 5:9], [0.5, 17 / 32, 18 / 32, 19 / 32])
    assert not grid[:, 4].any() and not grid[0].any()  # the gaps


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read().decode()


@pytest.fixture
def dashboard_cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", processes=True) as cluster, \
            Client(cluster) as client:
        yield client


def test_fit_fills_the_page_served_by_the_scheduler(dashboard_cluster, fashion_test_small_chunks):
    client = dashboard_cluster
    X = store.open_data(fashion_test_small_chunks, "test").images
    km = KMeans(10, init="k-means++", random_state=0, max_iter=5, tol=0).fit(X)
    link = dashboard.page_link(client)
    assert link.startswith("http://127.0.0.1:") and link.endswith("/kmeans")
    status, html = _get(link)
    assert status == 200 and "kmeans-dask" in html
    # BokehJS is in the page itself: nothing is fetched from the internet.
    assert "cdn.bokeh.org" not in html and "Bokeh" in html
    deadline = time.monotonic() + 10
    while True:  # events are batched: they reach the scheduler a moment later
        data = json.loads(_get(f"{link}/data/iterations.json")[1])
        if len(data["iteration"]) == km.n_iter_ or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert data["iteration"] == list(range(1, km.n_iter_ + 1))
    assert data["inertia"] == [h["inertia"] for h in km.history_]
    assert all(0 <= s <= 1 for s in data["skipped"])
    cent = json.loads(_get(f"{link}/data/centroids.json")[1])
    assert len(cent["x"]) > 100 and 2 * 29 <= max(cent["y"]) < 3 * 29  # 10 centres, 3 rows


def _browser():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        return None, "the playwright package is not installed (pip install playwright)"
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return None, "no chromium browser on PATH (Debian: apt-get install chromium)"
    return exe, None


def test_page_in_a_real_browser_shows_a_running_fit(dashboard_cluster, fashion_test_small_chunks,
                                                    tmp_path):
    exe, why = _browser()
    if exe is None:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    client = dashboard_cluster
    X = store.open_data(fashion_test_small_chunks, "test").images
    done = {}
    # As a job does on connecting: the page exists before the fit starts, so
    # the browser cannot reach it first and be answered 404.
    assert dashboard.register(client)
    link = dashboard.page_link(client)
    assert _get(link)[0] == 200

    def fit():
        # A new thread does not inherit the test's current client; pinned, the
        # fit cannot land on a client another test module left behind in this
        # process, whose page the browser is not watching.
        with client.as_current(), dask.config.set({"kmeans_dask.task-bytes": 1}):
            done["km"] = KMeans(64, init="random", n_init=1, random_state=0, max_iter=60,
                                tol=0).fit(X)

    thread = threading.Thread(target=fit)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 900, "height": 1100})
            problems = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}")
                    if r.status >= 400 else None)
            page.goto(link.replace("/kmeans", "/status"))
            page.wait_for_selector(".bk-Canvas, canvas", timeout=30_000)
            page.goto(link)
            # window.Bokeh: the predicate may run before BokehJS has defined it.
            read = ("() => { const d = window.Bokeh && Bokeh.documents[0];"
                    " const s = d && d.get_model_by_name('iterations');"
                    " return s ? s.data.iteration.length : 0; }")
            # Generous: two whole test suites may share the two cores (xdist).
            try:
                page.wait_for_function(f"({read})() >= 2", timeout=180_000)
            except Exception as exc:
                # Say whether the scheduler had the iterations and the page did
                # not, or the fit never reached this cluster.
                _, served = _get(link + "/data/iterations.json")
                rows = len(json.loads(served).get("iteration", []))
                fit_state = "finished" if "km" in done else "not finished"
                raise AssertionError(
                    f"the page showed fewer than 2 iterations in 180 s ({exc}); the "
                    f"scheduler served {rows} iterations; the fit was {fit_state}; "
                    f"page messages: {problems[-10:]}") from exc
            seen = page.evaluate(read)
            shot = tmp_path / "kmeans-page.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        thread.join()
    assert seen >= 2
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 5  # not a blank page
    assert done["km"].n_iter_ >= seen
