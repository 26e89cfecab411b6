"""DataLoaders: batches and targets, seeded order and augmentation, sharding, unreadable images."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tresfinetune.cli import cli
from tresfinetune.datasets import build_loaders
from tresfinetune.datasets.loaders import ShardSampler, TrainSampler
from tresfinetune.errors import UserError
from tresfinetune.recipes import recipe_from_dict


def recipe(**raw):
    base = {"model": {"name": "tresnet_m"}, "input_size": 32, "batch_size": 8, "workers": 0, "seed": 3}
    return recipe_from_dict({**base, **raw})


def write_folder(root: Path, counts: dict[str, int]) -> None:
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            (root / name).mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(100 * c + i).integers(0, 256, (24, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg")


def epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.fixture
def tresfinetune_log(caplog):
    """Capture the library's log even when a CLI test elsewhere turned off propagation."""
    logger = logging.getLogger("tresfinetune")
    caplog.set_level(logging.INFO, logger="tresfinetune")
    if logger.propagate:
        yield caplog
        return
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_digits_batches_and_targets():
    train_loader, val_loader, source = build_loaders(recipe())
    assert source.task == "single-label" and len(source.class_names) == 10
    images, targets = next(iter(train_loader))
    assert images.shape == (8, 32, 32, 3) and images.dtype == torch.uint8
    assert images.min() < 64 and images.max() == 255  # dark ink on white paper
    assert targets.shape == (8,) and targets.dtype == torch.int64
    assert train_loader.drop_last and not val_loader.drop_last
    assert sum(len(t) for _, t in val_loader) == len(source.split("val"))
    assert not train_loader.pin_memory  # CPU


def test_same_seed_same_batches_and_epochs_differ():
    first, _, source = build_loaders(recipe())
    second, _, _ = build_loaders(recipe(), source=source)
    a = epoch_batches(first, 0)[:3]
    b = epoch_batches(second, 0)[:3]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = epoch_batches(first, 1)[:3]
    assert not torch.equal(a[0][0], c[0][0])
    other_seed, _, _ = build_loaders(recipe(seed=4), source=source)
    assert not torch.equal(epoch_batches(other_seed, 0)[0][0], a[0][0])


def test_an_epoch_depends_only_on_seed_and_epoch_not_on_history_or_workers(tmp_path):
    write_folder(tmp_path, {"a": 9, "b": 9})
    raw = {"data": {"name": "folder", "root": str(tmp_path)}, "batch_size": 4}
    continuous, _, source = build_loaders(recipe(**raw))
    for epoch in range(2):
        epoch_batches(continuous, epoch)
    expected = epoch_batches(continuous, 2)
    resumed, _, _ = build_loaders(recipe(**raw), source=source)  # a fresh process starting at epoch 2
    with_workers, _, _ = build_loaders(recipe(**raw, workers=2), source=source)
    epoch_batches(with_workers, 0)  # persistent workers carry on from an earlier epoch
    for loader in (resumed, with_workers):
        got = epoch_batches(loader, 2)
        assert len(got) == len(expected)
        for (x, y), (xe, ye) in zip(got, expected, strict=True):
            assert torch.equal(x, xe) and torch.equal(y, ye)
    assert with_workers.persistent_workers


