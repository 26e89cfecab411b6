"""fuse_for_inference and export: the fused and exported models compute what the PyTorch model computes."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tresfinetune.models
from tresfinetune.cli import cli
from tresfinetune.errors import UserError
from tresfinetune.export import export_model, read_export_metadata, sample_inputs
from tresfinetune.models import NormAct, create_model, fuse_for_inference
from tresfinetune.models.from_checkpoint import load_trained_model
from tresfinetune.models.tresnet import AntiAliasDownsample

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Statistics and affine values far from the init, with negative and zero ABN weights and a plain-BN layer."""
    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, NormAct)]
    for layer in layers:
        n, like = layer.num_features, layer.weight
        layer.weight.data = torch.randn(n, generator=generator).to(like)
        layer.weight.data[0] = 0.0  # ABN scale 1e-5
        layer.bias.data = (torch.randn(n, generator=generator) * 0.1).to(like)
        layer.running_mean.data = (torch.randn(n, generator=generator) * 0.1).to(like)
        layer.running_var.data = (torch.rand(n, generator=generator) + 0.5).to(like)
    layers[3].plain_bn = True  # scale = weight itself, negative values included


@pytest.mark.parametrize("name", ["tresnet_m", "tresnet_v2_l"])
def test_fused_model_computes_the_same_function(name):
    """In float64 rounding cannot hide a mistake: the folded model must agree to ~1e-12."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).double().eval()
    randomise_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    images = torch.rand(2, 3, 64, 96, dtype=torch.float64)  # 96 / 32 = 3: odd sizes reach the reflect padding
    with torch.no_grad():
        expected, got = model(images), fused(images)
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert not any(isinstance(m, NormAct | AntiAliasDownsample) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_float32_fused_model_is_within_the_export_tolerance():
    torch.manual_seed(0)
    model = create_model("tresnet_m", num_classes=5).eval()
    randomise_norms(model)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(images), fuse_for_inference(model)(images)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_fusion_removes_every_norm_pass():
    """Conv count unchanged apart from the blurs, which became convs; no batch norm or padding op left."""
    model = create_model("tresnet_m", num_classes=3).eval()
    fused = fuse_for_inference(model)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    blurs = sum(isinstance(m, AntiAliasDownsample) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in fused.modules()) == convs + blurs
    # Every conv-norm became a conv with a bias; only the fixed blur filters have none.
    assert sum(m.bias is None for m in fused.modules() if isinstance(m, torch.nn.Conv2d)) == blurs


def _reference(run_dir, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    trained = load_trained_model(run_dir)
    model = trained.model
    images = sample_inputs(trained.info, batch, seed=5)
    with torch.no_grad():
        return images, model(images)


def test_onnx_file_runs_in_onnxruntime_with_metadata(multi_label_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    result = CliRunner().invoke(cli, ["export", str(multi_label_run), "--format", "onnx", "-o",
                                      str(tmp_path / "model.onnx")], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "fused model vs PyTorch" in result.output and "onnxruntime vs PyTorch" in result.output

    metadata = read_export_metadata(tmp_path / "model.onnx")
    ckpt = torch.load(multi_label_run / "best.pt", weights_only=True)
    assert metadata["class_names"] == ["blue", "red"] and metadata["task"] == "multi-label"
    assert metadata["input_size"] == 32 and metadata["mean"] == [0, 0, 0] and metadata["std"] == [1, 1, 1]
    assert metadata["thresholds"] == pytest.approx(ckpt["thresholds"])

    images, expected = _reference(multi_label_run, batch=5)  # batch 5: the batch axis is dynamic
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": images.numpy()})
    assert np.abs(got - expected.numpy()).max() <= 1e-4 * expected.abs().max().item()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_file_carries_metadata(single_label_run, tmp_path):
    result = export_model(single_label_run, tmp_path / "model.ts", "torchscript")
    assert result.runtime == "torch.jit" and result.fused_difference <= 1e-4
    metadata = read_export_metadata(tmp_path / "model.ts")
    assert metadata["class_names"] == ["blue", "green", "red"] and metadata["thresholds"] is None

    images, expected = _reference(single_label_run)
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        got = loaded(images)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_wrong_fused_model_fails_the_check_and_keeps_no_file(single_label_run, tmp_path, monkeypatch):
    def broken_fusion(model):
        fused = fuse_for_inference(model)
        with torch.no_grad():
            fused.head.fc.bias += 0.01
        return fused

    monkeypatch.setattr(tresfinetune.models, "fuse_for_inference", broken_fusion)
    with pytest.raises(UserError, match="differs from the PyTorch model"):
        export_model(single_label_run, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()


def test_bad_requests(single_label_run, tmp_path):
    with pytest.raises(UserError, match="cannot tell the format"):
        export_model(single_label_run, tmp_path / "model.bin")
    with pytest.raises(UserError, match="does not exist"):
        export_model(single_label_run, tmp_path / "missing" / "model.onnx")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nope"), "--format", "onnx", "-o",
                                      str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output and "does not exist" in result.output
