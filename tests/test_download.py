"""Download path against a local HTTP server on 127.0.0.1 serving small generated archives."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

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


STOP = threading.Event()  # set when the module's tests end: every slow handler returns
TRICKLE_LENGTH = 1000  # announced bytes of /trickle and /stall
TRICKLE_EVERY = 0.5  # seconds between the bytes of /trickle


class Handler(http.server.BaseHTTPRequestHandler):
    """/good-<fmt>, /corrupt (a byte flipped), /short (Content-Length > body), /evil, /nofolder,
    /stall (headers, then silence), /stall-headers (no answer at all), /trickle (one byte every
    TRICKLE_EVERY s), /drop (half the body, then a TCP reset). Slow routes end when STOP is set
    and are bounded even if it never is."""

    def do_GET(self):
        slow = {"/stall": self.stall, "/stall-headers": self.stall_headers}
        slow |= {"/trickle": self.trickle, "/drop": self.drop}
        if self.path in slow:
            slow[self.path]()
            return
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
        self.headers_with_length(length or len(body))
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True  # for /short: the body ends early and the socket closes

    def headers_with_length(self, length: int):
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.flush()

    def stall(self):
        self.headers_with_length(TRICKLE_LENGTH)
        STOP.wait(60)

    def stall_headers(self):
        STOP.wait(60)

    def trickle(self):
        self.headers_with_length(TRICKLE_LENGTH)
        for _ in range(TRICKLE_LENGTH - 1):  # never the whole body
            if STOP.wait(TRICKLE_EVERY):
                return
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:  # the client gave up
                return

    def drop(self):
        body = GOOD["binary"]
        self.headers_with_length(len(body))
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        # SO_LINGER 0: close() sends a reset instead of an orderly end of stream
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def log_message(self, *args):
        pass


ARCHIVE_ROUTES = {
    "/evil": make_archive({"../escaped.txt": b"x", "cifar-10-batches-bin/test_batch.bin": b""}),
    "/nofolder": make_archive({"other/data_batch_1.bin": b"\0" * 3073}),
}


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up on a slow route is what these tests do


@pytest.fixture(scope="module")
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    STOP.set()
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
        ("/corrupt", "is not the official CIFAR-10 binary archive .*re-running will not help"),
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
        download.download(tmp_path / "d", url=url, progress=False, stall_timeout=5)
    msg = str(info.value)
    assert msg.startswith(f"could not reach {url}") and "\n" not in msg
    assert str(tmp_path / "d") in msg and "BNEXP_DATA_DIR" in msg
    assert list((tmp_path / "d").iterdir()) == []


def test_unknown_format(tmp_path):
    with pytest.raises(DataError, match="unknown CIFAR-10 format 'jpeg'"):
        download.download(tmp_path, "jpeg")


def test_load_splits_downloads_only_into_the_default_cache(tmp_path, server, monkeypatch):
    _, _, folder = download.ARCHIVES["binary"]
    fake = (f"{server}/good-binary", md5(GOOD["binary"]), folder)
    monkeypatch.setitem(download.ARCHIVES, "binary", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("BNEXP_DATA_DIR", raising=False)
    settings = {"num_training": 50, "num_validation": 10, "num_test": 5, "num_train_subset": 5}
    with pytest.raises(DataError, match="bnexp data download"):
        data.load_splits(tmp_path / "d", download_if_missing=True, use_cache=False, **settings)
    assert not (tmp_path / "d").exists()  # a folder the user named is never filled on its own
    default = data.resolve_data_dir(None)
    assert default == tmp_path / "xdg" / "bnexp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = data.load_splits(default, download_if_missing=True, use_cache=False, **settings)
    assert s.source["layout"] == "binary" and s.source["train_images"] == 5 * N


def test_mirror_md5_mismatch_says_retrying_will_not_help(tmp_path, server, monkeypatch):
    with pytest.raises(DataError) as info:
        download.download(tmp_path, url=f"{server}/good-binary", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"the file at {server}/good-binary is not the official CIFAR-10 binary")
    assert "re-running will not help" in msg and "\n" not in msg
    # From the official address, a mismatch is a damaged transfer: then retrying is the advice.
    _, _, folder = download.ARCHIVES["binary"]
    official = (f"{server}/corrupt", md5(GOOD["binary"]), folder)
    monkeypatch.setitem(download.ARCHIVES, "binary", official)
    with pytest.raises(DataError, match="the download is corrupt, run `bnexp data download` again"):
        download.download(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


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


# --- hostile servers: every transfer ends with one line within its limits, leaving nothing ----


@pytest.mark.parametrize(
    "route,stall,deadline,message",
    [
        ("/stall", 1.0, 30.0, r"no data from \S+/stall for 1 s \(stalled\)"),
        ("/stall-headers", 1.0, 30.0, r"no data from \S+/stall-headers for 1 s \(stalled\)"),
        ("/stall-headers", 30.0, 1.5, r"did not finish within the deadline of 1\.5 s"),
        ("/trickle", 30.0, 2.0, r"deadline of 2 s \(received [1-9] of 1000 bytes\)"),
        ("/drop", 30.0, 30.0, r"download from \S+/drop was interrupted"),
    ],
)
def test_hostile_server_ends_within_limits(tmp_path, server, route, stall, deadline, message):
    dest = tmp_path / "data"
    start = time.monotonic()
    with pytest.raises(DataError, match=message) as info:
        download.download(
            dest, url=f"{server}{route}", progress=False, stall_timeout=stall, deadline=deadline
        )
    elapsed = time.monotonic() - start
    assert elapsed < min(stall, deadline) + 1.0, elapsed  # the first limit to pass ends it
    assert "\n" not in str(info.value)
    assert list(dest.iterdir()) == []


def test_cli_trickle_one_line_within_deadline(tmp_path, server):
    dest = tmp_path / "d"
    args = ["data", "download", "--data-dir", str(dest), "--url", f"{server}/trickle"]
    start = time.monotonic()
    result = CliRunner().invoke(main, [*args, "--stall-timeout", "10", "--deadline", "1.5"])
    assert time.monotonic() - start < 2.5
    assert result.exit_code == DataError.exit_code
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "did not finish within the deadline of 1.5 s" in lines[0]
    assert list(dest.iterdir()) == []
    result = CliRunner().invoke(main, [*args, "--deadline", "0"])
    assert result.exit_code == 2 and "--deadline" in result.output  # click usage error


@pytest.mark.parametrize(
    "url",
    ["notaurl", "http://", "ftp://example.org/cifar.tgz", "//x/y", "http://[::1", "http://h:x/"],
)
def test_cli_bad_url_is_one_line(tmp_path, url):
    dest = tmp_path / "d"
    result = CliRunner().invoke(main, ["data", "download", "--data-dir", str(dest), "--url", url])
    assert result.exit_code == DataError.exit_code
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --url {url!r} is not an http://")
    assert not dest.exists()


def test_file_url_of_a_local_archive(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(GOOD["binary"])
    out = download.download(
        tmp_path / "d", url=archive.as_uri(), md5=md5(GOOD["binary"]), progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(batch_files("binary"))


def test_regular_file_where_the_folder_should_be_is_an_error(tmp_path, server):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "cifar-10-batches-bin").write_text("not a folder")
    args = ["data", "download", "--data-dir", str(dest), "--url", f"{server}/good-binary"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == DataError.exit_code
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cifar-10-batches-bin exists but is not a folder" in lines[0]
    assert (dest / "cifar-10-batches-bin").read_text() == "not a folder"
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-bin"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_downloaded_folder_respects_umask(tmp_path, server, umask):
    old = os.umask(umask)
    try:
        out = download.download(
            tmp_path / "d", url=f"{server}/good-binary", md5=md5(GOOD["binary"]), progress=False
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert stat.S_IMODE((out / "test_batch.bin").stat().st_mode) == 0o644  # the archive's mode


# --- signals and stale temporaries ----------------------------------------------------------


def start_cli_download(dest: Path, url: str) -> subprocess.Popen:
    """`python -m bnexp data download` in a child process with this worktree's package."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    args = ["data", "download", "--data-dir", str(dest), "--url", url, "--deadline", "60"]
    return subprocess.Popen(
        [sys.executable, "-m", "bnexp", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_temporary(dest: Path, proc: subprocess.Popen) -> Path:
    """The child's .cifar-download-* file, a second into the transfer (at most 20 s)."""
    for _ in range(200):
        found = list(dest.glob(".cifar-download-*"))
        if found:
            time.sleep(1.0)  # a few bytes of the trickle have arrived
            assert proc.poll() is None, proc.communicate()
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the download never started")


# SIGTERM exits 143 (128 + 15, what a shell shows for a SIGTERM death); Ctrl-C exits 130.
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_transfer_leaves_nothing(tmp_path, server, sig, code):
    dest = tmp_path / "d"
    proc = start_cli_download(dest, f"{server}/trickle")
    wait_for_temporary(dest, proc)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert list(dest.iterdir()) == []


def test_sigkill_leftovers_are_swept_by_the_next_start(tmp_path, server, capsys):
    dest = tmp_path / "d"
    proc = start_cli_download(dest, f"{server}/trickle")
    left = wait_for_temporary(dest, proc)
    proc.kill()
    proc.wait(timeout=10)
    assert left.exists()  # SIGKILL cannot be caught: the file stays until the next start
    with pytest.raises(DataError, match="HTTP 404"):
        download.download(dest, url=f"{server}/missing", progress=False)
    assert list(dest.iterdir()) == []
    assert f"removed {left}" in capsys.readouterr().err


def test_sweep_removes_only_what_no_live_process_will_finish(tmp_path):
    host = download._host()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now free: the owner of the "dead" files is gone
    names = {
        "dead": f".cifar-download-{host}-{proc.pid}-0a0a.tgz",
        "dead_dir": f".cifar-extract-{host}-{proc.pid}-0b0b",
        "mine": f".cifar-download-{host}-{os.getpid()}-0c0c.tgz",
        "other_host": f".cifar-download-elsewhere-{proc.pid}-0d0d.tgz",
        "old_name_recent": ".cifar-download-k2j3h4.tgz",
        "old_name_old": ".cifar-download-x9y8z7.tgz",
        "unrelated": "notes.txt",
    }
    for key, name in names.items():
        if key == "dead_dir":
            (tmp_path / name).mkdir()
            (tmp_path / name / "cifar-10-batches-bin").mkdir()
        else:
            (tmp_path / name).write_bytes(b"x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / names["old_name_old"], (two_days_ago, two_days_ago))
    removed = download.sweep_temporaries(tmp_path)
    gone = {"dead", "dead_dir", "old_name_old"}
    assert sorted(p.name for p in removed) == sorted(names[k] for k in gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        name for key, name in names.items() if key not in gone
    )
