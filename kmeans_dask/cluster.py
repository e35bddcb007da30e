"""Where a job runs: ``cluster.yaml`` as typed configuration, and a Client for it.

The file has two sections; ``mode`` picks one::

    mode: local            # or: remote, jobqueue, kubernetes
    local:
      n_workers: 2
      threads_per_worker: 1
      memory_limit: auto   # per worker: "auto", bytes, or "4GiB"
      dashboard_address: 127.0.0.1:8787
    remote:
      address: tcp://127.0.0.1:8786   # or tls://...
      timeout: 10                     # seconds to wait for the scheduler
      tls:                            # required for tls:// addresses
        ca_file: ca.pem
        cert_file: client-cert.pem
        key_file: client-key.pem

A ``--scheduler ADDRESS`` given to a job overrides the file and selects remote
mode.  Every key is checked on load; an unknown key or a value of the wrong
type is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import dask
import yaml

from .errors import ClusterError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalConfig:
    """An embedded :class:`distributed.LocalCluster` of worker processes on loopback."""

    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | int = "auto"
    dashboard_address: str = "127.0.0.1:8787"


@dataclass(frozen=True)
class TLSConfig:
    """Certificate paths for a ``tls://`` scheduler."""

    ca_file: str
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class RemoteConfig:
    """An existing ``distributed`` scheduler to connect to."""

    address: str
    timeout: float = 10.0
    tls: TLSConfig | None = None


@dataclass(frozen=True)
class ManagerConfig:
    """A cluster manager that starts its own scheduler and workers: dask-jobqueue on a
    batch system (``mode: jobqueue``) or dask-kubernetes' operator (``mode: kubernetes``).

    ``options`` are the keyword arguments of the manager's class, passed unchanged
    (see :data:`MANAGERS`); ``n_workers`` is what the job scales it to, and
    ``timeout`` how long it waits for the first worker.
    """

    system: str = "slurm"
    n_workers: int = 2
    timeout: float = 600.0
    options: dict = field(default_factory=dict)


# mode -> system -> (module, class, package to install)
# distributed's nanny starts workers with MALLOC_TRIM_THRESHOLD_ at 64 KiB, and
# setting it stops glibc from raising its mmap threshold: every chunk-sized
# array a worker makes is then a fresh mapping whose pages fault in one by one,
# which cost more than decoding the chunk (6 of 11 ms per streamed chunk of
# 10,000 MNIST rows).  With these, the arrays reuse the heap, and at most
# 128 MiB of it is kept free.  glibc reads them when a process starts, so they
# go in ``distributed.nanny.pre-spawn-environ`` (``environ`` is set too late).
# The nanny lets a variable already in this process's environment win over
# that setting, and leaves its own pre-spawn values there after spawning, so
# any LocalCluster started earlier in the process (its 64 KiB trim threshold
# included) would override these: they are put in the environment too while
# the workers spawn (:func:`_environ`).
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                 "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20)}


@contextlib.contextmanager
def _environ(values: dict):
    """``os.environ`` updated with ``values`` inside, as it was afterwards."""
    import os

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

MANAGERS = {
    "jobqueue": {name.lower().removesuffix("cluster"): ("dask_jobqueue", name, "dask-jobqueue")
                 for name in ("SLURMCluster", "PBSCluster", "SGECluster", "LSFCluster",
                              "HTCondorCluster", "MoabCluster", "OARCluster")},
    "kubernetes": {"operator": ("dask_kubernetes.operator", "KubeCluster", "dask-kubernetes")},
}


@dataclass(frozen=True)
class ClusterConfig:
    mode: str = "local"
    local: LocalConfig = field(default_factory=LocalConfig)
    remote: RemoteConfig | None = None
    manager: ManagerConfig | None = None  # for mode jobqueue or kubernetes
    # Per URL scheme, options for its fsspec file system (s3fs, gcsfs, adlfs).
    storage_options: dict = field(default_factory=dict)


