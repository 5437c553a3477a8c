"""Fetch an official CIFAR-10 archive, verify its MD5 and extract it safely.

Everything is written under temporary names inside the data folder and renamed into place only
after the archive has been fully received, verified and unpacked. A transfer cannot hang: it stops
when no byte arrives for ``stall_timeout`` seconds and when it has taken ``deadline`` seconds in
all. SIGINT and SIGTERM remove the temporaries before the process ends; temporaries that a killed
process (SIGKILL, power loss) left behind are removed by the next download into the same folder.

The network modules (urllib, http.client, tarfile) are imported where they are used, so that
importing this module (and starting the CLI) stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from bnexp.errors import ConfigError, DataError

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html): url, md5, folder inside.
ARCHIVES = {
    "binary": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530",
        "cifar-10-batches-bin",
    ),
    "python": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
}
CHUNK = 1 << 20
DEFAULT_STALL_TIMEOUT = 60.0  # seconds without a byte before giving up
DEFAULT_DEADLINE = 3600.0  # seconds for the whole transfer (162 MB at 50 kB/s)
# Temporaries untouched this long are stale whoever made them: a live download ends within its
# deadline, and both limits are capped at this.
STALE_AGE = 24 * 3600.0
MAX_ARCHIVE_BYTES = 1 << 30  # the official archives are 163 MB; anything past 1 GiB is not one
URL_SCHEMES = ("http", "https", "file")
TEMP_PREFIXES = (".cifar-download-", ".cifar-extract-")


def download(
    data_dir: str | os.PathLike,
    fmt: str = "binary",
    url: str | None = None,
    progress: bool = True,
    *,
    md5: str | None = None,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    deadline: float = DEFAULT_DEADLINE,
) -> Path:
    """Download, verify and extract an official CIFAR-10 archive into ``data_dir``.

    Parameters
    ----------
    data_dir : folder that will hold ``cifar-10-batches-bin/`` (or ``-py/``); created if needed.
    fmt : ``"binary"`` (3,073-byte records) or ``"python"`` (pickled batches).
    url : where to fetch the archive (default: the official URL for ``fmt``), e.g. a mirror.
    progress : show a tqdm progress bar on stderr (when stderr is a terminal).
    md5 : expected MD5 of the archive (default: the official one for ``fmt``).
    stall_timeout : give up when no byte arrives for this many seconds (connecting included).
    deadline : give up when the transfer has taken this many seconds in all.

    Returns
    -------
    The extracted layout folder, ``data_dir / "cifar-10-batches-bin"`` (or ``-py``). If it already
    exists nothing is downloaded.

    Raises
    ------
    DataError : unknown format, bad URL, server unreachable, stalled or too slow, interrupted
        transfer, MD5 mismatch, unsafe or unexpected archive content, a file where the folder
        should be, or an unwritable folder. Nothing partial is left behind.
    ConfigError : stall_timeout or deadline not a positive number of seconds (at most a day).
    """
    if fmt not in ARCHIVES:
        raise DataError(f"unknown CIFAR-10 format {fmt!r}; use one of: {', '.join(ARCHIVES)}")
    _check_seconds("stall timeout", stall_timeout)
    _check_seconds("deadline", deadline)
    official_url, official_md5, folder = ARCHIVES[fmt]
    source = url or official_url
    _check_url(source)
    data_dir = Path(data_dir).expanduser()
    target = data_dir / folder
    sweep_temporaries(data_dir)
    if target.is_dir():
        print(f"{target} already exists; nothing downloaded", file=sys.stderr)
        return target
    if target.exists() or target.is_symlink():
        raise DataError(
            f"{target} exists but is not a folder; move or delete it, then run "
            "`bnexp data download` again"
        )
    expected = {
        "md5": (md5 or official_md5).lower(),
        "mirror": source != official_url,
        "what": f"official CIFAR-10 {fmt} archive",
    }
    with _unwind_on_sigterm():
        return _download_into(data_dir, target, source, expected, progress, stall_timeout, deadline)


def _check_seconds(name: str, value) -> None:
    """ConfigError unless ``value`` is a number of seconds in (0, STALE_AGE]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 < value <= STALE_AGE:
        raise ConfigError(f"download {name} must be between 0 and {STALE_AGE:g} s, got {value!r}")


