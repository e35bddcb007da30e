"""A real S3 API server for the tests: moto's standalone ``moto_server`` on 127.0.0.1.

The same approach as s3fs's own test suite: one server process per test
module, started on a free loopback port and stopped by its process id.  The
environment variables that boto3/s3fs read (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) are what a job, a ``dask scheduler`` or a ``dask
worker`` is given to reach it, exactly as a user sets them for a real store.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Fake credentials for moto; never real ones.
KEY_ID = "testing-key-id"
SECRET = "testing-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server() -> str | None:
    exe = Path(sys.executable).parent / "moto_server"
    return str(exe) if exe.exists() else shutil.which("moto_server")


class S3Server:
    """``moto_server -H 127.0.0.1 -p PORT`` in a process of its own."""

    def __init__(self, workdir: Path, *, auth: bool = False):
        exe = _moto_server()
        if exe is None:
            pytest.skip("moto_server not installed (pip install 'moto[server]')")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if auth:
            # Every request is authenticated against moto's IAM, where no key exists:
            # any access key is then wrong, as a mistyped real one would be.
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.log = open(workdir / f"moto-{self.port}.log", "wb")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=workdir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}; see {workdir}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint}")

    def env(self, **extra) -> dict:
        """The environment of a process that reaches this server as its S3 endpoint."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID=KEY_ID,
                   AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true")
        env.update(extra)
        return env

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset endpoint)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """One moto server per test module."""
    server = S3Server(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process reaches the module's moto server through the standard variables,
    with a fresh filesystem cache (s3fs caches instances and listings)."""
    import fsspec

    for key, value in s3_server.env().items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("AWS_") and k not in s3_server.env()]:
        monkeypatch.delenv(key)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    yield s3_server
    fsspec.get_filesystem_class("s3").clear_instance_cache()


def make_bucket(name: str) -> str:
    """Create ``name`` on the current endpoint; returns ``s3://name``."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