def _typed(section: str, cls, raw, types: dict):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key (expected one of {sorted(known)})")
        want = types.get(key)
        if want is not None and (not isinstance(value, want) or isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(f"{section}.{key}: expected {names}, got {value!r}")
    return raw


def parse_config(raw, origin: str = "cluster.yaml") -> ClusterConfig:
    """Build a :class:`ClusterConfig` from parsed YAML, checking every key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in ("mode", "local", "remote", "jobqueue", "kubernetes", "storage_options"):
            raise ConfigError(f"{origin}: unknown key {key!r} (expected mode, local, remote); "
                              f"or jobqueue, kubernetes, storage_options")
    mode = raw.get("mode", "local")
    if mode not in ("local", "remote", "jobqueue", "kubernetes"):
        raise ConfigError(f"{origin}: mode: expected 'local' or 'remote', got {mode!r}; or "
                          f"'jobqueue' or 'kubernetes' for a cluster manager")
    loc = _typed(f"{origin}: local", LocalConfig, raw.get("local"), {
        "n_workers": int, "threads_per_worker": int, "memory_limit": (str, int),
        "dashboard_address": str,
    })
    local = LocalConfig(**loc)
    if local.n_workers < 1 or local.threads_per_worker < 1:
        raise ConfigError(f"{origin}: local.n_workers and local.threads_per_worker must be >= 1")
    _check_memory_limit(local.memory_limit, origin)
    _check_dashboard_address(local.dashboard_address, origin)
    remote = None
    if raw.get("remote") is not None:
        rem = dict(_typed(f"{origin}: remote", RemoteConfig, raw["remote"], {
            "address": str, "timeout": (int, float), "tls": dict,
        }))
        if "address" not in rem:
            raise ConfigError(f"{origin}: remote.address is required")
        if rem.get("tls") is not None:
            tls = _typed(f"{origin}: remote.tls", TLSConfig, rem["tls"], {
                "ca_file": str, "cert_file": str, "key_file": str,
            })
            missing = [f.name for f in fields(TLSConfig) if f.name not in tls]
            if missing:
                raise ConfigError(f"{origin}: remote.tls lacks {missing}")
            rem["tls"] = TLSConfig(**tls)
        remote = RemoteConfig(**rem)
        if not (math.isfinite(remote.timeout) and remote.timeout > 0):
            raise ConfigError(f"{origin}: remote.timeout: expected a number of seconds > 0, "
                              f"got {remote.timeout!r}")
        _check_address(remote, origin)
    if mode == "remote" and remote is None:
        raise ConfigError(f"{origin}: mode is 'remote' but there is no remote section")
    manager = None
    if mode in MANAGERS:
        manager = _manager(mode, raw.get(mode), origin)
    return ClusterConfig(mode=mode, local=local, remote=remote, manager=manager,
                         storage_options=_storage_options(raw.get("storage_options"), origin))


def _manager(mode: str, raw, origin: str) -> ManagerConfig:
    if raw is None:
        raise ConfigError(f"{origin}: mode is {mode!r} but there is no {mode} section")
    default = "slurm" if mode == "jobqueue" else "operator"
    got = dict(_typed(f"{origin}: {mode}", ManagerConfig, raw, {
        "system": str, "n_workers": int, "timeout": (int, float), "options": dict}))
    got.setdefault("system", default)
    if got["system"] not in MANAGERS[mode]:
        raise ConfigError(f"{origin}: {mode}.system: expected one of {sorted(MANAGERS[mode])}, "
                          f"got {got['system']!r}")
    manager = ManagerConfig(**got)
    if manager.n_workers < 1:
        raise ConfigError(f"{origin}: {mode}.n_workers must be >= 1")
    if not (math.isfinite(manager.timeout) and manager.timeout > 0):
        raise ConfigError(f"{origin}: {mode}.timeout: expected a number of seconds > 0")
    if not all(isinstance(k, str) and k.isidentifier() for k in manager.options):
        raise ConfigError(f"{origin}: {mode}.options: expected keyword arguments of "
                          f"{'.'.join(MANAGERS[mode][manager.system][:2])}")
    return manager


def manager_class(config: ClusterConfig):
    """The cluster manager class of a ``jobqueue`` or ``kubernetes`` configuration, imported.

    Raises
    ------
    ClusterError
        Its package is not installed (the message says which).
    """
    import importlib

    module, name, package = MANAGERS[config.mode][config.manager.system]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ClusterError(f"mode {config.mode!r} needs {package} ({exc}); install it with: "
                           f"pip install {package}") from None


def start_manager(config: ClusterConfig):
    """Construct the configured cluster manager with its options (not yet scaled)."""
    cls = manager_class(config)
    try:
        return cls(**config.manager.options)
    except Exception as exc:
        raise ClusterError(f"could not start {cls.__name__} ({type(exc).__name__}: {exc}); "
                           f"check the {config.mode} section of the cluster configuration") from exc


def _storage_options(raw, origin: str) -> dict:
    """``storage_options``: per URL scheme (``s3``, ``gs``, ``az``...) a mapping of keyword
    arguments for its fsspec file system; values are never echoed (they may be secrets)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: storage_options: expected a mapping of URL schemes, got "
                          f"{type(raw).__name__}")
    for scheme, opts in raw.items():
        if not isinstance(scheme, str) or not scheme.isidentifier():
            raise ConfigError(f"{origin}: storage_options: {scheme!r} is not a URL scheme")
        if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
            raise ConfigError(f"{origin}: storage_options.{scheme}: expected a mapping of "
                              f"option names to values")
    return {scheme: dict(opts) for scheme, opts in raw.items()}


