"""TResNet architecture: sizes, key layout, building blocks, model API."""

import pytest
import torch
import torch.nn.functional as F

from tresfinetune.errors import UserError
from tresfinetune.models import create_model, describe_models, list_models
from tresfinetune.models.factory import GFLOPS_224
from tresfinetune.models.norm import NormAct
from tresfinetune.models.tresnet import ARCHITECTURES, AntiAliasDownsample, SpaceToDepth, TResNet, conv_gflops

PARAMS = {"tresnet_m": 31_389_032, "tresnet_l": 55_989_256, "tresnet_xl": 78_436_244, "tresnet_v2_l": 46_174_824,
          "tresnet_v2_xl": 69_300_712}
AUTHORS_KEYS = {"tresnet_m": 374, "tresnet_l": 535, "tresnet_xl": 649, "tresnet_v2_l": 642}


def meta_model(name: str, num_classes: int = 1000) -> TResNet:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return TResNet(ARCHITECTURES[name], num_classes)


@pytest.fixture(scope="module")
def small_m():
    torch.manual_seed(0)
    return create_model("tresnet_m", num_classes=5)


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_at_1000_classes(name):
    assert sum(p.numel() for p in meta_model(name).parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list(AUTHORS_KEYS))
def test_state_dict_has_the_authors_key_count(name):
    assert len(meta_model(name).state_dict()) == AUTHORS_KEYS[name]


def test_authors_key_names():
    m, v2 = meta_model("tresnet_m").state_dict(), meta_model("tresnet_v2_l").state_dict()
    for key in ["body.conv1.0.weight", "body.conv1.1.running_var", "body.layer1.0.conv1.0.weight",
                "body.layer2.0.conv1.0.0.weight", "body.layer2.0.conv1.0.1.weight",
                "body.layer2.0.downsample.1.0.weight", "body.layer2.0.downsample.1.1.running_mean",
                "body.layer3.0.conv2.0.0.weight", "body.layer3.0.conv2.0.1.bias", "body.layer3.0.conv3.1.weight",
                "body.layer1.0.se.fc1.weight", "body.layer3.10.se.fc2.bias", "head.fc.weight"]:
        assert key in m, key
    assert not any(".se." in k for k in m if k.startswith("body.layer4"))
    assert not any("num_batches_tracked" in k or "filt" in k for k in m)
    assert "body.layer1.0.downsample.0.0.weight" in v2  # V2's layer-1 shortcut has no AvgPool


def test_gflops_table_matches_counted():
    for name in ARCHITECTURES:
        assert conv_gflops(name) == pytest.approx(GFLOPS_224[name], abs=1e-3)


def test_space_to_depth_channel_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = SpaceToDepth()(x)
    assert out.shape == (2, 48, 2, 2)
    for row_offset in range(4):
        for col_offset in range(4):
            for c in range(3):
                channel = (row_offset * 4 + col_offset) * 3 + c
                torch.testing.assert_close(out[:, channel], x[:, c, row_offset::4, col_offset::4], rtol=0, atol=0)


def test_anti_alias_is_binomial_blur_with_reflect_pad_and_stride_2():
    x = torch.randn(2, 4, 8, 6)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = torch.outer(taps, taps) / 16
    want = torch.zeros(2, 4, 4, 3)
    for i in range(4):
        for j in range(3):
            want[:, :, i, j] = (padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * kernel).sum((-1, -2))
    torch.testing.assert_close(AntiAliasDownsample(4)(x), want)


def test_init_follows_the_paper(small_m):
    last_norms = [b.last_norm() for layer in ("layer1", "layer2", "layer3", "layer4")
                  for b in getattr(small_m.body, layer)]
    assert all((n.weight == 0).all() for n in last_norms)
    other_norms = [n for n in small_m.norm_layers() if all(n is not m for m in last_norms)]
    assert all((n.weight == 1).all() and (n.bias == 0).all() for n in other_norms)
    assert small_m.head.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("size", [64, 96])
def test_forward_shapes_for_sizes_divisible_by_32(small_m, size):
    small_m.eval()
    with torch.no_grad():
        features = small_m.forward_features(torch.rand(2, 3, size, size))
        logits = small_m.forward_head(features)
    assert features.shape == (2, small_m.num_features, size // 32, size // 32)
    assert logits.shape == (2, 5)


def test_inference_fast_path_equals_eval_with_autograd(small_m):
    small_m.eval()
    with torch.no_grad():
        for n in small_m.norm_layers():  # make norms non-trivial so folding is really exercised
            n.weight.uniform_(-1, 1)
            n.running_mean.uniform_(-0.1, 0.1)
            n.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 64, 64)
    with_autograd = small_m(x)  # grad enabled: unfused path
    with torch.inference_mode():
        fused = small_m(x)
    torch.testing.assert_close(fused, with_autograd.detach(), rtol=1e-5, atol=1e-6)
    # The cached folded weights follow in-place parameter changes.
    with torch.no_grad():
        small_m.body.conv1[1].bias.add_(0.5)
        with_autograd = small_m(x).clone()
    with torch.enable_grad():
        torch.testing.assert_close(small_m(x).detach(), with_autograd, rtol=1e-5, atol=1e-6)


