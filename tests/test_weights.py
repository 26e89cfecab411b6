"""Weight files in every layout load with timm-equal logits; bad files give one clear UserError."""

import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from tresfinetune.errors import UserError
from tresfinetune.models import (
    authors_to_ours,
    create_model,
    load_weights,
    ours_to_authors,
    ours_to_timm,
    timm_to_ours,
)
from tresfinetune.models.tresnet import ARCHITECTURES, TResNet

timm = pytest.importorskip("timm")

NUM_CLASSES = 6
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def randomize_norms(model, positive=True, seed=0):
    """Random norm weights/biases/statistics; `positive` keeps weights >= 1e-5 (files converted from ABN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                low = 0.05 if positive else -1.0
                m.weight.copy_(torch.rand(n, generator=g) * (1.5 - low) + low)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def timm_model(name="tresnet_m", positive=True, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(timm.create_model(name, num_classes=NUM_CLASSES), positive, seed).eval()


def logits(model, x=X):
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_logits(ours, reference_logits):
    got = logits(ours)
    scale = reference_logits.abs().max()
    assert (got - reference_logits).abs().max() <= 1e-5 * scale, (got - reference_logits).abs().max() / scale


def authors_layout_from_timm(timm_sd, seed=0):
    """The authors' layout written independently from SPEC section 3: nested Sequentials, raw ABN weights of
    random sign with |w_raw| + 1e-5 == timm weight, no num_batches_tracked, no filter buffers."""
    g = torch.Generator().manual_seed(seed)
    stride2 = {f"body.layer{i}.0.{conv}" for i in (2, 3, 4) for conv in ("conv1", "conv2")}
    out = {}
    for key, value in timm_sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        unit, _, rest = key.partition(".conv.") if ".conv." in key else key.partition(".bn.")
        if rest:
            is_bottleneck = f"{unit.rsplit('.', 1)[0]}.conv3.conv.weight" in timm_sd
            aa = unit in stride2 and (unit.endswith("conv2") == is_bottleneck)
            index = "0" if ".conv." in key else "1"
            key = f"{unit}.0.{index}.{rest}" if aa else f"{unit}.{index}.{rest}"
            if index == "1" and rest == "weight":
                sign = torch.where(torch.rand(value.shape, generator=g) < 0.5, -1.0, 1.0)
                value = (value - 1e-5) * sign
        out[key] = value.clone()
    return out


@pytest.fixture(scope="module")
def timm_m():
    return timm_model("tresnet_m")


@pytest.fixture(scope="module")
def timm_m_logits(timm_m):
    return logits(timm_m)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_file_gives_timm_logits(tmp_path, timm_m, timm_m_logits, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(timm_m.state_dict(), path)
    else:
        save_file(timm_m.state_dict(), path)
    ours = create_model("tresnet_m", num_classes=NUM_CLASSES, weights=str(path))
    assert_same_logits(ours, timm_m_logits)
    assert not any(n.plain_bn for n in ours.norm_layers())  # all weights >= 1e-5: ABN semantics everywhere
    assert ours.pretrained_cfg["file"] == str(path)


def test_timm_file_with_negative_and_tiny_norm_weights(tmp_path):
    """Fine-tuned in timm with plain BatchNorm: weights of either sign, some below 1e-5."""
    reference = timm_model("tresnet_m")
    with torch.no_grad():
        reference.body.layer1[0].conv2.bn.weight[:3] = torch.tensor([-0.7, 0.0, 3e-6])
        reference.body.layer3[2].conv1.bn.weight.neg_()
    path = tmp_path / "finetuned.pth"
    torch.save(reference.state_dict(), path)
    ours = create_model("tresnet_m", num_classes=NUM_CLASSES, weights=path)
    assert_same_logits(ours, logits(reference))
    plain = [n for n in ours.norm_layers() if n.plain_bn]
    assert plain == [ours.body.layer1[0].conv2[1], ours.body.layer3[2].conv1[1]]
    # The switch survives our own state dict (e.g. a tresfinetune checkpoint) and training still works.
    again = create_model("tresnet_m", num_classes=NUM_CLASSES)
    again.load_state_dict(ours.state_dict())
    assert_same_logits(again, logits(reference))
    again.train()
    again(X).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in again.parameters())


@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict", "asl"])
def test_authors_layout_gives_timm_logits(tmp_path, timm_m, timm_m_logits, wrapper):
    authors = authors_layout_from_timm(timm_m.state_dict())
    assert len(authors) == 374 and any((v < 0).any() for k, v in authors.items() if k.endswith(".1.weight"))
    content = {
        "plain": authors,
        "model": {"model": authors},
        "state_dict": {"state_dict": authors},
        "asl": {"model": authors, "num_classes": NUM_CLASSES, "idx_to_class": {i: f"c{i}" for i in range(6)}},
    }[wrapper]
    path = tmp_path / "authors.pth"
    torch.save(content, path)
    ours = create_model("tresnet_m", num_classes=NUM_CLASSES, weights=path)
    assert_same_logits(ours, timm_m_logits)
    assert not any(n.plain_bn for n in ours.norm_layers())


def test_conversions_round_trip(timm_m):
    ours = timm_to_ours(timm_m.state_dict())
    assert set(ours) == set(create_model("tresnet_m", num_classes=NUM_CLASSES).state_dict())
    back = ours_to_timm(ours)
    assert set(back) == set(timm_m.state_dict())
    for key, value in timm_m.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[key], value, rtol=1e-6, atol=1e-7)
    assert ours_to_authors(ours) == ours
    assert authors_to_ours({**ours, "body.layer2.0.conv1.1.filt": torch.ones(1),
                            "body.conv1.1.num_batches_tracked": torch.tensor(3)}) == ours


@pytest.mark.parametrize("name", ["tresnet_l", "tresnet_xl", "tresnet_v2_l"])
def test_key_mapping_for_larger_models(name):
    """Full parity for these costs seconds each; keys and shapes are what differs from M."""
    with torch.device("meta"):
        reference = timm.create_model(name)
        ours = TResNet(ARCHITECTURES[name])
    # Zero-stride stand-ins for the meta tensors: real values without the memory.
    converted = timm_to_ours({k: torch.ones(()).expand(v.shape) for k, v in reference.state_dict().items()})
    expected = ours.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert set(ours_to_timm(expected)) == set(reference.state_dict())


def test_v2_parity_with_timm_slopes_and_authors_slopes(tmp_path):
    """tresnet_v2_l: slopes='timm' reproduces timm; the default (authors' 1e-6) differs slightly, as expected."""
    reference = timm_model("tresnet_v2_l")
    want = logits(reference)
    path = tmp_path / "v2.safetensors"
    save_file(reference.state_dict(), path)
    timm_like = create_model("tresnet_v2_l", num_classes=NUM_CLASSES, weights=path, slopes="timm")
    assert_same_logits(timm_like, want)
    authors_like = create_model("tresnet_v2_l", num_classes=NUM_CLASSES, weights=path)
    assert not torch.allclose(logits(authors_like), want, rtol=1e-6, atol=0)
    # The authors' slope everywhere, applied to timm's model, is what our default computes.
    for m in reference.modules():
        if isinstance(m, torch.nn.LeakyReLU):
            m.negative_slope = 1e-6
    assert_same_logits(authors_like, logits(reference))


def test_tresfinetune_checkpoint_uses_the_inference_weights(tmp_path, timm_m, timm_m_logits):
    good = create_model("tresnet_m", num_classes=NUM_CLASSES)
    good.load_state_dict(timm_to_ours(timm_m.state_dict()))
    other = create_model("tresnet_m", num_classes=NUM_CLASSES).state_dict()
    checkpoint = {
        # The EMA wrapper (AveragedModel) stores the model under `module.` plus its own counter.
        "format": "tresfinetune-checkpoint", "version": 1, "model": other,
        "ema": {**{f"module.{k}": v for k, v in good.state_dict().items()}, "n_averaged": torch.tensor(5)},
        "inference": "ema", "model_name": "tresnet_m", "class_names": list("abcdef"), "task": "single-label",
        "input_size": 64, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "thresholds": None,
        "optimizer": {"state": {}, "param_groups": []},
    }
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    ours = create_model("tresnet_m", num_classes=None, weights=path)  # None: take the head size from the file
    assert ours.num_classes == NUM_CLASSES
    assert_same_logits(ours, timm_m_logits)
    assert ours.pretrained_cfg["input_size"] == 64 and ours.pretrained_cfg["class_names"] == list("abcdef")


def test_head_size_mismatch_reinitialises_head_with_warning(tmp_path, timm_m, timm_m_logits, caplog):
    path = tmp_path / "w.pth"
    torch.save(timm_m.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="tresfinetune"):
        ours = create_model("tresnet_m", num_classes=3, weights=path)
    assert "6-class head" in caplog.text and "re-initialised" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_features(X), timm_m.forward_features(X), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(UserError, match="6-class head"):
        load_weights(create_model("tresnet_m", num_classes=3), path, strict_head=True)


def test_wrong_architecture_is_named(tmp_path):
    with torch.device("meta"):
        small = TResNet(ARCHITECTURES["tresnet_l"], NUM_CLASSES).state_dict()
    path = tmp_path / "l.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in small.items()}, path)
    with pytest.raises(UserError, match="holds tresnet_l weights, but the model is tresnet_m"):
        create_model("tresnet_m", weights=path)


def test_missing_and_unexpected_keys_are_named(tmp_path, timm_m):
    sd = timm_to_ours(timm_m.state_dict())
    del sd["body.layer2.1.conv1.1.running_var"]
    sd["body.layer2.1.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(UserError, match=re.escape("missing keys: body.layer2.1.conv1.1.running_var")) as e:
        create_model("tresnet_m", num_classes=NUM_CLASSES, weights=path)
    assert "unexpected keys: body.layer2.1.extra.weight" in str(e.value)


def test_not_tresnet_weights(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(UserError, match="does not contain TResNet weights"):
        create_model("tresnet_m", weights=path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match="cannot read"):
        create_model("tresnet_m", weights=path)


class RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": RunsCode()}, path)
    with pytest.raises(UserError, match="refusing to load .*would call print"):
        create_model("tresnet_m", weights=path)
    assert "this would have run" not in capsys.readouterr().out


def test_missing_file_or_unknown_tag(tmp_path):
    with pytest.raises(UserError, match="neither a file nor a known tag.*tresnet_m.miil_in1k"):
        create_model("tresnet_m", weights=str(tmp_path / "nope.pth"))
