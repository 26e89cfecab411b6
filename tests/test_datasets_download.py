"""Downloads, against a real HTTP server on 127.0.0.1 standing in for the official hosts."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tresfinetune.datasets import build_source, official
from tresfinetune.datasets.download import MIRROR_ENV
from tresfinetune.errors import UserError
from tresfinetune.recipe import DataConfig


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/served on a free port; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def cifar10_archive(path: Path) -> str:
    """A miniature cifar-10-python.tar.gz in the official layout; returns its md5."""
    def add(tar: tarfile.TarFile, name: str, obj: dict) -> None:
        data = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            add(tar, f"data_batch_{i}", {"data": np.full((2, 3072), i, np.uint8), "labels": [0, 1]})
        add(tar, "test_batch", {"data": np.zeros((1, 3072), np.uint8), "labels": [1]})
        add(tar, "batches.meta", {"label_names": ["cat", "dog"]})
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_download_checks_md5_and_unpacks(server, tmp_path, monkeypatch):
    served, url = server
    md5 = cifar10_archive(served / "cifar-10-python.tar.gz")
    monkeypatch.setenv(MIRROR_ENV, url)
    root = tmp_path / "data"

    monkeypatch.setitem(official.CIFAR["cifar10"], "remote", replace(official.CIFAR["cifar10"]["remote"], md5="0" * 32))
    with pytest.raises(UserError, match="corrupt .*expected 0000"):
        build_source(DataConfig(name="cifar10", root=str(root), download=True))
    assert not [p for p in root.iterdir() if p.suffix == ".part" or p.name.endswith(".gz")]  # nothing half-written

    monkeypatch.setitem(official.CIFAR["cifar10"], "remote", replace(official.CIFAR["cifar10"]["remote"], md5=md5))
    source = build_source(DataConfig(name="cifar10", root=str(root), download=True))
    assert source.class_names == ["cat", "dog"] and len(source.split("train")) == 10
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    (served / "cifar-10-python.tar.gz").unlink()  # already there: no second download
    assert len(build_source(DataConfig(name="cifar10", root=str(root), download=True)).split("val")) == 1


def test_flowers102_download(server, tmp_path, monkeypatch):
    import scipy.io

    served, url = server
    with tarfile.open(served / "102flowers.tgz", "w:gz") as tar:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (20, 16), (200, 30, 30)).save(buffer, format="JPEG")
        for n in (1, 2, 3):
            info = tarfile.TarInfo(f"jpg/image_{n:05d}.jpg")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    scipy.io.savemat(served / "imagelabels.mat", {"labels": np.array([[5, 6, 7]])})
    scipy.io.savemat(served / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]),
                                            "tstid": np.array([[3]])})
    files = [replace(f, md5=hashlib.md5((served / f.filename).read_bytes()).hexdigest())
             for f in official.FLOWERS_FILES]
    monkeypatch.setattr(official, "FLOWERS_FILES", files)
    monkeypatch.setenv(MIRROR_ENV, url)
    source = build_source(DataConfig(name="flowers102", root=str(tmp_path / "data"), download=True))
    assert [t for _, t in source.split("train")] == [4]
    assert Path(source.split("test")[0].image).is_file()


def test_no_network_says_where_to_get_the_files(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match=r"could not download .*cifar-100-python.tar.gz.*download "
                                        r"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz yourself"):
        build_source(DataConfig(name="cifar100", root=str(tmp_path / "d"), download=True))
    with pytest.raises(UserError, match="flowers-102"):
        build_source(DataConfig(name="flowers102", root=str(tmp_path / "d"), download=True))