def test_training_step_updates_weights_and_running_stats():
    torch.manual_seed(0)
    model = create_model("tresnet_m", num_classes=3).train()
    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    stem_norm = model.body.conv1[1]
    before = stem_norm.running_mean.clone()
    F.cross_entropy(model(x), y).backward()
    assert not torch.equal(before, stem_norm.running_mean)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # Zero-initialised last norms get gradient too (d|w|/dw = +1 at 0, as in inplace_abn).
    assert model.body.layer1[0].last_norm().weight.grad.abs().sum() > 0


def test_model_api(small_m):
    assert isinstance(small_m.head.fc, torch.nn.Linear)
    assert small_m.num_features == 2048 and small_m.num_classes == 5
    cfg = small_m.pretrained_cfg
    assert cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)
    assert cfg["input_size"] == 224 and cfg["tag"] is None and cfg["num_classes"] == 5
    assert {"crop_pct", "interpolation"} <= set(cfg)


def test_reset_classifier():
    model = create_model("tresnet_m", num_classes=5)
    model.reset_classifier(7)
    assert model.head.fc.out_features == 7 and model.num_classes == 7
    assert model.pretrained_cfg["num_classes"] == 7
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 7)


def test_v2_slopes_option():
    authors = meta_model("tresnet_v2_l")
    assert {n.slope for n in authors.norm_layers()} == {1e-6, None}
    with torch.device("meta"):
        timm_like = create_model("tresnet_v2_l", slopes="timm")
    assert timm_like.body.conv1[1].slope == 1e-2
    assert {n.slope for n in timm_like.body.layer1.modules() if isinstance(n, NormAct)} == {1e-3, None}
    m = meta_model("tresnet_m")
    assert m.body.conv1[1].slope == 1e-2 and m.body.layer1[0].conv1[1].slope == 1e-3


def test_list_and_describe_models():
    assert list_models() == ["tresnet_m", "tresnet_l", "tresnet_xl", "tresnet_v2_l", "tresnet_v2_xl"]
    rows = {r["name"]: r for r in describe_models()}
    assert rows["tresnet_m"]["params"] == PARAMS["tresnet_m"]
    assert rows["tresnet_l"]["gflops_224"] == pytest.approx(10.878)
    assert {"tag": "tresnet_m.miil_in1k", "top1": 80.8}.items() <= rows["tresnet_m"]["tags"][0].items()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "resnet50"}, "tresnet_m, tresnet_l, tresnet_xl, tresnet_v2_l, tresnet_v2_xl"),
        ({"name": "tresnet_m", "num_classes": 0}, "positive integer"),
        ({"name": "tresnet_m", "drop_rate": 0.1}, "unknown model option"),
        ({"name": "tresnet_m", "slopes": "mine"}, "authors, timm"),
        ({"name": "tresnet_m", "norm": "syncbn"}, "native, inplace_abn"),
        ({"name": "tresnet_m", "weights": "tresnet_l.miil_in1k"}, "for tresnet_l, not tresnet_m"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        create_model(**kwargs)


def test_inplace_abn_absence_is_silent_unless_requested(caplog):
    with caplog.at_level("DEBUG", logger="tresfinetune"), torch.device("meta"):
        model = create_model("tresnet_m")
    assert all(n.backend == "native" for n in model.norm_layers())
    assert not caplog.records


def test_models_command_prints_the_table():
    from click.testing import CliRunner

    from tresfinetune.cli import cli

    result = CliRunner().invoke(cli, ["models"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for text in ["tresnet_m", "31.4", "5.7", "tresnet_v2_l", "46.2", "tresnet_l.miil_in1k (81.5)",
                 "tresnet_v2_l.miil_in21k_ft_in1k (83.9)", "tresnet_xl.miil_in1k_448 (83.1, 448px)"]:
        assert text in result.output, text


def test_reflect_pad_matches_pytorch_keeps_channels_last_and_avoids_reflection_pad():
    """CUDA's reflection-pad backward is nondeterministic and its output contiguous: the model uses neither."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tresfinetune.models.tresnet import reflect_pad_1

    class Ops(TorchDispatchMode):
        seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 5, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    want = F.pad(x, (1, 1, 1, 1), mode="reflect")
    (want_grad,) = torch.autograd.grad(want, x, grad)
    with Ops() as ops:
        got = reflect_pad_1(x)
        (got_grad,) = torch.autograd.grad(got, x, grad)
        AntiAliasDownsample(5).to(torch.float64)(x).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad)  # the same sums, in another order
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert not any("reflection_pad" in op for op in ops.seen), ops.seen
    blur = AntiAliasDownsample(5)
    assert "filter" in dict(blur.named_buffers()) and "filter" not in blur.state_dict()
