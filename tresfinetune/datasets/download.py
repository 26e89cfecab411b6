"""Fetching official dataset files: streamed to a temporary file, md5-checked, then moved into place.

Set TRESFINETUNE_DATA_MIRROR to a base URL to fetch every file from a mirror with the same file names instead
(e.g. an internal server, or http://127.0.0.1:PORT in the tests).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from tresfinetune.errors import UserError

MIRROR_ENV = "TRESFINETUNE_DATA_MIRROR"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    url: str
    md5: str
    extract: bool = False  # a .tar / .tar.gz / .tgz to unpack into the target folder

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def resolved_url(self) -> str:
        mirror = os.environ.get(MIRROR_ENV)
        return f"{mirror.rstrip('/')}/{self.filename}" if mirror else self.url


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(remote: RemoteFile, folder: Path, manual_hint: str, timeout: float = 30.0) -> Path:
    """Download `remote` into `folder` (kept if already there with the right md5); UserError when it can't."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.filename
    if target.exists() and md5_of(target) == remote.md5:
        return target
    url = remote.resolved_url()
    fd, partial_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
    partial = Path(partial_name)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())
            with Progress(*columns, transient=True) as progress:
                task = progress.add_task(f"downloading {remote.filename}", total=total)
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(task, len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}); {manual_hint}") from None
    if digest.hexdigest() != remote.md5:
        partial.unlink(missing_ok=True)
        raise UserError(f"the download of {url} is corrupt (md5 {digest.hexdigest()}, expected {remote.md5}); "
                        f"try again, or {manual_hint}")
    os.replace(partial, target)  # atomic: a file with the final name is always complete
    return target


def extract_archive(archive: Path, folder: Path) -> None:
    """Unpack a tar archive, refusing members that would land outside `folder`."""
    try:
        with tarfile.open(archive) as tar:
            root = folder.resolve()
            for member in tar.getmembers():
                destination = (folder / member.name).resolve()
                if root not in destination.parents and destination != root:
                    raise UserError(f"archive {archive} contains an unsafe path '{member.name}'; delete it and "
                                    "download again")
                if not (member.isfile() or member.isdir()):
                    raise UserError(f"archive {archive} contains a link or device '{member.name}'; delete it and "
                                    "download again")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python's own check where present
            tar.extractall(folder, **safe)
    except tarfile.TarError as e:
        raise UserError(f"archive {archive} is damaged ({e}); delete it and download again") from None


def fetch(files: list[RemoteFile], folder: Path, manual_hint: str) -> None:
    """Download every file into `folder` and unpack the archives among them."""
    for remote in files:
        path = download_file(remote, folder, manual_hint)
        if remote.extract:
            extract_archive(path, folder)