def test_training_shards_and_validation_counts_every_image_once():
    shards = [list(TrainSampler(11, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to equal length
    assert {i for s in shards for i, _ in s} == set(range(11))
    assert shards[0] != list(TrainSampler(11, seed=2, rank=0, world_size=3))
    val = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in val for i in s) == list(range(11))
    _, val_loader, source = build_loaders(recipe(), rank=1, world_size=2)
    n = len(source.split("val"))
    assert len(val_loader.dataset) == n and len(val_loader.sampler) == n - n // 2


def test_unknown_split_names_the_available_ones():
    with pytest.raises(UserError, match="no split 'holdout'; available: train, val"):
        build_loaders(recipe(data={"val_split": "holdout"}))


def test_unreadable_images_are_skipped_and_reported_once(tmp_path, tresfinetune_log):
    write_folder(tmp_path / "train", {"a": 3, "b": 3})
    write_folder(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "train" / "b" / "empty.JPG").write_bytes(b"")
    raw = {"data": {"name": "folder", "root": str(tmp_path)}, "batch_size": 8}
    train_loader, _, _ = build_loaders(recipe(**raw))
    for epoch in range(2):
        batches = epoch_batches(train_loader, epoch)
        assert [len(y) for _, y in batches] == [6]  # one batch of 8 samples, 2 of them unreadable
    warnings = [r.getMessage() for r in tresfinetune_log.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 2 unreadable image(s)" in warnings[0]
    assert "broken.jpg" in warnings[0] and "empty.JPG" in warnings[0]
    assert set(train_loader.bad_images.paths) == {str(tmp_path / "train" / "a" / "broken.jpg"),
                                                  str(tmp_path / "train" / "b" / "empty.JPG")}

    strict, _, _ = build_loaders(recipe(**{**raw, "data": {**raw["data"], "on_bad_image": "error"}}))
    with pytest.raises(UserError, match=r"cannot read image '.*(broken.jpg|empty.JPG)'.*on_bad_image: skip"):
        epoch_batches(strict, 0)


def test_a_single_label_set_needs_two_classes_each_with_a_training_image(tmp_path, tresfinetune_log):
    write_folder(tmp_path / "one", {"cat": 4})
    with pytest.raises(UserError, match=r"dataset 'folder' has a single class \('cat'\); .* at least two"):
        build_loaders(recipe(data={"name": "folder", "root": str(tmp_path / "one")}))

    # Training on a split that lacks a class the data set has.
    write_folder(tmp_path / "split" / "train", {"cat": 3, "dog": 3, "fox": 2})
    write_folder(tmp_path / "split" / "val", {"cat": 2, "fox": 1})
    raw = {"data": {"name": "folder", "root": str(tmp_path / "split"), "train_split": "val", "val_split": "train"}}
    with pytest.raises(UserError, match="class 'dog' has no image in the 'val' split of dataset 'folder'"):
        build_loaders(recipe(**raw))
    build_loaders(recipe(data={"name": "folder", "root": str(tmp_path / "split")}))  # the right way round is fine

    # data.limit's subset may leave classes out: a quick run, so a warning that names them.
    train_loader, _, source = build_loaders(recipe(data={"name": "digits", "limit": 6}))
    seen = {int(sample.target) for sample in source.split("train")}
    missing = [name for i, name in enumerate(source.class_names) if i not in seen]
    assert len(missing) >= 4 and len(train_loader.dataset) == 6
    (warning,) = [r.getMessage() for r in tresfinetune_log.records if "data.limit" in r.getMessage()]
    assert warning.startswith(f"data.limit 6 leaves classes '{missing[0]}'") and "'train' split" in warning


def test_cli_refuses_a_one_class_folder_in_one_line(tmp_path):
    write_folder(tmp_path / "one", {"cat": 4})
    (tmp_path / "r.yaml").write_text(f"model: {{name: tresnet_m, weights: none}}\ninput_size: 32\n"
                                     f"data: {{name: folder, root: '{tmp_path / 'one'}'}}\n")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "has a single class ('cat')" in " ".join(result.output.split())


def test_multilabel_targets_are_float_multi_hot(tmp_path):
    write_folder(tmp_path / "img", {"x": 6})
    rows = "\n".join(f"img/x/{i}.jpg,{'cat dog' if i % 2 else 'dog'}" for i in range(6))
    (tmp_path / "labels.csv").write_text("file,labels\n" + rows + "\n")
    train_loader, _, source = build_loaders(recipe(data={"name": "multilabel_csv", "root": str(tmp_path),
                                                         "csv": "labels.csv", "val_fraction": 0.34}, batch_size=2))
    images, targets = next(iter(train_loader))
    assert images.shape == (2, 32, 32, 3)
    assert targets.dtype == torch.float32 and targets.shape == (2, 2)
    assert source.class_names == ["cat", "dog"] and (targets[:, 1] == 1).all()


def test_workers_do_not_hang_after_the_main_process_ran_opencv():
    """The pipeline check runs OpenCV in the main process before the workers fork; OpenCV's thread pool would
    deadlock them (seen with RandAugment at 224 px). Run in a subprocess so a regression fails instead of hanging."""
    script = """
from tresfinetune.datasets import build_loaders
from tresfinetune.recipes import recipe_from_dict
train = [{"RandomResizedCrop": {"size": [224, 224]}}, {"RandAugment": {"num_ops": 2, "magnitude": 9}}]
recipe = recipe_from_dict({"input_size": 224, "data": {"name": "digits", "limit": 16}, "transforms": {"train": train},
                           "batch_size": 8, "workers": 2})
loader, _, _ = build_loaders(recipe)
print(sum(len(images) for images, _ in loader))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "16"