def _check_memory_limit(value, origin: str) -> None:
    from dask.utils import parse_bytes

    if value == "auto":
        return
    try:
        nbytes = parse_bytes(value) if isinstance(value, str) else value
    except (ValueError, TypeError):
        nbytes = None
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise ConfigError(f"{origin}: local.memory_limit: expected 'auto', a number of bytes > 0 "
                          f"or a size such as '4GiB', got {value!r}")


def _check_dashboard_address(value: str, origin: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or " " in host:
        raise ConfigError(f"{origin}: local.dashboard_address: expected HOST:PORT or :PORT "
                          f"(port 0-65535), got {value!r}")


def _check_address(remote: RemoteConfig, origin: str) -> None:
    if not remote.address.startswith(("tcp://", "tls://")):
        raise ConfigError(
            f"{origin}: remote.address: expected tcp://HOST:PORT or tls://HOST:PORT, "
            f"got {remote.address!r}"
        )
    if remote.address.startswith("tls://") and remote.tls is None:
        raise ConfigError(f"{origin}: remote.address is tls:// but remote.tls is not set")


def load_config(path=None, scheduler: str | None = None) -> ClusterConfig:
    """Read ``cluster.yaml`` (if ``path`` is given) and apply a ``--scheduler`` override.

    Raises
    ------
    ConfigError
        Unreadable or malformed file, unknown key, wrong type or bad address.
    """
    config = ClusterConfig()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: cluster configuration not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: malformed YAML: {exc}") from exc
        config = parse_config(raw, str(path))
    if scheduler:
        tls = config.remote.tls if config.remote else None
        timeout = config.remote.timeout if config.remote else 10.0
        remote = RemoteConfig(address=scheduler, timeout=timeout, tls=tls)
        _check_address(remote, "--scheduler")
        config = replace(config, mode="remote", remote=remote)
    return config


def security_for(tls: TLSConfig | None):
    """A :class:`distributed.security.Security` for ``tls`` (None for plain TCP)."""
    if tls is None:
        return None
    from distributed.security import Security

    for name in ("ca_file", "cert_file", "key_file"):
        if not Path(getattr(tls, name)).is_file():
            raise ConfigError(f"remote.tls.{name}: {getattr(tls, name)} does not exist")
    return Security(
        tls_ca_file=tls.ca_file,
        tls_client_cert=tls.cert_file,
        tls_client_key=tls.key_file,
        require_encryption=True,
    )


@contextlib.contextmanager
def connect(config: ClusterConfig):
    """Yield a :class:`distributed.Client` for ``config``, closed on exit.

    In local mode a LocalCluster of worker processes is started on 127.0.0.1
    (scheduler, workers and dashboard on loopback) and shut down afterwards.
    In remote mode the client only connects; it never starts a cluster.

    Raises
    ------
    ClusterError
        The scheduler could not be reached within ``remote.timeout`` seconds.
    """
    from distributed import Client, LocalCluster

    if config.mode in MANAGERS:
        with start_manager(config) as cluster:
            cluster.scale(config.manager.n_workers)
            with Client(cluster) as client:
                try:
                    client.wait_for_workers(1, timeout=config.manager.timeout)
                except TimeoutError as exc:
                    raise ClusterError(f"no worker of {type(cluster).__name__} joined within "
                                       f"{config.manager.timeout:g} s") from exc
                yield client
        return
    if config.mode == "remote":
        remote = config.remote
        try:
            client = Client(remote.address, timeout=remote.timeout,
                            security=security_for(remote.tls))
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"could not reach the scheduler at {remote.address} within "
                f"{remote.timeout:g} s: {exc}"
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    local = config.local
    # Worker processes start with SIGINT ignored (a child keeps an ignored signal), so
    # Ctrl-C reaches only the job, which then shuts its cluster down in order instead
    # of every worker printing its own traceback.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        spawn_env = {**(dask.config.get("distributed.nanny.pre-spawn-environ") or {}),
                     **WORKER_MALLOC}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn_env}), \
                _environ(WORKER_MALLOC):
            cluster = LocalCluster(
                n_workers=local.n_workers,
                threads_per_worker=local.threads_per_worker,
                memory_limit=local.memory_limit,
                processes=True,
                host="127.0.0.1",
                dashboard_address=local.dashboard_address,
            )
    except Exception as exc:
        raise ClusterError(f"could not start the local cluster ({type(exc).__name__}: {exc}); "
                           f"check the local section of the cluster configuration") from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    with cluster, Client(cluster) as client:
        try:
            yield client
        except KeyboardInterrupt:
            # The shutdown that follows can race a worker's heartbeat against the
            # scheduler's exit, which the worker would log with a traceback.
            try:
                client.run(_quiet_logs, on_error="ignore")
            except Exception:  # noqa: BLE001 - the interrupt is what matters
                pass
            raise


