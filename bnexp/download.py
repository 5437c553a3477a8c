"""Fetch an official CIFAR-10 archive, verify its MD5 and extract it safely.

Everything is written under temporary names inside the data folder and renamed into place only
after the archive has been fully received, verified and unpacked, so an interrupted or failed
download leaves nothing half written behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from bnexp.errors import DataError

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


def download(
    data_dir: str | os.PathLike,
    fmt: str = "binary",
    url: str | None = None,
    progress: bool = True,
    *,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and extract an official CIFAR-10 archive into ``data_dir``.

    Parameters
    ----------
    data_dir : folder that will hold ``cifar-10-batches-bin/`` (or ``-py/``); created if needed.
    fmt : ``"binary"`` (3,073-byte records) or ``"python"`` (pickled batches).
    url : where to fetch the archive (default: the official URL for ``fmt``), e.g. a mirror.
    progress : show a tqdm progress bar on stderr (when stderr is a terminal).
    md5 : expected MD5 of the archive (default: the official one for ``fmt``).
    timeout : seconds to wait for the server on each network operation.

    Returns
    -------
    The extracted layout folder, ``data_dir / "cifar-10-batches-bin"`` (or ``-py``). If it already
    exists nothing is downloaded.

    Raises
    ------
    DataError : unknown format, server unreachable, interrupted transfer, MD5 mismatch, unsafe or
        unexpected archive content, or an unwritable folder. Nothing partial is left behind.
    """
    if fmt not in ARCHIVES:
        raise DataError(f"unknown CIFAR-10 format {fmt!r}; use one of: {', '.join(ARCHIVES)}")
    official_url, official_md5, folder = ARCHIVES[fmt]
    url = url or official_url
    md5 = (md5 or official_md5).lower()
    data_dir = Path(data_dir).expanduser()
    target = data_dir / folder
    if target.exists():
        print(f"{target} already exists; nothing downloaded", file=sys.stderr)
        return target
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, archive_name = tempfile.mkstemp(dir=data_dir, prefix=".cifar-download-", suffix=".tgz")
    except OSError as exc:
        raise DataError(f"cannot write to data folder {data_dir}: {exc.strerror or exc}") from exc
    archive = Path(archive_name)
    extract_dir = None
    try:
        with os.fdopen(fd, "wb") as out:
            got_md5 = _fetch(url, out, progress=progress, timeout=timeout, data_dir=data_dir)
        if got_md5 != md5:
            raise DataError(
                f"MD5 mismatch for the archive downloaded from {url}: expected {md5}, got "
                f"{got_md5}; the download is corrupt, run `bnexp data download` again"
            )
        extract_dir = Path(tempfile.mkdtemp(dir=data_dir, prefix=".cifar-extract-"))
        _safe_extract(archive, extract_dir, url)
        if not (extract_dir / folder).is_dir():
            raise DataError(f"the archive from {url} has no {folder}/ folder (wrong --format?)")
        os.replace(extract_dir / folder, target)
    finally:
        archive.unlink(missing_ok=True)
        if extract_dir is not None:
            shutil.rmtree(extract_dir, ignore_errors=True)
    return target


def _fetch(url: str, out, *, progress: bool, timeout: float, data_dir: Path) -> str:
    """Stream ``url`` into the open file ``out``; return the MD5 hex digest of the bytes."""
    from tqdm import tqdm

    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    manual = (
        f"put a copy there by hand: download {url} elsewhere and extract it into {data_dir}, "
        "or pass --data-dir / set BNEXP_DATA_DIR to a folder that holds one"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="CIFAR-10",
                file=sys.stderr,
                disable=None if progress else True,  # None: silent when not a TTY
            ) as bar:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url} answered HTTP {exc.code} {exc.reason}; {manual}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"could not reach {url} ({exc.reason}); {manual}") from exc
    except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
        raise DataError(f"download from {url} was interrupted ({exc!r}); try again") from exc
    except OSError as exc:
        raise DataError(f"download from {url} failed: {exc}") from exc
    if total is not None and received != total:
        raise DataError(
            f"download from {url} was interrupted: received {received} of {total} bytes; try again"
        )
    return digest.hexdigest()


def _safe_extract(archive: Path, dest: Path, url: str) -> None:
    """Extract a tar archive into ``dest``, refusing absolute paths, '..' members and links."""
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
