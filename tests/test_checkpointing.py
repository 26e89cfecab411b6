"""Activation checkpointing: the same gradients and running statistics as without it, in every combination."""

import copy
import socket

import pytest
import torch
import torch.nn.functional as F

from tresfinetune.errors import UserError
from tresfinetune.models.checkpointing import body_segments
from tresfinetune.models.tresnet import Architecture, TResNet, _v1_stages
from tresfinetune.optim import ModelEma


def small_model(dtype=torch.float64, head="fc", seed=0):
    """A narrow TResNet with every kind of block, norms randomised so that no gradient is trivially small."""
    torch.manual_seed(seed)
    model = TResNet(Architecture(16, _v1_stages((1, 3, 2, 2))), num_classes=5, head=head).to(dtype)
    with torch.no_grad():
        for layer in model.norm_layers():
            layer.weight.uniform_(0.2, 1.5)
            layer.bias.uniform_(-0.5, 0.5)  # |bias| / scale above 0.5 on some channels: they keep their input in bf16
    return model


def pair(**kwargs):
    plain = small_model(**kwargs)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    return plain, checkpointed


def batch(dtype=torch.float64, size=64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 5, (4,), generator=g)


def train_step(model, x, y, amp=None):
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss.detach()


def assert_same_training_state(plain, checkpointed, rtol, atol):
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=f"gradient of {name}")
    # Running statistics are updated once per step, not again when the segment is recomputed.
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=f"buffer {name}")


def test_segments_cover_the_body_once_without_crossing_stages_and_end_with_the_last_stage():
    model = small_model()
    segments = body_segments(model.body, 2)
    flat = [module for segment in segments for module in segment]
    assert flat == [model.body.s2d, model.body.conv1, *[b for n, s in model.body.named_children()
                                                        if n.startswith("layer") for b in s]]
    # The stem, stages of 1, 3 and 2 blocks in pairs, then the last stage (2 blocks) whole.
    assert [len(s) for s in segments] == [2, 1, 2, 1, 2, 2]


@pytest.mark.parametrize("head", ["fc", "ml_decoder"])
def test_float64_gradients_and_running_stats_equal_the_plain_model(head):
    plain, checkpointed = pair(head=head)
    x, y = batch()
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(2)  # the same dropout masks in the ML-Decoder head
        for _ in range(2):  # gradients accumulate over two steps; the statistics move twice
            train_step(model, x, y)
    assert_same_training_state(plain, checkpointed, rtol=1e-9, atol=1e-12)


def test_bf16_autocast_with_a_keep_input_plan_that_changes_between_steps():
    """The recomputation reuses the forward's keep-input choice; left to itself it would adopt a newer plan."""
    plain, checkpointed = pair(dtype=torch.float32)
    x, y = batch(torch.float32)
    for model in (plain, checkpointed):
        model.train()
        train_step(model, x, y, torch.bfloat16)
        with torch.no_grad():  # as an optimizer step would: a new plan is measured, used from the next forward
            for layer in model.norm_layers():
                layer.bias.mul_(-2.0)
        model.zero_grad()
        train_step(model, x, y, torch.bfloat16)
    assert_same_training_state(plain, checkpointed, rtol=1e-2, atol=1e-4)
    for layer, other in zip(plain.norm_layers(), checkpointed.norm_layers(), strict=True):
        assert str(layer._keep_input_plan._keep) == str(other._keep_input_plan._keep)


