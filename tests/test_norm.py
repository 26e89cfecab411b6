"""The norm + activation layer: ABN semantics, the output-saving backward, backends, plain-BN switch."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from tresfinetune.errors import UserError
from tresfinetune.models.norm import NormAct, NormActFunction, reference_norm_act


def make_layer(channels=3, slope=0.01, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = NormAct(channels, slope=slope).to(dtype)
    with torch.no_grad():
        # Raw ABN weights of both signs, away from 0 where |w| has no derivative for finite differences.
        layer.weight.copy_(torch.tensor([0.7, -1.3, 0.2, -0.4, 1.1][:channels], dtype=dtype))
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-0.3, 0.3)
        layer.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("slope", [0.01, 1e-3, None])
def test_gradcheck_against_finite_differences(training, slope):
    layer = make_layer(slope=slope)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        # Fresh running-stat copies: the training forward updates them in place.
        return NormActFunction.apply(x, w, b, layer.running_mean.clone(), layer.running_var.clone(),
                                     training, 0.1, 1e-5, slope)

    assert torch.autograd.gradcheck(f, (x, layer.weight, layer.bias))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("slope", [0.01, 1e-6, None])
def test_matches_plain_batchnorm_of_abs_weight_plus_leaky_relu(training, slope):
    layer = make_layer(slope=slope).train(training)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(4, 3, 6, 6, dtype=torch.float64)

    ref = reference_norm_act(x_ref, layer, training)
    ref_grads = torch.autograd.grad(ref, (x_ref, layer.weight, layer.bias), grad_out)
    out = layer(x)
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), grad_out)

    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_running_stats_update_like_batchnorm():
    layer = make_layer(slope=0.01)
    bn = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.1).double()
    bn.running_mean.copy_(layer.running_mean)
    bn.running_var.copy_(layer.running_var)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    bn(x)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)  # unbiased batch variance, as InPlaceABN


def test_eval_mode_is_plain_affine_with_running_stats():
    layer = make_layer(slope=None).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    scale = (layer.weight.abs() + 1e-5) / torch.sqrt(layer.running_var + 1e-5)
    want = (x - layer.running_mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), want)


def test_zero_weight_gets_gradient_like_inplace_abn():
    """inplace_abn takes d|w|/dw = +1 at w == 0, so zero-initialised last norms of blocks can learn."""
    layer = make_layer(slope=None)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    grad_out = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    (layer(x.requires_grad_()) * grad_out).sum().backward()
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer.weight.grad, (grad_out * x_hat).sum((0, 2, 3)))
    assert (layer.weight.grad != 0).all()


def test_training_saves_only_the_output():
    layer = make_layer(channels=3, slope=0.01, dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x * 1.0)
    big = [t for t in saved if t.numel() == out.numel()]
    assert len(big) == 1 and big[0].data_ptr() == out.data_ptr()


def test_plain_bn_switch_survives_state_dict_round_trip():
    layer = make_layer(dtype=torch.float32)
    layer.plain_bn = True
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-0.5, 0.0, 2e-6]))
    state = layer.state_dict()
    assert "plain_bn" in state
    fresh = NormAct(3, slope=0.01)
    fresh.load_state_dict(state)
    assert fresh.plain_bn
    x = torch.randn(2, 3, 4, 4)
    fresh.eval()
    want = F.leaky_relu(F.batch_norm(x, fresh.running_mean, fresh.running_var, fresh.weight, fresh.bias, False,
                                     0.0, 1e-5), 0.01)
    torch.testing.assert_close(fresh(x), want)
    # A state dict without the marker turns the switch off again.
    fresh.load_state_dict(NormAct(3, slope=0.01).state_dict())
    assert not fresh.plain_bn and "plain_bn" not in fresh.state_dict()


def test_inplace_abn_requested_but_missing_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "inplace_abn", None)  # import fails as where the package is absent
    monkeypatch.setitem(sys.modules, "inplace_abn.functions", None)
    with pytest.raises(UserError, match="inplace_abn.*norm='native'"):
        NormAct(4, backend="inplace_abn")
    assert NormAct(4).backend == "native"  # not asked for: its absence is silent


def _stand_in_inplace_abn(calls: list) -> types.ModuleType:
    """inplace_abn's functional API (the compiled package does not build here), computing ABN from its definition:
    y = act((x - mean) / sqrt(var + eps) * (|w| + eps) + b)."""

    def inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, slope):
        calls.append((activation, slope))
        out = F.batch_norm(x, running_mean, running_var, weight.abs() + eps, bias, training, momentum, eps)
        return out if activation == "identity" else F.leaky_relu(out, slope)

    functions = types.ModuleType("inplace_abn.functions")
    functions.inplace_abn = inplace_abn
    package = types.ModuleType("inplace_abn")
    package.functions = functions
    return package


@pytest.mark.parametrize("slope", [0.01, None])
def test_inplace_abn_backend_is_called_with_the_same_semantics(monkeypatch, slope):
    calls = []
    package = _stand_in_inplace_abn(calls)
    monkeypatch.setitem(sys.modules, "inplace_abn", package)
    monkeypatch.setitem(sys.modules, "inplace_abn.functions", package.functions)
    native = make_layer(slope=slope, dtype=torch.float32)
    other = make_layer(slope=slope, dtype=torch.float32)
    other.set_backend("inplace_abn")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    torch.testing.assert_close(other(x), native(x))
    torch.testing.assert_close(other.running_mean, native.running_mean)
    assert calls == [("identity", 0.0) if slope is None else ("leaky_relu", slope)]


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="native"):
        NormAct(4, backend="cudnn")


def _sync_worker(rank, port, folder):
    import torch.distributed as dist

    from tresfinetune.models.norm import convert_sync_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for plain in (False, True):
            layer = make_layer(slope=0.01)
            layer.plain_bn = plain
            convert_sync_norm(layer)
            x, grad_out = sync_inputs()
            half = x.shape[0] // 2
            x_local = x[rank * half:(rank + 1) * half].clone().requires_grad_()
            (layer(x_local) * grad_out[rank * half:(rank + 1) * half]).sum().backward()
            torch.save({"grad_x": x_local.grad, "grad_w": layer.weight.grad, "grad_b": layer.bias.grad,
                        "running_mean": layer.running_mean, "running_var": layer.running_var},
                       f"{folder}/{plain}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def sync_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64),
            torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64))


@pytest.fixture(scope="module")
def sync_results(tmp_path_factory):
    import socket

    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("sync")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_worker, args=(port, str(folder)), nprocs=2)
    return folder


@pytest.mark.parametrize("plain", [False, True])
def test_sync_norm_two_processes_equal_one_process_with_the_whole_batch(sync_results, plain):
    parts = [torch.load(sync_results / f"{plain}-{rank}.pt") for rank in (0, 1)]
    layer = make_layer(slope=0.01)
    layer.plain_bn = plain
    x, grad_out = sync_inputs()
    x.requires_grad_()
    (layer(x) * grad_out).sum().backward()
    torch.testing.assert_close(torch.cat([p["grad_x"] for p in parts]), x.grad)
    # Parameter gradients are per-process sums; DDP averages them, as with PyTorch's SyncBatchNorm.
    torch.testing.assert_close(parts[0]["grad_w"] + parts[1]["grad_w"], layer.weight.grad)
    torch.testing.assert_close(parts[0]["grad_b"] + parts[1]["grad_b"], layer.bias.grad)
    torch.testing.assert_close(parts[0]["running_var"], layer.running_var)
    torch.testing.assert_close(parts[1]["running_mean"], layer.running_mean)
