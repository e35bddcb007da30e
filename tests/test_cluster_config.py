"""cluster.yaml parsing and validation, and the local workers' settings (cluster.py)."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest

from kmeans_dask import cluster
from kmeans_dask.errors import ConfigError

from conftest import ROOT


def test_shipped_cluster_yaml_is_valid():
    config = cluster.load_config(ROOT / "cluster.yaml")
    assert config.mode == "local"
    assert config.local.dashboard_address.startswith("127.0.0.1:")
    assert config.remote.address == "tcp://127.0.0.1:8786"


def test_defaults_without_a_file():
    config = cluster.load_config(None)
    assert config == cluster.ClusterConfig()
    assert config.local.n_workers == 2 and config.local.threads_per_worker == 1


def test_scheduler_option_overrides_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: local\nremote:\n  address: tcp://127.0.0.1:9999\n  timeout: 3\n")
    config = cluster.load_config(f, "tcp://127.0.0.1:8786")
    assert config.mode == "remote"
    assert config.remote.address == "tcp://127.0.0.1:8786" and config.remote.timeout == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("mode: cloud\n", "c.yaml: mode: expected 'local' or 'remote', got 'cloud'"),
        ("workers: 3\n", "c.yaml: unknown key 'workers' (expected mode, local, remote)"),
        ("local:\n  n_worker: 3\n", "c.yaml: local.n_worker: unknown key"),
        ("local:\n  n_workers: two\n", "c.yaml: local.n_workers: expected int, got 'two'"),
        ("local:\n  n_workers: 0\n", "c.yaml: local.n_workers and local.threads_per_worker must be >= 1"),
        ("local: [1, 2]\n", "c.yaml: local: expected a mapping, got list"),
        ("mode: remote\n", "c.yaml: mode is 'remote' but there is no remote section"),
        ("remote:\n  timeout: 3\n", "c.yaml: remote.address is required"),
        ("remote:\n  address: 127.0.0.1:8786\n", "c.yaml: remote.address: expected tcp://HOST:PORT or tls://HOST:PORT, got '127.0.0.1:8786'"),
        ("remote:\n  address: tls://127.0.0.1:8786\n", "c.yaml: remote.address is tls:// but remote.tls is not set"),
        ("remote:\n  address: tls://h:1\n  tls:\n    ca_file: a\n", "c.yaml: remote.tls lacks ['cert_file', 'key_file']"),
        ("local:\n  n_workers: [\n", "c.yaml: malformed YAML"),
        ("- 1\n- 2\n", "c.yaml: expected a mapping at the top level, got list"),
    ],
)
def test_malformed_files_name_the_key(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        cluster.load_config(f)
    assert str(err.value).startswith(message.replace("c.yaml", str(f), 1)), str(err.value)


def test_missing_file_and_bad_scheduler_option(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cluster configuration not found"):
        cluster.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"--scheduler: remote.address: expected tcp://"):
        cluster.load_config(None, "localhost:8786")


def test_tls_paths_must_exist(tmp_path):
    tls = cluster.TLSConfig(str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    with pytest.raises(ConfigError, match=r"remote.tls.ca_file: .*ca.pem does not exist"):
        cluster.security_for(tls)


@pytest.mark.skipif(not platform.libc_ver()[0] == "glibc",
                    reason="the malloc settings are glibc's; this C library has its own")
def test_local_workers_reuse_the_heap_for_chunk_sized_arrays(monkeypatch):
    """Arrays of a streamed chunk's size, made and freed by task after task, reuse the
    workers' heap: distributed's 64 KiB trim threshold alone would map (and fault
    in) fresh pages for each of them."""
    config = cluster.parse_config({"mode": "local",
                                   "local": {"n_workers": 1, "dashboard_address": ":0"}})
    # distributed's nanny leaves its own 64 KiB trim threshold in the process's
    # environment once any plain LocalCluster has started, and a variable there
    # wins over its configuration: the job's cluster must not inherit it.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")

    def faults():
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def churn(i):
        a = np.full((10_000, 784), i % 7, dtype=np.uint8)  # 7.5 MiB, every page written
        return int(a[::997, ::97].sum())

    with cluster.connect(config) as client:
        env = client.run(lambda: {k: __import__("os").environ.get(k)
                                  for k in cluster.WORKER_MALLOC})
        assert list(env.values()) == [cluster.WORKER_MALLOC]
        client.gather([client.submit(churn, i, pure=False) for i in range(5)])
        before = next(iter(client.run(faults).values()))
        for i in range(40):  # one after another, as a worker's tasks run
            client.submit(churn, i, pure=False).result()
        after = next(iter(client.run(faults).values()))
    pages = 10_000 * 784 // 4096
    print(f"{(after - before) / 40:.0f} minor faults per task of {pages} pages")
    assert after - before < 40 * pages // 10
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # the process's own is left as it was


def test_local_threads_know_workers_on_this_machine():
    """The client's own LocalCluster, and a scheduler's workers at 127.0.0.1, share
    this machine's files and cores; an address of another machine does not."""
    from distributed import Client, LocalCluster

    assert cluster._this_machine("127.0.0.1") and cluster._this_machine("localhost")
    assert not cluster._this_machine("192.0.2.1")  # TEST-NET-1: never assigned
    assert not cluster._this_machine("no-such-host.invalid")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=":0") as lc:
        with Client(lc) as client:
            assert cluster.local_threads(client) == 2
        with Client(lc.scheduler_address) as client:
            assert cluster.local_threads(client) == 2