def saved_storages(forward, x):
    """{storage address: bytes} of every tensor autograd keeps for backward during forward(x)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x)
    return storages


def test_norm_layers_in_eval_mode_inside_a_training_segment():
    """Frozen (eval-mode) norms among training ones: each layer replays its own choice, eval ones keep their stats."""
    plain, checkpointed = pair(dtype=torch.float32)
    x, y = batch(torch.float32)
    for model in (plain, checkpointed):
        model.train()
        for layer in model.norm_layers()[::2]:
            layer.eval()
        for _ in range(2):
            train_step(model, x, y, torch.bfloat16)
    assert_same_training_state(plain, checkpointed, rtol=1e-2, atol=1e-4)


def test_keeps_only_the_segment_inputs_and_checkpoints_only_in_training():
    plain, checkpointed = pair(dtype=torch.float32)
    x, _ = batch(torch.float32)
    segments = body_segments(checkpointed.body)
    inputs = []
    for modules in segments[1:]:
        modules[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    kept = saved_storages(checkpointed.train(), x)
    *segment_inputs, last_input = [x, *inputs]

    def last_stage_and_head(t):
        for module in segments[-1]:
            t = module(t)
        return checkpointed.head(t)

    # The checkpointed segments keep their inputs and nothing else; the last stage and the head keep what they
    # would without checkpointing.
    expected = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in segment_inputs}
    statistics = copy.deepcopy(checkpointed.state_dict())
    expected |= saved_storages(last_stage_and_head, last_input.detach())
    checkpointed.load_state_dict(statistics)  # as after the one training forward
    assert sum(kept.values()) == sum(expected.values())
    assert sum(kept.values()) < 0.7 * sum(saved_storages(plain.train(), x).values())  # 64 px: inputs weigh a lot
    checkpointed.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(x), plain.eval()(x))


def test_compiled_model_gets_the_same_gradients_and_statistics():
    """Under torch.compile the segments are traced (without replay contexts) and the norms run as plain batch norm.

    aot_eager traces forward and backward as inductor does, minus code generation, which takes minutes on a CPU.
    """
    plain, checkpointed = pair()
    x, y = batch()
    train_step(plain.train(), x, y)
    train_step(torch.compile(checkpointed.train(), backend="aot_eager"), x, y)
    assert_same_training_state(plain, checkpointed, rtol=1e-9, atol=1e-12)


def test_ema_copies_and_the_switch_can_be_turned_off():
    _, checkpointed = pair()
    ema = ModelEma(checkpointed, 0.9)
    x, y = batch()
    train_step(checkpointed.train(), x, y)
    ema.update(checkpointed)
    assert ema.module.grad_checkpointing and not ema.module.training
    checkpointed.set_grad_checkpointing(False)
    assert not checkpointed.grad_checkpointing


def test_needs_the_native_norm():
    model = small_model()
    model.norm_layers()[0].backend = "inplace_abn"  # as set_backend does once the package imports
    with pytest.raises(UserError, match="native"):
        model.set_grad_checkpointing(True)


def _ddp_worker(rank, port, folder):
    import torch.distributed as dist

    from tresfinetune.models import convert_sync_norm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, y = batch()
        results = {}
        for checkpointing in (False, True):
            model = convert_sync_norm(small_model())
            model.set_grad_checkpointing(checkpointing)
            ddp = torch.nn.parallel.DistributedDataParallel(model.train())
            train_step(ddp, x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2])
            results[checkpointing] = ({n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers()))
        torch.save(results, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_with_synchronised_norms(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"{rank}.pt")
        (plain_grads, plain_buffers), (grads, buffers) = results[False], results[True]
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
        for name, buffer in plain_buffers.items():
            torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0, msg=name)


def test_training_run_with_the_recipe_key_matches_one_without(tmp_path):
    from conftest import TINY_RUN, one_thread, write_colour_folder

    from tresfinetune.recipes import recipe_from_dict
    from tresfinetune.train import train

    data = {"name": "folder", "root": str(write_colour_folder(tmp_path / "colours")), "val_fraction": 0.25}
    histories = {}
    with one_thread():
        for checkpointing in (False, True):
            raw = dict(TINY_RUN, data=data, epochs=2, ema=0.5, grad_checkpointing=checkpointing)
            result = train(recipe_from_dict(raw), output=tmp_path / f"run{checkpointing}", progress=False)
            histories[checkpointing] = result.history
    for plain, checkpointed in zip(histories[False], histories[True], strict=True):
        for key in ("train_loss", "val_top1", "ema_val_top1"):
            assert checkpointed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key


def test_recipe_key_needs_the_native_norm():
    from tresfinetune.recipes import recipe_from_dict

    assert recipe_from_dict({"grad_checkpointing": True}).grad_checkpointing
    with pytest.raises(UserError, match="grad_checkpointing"):
        recipe_from_dict({"grad_checkpointing": True, "model": {"norm": "inplace_abn"}})
