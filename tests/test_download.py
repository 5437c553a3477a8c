"""Download path against a local HTTP server on 127.0.0.1 serving small generated archives."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import socket
import tarfile
import threading
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from bnexp import data, download
from bnexp.cli import main
from bnexp.errors import DataError

N = 12  # images per generated batch


def batch_files(fmt: str) -> dict[str, bytes]:
    """Six small batches of the given layout, as {file name: bytes}."""
    rng = np.random.default_rng(7)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(N, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=N)
        if fmt == "binary":
            files[name + ".bin"] = np.column_stack([y.astype(np.uint8), x]).tobytes()
        else:
            d = {b"data": x, b"labels": [int(v) for v in y]}
            files[name] = pickle.dumps(d, protocol=2)
    return files


def make_archive(members: dict[str, bytes]) -> bytes:
    """A .tar.gz holding the given {member path: bytes}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


GOOD = {
    fmt: make_archive({f"{download.ARCHIVES[fmt][2]}/{k}": v for k, v in batch_files(fmt).items()})
    for fmt in download.ARCHIVES
}


class Handler(http.server.BaseHTTPRequestHandler):
    """/good-<fmt>, /corrupt (a byte flipped), /short (Content-Length > body), /evil, /nofolder."""

    def do_GET(self):
        body, length = None, None
        if self.path.startswith("/good-"):
            body = GOOD[self.path.removeprefix("/good-")]
        elif self.path == "/corrupt":
            raw = bytearray(GOOD["binary"])
            raw[len(raw) // 2] ^= 0xFF
            body = bytes(raw)
        elif self.path == "/short":
            body = GOOD["binary"][: len(GOOD["binary"]) // 2]
            length = len(GOOD["binary"])
        elif self.path in ARCHIVE_ROUTES:
            body = ARCHIVE_ROUTES[self.path]
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(length or len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True  # for /short: the body ends early and the socket closes

    def log_message(self, *args):
        pass


ARCHIVE_ROUTES = {
    "/evil": make_archive({"../escaped.txt": b"x", "cifar-10-batches-bin/test_batch.bin": b""}),
    "/nofolder": make_archive({"other/data_batch_1.bin": b"\0" * 3073}),
}


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


@pytest.mark.parametrize("fmt", ["binary", "python"])
def test_good_download_extracts_and_loads(tmp_path, server, fmt):
    dest = tmp_path / "data"
    out = download.download(
        dest, fmt, url=f"{server}/good-{fmt}", md5=md5(GOOD[fmt]), progress=False
    )
    assert out == dest / download.ARCHIVES[fmt][2]
    assert sorted(p.name for p in dest.iterdir()) == [out.name]  # no temp file or folder left
    for name, payload in batch_files(fmt).items():
        assert (out / name).read_bytes() == payload
    settings = {"num_training": 40, "num_validation": 20, "num_test": 12, "num_train_subset": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = data.load_splits(dest, cache_dir=tmp_path / "cache", **settings)
    assert s.X_train.shape == (10, 3072) and s.X_val.shape == (20, 3072)


def test_existing_copy_is_not_downloaded_again(tmp_path, server):
    dest = tmp_path / "data"
    (dest / "cifar-10-batches-bin").mkdir(parents=True)
    out = download.download(dest, url=f"{server}/corrupt", progress=False)
    assert out == dest / "cifar-10-batches-bin" and list(out.iterdir()) == []


@pytest.mark.parametrize(
    "route,message",
    [
        ("/corrupt", "MD5 mismatch for the archive downloaded from"),
        ("/short", r"was interrupted: received \d+ of \d+ bytes"),
        ("/missing", "answered HTTP 404"),
        ("/evil", "unsafe path '../escaped.txt'"),
        ("/nofolder", "has no cifar-10-batches-bin/ folder"),
    ],
)
def test_failed_download_leaves_nothing(tmp_path, server, route, message):
    dest = tmp_path / "data"
    digest = md5(ARCHIVE_ROUTES[route]) if route in ARCHIVE_ROUTES else md5(GOOD["binary"])
    with pytest.raises(DataError, match=message) as info:
        download.download(dest, url=f"{server}{route}", md5=digest, progress=False)
    assert "\n" not in str(info.value)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_wrong_official_md5_is_rejected(tmp_path, server):
    # Without an md5 argument the official checksum applies; the generated archive cannot match.
    with pytest.raises(DataError, match="expected c32a1d4ab5d03f1284b67883e8d87530"):
        download.download(tmp_path, url=f"{server}/good-binary", progress=False)
    assert list(tmp_path.iterdir()) == []


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused, like being offline)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz"


def test_offline_one_line_with_manual_instructions(tmp_path):
    url = closed_port_url()
    with pytest.raises(DataError) as info:
        download.download(tmp_path / "d", url=url, progress=False, timeout=5)
    msg = str(info.value)
    assert msg.startswith(f"could not reach {url}") and "\n" not in msg
    assert str(tmp_path / "d") in msg and "BNEXP_DATA_DIR" in msg
    assert list((tmp_path / "d").iterdir()) == []


def test_unknown_format(tmp_path):
    with pytest.raises(DataError, match="unknown CIFAR-10 format 'jpeg'"):
        download.download(tmp_path, "jpeg")


def test_load_splits_downloads_when_missing(tmp_path, server, monkeypatch):
    _, _, folder = download.ARCHIVES["binary"]
    fake = (f"{server}/good-binary", md5(GOOD["binary"]), folder)
    monkeypatch.setitem(download.ARCHIVES, "binary", fake)
    settings = {"num_training": 50, "num_validation": 10, "num_test": 5, "num_train_subset": 5}
    with pytest.raises(DataError, match="bnexp data download"):
        data.load_splits(tmp_path / "d", use_cache=False, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = data.load_splits(tmp_path / "d", download_if_missing=True, use_cache=False, **settings)
    assert s.source["layout"] == "binary" and s.source["train_images"] == 5 * N


def test_cli_download(tmp_path, server):
    dest = tmp_path / "d"
    result = CliRunner().invoke(
        main, ["data", "download", "--data-dir", str(dest), "--url", f"{server}/short"]
    )
    assert result.exit_code == DataError.exit_code
    assert (
        result.output.splitlines()[-1].startswith("error: download from")
        and list(dest.iterdir()) == []
    )
    result = CliRunner().invoke(
        main, ["data", "download", "--data-dir", str(dest), "--format", "rar"]
    )
    assert result.exit_code == 2 and "rar" in result.output  # click usage error
