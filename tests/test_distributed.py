"""torchrun on CPU (gloo): two processes equal one process with the same global batch; two nodes on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tresfinetune.distributed import World, error_prefix, process_device
from tresfinetune.errors import UserError

BASE = {
    "model": {"name": "tresnet_m", "weights": "none"},
    "input_size": 32,
    "data": {"name": "digits", "limit": 32, "val_fraction": 0.25},
    "transforms": {"train": [{"Resize": {"height": 32, "width": 32}}, {"Affine": {"rotate": [-10, 10]}}],
                   "val": [{"Resize": {"height": 32, "width": 32}}]},
    "epochs": 2,
    "workers": 0,
    "deterministic": True,
    # SGD: Adam's first steps turn float noise in near-zero gradients into full-size updates of either sign.
    "optimizer": {"name": "sgd", "lr": 0.01},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(path: Path, batch_size: int, **extra) -> Path:
    path.write_text(yaml.safe_dump({**BASE, "batch_size": batch_size, **extra}))
    return path


def torchrun(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    one = torchrun("--standalone", "--nproc_per_node=1", "-m", "tresfinetune", "train",
                   str(write_recipe(tmp_path / "one.yaml", 16, sync_bn=True)), "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stdout + one.stderr
    two = torchrun("--standalone", "--nproc_per_node=2", "-m", "tresfinetune", "train",
                   str(write_recipe(tmp_path / "two.yaml", 8, sync_bn=True)), "-o", str(tmp_path / "two"))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "per process, effective 16" in two.stdout

    # One set of rows and checkpoints, written by rank 0 alone.
    assert [r["epoch"] for r in rows(tmp_path / "two")] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]
    assert two.stdout.count("epoch 2/2") == 1

    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    # Summation order differs between the runs, so float noise differs. The zero-initialised last norm of each block
    # (and what feeds it) gets gradients ~1e-5 the size of the others', in fp32 mostly rounding noise: entries of
    # size 1e-4 can differ by 1e-6 between any two summation orders. So: the whole model to 1e-6 (measured ~1e-8),
    # each tensor to 1e-3 of its size (at least 1e-2). A wrong shard, batch or statistic differs by far more.
    keys = [k for k in a if a[k].is_floating_point()]
    whole_a = torch.cat([a[k].double().flatten() for k in keys])
    whole_b = torch.cat([b[k].double().flatten() for k in keys])
    assert (whole_b - whole_a).norm() / whole_a.norm() < 1e-6
    for key in keys:
        scale = a[key].float().abs().max().clamp(min=1e-2)
        assert (b[key].float() - a[key].float()).abs().max() / scale < 1e-3, key
    for ours, theirs in zip(rows(tmp_path / "two"), rows(tmp_path / "one"), strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        assert ours["val_top1"] == pytest.approx(theirs["val_top1"], abs=1e-6)  # every val image counted once


@pytest.mark.slow
def test_two_nodes_on_localhost(tmp_path):
    recipe = str(write_recipe(tmp_path / "r.yaml", 8, epochs=1))
    port = str(free_port())
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              "--rdzv-id=test", "-m", "tresfinetune", "train", recipe, "-o", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    nodes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--node_rank={rank}", *common],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1]
    assert "x2" in outputs[0] + outputs[1]


def test_errors_are_printed_once(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert error_prefix(shared=False) == ""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert error_prefix(shared=True) is None  # rank 0 prints it
    assert error_prefix(shared=False) is None  # before the group exists every rank fails alike
    monkeypatch.setenv("RANK", "0")
    assert error_prefix(shared=False) == ""


def test_a_recipe_error_under_torchrun_is_shown_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epohcs: 3\n")
    result = torchrun("--standalone", "--nproc_per_node=2", "-m", "tresfinetune", "train", str(bad), timeout=120)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("did you mean 'epochs'") == 1


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank():
    two = World(rank=3, local_rank=1, size=4)
    assert process_device(torch.device("cuda"), two, cuda_devices=2) == torch.device("cuda", 1)
    assert process_device(torch.device("cpu"), two, cuda_devices=0) == torch.device("cpu")
    assert process_device(torch.device("cuda", 1), World(), cuda_devices=2) == torch.device("cuda", 1)  # one process
    with pytest.raises(UserError, match="same GPU.*LOCAL_RANK"):
        process_device(torch.device("cuda", 0), two, cuda_devices=2)
    with pytest.raises(UserError, match="sees 1 GPU.*--nproc-per-node 1"):
        process_device(torch.device("cuda"), two, cuda_devices=1)


def test_cuda_rng_states_restore_on_a_machine_with_fewer_gpus():
    from tresfinetune.checkpoint import restorable_cuda_states

    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    assert [index for index, _ in restorable_cuda_states(states, 2)] == [0, 1]
    assert len(restorable_cuda_states(states, 8)) == 4


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_step_and_rank_0_saves(tmp_path):
    """What a scheduler does: SIGTERM to torchrun, which passes it to its processes."""
    import signal
    import time

    from tresfinetune.checkpoint import load_checkpoint

    recipe = write_recipe(tmp_path / "r.yaml", 8, data={"name": "digits", "limit": 64}, checkpoint_every="2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "tresfinetune", "train", str(recipe), "-o", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert output.count("Stopped (SIGTERM) after a completed step") == 1, output  # rank 0 speaks for both
    state = load_checkpoint(tmp_path / "run" / "last.pt").state
    assert state.epoch == 0 and state.step > 2  # saved at the step the ranks agreed on, after the step checkpoint

    resumed = torchrun("--standalone", "--nproc_per_node=2", "-m", "tresfinetune", "train", "--resume",
                       str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1, 2]
