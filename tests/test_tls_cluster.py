"""A fit over tls:// with a throw-away CA; clients without a valid certificate are refused."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from distributed.security import Security

from kmeans_dask import store

pytestmark = pytest.mark.cluster


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path, key, cert):
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


def make_ca(directory, cn):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / cn, key, cert)
    return key, cert


def make_cert(directory, name, ca_key, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _write(directory / name, key, cert)


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca_key, ca_cert = make_ca(d, "ca")
    other_key, other_cert = make_ca(d, "other-ca")
    return {
        "ca": str(d / "ca.pem"),
        "node": make_cert(d, "node", ca_key, ca_cert),
        "client": make_cert(d, "client", ca_key, ca_cert),
        "stranger": make_cert(d, "stranger", other_key, other_cert),
    }


def test_fit_over_tls_and_refusal_without_certificate(dask_processes, pki, fashion_test_small_chunks,
                                                      tmp_path, jobs):
    cert, key = pki["node"]
    tls = ["--tls-ca-file", pki["ca"], "--tls-cert", cert, "--tls-key", key]
    address = dask_processes.start_scheduler("--protocol", "tls", *tls)
    assert address.startswith("tls://127.0.0.1:")
    dask_processes.start_worker(*tls)
    ccert, ckey = pki["client"]
    client_tls = Security(tls_ca_file=pki["ca"], tls_client_cert=ccert, tls_client_key=ckey,
                          require_encryption=True)
    with Client(address, security=client_tls, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)  # so the job finds it there
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"mode: remote\nremote:\n  address: {address}\n  timeout: 20\n  tls:\n"
                   f"    ca_file: {pki['ca']}\n    cert_file: {ccert}\n    key_file: {ckey}\n")
    out = tmp_path / "r.zarr"
    res = jobs.run("fit", "--data", fashion_test_small_chunks, "--split", "test", "--k", 10,
                   "--out", out, "--cluster", cfg)
    assert res.returncode == 0, res.stderr
    assert f"scheduler {address}: 1 worker, 1 threads" in res.stderr
    assert store.read_result(out).centroids.shape == (10, 784)

    # A TLS client with no certificate is refused during the handshake...
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as conn:
                conn.sendall(b"\0" * 8)
                if not conn.recv(1):
                    raise ConnectionError("closed by the scheduler")
    # ... and so is a client whose certificate another CA signed.
    stranger = Security(tls_ca_file=pki["ca"], tls_client_cert=pki["stranger"][0],
                        tls_client_key=pki["stranger"][1], require_encryption=True)
    with pytest.raises((OSError, TimeoutError)):
        Client(address, security=stranger, timeout=5)
    # And a plain-TCP job pointed at the TLS scheduler fails cleanly within its timeout.
    plain = jobs.run("fit", "--data", fashion_test_small_chunks, "--split", "test", "--k", 10,
                     "--out", tmp_path / "plain.zarr", "--scheduler",
                     address.replace("tls://", "tcp://"))
    assert plain.returncode == 2 and "could not reach the scheduler" in plain.stderr
    assert not (tmp_path / "plain.zarr").exists()
    np.testing.assert_array_equal(store.read_result(out).labels.shape, (10000,))