def _quiet_logs() -> None:
    import logging

    logging.disable(logging.CRITICAL)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def describe(client) -> str:
    """One line saying where the client is connected and where the dashboard is."""
    workers = worker_info(client)
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    from .dashboard import page_link

    link = client.dashboard_link or "(no dashboard)"
    page = page_link(client)
    plural = "" if len(workers) == 1 else "s"
    return (f"scheduler {client.scheduler.address}: {len(workers)} worker{plural}, {threads} threads; "
            f"dashboard {link}" + (f"; K-Means page {page}" if page else ""))


def active_client():
    """The current ``distributed`` client, or None (no client, or distributed not installed)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def local_threads(client) -> int | None:
    """The worker threads of ``client``'s cluster when its workers all share this
    machine's files and cores (a LocalCluster this process started, or workers at
    this machine's addresses), else None."""
    from distributed import LocalCluster
    from distributed.comm import get_address_host

    threads = client.nthreads()
    if not isinstance(getattr(client, "cluster", None), LocalCluster):
        try:
            hosts = {get_address_host(addr) for addr in threads}
        except ValueError:  # an address of a kind that names no host
            return None
        if not hosts or not all(_this_machine(h) for h in hosts):
            return None
    return sum(threads.values()) or None


def _this_machine(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine: a loopback address,
    or one of its network interfaces' addresses."""
    import ipaddress

    import psutil

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return False
    if ip.is_loopback:
        return True
    mine = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return str(ip) in mine


def worker_info(client) -> dict:
    """Every worker's entry in the scheduler's info, ``{address: info}``.

    Newer ``distributed`` releases list only a few workers unless asked for all.
    """
    import inspect

    takes_n = "n_workers" in inspect.signature(client.scheduler_info).parameters
    info = client.scheduler_info(n_workers=-1) if takes_n else client.scheduler_info()
    return info.get("workers", {})
