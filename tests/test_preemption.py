"""Runs that survive preemption: stop signals, step checkpoints, mid-epoch resume without re-reading data, disk
errors. Subprocess-level where signals are involved; the interrupted runs must end exactly where an uninterrupted
run ends (deterministic mode, CPU)."""

import errno
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_train import _run_cli, digits_recipe, write_recipe

from tresfinetune.checkpoint import load_checkpoint
from tresfinetune.cli import cli
from tresfinetune.datasets import ImageDataset, Sample, build_transforms
from tresfinetune.datasets.loaders import BadImageLog, ImageLoader, TrainSampler
from tresfinetune.errors import UserError
from tresfinetune.recipes import recipe_from_dict
from tresfinetune.tasks import SINGLE_LABEL
from tresfinetune.train import train

# 64 digits, 25% held out: 6 batches of 8 per epoch; last.pt after steps 3 and 6, so a stop lands inside an epoch.
RAW = digits_recipe(epochs=2, batch_size=8, data={"name": "digits", "limit": 64}, checkpoint_every="3")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("reference")
    return train(recipe_from_dict(RAW), output=folder / "run", progress=False).history


def assert_same_run(history: list[dict], reference: list[dict]) -> None:
    assert [r["epoch"] for r in history] == [r["epoch"] for r in reference]
    for ours, theirs in zip(history, reference, strict=True):
        for key in ("train_loss", "val_top1", "val_top5", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key


def wait_for_step_checkpoint(run_dir: Path, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "last.pt").exists():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    raise AssertionError("no step checkpoint in time")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopped_mid_epoch_then_resumed_ends_like_an_uninterrupted_run(tmp_path, reference, signum):
    run_dir = tmp_path / "run"
    proc = _run_cli(["train", str(write_recipe(tmp_path / "r.yaml", RAW)), "-o", str(run_dir)])
    wait_for_step_checkpoint(run_dir, proc)
    started = time.time()
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode in (128 + signum, -signal.SIGKILL), output
    if signum != signal.SIGKILL:
        assert time.time() - started < 20  # well inside a 30 s grace period
        assert f"tresfinetune train --resume {run_dir}" in output and "Traceback" not in output
    saved = load_checkpoint(run_dir / "last.pt").state
    assert saved.epoch == 0 and 0 < saved.step < 6, "the stop did not land inside the first epoch"

    result = CliRunner().invoke(cli, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"batch {saved.step + 1}" in result.output
    assert_same_run(rows(run_dir), reference)


class RecordingDataset(ImageDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded: list[int] = []

    def load(self, index: int) -> np.ndarray:
        self.loaded.append(index)
        return super().load(index)


def test_resuming_mid_epoch_reads_none_of_the_skipped_images(tmp_path):
    samples = []
    for i in range(20):
        Image.fromarray(np.full((16, 16, 3), i * 10, np.uint8)).save(tmp_path / f"{i}.png")
        samples.append(Sample(str(tmp_path / f"{i}.png"), i % 2))
    recipe = recipe_from_dict({"input_size": 32})
    dataset = RecordingDataset(samples, build_transforms(recipe, train=True), SINGLE_LABEL)
    sampler = TrainSampler(len(samples), seed=3)
    loader = ImageLoader(dataset, sampler=sampler, batch_size=4, bad_images=BadImageLog())
    sampler.set_epoch(2)
    full = [targets for _, targets in loader]
    order = list(dataset.loaded)
    dataset.loaded.clear()

    sampler.set_epoch(2)
    sampler.set_start(3 * 4)  # three batches were trained on before the interruption
    rest = [targets for _, targets in loader]
    assert dataset.loaded == order[12:]  # the skipped images are not even opened
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, full[3:], strict=True))
    sampler.set_epoch(3)
    assert len(list(loader)) == 5  # the next epoch starts at its beginning again


def test_a_full_disk_names_the_file_keeps_the_checkpoints_and_resumes(tmp_path, monkeypatch):
    import tresfinetune.checkpoint as checkpoint_module

    raw = digits_recipe(epochs=2, data={"name": "digits", "limit": 32})
    real_save, calls = torch.save, []

    def save_on_a_disk_that_fills_up(obj, f):
        calls.append(1)
        if len(calls) == 3:  # epoch 1 wrote last.pt and best.pt; epoch 2's last.pt finds the disk full
            f.write(b"x" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_on_a_disk_that_fills_up)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"could not write .*last.pt: the disk holding .* is full.*--resume"):
        train(recipe_from_dict(raw), output=run_dir, progress=False)
    assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob("*.tmp"))
    assert load_checkpoint(run_dir / "last.pt").state.epoch == 1  # the previous last.pt, intact
    assert load_checkpoint(run_dir / "best.pt").info.task == SINGLE_LABEL

    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)  # space freed
    result = train(resume=run_dir, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_an_output_folder_that_cannot_be_created_says_why(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = CliRunner().invoke(cli, ["train", str(write_recipe(tmp_path / "r.yaml", RAW)), "-o",
                                      str(tmp_path / "file" / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot create the run folder" in result.output and "is a file, not a folder" in result.output


@pytest.mark.parametrize("value", ["0", "10x", "-5m", "soon"])
def test_checkpoint_every_is_steps_or_a_duration(value):
    for good in ("500", "90s", "10m", "1h"):
        recipe_from_dict({"checkpoint_every": good})
    with pytest.raises(UserError, match="checkpoint_every.*optimizer steps.*duration"):
        recipe_from_dict({"checkpoint_every": value})
