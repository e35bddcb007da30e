"""The docker compose recipe (deploy/docker-compose.yml), run as written on loopback.

This machine runs no Docker daemon and reaches no image registry, so the
containers themselves cannot start here.  What can be checked is everything
inside them: each service's own command and environment, read from the
compose file, run as a real process in an empty working directory of its own
(nothing shared but the object store), with the compose network's host names
mapped to 127.0.0.1 as Docker's DNS would map them to the containers, and
moto's S3 server standing in for MinIO.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from s3_server import S3Server, free_port

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"


def _stop(proc):
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_compose_services_run_their_commands_with_nothing_shared_but_the_bucket(tmp_path):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    dask_exe = str(Path(sys.executable).parent / "dask")
    s3 = S3Server(tmp_path)
    port, dash = free_port(), free_port()
    # The compose network's names, as Docker's DNS resolves them, here on loopback;
    # the image's /opt/kmeans-dask is this checkout.
    names = {"http://minio:9000": s3.endpoint, "tcp://scheduler:8786": f"tcp://127.0.0.1:{port}",
             "/opt/kmeans-dask/": f"{ROOT}/"}

    def local(text: str) -> str:
        for a, b in names.items():
            text = text.replace(a, b)
        return re.sub(r"(?<![\w/.-])python(?![\w.-])", sys.executable, text)

    def env_of(service: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({k: local(str(v)) for k, v in (services[service].get("environment") or {}).items()})
        return env

    procs = []
    try:
        # The bucket service: `mc mb s3/<bucket>` against the store.
        bucket = re.search(r"mc mb (?:--ignore-existing )?s3/([\w.-]+)",
                           " ".join(services["bucket"]["entrypoint"])).group(1)
        import s3fs

        worker_env = env_of("worker")
        fs = s3fs.S3FileSystem(endpoint_url=worker_env["AWS_ENDPOINT_URL"],
                               key=worker_env["AWS_ACCESS_KEY_ID"],
                               secret=worker_env["AWS_SECRET_ACCESS_KEY"])
        fs.mkdir(bucket)

        cmd = services["scheduler"]["command"]
        assert cmd[:2] == ["dask", "scheduler"]
        # Its published ports, bound to loopback: the host, the port and the dashboard's.
        args = [{"0.0.0.0": "127.0.0.1", "8786": str(port), ":8787": f"127.0.0.1:{dash}"}.get(a, a)
                for a in cmd[2:]]
        (tmp_path / "scheduler").mkdir()
        with open(tmp_path / "scheduler.log", "wb") as log:
            procs.append(subprocess.Popen([dask_exe, "scheduler", *args], cwd=tmp_path / "scheduler",
                                          env=env_of("scheduler"), stdout=log,
                                          stderr=subprocess.STDOUT))
        worker = services["worker"]
        replicas = worker["deploy"]["replicas"]
        for i in range(replicas):
            wd = tmp_path / f"worker-{i}"
            wd.mkdir()
            wcmd = [local(a) for a in worker["command"]]
            assert wcmd[:2] == ["dask", "worker"]
            with open(tmp_path / f"worker-{i}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [dask_exe, *wcmd[1:], "--host", "127.0.0.1", "--no-dashboard"], cwd=wd,
                    env=worker_env, stdout=log, stderr=subprocess.STDOUT))
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(replicas, timeout=120)

        job = services["job"]
        assert job["entrypoint"] == ["sh", "-c"]
        (tmp_path / "job").mkdir()
        t = time.monotonic()
        run = subprocess.run(["sh", "-c", local(" ".join(job["command"]))], cwd=tmp_path / "job",
                             env=env_of("job"), capture_output=True, text=True, timeout=900)
        took = time.monotonic() - t
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        assert f"{replicas} workers" in run.stderr, run.stderr[-3000:]
        objects = fs.find(bucket)
        assert f"{bucket}/fashion-k10.zarr/zarr.json" in objects, objects[:20]
        assert any(o.endswith("/metrics.json") for o in objects), objects[:20]
        # Nothing was written where the processes ran: the bucket is all they share.
        for name in ["scheduler", "job"] + [f"worker-{i}" for i in range(replicas)]:
            written = [p for p in (tmp_path / name).rglob("*")
                       if p.is_file() and "dask-scratch-space" not in p.parts]
            assert not written, (name, written)
        print(f"compose job (ingest, fit K=10, evaluate) on {replicas} workers: {took:.1f} s")
    finally:
        for proc in reversed(procs):
            _stop(proc)
        s3.stop()
