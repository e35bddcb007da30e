"""Object-storage failures as a user meets them: one ``error:`` line naming the URL and
the cause, exit status 2, no secret printed, before any cluster starts."""

from __future__ import annotations

import socket

import pytest

from conftest import run_job
from s3_server import SECRET, S3Server, make_bucket, s3_env, s3_server  # noqa: F401


def _refused(done, *expected):
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert SECRET not in done.stderr + done.stdout and "Traceback" not in done.stderr
    return lines[0]


def test_missing_bucket_is_named_for_inputs_and_outputs(s3_server):
    env = s3_server.env()
    _refused(run_job("ingest", "--dataset", "fashion-mnist", "--out", "s3://kd-missing/data",
                     env=env),
             "s3://kd-missing/data/fashion-mnist.zarr: the bucket 'kd-missing' does not exist")
    _refused(run_job("fit", "--data", "s3://kd-missing/x.zarr", "--k", 2, "--out", "r.zarr",
                     env=env),
             "s3://kd-missing/x.zarr: the bucket 'kd-missing' does not exist")


def test_wrong_credentials_are_named(tmp_path):
    server = S3Server(tmp_path, auth=True)  # every key is unknown to it
    try:
        _refused(run_job("evaluate", "--result", "s3://kd-any/r.zarr", env=server.env()),
                 "s3://kd-any/r.zarr: access denied", "check the credentials")
    finally:
        server.stop()


def test_unreachable_endpoint_is_named():
    # The port stays bound, never listening, for the whole job: connections are
    # refused, and no process of a parallel test (a Dask worker, say) can take it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        env = S3Server.__new__(S3Server)
        env.endpoint = f"http://127.0.0.1:{held.getsockname()[1]}"
        done = run_job("predict", "--result", "s3://kd-any/r.zarr", "--data",
                       "s3://kd-any/d.zarr", "--out", "s3://kd-any/l.zarr",
                       env={**S3Server.env(env), "AWS_MAX_ATTEMPTS": "1"})
    _refused(done, "s3://kd-any/r.zarr: cannot reach the storage endpoint", env.endpoint)


def test_scheme_without_its_package_says_what_to_install(s3_server):
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here; its absence cannot be shown")
    except ImportError:
        pass
    _refused(run_job("fit", "--data", "gs://kd-b/x.zarr", "--k", 2, "--out", "r.zarr"),
             "gs://kd-b/x.zarr: gs:// URLs need a package that is not installed",
             "pip install gcsfs")
    _refused(run_job("fit", "--data", "nosuch://kd-b/x.zarr", "--k", 2, "--out", "r.zarr"),
             "unknown URL scheme nosuch://")


def test_cluster_yaml_storage_options_reach_the_store_and_stay_secret(s3_env, tmp_path):
    make_bucket("kd-options")
    env = {k: v for k, v in s3_env.env().items() if not k.startswith("AWS_")}
    conf = tmp_path / "cluster.yaml"
    conf.write_text(f"storage_options:\n  s3:\n    endpoint_url: {s3_env.endpoint}\n"
                    f"    key: testing-key-id\n    secret: {SECRET}\n")
    # The bucket exists only on the server the options name: it is found, the store is not.
    _refused(run_job("fit", "--data", "s3://kd-options/none.zarr", "--k", 2, "--out", "r.zarr",
                     "--cluster", conf, env=env),
             "s3://kd-options/none.zarr: data store not found")
    conf.write_text("storage_options:\n  s3: [1, 2]\n")
    _refused(run_job("fit", "--data", "s3://kd-options/none.zarr", "--k", 2, "--out", "r.zarr",
                     "--cluster", conf, env=env),
             "storage_options.s3: expected a mapping")
