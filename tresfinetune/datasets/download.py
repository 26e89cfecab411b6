"""Fetching official dataset files with files.download: md5-checked before they get their final name.

Set TRESFINETUNE_DATA_MIRROR to a base URL to fetch every file from a mirror with the same file names instead
(e.g. an internal server, or http://127.0.0.1:PORT in the tests).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tresfinetune import files
from tresfinetune.errors import UserError

MIRROR_ENV = "TRESFINETUNE_DATA_MIRROR"


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


def download_file(remote: RemoteFile, folder: Path, manual_hint: str) -> Path:
    """Download `remote` into `folder` (kept if already there with the right md5); UserError when it can't."""
    target = folder / remote.filename
    if target.exists() and files.file_digest(target, "md5") == remote.md5:
        return target
    url = remote.resolved_url()
    try:
        return files.download(url, target, f"downloading {remote.filename}", "md5", remote.md5, hint=manual_hint)
    except files.DownloadError as e:
        raise UserError(f"could not download {url} ({e.reason}); {manual_hint}") from None


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
