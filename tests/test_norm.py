"""The norm + activation layer: ABN semantics, the output-saving backward, backends, plain-BN switch."""

import collections
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


# ---- 16-bit autocast: the gradients stay as good as plain BatchNorm's ----------------------------------------------

# (|bias|, scale) regimes: centred, moderate bias, large bias against a small scale, a zero-initialised residual norm
# whose bias has moved, and every channel different (some rebuilt from the output, some from the input).
REGIMES = {"centred": (0.0, 1.0), "moderate": (0.5, 0.3), "large_bias": (1.0, 0.1), "zero_init": (0.1, 1e-5),
           "mixed": None}


def _regime_parameters(regime, channels, generator):
    if REGIMES[regime] is None:
        bias = torch.rand(channels, generator=generator, dtype=torch.float64) * 2 - 1
        scale = torch.rand(channels, generator=generator, dtype=torch.float64) * 0.95 + 0.05
        return scale, bias
    bias, scale = REGIMES[regime]
    jitter = 1 + 0.2 * torch.rand(channels, generator=generator, dtype=torch.float64)
    signs = torch.randn(channels, generator=generator, dtype=torch.float64).sign()
    return scale * jitter, bias * signs * jitter


def _relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def _norm_act_grads(x, grad_out, weight, bias, slope, layer=None):
    """(dX, dW, dB) of NormAct's forward through `layer`, or of plain batch_norm(|w| + eps) + leaky ReLU."""
    x = x.detach().requires_grad_()
    if layer is None:
        weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        out = F.batch_norm(x, None, None, weight.abs() + 1e-5, bias, True, 0.1, 1e-5)
        out = out if slope is None else F.leaky_relu(out, slope)
    else:
        weight, bias = layer.weight, layer.bias
        out = layer(x)
    return torch.autograd.grad(out, (x, weight, bias), grad_out)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("slope", [1e-3, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients_are_within_2x_of_plain_batchnorm_error(regime, slope, dtype):
    """Inputs and incoming gradients rounded to 16 bits, as autocast hands them over; errors against float64."""
    channels = 32
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, channels, 10, 10, generator=generator, dtype=torch.float64)
    grad64 = torch.randn(x64.shape, generator=generator, dtype=torch.float64)
    weight64, bias64 = _regime_parameters(regime, channels, generator)
    want = _norm_act_grads(x64, grad64, weight64, bias64, slope)
    plain = _norm_act_grads(x64.to(dtype), grad64.to(dtype), weight64.float(), bias64.float(), slope)
    layer = NormAct(channels, slope=slope)
    with torch.no_grad():
        layer.weight.copy_(weight64)
        layer.bias.copy_(bias64)
    ours = _norm_act_grads(x64.to(dtype), grad64.to(dtype), None, None, slope, layer)
    for name, o, p, w in zip(("dX", "dW", "dB"), ours, plain, want, strict=True):
        assert _relative_error(o, w) <= 2 * _relative_error(p, w) + 1e-6, name


def _saved_bytes(layer, x):
    """Bytes of the activation-sized tensors a training forward saves (parameters and C-sized vectors left out)."""
    storages = {}

    def pack(t):
        if t.numel() > layer.num_features:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    return sum(storages.values()), out


def test_16bit_keeps_only_the_channels_whose_output_cannot_be_inverted():
    channels = 8
    layer = NormAct(channels, slope=1e-3)
    x = torch.randn(4, channels, 6, 6).to(torch.bfloat16).requires_grad_()
    saved, out = _saved_bytes(layer, x)  # bias 0: every channel is rebuilt from the output
    assert saved == out.untyped_storage().nbytes()
    with torch.no_grad():
        layer.weight.fill_(0.1)
        layer.bias[:2] = 1.0  # |bias| / scale = 10 on two channels of eight
    layer.load_state_dict(layer.state_dict())  # new weights: the plan is measured afresh
    saved, out = _saved_bytes(layer, x)
    assert saved == out.untyped_storage().nbytes() * (1 + 2 / channels)


def test_keep_input_plan_is_measured_at_one_forward_and_used_from_the_next():
    """The plan never waits for the device: what a forward measures, the next forward uses."""
    layer = NormAct(4, slope=1e-3)
    x = torch.randn(2, 4, 5, 5).to(torch.bfloat16).requires_grad_()
    assert _saved_bytes(layer, x)[0] == x.untyped_storage().nbytes()  # output only
    with torch.no_grad():
        layer.weight.fill_(0.0)
        layer.bias.fill_(0.1)  # every channel now needs its input
    assert _saved_bytes(layer, x)[0] == x.untyped_storage().nbytes()  # still the plan of the old weights
    assert _saved_bytes(layer, x)[0] == 2 * x.untyped_storage().nbytes()  # input, and output for the leaky sign
    identity = NormAct(4, slope=None)
    with torch.no_grad():
        identity.bias.fill_(1.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        identity(x)
    # All channels keep their input, and an identity layer then needs nothing of its output.
    assert [t.data_ptr() for t in saved if t.numel() == x.numel()] == [x.data_ptr()]
    layer.float()
    # float32 inputs rebuild every channel: rounding there is 2^16 times finer
    assert _saved_bytes(layer, x.float())[0] == x.float().untyped_storage().nbytes()


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_training_forward_and_input_preparation_make_no_constants_and_read_nothing_back():
    """A tensor built from Python numbers (aten.lift_fresh) is a host-to-device copy on a GPU, and a scalar read
    (aten._local_scalar_dense) a host sync: neither may happen per forward or per batch."""
    from tresfinetune.datasets.transforms import to_model_input
    from tresfinetune.models import create_model

    model = create_model("tresnet_m", num_classes=3).train()
    x = torch.rand(2, 3, 64, 64)
    for _ in range(2):  # the first forward measures each layer's plan; steady state from the second
        with _OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).sum().backward()
    assert log.ops["aten.lift_fresh"] == 0 and log.ops["aten._local_scalar_dense"] == 0, log.ops
    batch = torch.randint(0, 255, (2, 8, 8, 3), dtype=torch.uint8)
    to_model_input(batch, torch.device("cpu"), [0.5, 0.4, 0.3], [0.2, 0.3, 0.4])
    with _OpLog() as log:
        out = to_model_input(batch, torch.device("cpu"), [0.5, 0.4, 0.3], [0.2, 0.3, 0.4])
    assert log.ops["aten.lift_fresh"] == 0 and log.ops["aten._local_scalar_dense"] == 0, log.ops
    want = (batch.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sync_norm_in_16_bits_matches_plain_batchnorm_without_host_reads(tmp_path, dtype):
    """The synced variant in a one-process gloo group: statistics stay on the device, gradients as plain's."""
    import torch.distributed as dist

    from tresfinetune.models.norm import SyncNormActFunction

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        generator = torch.Generator().manual_seed(0)
        x64 = torch.randn(4, 16, 6, 6, generator=generator, dtype=torch.float64) * 0.1 + 3.0  # mean >> std
        grad64 = torch.randn(x64.shape, generator=generator, dtype=torch.float64)
        weight64, bias64 = _regime_parameters("zero_init", 16, generator)
        want = _norm_act_grads(x64, grad64, weight64, bias64, 1e-3)
        plain = _norm_act_grads(x64.to(dtype), grad64.to(dtype), weight64.float(), bias64.float(), 1e-3)
        weight, bias = weight64.float().requires_grad_(), bias64.float().requires_grad_()
        x = x64.to(dtype).requires_grad_()
        with _OpLog() as log:
            out = SyncNormActFunction.apply(x, weight, bias, torch.zeros(16), torch.ones(16), 0.1, 1e-5, 1e-3,
                                            False, dist.group.WORLD)
            ours = torch.autograd.grad(out, (x, weight, bias), grad64.to(dtype))
        assert out.dtype == dtype
        assert log.ops["aten.lift_fresh"] == 0 and log.ops["aten._local_scalar_dense"] == 0, log.ops
        for name, o, p, w in zip(("dX", "dW", "dB"), ours, plain, want, strict=True):
            assert _relative_error(o, w) <= 2 * _relative_error(p, w) + 1e-6, name
    finally:
        dist.destroy_process_group()