def _check_url(url: str) -> None:
    """DataError (one line) unless ``url`` is an absolute http(s) or file URL."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in URL_SCHEMES and (parts.scheme == "file" or bool(parts.hostname))
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        ok = False
    if not ok:
        raise DataError(
            f"--url {url[:200]!r} is not an http://, https:// or file:// address; give the full "
            f"URL of a mirror of {ARCHIVES['binary'][0]} (or of the python archive)"
        )


def _download_into(data_dir, target, url, expected, progress, stall_timeout, deadline) -> Path:
    """Fetch into a temporary archive, check its MD5, extract beside, rename into ``target``."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        archive, fd = new_temp_file(data_dir, ".cifar-download-", ".tgz")
    except OSError as exc:
        raise DataError(f"cannot write to data folder {data_dir}: {exc.strerror or exc}") from exc
    extract_dir = None
    try:
        with os.fdopen(fd, "wb") as out:
            limits = {"stall": stall_timeout, "deadline": deadline}
            got_md5 = _fetch(url, out, progress=progress, limits=limits, data_dir=data_dir)
        if got_md5 != expected["md5"]:
            raise DataError(_md5_message(url, expected, got_md5))
        extract_dir = new_temp_dir(data_dir, ".cifar-extract-")
        _safe_extract(archive, extract_dir, url)
        if not (extract_dir / target.name).is_dir():
            missing = f"{target.name}/ folder (wrong --format?)"
            raise DataError(f"the archive from {url} has no {missing}")
        _move_into_place(extract_dir / target.name, target)
    finally:
        archive.unlink(missing_ok=True)
        if extract_dir is not None:
            shutil.rmtree(extract_dir, ignore_errors=True)
    return target


def _md5_message(url: str, expected: dict, got: str) -> str:
    """One line: a mirror serving another file is not fixed by retrying; a corrupt transfer is."""
    if expected["mirror"]:
        return (
            f"the file at {url} is not the {expected['what']} (MD5 {got}, expected "
            f"{expected['md5']}); re-running will not help: drop --url to use the official "
            "address, or give a mirror of that exact file"
        )
    return (
        f"MD5 mismatch for the archive downloaded from {url}: expected {expected['md5']}, got "
        f"{got}; the download is corrupt, run `bnexp data download` again"
    )


def _move_into_place(src: Path, target: Path) -> None:
    """Rename the extracted folder to ``target``; another process finishing first is fine."""
    try:
        os.replace(src, target)
    except OSError as exc:
        if not target.is_dir():
            raise DataError(f"cannot move the extracted data to {target}: {exc}") from exc


# --- the transfer ---------------------------------------------------------------------------


def _fetch(url: str, out, *, progress: bool, limits: dict, data_dir: Path) -> str:
    """Stream ``url`` into the open file ``out``; return the MD5 hex digest of the bytes.

    ``limits`` holds ``stall`` and ``deadline`` in seconds. Every socket operation times out
    after ``stall`` seconds; at the deadline a watchdog shuts the sockets down, which wakes a
    read that is blocked or being fed one byte at a time.
    """
    state = {"received": 0, "total": None}
    with _Watchdog(limits["deadline"]) as watchdog:
        try:
            return _stream(url, out, progress, limits["stall"], watchdog, state)
        except DataError:
            raise
        except Exception as exc:
            if watchdog.expired:
                raise DataError(_deadline_message(url, limits["deadline"], state)) from exc
            raise _transfer_error(exc, url, limits["stall"], data_dir) from exc


def _transfer_error(exc: Exception, url: str, stall: float, data_dir: Path) -> Exception:
    """The one-line DataError for a failed transfer (``exc`` itself when it is not one)."""
    import http.client
    import urllib.error

    manual = (
        f"put a copy there by hand: download {url} elsewhere and extract it into {data_dir}, "
        "or pass --data-dir / set BNEXP_DATA_DIR to a folder that holds one"
    )
    if _is_timeout(exc):
        return DataError(
            f"no data from {url} for {stall:g} s (stalled); try again later, use another "
            "mirror (--url) or raise --stall-timeout"
        )
    if isinstance(exc, urllib.error.HTTPError):
        return DataError(f"{url} answered HTTP {exc.code} {exc.reason}; {manual}")
    if isinstance(exc, urllib.error.URLError):
        return DataError(f"could not reach {url} ({exc.reason}); {manual}")
    if isinstance(exc, (http.client.HTTPException, ConnectionError)):
        return DataError(f"download from {url} was interrupted ({exc!r}); try again")
    if isinstance(exc, (OSError, ValueError)):
        return DataError(f"download from {url} failed: {exc}")
    return exc


def _stream(url, out, progress, stall, watchdog, state) -> str:
    """The read loop; bounded by the stall timeout, the watchdog and MAX_ARCHIVE_BYTES."""
    from tqdm import tqdm

    digest = hashlib.md5(usedforsecurity=False)
    with _open_url(url, stall, watchdog) as response:
        length = response.headers.get("Content-Length")
        state["total"] = int(length) if length and length.isdigit() else None
        if (state["total"] or 0) > MAX_ARCHIVE_BYTES:
            raise DataError(f"{url} announces {length} bytes; that is not a CIFAR-10 archive")
        read = getattr(response, "read1", response.read)  # read1: returns after one recv
        bar = tqdm(
            total=state["total"],
            unit="B",
            unit_scale=True,
            desc="CIFAR-10",
            file=sys.stderr,
            disable=None if progress else True,  # None: silent when not a TTY
        )
        with bar:
            while chunk := read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                state["received"] += len(chunk)
                bar.update(len(chunk))
                if state["received"] > MAX_ARCHIVE_BYTES:
                    raise DataError(f"{url} sent more than {MAX_ARCHIVE_BYTES} bytes; not CIFAR-10")
                if watchdog.expired:
                    break
    if watchdog.expired:
        raise TimeoutError("deadline")  # turned into the deadline message by _fetch
    total, received = state["total"], state["received"]
    if total is not None and received != total:
        raise DataError(
            f"download from {url} was interrupted: received {received} of {total} bytes; try again"
        )
    return digest.hexdigest()


