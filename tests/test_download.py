"""The download path, against an HTTP server on 127.0.0.1 serving a temporary folder."""

from __future__ import annotations

import functools
import http.server
import stat
import threading

import pytest

from kmeans_dask import datasets, store
from kmeans_dask.errors import SourceError

from conftest import leftovers

SPEC = datasets.get_spec("mnist")
TEST_FILES = SPEC.files["test"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror_root(tmp_path, shared_datasets):
    """/good/ holds the real files, /corrupt/ flipped bytes, /truncated/ half files, /missing/ nothing."""
    root = tmp_path / "www"
    for name in ("good", "corrupt", "truncated", "missing"):
        (root / name).mkdir(parents=True)
    for f in TEST_FILES.values():
        data = (shared_datasets / "mnist" / f.name).read_bytes()
        (root / "good" / f.name).write_bytes(data)
        (root / "corrupt" / f.name).write_bytes(data[:30] + bytes(b ^ 0x55 for b in data[30:90]) + data[90:])
        (root / "truncated" / f.name).write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture
def server(mirror_root):
    handler = functools.partial(_QuietHandler, directory=str(mirror_root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.t10k
def test_good_mirror(server, tmp_path):
    dest = tmp_path / "cache"
    f = TEST_FILES["images"]
    path = datasets.download_file(SPEC, f, dest, mirrors=[server + "/good/"], progress=False)
    assert path == dest / f.name
    datasets.decompress_idx(path, "images", expected=f)
    assert leftovers(dest) == [f.name]
    assert stat.S_IMODE(path.stat().st_mode) == store.file_mode()  # not mkstemp's 0600


@pytest.mark.t10k
@pytest.mark.parametrize("mirror", ["corrupt", "truncated"])
def test_bad_file_is_refused_and_not_cached(server, tmp_path, mirror):
    dest = tmp_path / "cache"
    f = TEST_FILES["labels"]
    with pytest.raises(SourceError) as err:
        datasets.download_file(SPEC, f, dest, mirrors=[f"{server}/{mirror}/"], progress=False)
    message = str(err.value)
    assert message.startswith(f"could not download {f.name}: {server}/{mirror}/{f.name}: MD5 ")
    assert f"does not match the published {f.gz_md5}" in message
    assert leftovers(dest) == []


@pytest.mark.t10k
def test_404_then_good_mirror(server, tmp_path):
    dest = tmp_path / "cache"
    f = TEST_FILES["labels"]
    path = datasets.download_file(
        SPEC, f, dest, mirrors=[f"{server}/missing/", f"{server}/good/"], progress=False)
    assert path.read_bytes() == (datasets.BUNDLED_DIR / "mnist" / f.name).read_bytes()
    assert leftovers(dest) == [f.name]


@pytest.mark.t10k
def test_all_mirrors_failing_lists_each(server, tmp_path):
    f = TEST_FILES["labels"]
    with pytest.raises(SourceError) as err:
        datasets.download_file(SPEC, f, tmp_path / "c",
                               mirrors=[f"{server}/missing/", f"{server}/truncated/"], progress=False)
    assert f"{server}/missing/{f.name}: HTTP 404" in str(err.value)
    assert f"{server}/truncated/{f.name}: MD5" in str(err.value)


def test_plain_http_to_other_hosts_is_refused(tmp_path):
    with pytest.raises(SourceError, match=r"only https:// mirrors are allowed"):
        datasets.download_file(SPEC, TEST_FILES["labels"], tmp_path,
                               mirrors=["http://example.invalid/mnist/"], progress=False)


@pytest.mark.t10k
def test_resolve_downloads_into_the_cache_then_reuses_it(server, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "BUNDLED_DIR", tmp_path / "no-bundle")
    cache = tmp_path / "cache"
    found = datasets.resolve_split("mnist", "test", cache_dir=cache, mirrors=[server + "/good/"])
    assert found.origin == "download"
    again = datasets.resolve_split("mnist", "test", cache_dir=cache, download=False)
    assert again.origin == "cache" and again.images == found.images


def test_unreachable_mirrors_leave_the_split_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "BUNDLED_DIR", tmp_path / "no-bundle")
    # A port nothing listens on: the connection is refused at once.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = datasets.resolve_split("mnist", "test", cache_dir=tmp_path / "c",
                                   mirrors=[f"http://127.0.0.1:{port}/"], timeout=2)
    assert found is None
