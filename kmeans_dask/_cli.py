"""Plumbing shared by the job scripts: logging, cluster options, exit codes.

A job's ``main`` raises :class:`~kmeans_dask.errors.KMeansDaskError` for
anything the user can fix; :func:`run` turns that into ``error: ...`` on
stderr and exit status 2.  Other exceptions keep their traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import cluster
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


def open_client(args):
    """Context manager: a connected Client for the job's cluster options, announced on stderr."""
    config = cluster.load_config(args.cluster, args.scheduler)
    return cluster.connect(config)


def run(main, argv=None) -> int:
    try:
        return main(argv) or 0
    except KMeansDaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    # distributed sets its own loggers to INFO; only our INFO lines are worth showing.
    handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("kmeans_dask"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("kmeans_dask").setLevel(logging.WARNING if quiet else logging.INFO)
