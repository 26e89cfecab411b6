"""End-to-end training on CPU at 32 px: the real model, data, loss and loop on a few dozen images."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from tresfinetune.checkpoint import load_checkpoint
from tresfinetune.cli import cli
from tresfinetune.errors import UserError
from tresfinetune.recipes import recipe_from_dict
from tresfinetune.runtime import amp_dtype_for
from tresfinetune.train import train

DIGITS = {
    "model": {"name": "tresnet_m", "weights": "none"},
    "input_size": 32,
    "data": {"name": "digits", "limit": 48},
    "transforms": {"train": [{"Resize": {"height": 32, "width": 32}}, {"Affine": {"rotate": [-10, 10]}}],
                   "val": [{"Resize": {"height": 32, "width": 32}}]},
    "epochs": 2,
    "batch_size": 16,
    "workers": 0,
    "deterministic": True,
    "optimizer": {"name": "adamw", "lr": 0.001},
}


def digits_recipe(**changes):
    raw = yaml.safe_load(yaml.safe_dump(DIGITS))
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_single_label_run_writes_metrics_and_checkpoints(tmp_path):
    recipe = recipe_from_dict(digits_recipe(ema=0.9))
    result = train(recipe, output=tmp_path / "run", progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert {"train_loss", "lr", "val_top1", "val_top5", "ema_val_top1"} <= set(row)
        assert 0 <= row["val_top1"] <= row["val_top5"] <= 100
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("epoch,")
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["input_size"] == 32

    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.state.epoch == 2 and last.info.class_names == [str(i) for i in range(10)]
    assert last.info.task == "single-label" and last.info.input_size == 32 and last.ema is not None
    assert last.optimization is not None and last.inference == "ema"
    stored = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {"epoch", "step", "optimizer", "scheduler", "scaler", "rng"} <= set(stored)  # format version 1's keys
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["inference"] == "model" and "optimizer" not in best
    assert result.best_metric == max(max(r["val_top1"], r["ema_val_top1"]) for r in rows)
    assert not list((tmp_path / "run").glob("*.tmp"))


def make_multilabel_csv(root: Path, n: int = 24) -> None:
    """Images with a red and/or a blue square; labels say which are present."""
    rng = np.random.default_rng(0)
    lines = ["image,labels"]
    for i in range(n):
        image = np.full((40, 40, 3), 128, np.uint8)
        labels = []
        if i % 2 == 0:
            image[2:18, 2:18] = (255, 0, 0)
            labels.append("red")
        if i % 3 == 0:
            image[22:38, 22:38] = (0, 0, 255)
            labels.append("blue")
        image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"img{i}.png")
        lines.append(f"img{i}.png,{' '.join(labels)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def test_multi_label_run_with_asl_reports_map_and_thresholds(tmp_path):
    make_multilabel_csv(tmp_path)
    raw = digits_recipe(data={"name": "multilabel_csv", "root": str(tmp_path), "csv": "labels.csv",
                              "val_fraction": 0.25})
    raw["loss"] = {"name": "asl", "options": {"gamma_neg": 4, "gamma_pos": 0, "clip": 0.05}}
    result = train(recipe_from_dict(raw), output=tmp_path / "run", progress=False)
    assert all(0 <= row["val_map"] <= 100 for row in result.history)
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best.info.task == "multi-label"
    assert sorted(best.info.class_names) == ["blue", "red"]
    assert len(best.info.thresholds) == 2 and best.state is None


def test_schedule_features_run_together(tmp_path):
    """Accumulation, clipping, frozen backbone, head lr, mixup/cutmix, SGD and bf16 autocast on CPU."""
    raw = digits_recipe(epochs=2, grad_accum_steps=2, clip_grad_norm=1.0, freeze_backbone_epochs=1, amp="bf16",
                        mixup={"mixup_alpha": 0.2, "cutmix_alpha": 1.0})
    raw["optimizer"] = {"name": "sgd", "lr": 0.01, "head_lr_mult": 10}
    raw["schedule"] = {"name": "cosine", "warmup_epochs": 1}
    raw["loss"] = {"name": "cross_entropy", "options": {"label_smoothing": 0.1}}
    recipe = recipe_from_dict(raw)
    assert amp_dtype_for(recipe.amp, torch.device("cpu")) == torch.bfloat16
    result = train(recipe, output=tmp_path / "run", progress=False)
    assert len(result.history) == 2
    assert all(np.isfinite(r["train_loss"]) for r in result.history)


def test_no_weight_decay_on_norm_and_bias():
    from tresfinetune.models import create_model
    from tresfinetune.optim import build_optimizer

    recipe = recipe_from_dict(digits_recipe(optimizer={"name": "adamw", "lr": 0.1, "weight_decay": 0.05,
                                                       "head_lr_mult": 10}))
    model = create_model("tresnet_m", num_classes=10)
    optimizer = build_optimizer(model, recipe)
    for group in optimizer.param_groups:
        dims = {p.ndim for p in group["params"]}
        assert (group["weight_decay"] == 0) == (dims == {1})
        head = any(p is model.head.fc.weight or p is model.head.fc.bias for p in group["params"])
        assert group["lr"] == pytest.approx(1.0 if head else 0.1)


def test_early_stopping(tmp_path):
    raw = digits_recipe(epochs=6, early_stopping_patience=1)
    raw["optimizer"] = {"name": "sgd", "lr": 1e-9}  # nothing is learnt, so nothing improves
    result = train(recipe_from_dict(raw), output=tmp_path / "run", progress=False)
    assert result.stopped_early and len(result.history) < 6


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    raw = digits_recipe(epochs=3)
    raw["optimizer"] = {"name": "sgd", "lr": 1e30, "momentum": 0.0}
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(write_recipe(tmp_path / "r.yaml", raw)), "-o", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "NaN/inf" in result.output and "Traceback" not in result.output


def _run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "tresfinetune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **kwargs)


def _wait_for_rows(run_dir: Path, rows: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows and (run_dir / "last.pt").exists():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise AssertionError("run did not reach the expected epoch in time")


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    raw = digits_recipe(epochs=3, data={"name": "digits", "limit": 96})
    recipe_path = write_recipe(tmp_path / "r.yaml", raw)

    reference = train(recipe_from_dict(raw), output=tmp_path / "ref", progress=False)

    proc = _run_cli(["train", str(recipe_path), "-o", str(tmp_path / "killed")])
    _wait_for_rows(tmp_path / "killed", 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows_at_kill = len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())
    assert rows_at_kill < 3, "the run finished before it could be killed"

    result = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "killed")])
    assert result.exit_code == 0, result.output
    resumed = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for ours, theirs in zip(resumed, reference.history, strict=True):
        for key in ("train_loss", "val_top1", "val_top5", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_ctrl_c_saves_and_resumes(tmp_path):
    raw = digits_recipe(epochs=30, data={"name": "digits", "limit": 64})
    proc = _run_cli(["train", str(write_recipe(tmp_path / "r.yaml", raw)), "-o", str(tmp_path / "run")])
    _wait_for_rows(tmp_path / "run", 1, proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert f"tresfinetune train --resume {tmp_path / 'run'}" in output
    assert "Traceback" not in output
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert 1 <= saved.state.epoch < 30

    result = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "run"), "--set", "epochs=" +
                                      str(saved.state.epoch + 1)])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "run" / "last.pt").state.epoch == saved.state.epoch + 1


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="holds no checkpoint"):
        train(resume=tmp_path)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="damaged or not a PyTorch"):
        train(resume=tmp_path / "last.pt")


def test_resume_with_other_classes_is_a_clear_error(tmp_path):
    train(recipe_from_dict(digits_recipe(epochs=1)), output=tmp_path / "run", progress=False)
    make_multilabel_csv(tmp_path)  # two classes instead of ten
    data = {"name": "multilabel_csv", "root": str(tmp_path), "csv": "labels.csv"}
    with pytest.raises(UserError, match="do not fit a tresnet_m with 2 classes"):
        train(resume=tmp_path / "run", overrides=["epochs=2", f"data={json.dumps(data)}"])


def test_resume_with_another_amp_setting(tmp_path):
    """A bf16 run saves an empty GradScaler state; resuming it with fp16 (and that with none) starts a fresh one."""
    raw = digits_recipe(epochs=1, amp="bf16", data={"name": "digits", "limit": 16}, batch_size=8)
    train(recipe_from_dict(raw), output=tmp_path / "run", progress=False)
    for epochs, amp in ((2, "fp16"), (3, "none")):
        result = train(resume=tmp_path / "run", overrides=[f"epochs={epochs}", f"amp={amp}"], progress=False)
        assert result.history[-1]["epoch"] == epochs
        assert math.isfinite(result.history[-1]["train_loss"])


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 8, 10])
def test_onecycle_schedule_runs_for_any_number_of_steps(total_steps):
    """PyTorch's OneCycleLR divides by zero when pct_start x steps is 1 (4 steps at 0.25): tiny runs must not."""
    from tresfinetune.optim import build_scheduler

    for pct_start in (0.2, 0.25, 0.5):
        recipe = recipe_from_dict(digits_recipe(epochs=1, schedule={"name": "onecycle", "pct_start": pct_start}))
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        scheduler = build_scheduler(optimizer, recipe, total_steps)
        for _ in range(total_steps):
            optimizer.step()
            scheduler.step()
        assert 0 < optimizer.param_groups[0]["lr"] <= 0.1
