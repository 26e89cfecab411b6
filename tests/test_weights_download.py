"""Downloading tagged weights: real download code against a local HTTP server on 127.0.0.1."""

import functools
import hashlib
import http.server
import threading

import pytest
import torch
from safetensors.torch import save_file

from tresfinetune.errors import UserError
from tresfinetune.models import create_model, download
from tresfinetune.models.pretrained import PRETRAINED, PretrainedWeights, WeightsFile


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; yields (base URL, folder, list of requested paths)."""
    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []
    handler = type("Handler", (CountingHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def hub_cache(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def test_download_into_hub_cache_then_reuse(server, hub_cache, monkeypatch):
    base, folder, requests = server
    (folder / "tresnet_m.miil_in1k.safetensors").write_bytes(b"0123456789" * 1000)
    monkeypatch.setenv("TRESFINETUNE_WEIGHTS_URL", base)
    path = download("tresnet_m.miil_in1k")
    assert path == hub_cache / "tresnet_m.miil_in1k.safetensors"
    assert path.read_bytes() == b"0123456789" * 1000
    assert list(hub_cache.iterdir()) == [path]  # no temp file left behind
    assert download("tresnet_m.miil_in1k") == path
    assert requests == ["/tresnet_m.miil_in1k.safetensors"]  # the second call used the cache


def test_per_tag_url_override(server, hub_cache, monkeypatch):
    base, folder, requests = server
    (folder / "mirror.bin").write_bytes(b"abc")
    monkeypatch.setenv("TRESFINETUNE_WEIGHTS_URL_TRESNET_XL_MIIL_IN1K", f"{base}/mirror.bin")
    assert download("tresnet_xl.miil_in1k").read_bytes() == b"abc"
    assert requests == ["/mirror.bin"]


def test_falls_back_to_next_source_and_refuses_hash_mismatch(server, hub_cache, monkeypatch):
    base, folder, requests = server
    # Hub file absent (404), so the GitHub release file is tried: its name carries sha256 prefix 940d0cd1.
    (folder / "tresnet_l_448-940d0cd1.pth").write_bytes(b"not the real file")
    monkeypatch.setenv("TRESFINETUNE_WEIGHTS_URL", base)
    with pytest.raises(UserError, match=r"corrupt \(sha256 .*expected 940d0cd1\)"):
        download("tresnet_l.miil_in1k_448")
    assert requests == ["/tresnet_l.miil_in1k_448.safetensors", "/tresnet_l_448-940d0cd1.pth"]
    assert not hub_cache.exists() or not any(hub_cache.iterdir())  # the bad file was removed


def test_tag_end_to_end_with_hash_check(server, monkeypatch):
    base, folder, _ = server
    torch.manual_seed(0)
    source = create_model("tresnet_m", num_classes=4)
    file = folder / "tiny.safetensors"
    save_file(source.state_dict(), file)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    tag = "tresnet_m.test_tiny"
    monkeypatch.setitem(PRETRAINED, tag, PretrainedWeights(
        tag, (WeightsFile(f"{base}/tiny.safetensors", "tiny.safetensors", digest[:8]),), num_classes=4,
        input_size=64))
    model = create_model("tresnet_m", num_classes=None, weights=tag)
    assert model.num_classes == 4
    assert model.pretrained_cfg["tag"] == tag and model.pretrained_cfg["input_size"] == 64
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_no_network_says_how_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("TRESFINETUNE_WEIGHTS_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(UserError, match=r"could not download tresnet_m.miil_in1k \(.*--set model.weights=PATH"):
        create_model("tresnet_m", weights="tresnet_m.miil_in1k")


def test_unknown_tag():
    with pytest.raises(UserError, match="unknown weights tag"):
        download("tresnet_m.nonexistent")


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_ml_decoder_zoo_tag_downloads_once_with_its_head(server, hub_cache, monkeypatch):
    """The OpenImages file: 9605 classes in 200 groups, which the head takes from the file (its rule alone: 100)."""
    from tresfinetune.models.tresnet import ARCHITECTURES, TResNet

    base, folder, requests = server
    with torch.device("meta"):
        shapes = TResNet(ARCHITECTURES["tresnet_m"], 9605, head="ml_decoder", head_groups=200).state_dict()
    torch.save({"model": {k: torch.zeros(()).expand(v.shape) for k, v in shapes.items()}},  # no memory
               folder / "tresnet_m.mldecoder_open_images.pth")
    monkeypatch.setenv("TRESFINETUNE_WEIGHTS_URL", base)
    for _ in range(2):
        with torch.device("meta"):
            model = create_model("tresnet_m.mldecoder_open_images", num_classes=None)
        assert model.head_kind == "ml_decoder" and model.head.groups == 200 and model.num_classes == 9605
        assert model.pretrained_cfg["tag"] == "tresnet_m.mldecoder_open_images"
    assert requests == ["/tresnet_m.mldecoder_open_images.pth"]
    assert PRETRAINED["tresnet_m.mldecoder_open_images"].sources[0].url.endswith(
        "/model-zoo/ML_Decoder/tresnet_m_open_images_200_groups_86_8.pth")
