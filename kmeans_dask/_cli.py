"""Plumbing shared by the job scripts: logging, cluster options, exit codes.

A job's ``main`` raises :class:`~kmeans_dask.errors.KMeansDaskError` for
anything the user can fix; :func:`run` turns that into ``error: ...`` on
stderr and exit status 2.  Other exceptions keep their traceback (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time

from . import cluster, dashboard
from .errors import KMeansDaskError

EXIT_USAGE = 2


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster")
    group.add_argument("--cluster", metavar="FILE", default=None,
                       help="cluster.yaml describing a local or remote cluster "
                            "(default: an embedded LocalCluster of 2 workers x 1 thread)")
    group.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="connect to this tcp:// or tls:// scheduler (overrides --cluster)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings and errors")


def add_model_options(parser: argparse.ArgumentParser, *, k_required: bool = True) -> None:
    group = parser.add_argument_group("K-Means")
    if k_required:
        group.add_argument("--k", type=int, required=True, help="number of clusters")
    group.add_argument("--init", default=None, choices=["k-means||", "k-means++", "random"],
                       help="initialisation (default: k-means|| for lloyd, k-means++ on a sample "
                            "for minibatch)")
    group.add_argument("--algorithm", default="lloyd", choices=["lloyd", "minibatch"],
                       help="lloyd (KMeans) or minibatch (MiniBatchKMeans); default: %(default)s")
    group.add_argument("--max-iter", type=int, default=None,
                       help="Lloyd iterations (default: 300), or mini-batch passes over the data "
                            "(default: 100)")
    group.add_argument("--tol", type=float, default=None,
                       help="tolerance on the centre shift, relative to the data's mean variance "
                            "(default: 1e-4 for lloyd, 0 for minibatch)")
    group.add_argument("--n-init", type=int, default=None,
                       help="initialisations, best kept (default: scikit-learn's 'auto': 1, "
                            "or 10 (lloyd) and 3 (minibatch) for --init random)")
    group.add_argument("--metric", default="euclidean", choices=["euclidean", "cosine"],
                       help="cosine: spherical K-Means (lloyd only); default: %(default)s")
    group.add_argument("--batch-size", type=int, default=None,
                       help="mini-batch rows (--algorithm minibatch; default: 1024)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


# What an option left unset means, per algorithm: the estimator's own defaults.
DEFAULTS = {
    "lloyd": {"init": "k-means||", "max_iter": 300, "tol": 1e-4, "n_init": "auto"},
    "minibatch": {"init": "k-means++", "max_iter": 100, "tol": 0.0, "n_init": "auto"},
}


def model_params(args) -> dict:
    """Estimator parameters from the job's options: for ``--algorithm minibatch``
    those of :class:`~kmeans_dask.MiniBatchKMeans` (with ``algorithm`` kept as the
    switch :func:`kmeans_dask.minibatch.make_estimator` reads)."""
    algorithm = getattr(args, "algorithm", "lloyd")
    params = {"algorithm": algorithm, "random_state": args.seed}
    for name, default in DEFAULTS[algorithm].items():
        value = getattr(args, name, None)
        params[name] = default if value is None else value
    batch_size = getattr(args, "batch_size", None)
    if algorithm == "minibatch":
        params["batch_size"] = 1024 if batch_size is None else batch_size
    elif batch_size is not None:
        raise ValueError("--batch-size is a mini-batch option; add --algorithm minibatch")
    metric = getattr(args, "metric", "euclidean")
    if metric != "euclidean":
        if algorithm == "minibatch":
            raise ValueError("--metric cosine is a Lloyd option; MiniBatchKMeans is Euclidean")
        params["metric"] = metric
    if getattr(args, "k", None) is not None:
        params["n_clusters"] = args.k
    return params


def check_model_params(params: dict) -> None:
    """The estimator's own parameter checks, run before a cluster starts."""
    from .minibatch import make_estimator

    make_estimator(params)._validate_params()