def _deadline_message(url: str, deadline: float, state: dict) -> str:
    """One line: what arrived before the deadline and how to get more time."""
    total = state["total"]
    got = f"{state['received']} of {total} bytes" if total else f"{state['received']} bytes"
    return (
        f"download from {url} did not finish within the deadline of {deadline:g} s (received "
        f"{got}); try again, use a faster mirror (--url) or raise --deadline"
    )


def _is_timeout(exc: BaseException) -> bool:
    """A socket timeout, bare or wrapped by urllib as URLError(reason=timeout)."""
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def _open_url(url: str, stall: float, watchdog: _Watchdog):
    """urlopen whose HTTP(S) connections register their sockets with ``watchdog``."""
    import urllib.request

    class Watched:
        def do_open(self, http_class, req, **kwargs):
            class Connection(http_class):
                def __init__(self, *args, **kw):
                    super().__init__(*args, **kw)
                    create = getattr(self, "_create_connection", socket.create_connection)

                    def create_and_watch(*a, **k):
                        return watchdog.watch(create(*a, **k))

                    self._create_connection = create_and_watch

                def connect(self):
                    super().connect()
                    watchdog.watch(self.sock)  # the TLS socket replaces the raw one

            return super().do_open(Connection, req, **kwargs)

    class HTTP(Watched, urllib.request.HTTPHandler):
        pass

    class HTTPS(Watched, urllib.request.HTTPSHandler):
        pass

    opener = urllib.request.build_opener(HTTP, HTTPS)
    return opener.open(url, timeout=stall)


class _Watchdog:
    """A timer that shuts down the registered sockets at the deadline (waking blocked reads)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False

    def watch(self, sock: socket.socket) -> socket.socket:
        """Register ``sock``; shut it down at once if the deadline has already passed."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    """shutdown() wakes a recv blocked in another thread (close() would not)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- signals and temporaries ----------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM during a download, raised so that the cleanup in ``finally`` blocks runs."""


@contextlib.contextmanager
def _unwind_on_sigterm():
    """While the body runs, SIGTERM unwinds it (removing temporaries), then ends the process
    as SIGTERM would have. Only in the main thread, and only when nobody else handles SIGTERM."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut cleanup
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the exit status says "killed by SIGTERM"
        raise SystemExit(128 + signal.SIGTERM) from None  # reached only if delivery is late
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _host() -> str:
    """This machine's name, reduced to characters safe in a file name (no '-')."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def _temp_name(prefix: str, suffix: str = "") -> str:
    """``prefix`` + host-pid-token + ``suffix``: the owner can be told from the name."""
    return f"{prefix}{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def new_temp_file(folder: Path, prefix: str, suffix: str = "") -> tuple[Path, int]:
    """Create a new empty file in ``folder`` named after its owner; return (path, fd).

    The mode is 0o666 minus the umask, as open() gives (mkstemp would give 0600).
    """
    path = folder / _temp_name(prefix, suffix)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return path, fd


def new_temp_dir(folder: Path, prefix: str) -> Path:
    """Create a new empty folder in ``folder`` named after its owner (mode 0o777 minus umask)."""
    path = folder / _temp_name(prefix)
    os.mkdir(path)
    return path


def sweep_temporaries(folder: Path, prefixes: tuple[str, ...] = TEMP_PREFIXES) -> list[Path]:
    """Remove the temporaries in ``folder`` that no live process will finish; return them.

    A temporary is stale when its name says it was made on this host by a process that no longer
    exists, or when it has not been modified for STALE_AGE seconds (other hosts, old names).
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith(prefixes) or not _is_stale(entry, prefixes):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
            print(f"removed {entry.path}, left behind by a process that died", file=sys.stderr)
    return removed


def _is_stale(entry: os.DirEntry, prefixes: tuple[str, ...]) -> bool:
    """Owner on this host is dead, or untouched for STALE_AGE seconds."""
    try:
        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if age > STALE_AGE:
        return True
    prefix = next(p for p in prefixes if entry.name.startswith(p))
    fields = entry.name[len(prefix) :].split("-")
    if len(fields) < 3 or fields[0] != _host() or not fields[1].isdigit():
        return False
    return not _alive(int(fields[1]))


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


# --- extraction -----------------------------------------------------------------------------


def _safe_extract(archive: Path, dest: Path, url: str) -> None:
    """Extract a tar archive into ``dest``, refusing absolute paths, '..' members and links."""
    import tarfile

    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise DataError(f"unsafe path {member.name!r} in the archive from {url}")
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"unexpected link or device {member.name!r} in {url}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python < 3.11.4: members were checked above
                tar.extractall(dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract the archive from {url}: {exc}") from exc
