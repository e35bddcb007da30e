"""cluster.yaml's cluster managers (dask-jobqueue, dask-kubernetes) and the compose recipe.

No batch system or Kubernetes API is here, and none is faked: the configuration
is parsed and checked, and the manager's class is the one named.  SLURMCluster
is constructed for real (it only starts a scheduler on loopback until scaled)
and its job script shows the options; KubeCluster would need an API server, so
only the class and its arguments are checked.
"""

from __future__ import annotations

import inspect

import pytest
import yaml

from conftest import ROOT
from kmeans_dask import cluster
from kmeans_dask.errors import ConfigError

SLURM = {"mode": "jobqueue", "jobqueue": {"system": "slurm", "n_workers": 3, "timeout": 30,
                                          "options": {"cores": 1, "memory": "2GiB",
                                                      "queue": "normal", "account": "proj",
                                                      "walltime": "00:10:00",
                                                      "scheduler_options": {
                                                          "host": "127.0.0.1",
                                                          "dashboard_address": ":0"}}}}
KUBE = {"mode": "kubernetes", "kubernetes": {"n_workers": 2, "options": {
    "name": "kmeans-dask", "image": "kmeans-dask:local", "env": {"AWS_ENDPOINT_URL": "http://s3"}}}}


def test_jobqueue_section_is_parsed_and_checked():
    config = cluster.parse_config(SLURM)
    assert config.mode == "jobqueue" and config.manager.system == "slurm"
    assert config.manager.n_workers == 3 and config.manager.timeout == 30
    assert config.manager.options["queue"] == "normal"
    for bad, message in (
            ({"mode": "jobqueue"}, "mode is 'jobqueue' but there is no jobqueue section"),
            ({"mode": "jobqueue", "jobqueue": {"system": "torque"}}, "jobqueue.system: expected one of"),
            ({"mode": "jobqueue", "jobqueue": {"n_workers": 0}}, "jobqueue.n_workers must be >= 1"),
            ({"mode": "jobqueue", "jobqueue": {"n_workers": "2"}}, "n_workers"),
            ({"mode": "jobqueue", "jobqueue": {"cores": 1}}, "jobqueue.cores: unknown key"),
            ({"mode": "jobqueue", "jobqueue": {"options": {"1x": 2}}}, "jobqueue.options"),
            ({"mode": "swarm"}, "or 'jobqueue' or 'kubernetes' for a cluster manager")):
        with pytest.raises(ConfigError, match=message):
            cluster.parse_config(bad, "c.yaml")


def test_slurm_cluster_is_constructed_with_the_options():
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed")
    from dask_jobqueue import SLURMCluster

    config = cluster.parse_config(SLURM)
    assert cluster.manager_class(config) is SLURMCluster
    with cluster.start_manager(config) as manager:  # not scaled: no job is submitted
        assert isinstance(manager, SLURMCluster)
        script = manager.job_script()
        assert manager.scheduler_address.startswith("tcp://127.0.0.1:")
    for line in ("#SBATCH -p normal", "#SBATCH -A proj", "#SBATCH --mem=2G",
                 "#SBATCH -t 00:10:00", "--nthreads 1"):
        assert line in script, script


def test_kubernetes_section_names_the_operators_kubecluster():
    config = cluster.parse_config(KUBE)
    assert config.manager.system == "operator" and config.manager.n_workers == 2
    try:
        cls = cluster.manager_class(config)
    except cluster.ClusterError as exc:
        assert "pip install dask-kubernetes" in str(exc)
        pytest.skip(f"dask-kubernetes not installed: {exc}")
    from dask_kubernetes.operator import KubeCluster

    assert cls is KubeCluster
    params = inspect.signature(KubeCluster.__init__).parameters
    assert set(config.manager.options) <= set(params)  # every option is one of its arguments


def test_committed_cluster_yaml_and_its_commented_modes_parse():
    text = (ROOT / "cluster.yaml").read_text()
    assert cluster.parse_config(yaml.safe_load(text)).mode == "local"
    # The commented sections, uncommented, are valid configurations too.
    lines = text.splitlines()
    for mode in ("jobqueue", "kubernetes"):
        start = lines.index(f"# {mode}:")
        block = []
        for line in lines[start:]:
            if not line.startswith("#"):
                break
            block.append(line[2:])
        raw = {"mode": mode, **yaml.safe_load("\n".join(block))}
        assert cluster.parse_config(raw).manager.n_workers >= 1


def test_compose_recipe_shares_nothing_but_the_bucket():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"minio", "scheduler", "worker", "job"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == 2
    for name in ("scheduler", "worker", "job"):
        assert "volumes" not in services[name]
    for name in ("worker", "job"):
        assert services[name]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "s3://kmeans/fashion-k10.zarr" in " ".join(services["job"]["command"])