def iteration_bar(total, desc: str, quiet: bool):
    """Progress for a fit's callback: a tqdm bar on a terminal; otherwise a log
    line every 10 Lloyd iterations, or every 10 s of mini-batch steps (``total``
    None), so redirected output stays readable."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty() and not quiet
    bar = tqdm(total=total, desc=desc, unit="it", disable=not interactive, file=sys.stderr,
               dynamic_ncols=True)
    log = logging.getLogger("kmeans_dask.progress")

    # The iterations' clock starts with the first one (not with set-up and init),
    # and counts them itself (a disabled bar does not).
    started = [None]
    done = [0]
    logged = [0.0]

    def due(record) -> bool:
        # Lloyd: every 10 iterations.  Mini-batch (no total): its steps take
        # milliseconds, so at most one line every 10 seconds.
        if total:
            return record["iteration"] % 10 == 0
        if time.monotonic() - logged[0] >= 10.0:
            logged[0] = time.monotonic()
            return True
        return False

    def callback(record):
        bar.update(1)
        done[0] += 1
        if started[0] is None:
            started[0] = logged[0] = time.monotonic() - record.get("seconds", 0.0)
        post = {"inertia": f"{record['inertia']:.6g}", "shift": f"{record['center_shift']:.2e}"}
        if "skipped" in record:
            post["skipped"] = f"{record['skipped']:.0%}"
        bar.set_postfix(post, refresh=False)
        if interactive or not due(record):
            return
        elapsed = time.monotonic() - started[0]
        if not total:
            log.info("%s: step %d, batch inertia %.6g per row, centre shift %.2e; steps %.1f s",
                     desc, record["iteration"], record["inertia"], record["center_shift"],
                     elapsed)
            return
        # An upper bound: the fit stops earlier once the shift is under tol.
        left = elapsed / done[0] * (total - record["iteration"])
        extra = (f", rows moved {record['changed']}, distances skipped "
                 f"{record['skipped']:.0%}" if "skipped" in record else "")
        log.info("%s: iteration %d, inertia %.6g, centre shift %.2e%s; iterations %.1f s, "
                 "at most %.0f s left (max_iter %s)", desc, record["iteration"],
                 record["inertia"], record["center_shift"], extra, elapsed, left, total)

    return bar, callback


def chunk_bar(desc: str, quiet: bool):
    """A tqdm bar for ``progress(done, total)`` callbacks (chunks written) on a
    terminal; a log line every tenth of the work otherwise (none when ``quiet``)."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty() and not quiet
    bar = tqdm(desc=desc, unit="chunk", disable=not interactive, file=sys.stderr,
               dynamic_ncols=True)
    log = logging.getLogger("kmeans_dask.progress")
    logged = [0]

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)
        # Redirected output gets a line per tenth of the work instead of a bar.
        if not interactive and (done * 10 // total > logged[0] or done == total):
            logged[0] = done * 10 // total
            log.info("%s: %d of %d chunks", desc, done, total)

    return bar, progress


@contextlib.contextmanager
def open_client(args):
    """A connected Client for the job's cluster options; says where it is on stderr."""
    config = cluster.load_config(args.cluster, args.scheduler)
    with cluster.connect(config) as client:
        # The page is added now, not at the first fit's start, so that the link
        # printed here works as soon as the user opens it.
        dashboard.register(client)
        print(cluster.describe(client), file=sys.stderr)
        yield client


def _terminate(signum, frame):
    # Turn SIGTERM into an exception so atomic writers remove their temporary files.
    raise SystemExit(128 + signum)


def _interrupt(signum, frame):
    # What the cluster logs while it shuts down after Ctrl-C is noise to the user.
    logging.disable(logging.CRITICAL)
    raise KeyboardInterrupt


def run(main, argv=None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return main(argv) or 0
    except (KMeansDaskError, ValueError) as exc:
        # ValueError: the estimator's parameter and data checks, which name the bad value.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        # A full disk, a permission problem: the outputs were written atomically, so
        # nothing half-written is left; say which file and why.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; no partial output is left", file=sys.stderr)
        return 130


def setup(args) -> None:
    """What every job does first: logging, and ``--cluster``'s ``storage_options`` for the
    store URLs it is given (so they are checked, and reach the workers, with them)."""
    setup_logging(args.quiet)
    if getattr(args, "cluster", None):
        from . import store

        store.set_storage_options(cluster.load_config(args.cluster).storage_options)


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    # distributed sets its own loggers to INFO; only our INFO lines are worth showing.
    handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("kmeans_dask"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("kmeans_dask").setLevel(logging.WARNING if quiet else logging.INFO)
