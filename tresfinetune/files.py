"""Files the tool writes and fetches: atomic writes, downloads checked before they are trusted, tensor files read
without unpickling code. One implementation each, used by checkpoints, weights, datasets and the decode cache."""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from tresfinetune.errors import UserError

CHUNK = 1 << 20
WEIGHTS_HINT = "pass a local weights file with --set model.weights=PATH"


class WriteFailed(UserError):
    """Writing a file failed for a reason outside the program (full disk, quota, read-only, permissions)."""

    def __init__(self, path: Path, cause: str):
        super().__init__(f"could not write {path}: {cause}")
        self.path, self.cause = path, cause


def cause_of(error: OSError, folder: Path) -> str:
    """Why writing into `folder` failed, in words, from the OSError it raised."""
    causes = {
        errno.ENOSPC: f"the disk holding {folder} is full",
        errno.EDQUOT: f"your disk quota on the disk holding {folder} is used up",
        errno.EROFS: f"{folder} is on a read-only file system",
        errno.EACCES: f"there is no permission to write in {folder}",
        errno.EPERM: f"there is no permission to write in {folder}",
        errno.EFBIG: "the file would be larger than this process may write (see ulimit -f)",
        errno.ENOENT: f"the folder {folder} does not exist (any more)",
        errno.ENOTDIR: f"{folder} is not a folder",
    }
    return causes.get(error.errno, error.strerror or str(error))


def write_failure(path: Path, error: OSError) -> WriteFailed:
    """WriteFailed naming the file and the cause, from the OSError that writing it raised."""
    return WriteFailed(path, cause_of(error, path.parent))


def write_text(path: Path, text: str) -> None:
    """A small text file (report, metrics, recipe); WriteFailed names the file and the cause."""
    try:
        write_atomic(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise write_failure(path, e) from None


def save_figure(figure: object, path: Path) -> None:
    """A matplotlib figure as PNG; WriteFailed names the file and the cause."""
    try:
        figure.savefig(path, dpi=100)
    except OSError as e:
        raise write_failure(path, e) from None


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Call `write` on a temporary file in `path`'s folder, then rename it to `path`: a crash never leaves half a
    file under the final name, and the temporary file never outlives a failure. `durable` also flushes the file
    and the rename to the disk (checkpoints, downloads), which a cache can skip."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable: without it a power cut can lose the new name even though the data was written."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders
    finally:
        os.close(fd)


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DownloadError(Exception):
    """The network or the server failed; `reason` says how. A caller may try another source."""

    def __init__(self, url: str, reason: object):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


def download(url: str, destination: Path, description: str, algorithm: str | None = None,
             expected: str | None = None, hint: str = "", timeout: float = 30.0) -> Path:
    """Stream `url` to `destination` with a progress bar. The hash (`algorithm`, hex digest or a prefix of it) is
    checked on the temporary file, before it gets the final name: an interrupted or corrupt download is never
    trusted later. DownloadError when the transfer fails; UserError (ending in `hint`) when the file is corrupt."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.new(algorithm) if algorithm else None

    def write(out: BinaryIO) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "tresfinetune"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())
            with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
                task = progress.add_task(description, total=total)
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    progress.advance(task, len(chunk))
        if digest is not None and expected and not digest.hexdigest().startswith(expected):
            raise _Corrupt(digest.hexdigest())

    try:
        write_atomic(destination, write)
    except _Corrupt as e:
        raise UserError(f"the download of {url} is corrupt ({algorithm} {e.actual}, expected {expected}) and was "
                        f"deleted; try again{', or ' + hint if hint else ''}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise DownloadError(url, getattr(e, "reason", None) or e) from None
    return destination


class _Corrupt(Exception):
    def __init__(self, actual: str):
        super().__init__(actual)
        self.actual = actual


def read_tensor_file(path: Path) -> object:
    """The object in a .safetensors or torch file, unpickled with weights_only=True; UserError if unreadable."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: not a valid safetensors file ({e}); {WEIGHTS_HINT}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if code is None:
            raise UserError(f"cannot read {path}: the file is damaged or not a PyTorch weights file") from None
        raise UserError(
            f"refusing to load {path}: it would call {code[1]} when unpickled, and only tensors and plain "
            "containers are accepted; re-save just the state dict (torch.save(model.state_dict(), PATH))"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError) as e:
        detail = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {path}: the file is damaged or not a PyTorch weights file ({detail})") from None
