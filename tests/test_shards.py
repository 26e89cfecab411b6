"""WebDataset shards: pack a folder / CSV, train from the shards (also from pipe: URLs and under torchrun), damaged
shards, and the streaming plan (disjoint readers, equal steps per rank, every validation image exactly once)."""

from __future__ import annotations

import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY_RUN, one_thread, write_colour_csv, write_colour_folder
from PIL import Image
from test_datasets_loaders import tresfinetune_log  # noqa: F401  (a fixture, used by name)

from tresfinetune.cli import cli
from tresfinetune.datasets import build_source
from tresfinetune.datasets.check import check_data
from tresfinetune.datasets.loaders import build_loaders
from tresfinetune.datasets.pack import pack, parse_size, smallest_side
from tresfinetune.datasets.shards import plan_readers
from tresfinetune.datasets.transforms import transform_spec
from tresfinetune.errors import UserError
from tresfinetune.evaluate import evaluate
from tresfinetune.recipes import recipe_from_dict
from tresfinetune.train import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RESIZE_32 = {"train": [{"Resize": {"height": 32, "width": 32}}], "val": [{"Resize": {"height": 32, "width": 32}}]}


def recipe(data: dict, **extra) -> object:
    return recipe_from_dict({**TINY_RUN, "data": data, **extra})


def write_numbered_folder(root: Path, count: int = 45) -> Path:
    """root/<class>/<i>.png, image i a flat colour whose red channel is 5 * i: a loaded batch names its images."""
    for i in range(count):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((24, 20, 3), (5 * i, 40 * (i % 3), 90), np.uint8)).save(folder / f"{i}.png")
    return root


def image_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() // 5).tolist()


def read_ids(loader) -> list[list[int]]:
    return [image_ids(images) for images, _ in loader]


def pack_folder(tmp_path: Path, root: Path, shard_size: str = "20KB", **data) -> Path:
    out = tmp_path / "shards"
    pack(recipe({"name": "folder", "root": str(root), "val_fraction": 0.25, **data}, transforms=RESIZE_32), out,
         shard_size)
    return out


def test_pack_keeps_classes_and_counts_and_check_reads_the_shards(tmp_path):
    source_recipe = recipe({"name": "folder", "root": str(write_colour_folder(tmp_path / "colours")),
                            "val_fraction": 0.25}, transforms=RESIZE_32)
    out = tmp_path / "shards"
    runner = CliRunner()
    recipe_path = tmp_path / "folder.yaml"
    recipe_path.write_text(yaml.safe_dump({"input_size": 32, "transforms": RESIZE_32, "data": {
        "name": "folder", "root": str(tmp_path / "colours"), "val_fraction": 0.25}}))
    result = runner.invoke(cli, ["data", "pack", str(recipe_path), "--out", str(out), "--shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "dataset.json").read_text())
    source = build_source(source_recipe.data)
    assert metadata["class_names"] == source.class_names == ["blue", "green", "red"]
    assert metadata["task"] == "single-label"
    assert metadata["command"].startswith("tresfinetune data pack")
    for split in ("train", "val"):
        entry = metadata["splits"][split]
        assert entry["images"] == len(source.split(split)) == sum(s["images"] for s in entry["shards"])
        assert len(entry["shards"]) > 1 and all((out / s["name"]).is_file() for s in entry["shards"])
    # every sample: an image and its class index, in a mixed order (not class after class)
    with tarfile.open(out / "train-000000.tar") as tar:
        names = tar.getnames()
        labels = [int(tar.extractfile(n).read()) for n in names if n.endswith(".cls")]
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "cls"} and len(set(labels)) > 1

    shard_recipe = recipe({"name": "webdataset", "root": str(out)}, transforms=RESIZE_32)
    report = check_data(shard_recipe)
    folder_report = check_data(source_recipe)
    for split in ("train", "val"):
        for key in ("images", "per_class", "unreadable"):
            assert report["splits"][split][key] == folder_report["splits"][split][key]

    again = runner.invoke(cli, ["data", "pack", str(recipe_path), "--out", str(out)])
    assert again.exit_code == 1 and "already holds shards" in again.output


def test_default_transforms_follow_the_packed_source(tmp_path):
    pack(recipe({"name": "digits", "limit": 20}), tmp_path / "digits")
    digits = transform_spec(recipe({"name": "webdataset", "root": str(tmp_path / "digits")}, transforms={}), True)
    assert transform_spec(recipe({"name": "digits"}, transforms={}), True) == digits  # no flips, gentle crops
    assert not any("HorizontalFlip" in step for step in digits)
    pack(recipe({"name": "multilabel_csv", "root": str(write_colour_csv(tmp_path / "halves", count=8))}),
         tmp_path / "csv")
    multi = transform_spec(recipe({"name": "webdataset", "root": str(tmp_path / "csv")}, transforms={}), True)
    assert any("Cutout" in step for step in multi)  # the multi-label defaults: the task comes from dataset.json


def test_train_one_epoch_from_shards_single_and_multi_label(tmp_path):
    folder_shards = pack_folder(tmp_path / "a", write_colour_folder(tmp_path / "colours"))
    run = train(recipe({"name": "webdataset", "root": str(folder_shards)}, transforms=RESIZE_32, epochs=1),
                output=tmp_path / "single", progress=False)
    row = run.history[0]
    assert "val_top1" in row and row["train_loss"] > 0
    saved = torch.load(run.run_dir / "best.pt", weights_only=True)
    assert saved["class_names"] == ["blue", "green", "red"] and saved["task"] == "single-label"
    evaluation = evaluate(run.run_dir, plot=False)  # streams the val shards: the 6 images once, as in training
    assert evaluation.report["num_samples"] == 6
    assert evaluation.report["top1"] == pytest.approx(row["val_top1"])

    csv_root = write_colour_csv(tmp_path / "halves")
    csv_data = {"name": "multilabel_csv", "root": str(csv_root), "csv": "labels.csv", "val_fraction": 0.25}
    out = tmp_path / "csv_shards"
    pack(recipe(csv_data, transforms=RESIZE_32), out, "10KB")
    metadata = json.loads((out / "dataset.json").read_text())
    source = build_source(recipe(csv_data).data)
    assert metadata["task"] == "multi-label" and metadata["class_names"] == source.class_names
    assert [metadata["splits"][s]["images"] for s in ("train", "val")] == [18, 6]
    # positives per class as the CSV says: red on even rows, blue where i % 3 != 1
    train_targets = np.stack([s.target for s in source.split("train")])
    assert metadata["splits"]["train"]["per_class"] == dict(zip(source.class_names,
                                                                train_targets.sum(0).astype(int).tolist(),
                                                                strict=True))
    run = train(recipe({"name": "webdataset", "root": str(out)}, transforms=RESIZE_32, epochs=1),
                output=tmp_path / "multi", progress=False)
    assert "val_map" in run.history[0]


def test_partial_labels_survive_packing(tmp_path):
    root = write_colour_csv(tmp_path / "halves", count=12)
    lines = (root / "labels.csv").read_text().splitlines()
    # a negative column: "red" known absent on rows 1 and 3; everything not listed is unknown
    rows = [lines[0] + ",absent"] + [line + (",red" if i in (1, 3) else ",") for i, line in enumerate(lines[1:])]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    data = {"name": "multilabel_csv", "root": str(root), "csv": "labels.csv", "negative_column": "absent"}
    out = tmp_path / "shards"
    pack(recipe(data, transforms=RESIZE_32), out)
    assert json.loads((out / "dataset.json").read_text())["unknown_labels"] is True
    source = build_source(recipe(data).data)
    expected = sorted(map(tuple, np.stack([s.target for s in source.split("train")]).tolist()))
    assert any(-1 in row for row in expected)
    # batches of one and no shuffle buffer: every training target comes back, unknowns (-1) included
    streamed = build_loaders(recipe({"name": "webdataset", "root": str(out), "shuffle_buffer": 0},
                                    transforms=RESIZE_32, batch_size=1))[0]
    assert streamed.dataset.has_unknown_labels
    assert sorted(map(tuple, torch.cat([t for _, t in streamed]).tolist())) == expected


@pytest.mark.parametrize("world_size, workers", [(2, 0), (2, 2), (3, 1)])
def test_ranks_and_workers_read_disjoint_samples_and_run_equal_steps(tmp_path, world_size, workers):
    out = pack_folder(tmp_path, write_numbered_folder(tmp_path / "numbers"), shard_size="6KB")
    metadata = json.loads((out / "dataset.json").read_text())
    assert len(metadata["splits"]["train"]["shards"]) % 2 == 1  # an odd number: the split cannot be even
    shard_recipe = recipe({"name": "webdataset", "root": str(out), "shuffle_buffer": 4}, transforms=RESIZE_32,
                          batch_size=3, workers=workers)
    train_ids, val_ids, lengths = [], [], []
    for rank in range(world_size):
        train_loader, val_loader, _ = build_loaders(shard_recipe, rank=rank, world_size=world_size)
        train_loader.dataset.set_epoch(1)
        batches = read_ids(train_loader)
        assert len(batches) == len(train_loader)  # the announced steps are the steps delivered
        lengths.append(len(batches))
        train_ids += [i for batch in batches for i in batch]
        val_ids += [i for batch in read_ids(val_loader) for i in batch]
    assert len(set(lengths)) == 1  # every rank the same number of steps: DDP never waits
    assert len(train_ids) == len(set(train_ids))  # no training image twice in an epoch
    train_total = metadata["splits"]["train"]["images"]
    assert len(train_ids) >= train_total - world_size * max(workers, 1) * 3 - 6 * world_size
    expected_val = sorted(int(Path(s.image).stem) for s in build_source(
        recipe({"name": "folder", "root": str(tmp_path / "numbers"), "val_fraction": 0.25}).data).split("val"))
    assert sorted(val_ids) == expected_val  # every validation image exactly once across ranks


def test_epoch_order_is_reproducible_and_changes_with_the_epoch(tmp_path):
    out = pack_folder(tmp_path, write_numbered_folder(tmp_path / "numbers"), shard_size="6KB")
    shard_recipe = recipe({"name": "webdataset", "root": str(out), "shuffle_buffer": 8}, transforms=RESIZE_32,
                          batch_size=4)
    loader = build_loaders(shard_recipe)[0]
    loader.dataset.set_epoch(3)
    first = read_ids(loader)
    again = build_loaders(shard_recipe)[0]  # a resumed run builds its loaders afresh
    again.dataset.set_epoch(3)
    assert read_ids(again) == first
    again.dataset.set_epoch(4)
    assert read_ids(again) != first


def test_plan_deals_shards_to_balance_samples():
    plan = plan_readers([10, 10, 10, 10, 2], world_size=2, workers=1)
    assert [sorted(reader.shards) for (reader,) in plan] == [[0, 2, 4], [1, 3]]
    # fewer shards than readers: they share the shards and keep every k-th sample
    (a, b), (c, d) = plan_readers([7], world_size=2, workers=2)
    assert [r.offset for r in (a, b, c, d)] == [0, 1, 2, 3] and {r.stride for r in (a, b, c, d)} == {4}
    assert sum(r.size([7]) for r in (a, b, c, d)) == 7
    # an empty shard would leave a rank without samples: shared reading instead
    assert all(r.stride == 3 for (r,) in plan_readers([5, 0, 4], world_size=3, workers=1))


def test_pipe_urls_without_dataset_json(tmp_path):
    out = pack_folder(tmp_path, write_colour_folder(tmp_path / "colours"))
    train_count = len(list(out.glob("train-*.tar")))
    data = {"name": "webdataset",
            "train_urls": f"pipe:cat {out}/train-{{000000..{train_count - 1:06d}}}.tar",
            "val_urls": [f"pipe:cat {path}" for path in sorted(out.glob("val-*.tar"))]}
    with pytest.raises(UserError, match="class names"):
        build_source(recipe(data).data)
    data["classes"] = ["blue", "green", "red"]
    source = build_source(recipe(data).data)  # counted by reading, the task read from the first sample
    assert source.task == "single-label"
    assert source.shard_splits["train"].images == 18 and source.shard_splits["val"].images == 6
    run = train(recipe(data, transforms=RESIZE_32, epochs=1), output=tmp_path / "run", progress=False)
    assert "val_top1" in run.history[0]

    # remote shards with a dataset.json: data check takes its counts rather than downloading everything, and says so
    report = check_data(recipe({**data, "root": str(out), "classes": None}, transforms=RESIZE_32))
    assert [report["splits"][s]["images"] for s in ("train", "val")] == [18, 6]
    assert report["splits"]["train"]["counted_from"] == "dataset.json" and "not decoded" in report["notes"][0]


def test_a_truncated_shard_is_reported_or_stops_the_run(tmp_path, tresfinetune_log):  # noqa: F811
    out = pack_folder(tmp_path, write_colour_folder(tmp_path / "colours"))
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:7000])
    data = {"name": "webdataset", "root": str(out)}
    run = train(recipe(data, transforms=RESIZE_32, epochs=1), output=tmp_path / "skip", progress=False)
    assert run.history[0]["train_loss"] > 0
    assert "train-000001.tar" in tresfinetune_log.text and "damaged shard" in tresfinetune_log.text

    with pytest.raises(UserError, match=r"cannot read shard '.*train-000001.tar' \(damaged shard"):
        train(recipe({**data, "on_bad_image": "error"}, transforms=RESIZE_32, epochs=1), output=tmp_path / "err",
              progress=False)

    report = check_data(recipe(data, transforms=RESIZE_32))
    assert str(shard) in report["unreadable"]


def test_max_side_stores_smaller_images(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    data = {"name": "folder", "root": str(root), "val_fraction": 0.34}

    def stored_sizes(out: Path) -> set[tuple[int, int]]:
        sizes = set()
        for path in out.glob("*.tar"):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".jpg"):
                        sizes.add(Image.open(tar.extractfile(member)).size)
        return sizes

    pack(recipe(data, transforms=RESIZE_32), tmp_path / "auto", max_side="auto")
    # Resize to 32 in both pipelines: the shorter side must stay >= 32, so 160x120 -> 42x32 (31.5 rounds to 32)
    assert stored_sizes(tmp_path / "auto") == {(42, 32)}
    metadata = json.loads((tmp_path / "auto" / "dataset.json").read_text())
    assert sum(len(metadata["splits"][s]["skipped"]) for s in ("train", "val")) == 1  # the broken file, left out
    assert sum(metadata["splits"][s]["images"] for s in ("train", "val")) == 6
    pack(recipe(data), tmp_path / "capped", max_side=100)
    assert stored_sizes(tmp_path / "capped") == {(100, 75)}
    pack(recipe(data), tmp_path / "asis")
    assert stored_sizes(tmp_path / "asis") == {(160, 120)}
    assert smallest_side(4000, 3000, lambda w, h: min(w, h) >= 256) == 341  # 341 x 255.75 -> 256


def test_recipe_and_option_errors_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="needs data.root"):
        build_source(recipe({"name": "webdataset"}).data)
    with pytest.raises(UserError, match="does not exist"):
        build_source(recipe({"name": "webdataset", "train_urls": str(tmp_path / "t-{0..3}.tar"),
                             "val_urls": str(tmp_path / "v.tar")}).data)
    with pytest.raises(UserError, match="dataset.json"):
        build_source(recipe({"name": "webdataset", "root": str(tmp_path)}).data)
    missing = f"pipe:cat {tmp_path / 'missing.tar'}"
    # Which fails first varies: the empty stream (ReadError) or the command's exit status.
    with pytest.raises(UserError, match=r"cannot read shard 'pipe:cat .*missing.tar' \((ReadError|the command exited "
                                        r"with status 1)"):
        build_source(recipe({"name": "webdataset", "train_urls": missing, "val_urls": missing, "classes": ["a"]}).data)
    with pytest.raises(UserError, match="--shard-size"):
        parse_size("lots")
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1GiB") == 2**30


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_is_exact(tmp_path):
    out = pack_folder(tmp_path, write_colour_folder(tmp_path / "colours"))
    data = {"name": "webdataset", "root": str(out), "shuffle_buffer": 6}
    straight = train(recipe(data, transforms=RESIZE_32, epochs=2), output=tmp_path / "straight", progress=False)
    train(recipe(data, transforms=RESIZE_32, epochs=1, schedule={"epochs": 2}), output=tmp_path / "split",
          progress=False)
    resumed = train(resume=tmp_path / "split", overrides=["epochs=2"], progress=False)
    assert resumed.history[-1]["train_loss"] == straight.history[-1]["train_loss"]
    a = torch.load(straight.run_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_over_an_odd_number_of_shards(tmp_path):
    from test_distributed import torchrun

    from tresfinetune.inference import collect_scores
    from tresfinetune.metrics import compute_metrics
    from tresfinetune.models import load_trained_model

    out = pack_folder(tmp_path, write_numbered_folder(tmp_path / "numbers"), shard_size="6KB")
    assert len(list(out.glob("train-*.tar"))) % 2 == 1
    raw = {**TINY_RUN, "data": {"name": "webdataset", "root": str(out), "shuffle_buffer": 4}, "transforms": RESIZE_32,
           "batch_size": 4, "workers": 1, "epochs": 2}
    recipe_path = tmp_path / "shards.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))

    # what each torchrun process's loaders deliver, written per rank: the images used in an epoch, the val images
    script = tmp_path / "read_ids.py"
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_shards import read_ids
from tresfinetune.datasets.loaders import build_loaders
from tresfinetune.distributed import world_from_environment
from tresfinetune.recipes import load_recipe
world = world_from_environment()
train_loader, val_loader, _ = build_loaders(load_recipe({str(recipe_path)!r}), rank=world.rank,
                                           world_size=world.size)
train_loader.dataset.set_epoch(1)
ids = {{"train": read_ids(train_loader), "val": read_ids(val_loader), "steps": len(train_loader)}}
open(os.path.join({str(tmp_path)!r}, f"ids{{world.rank}}.json"), "w").write(json.dumps(ids))
""")
    result = torchrun("--standalone", "--nproc_per_node=2", str(script), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [json.loads((tmp_path / f"ids{rank}.json").read_text()) for rank in (0, 1)]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == ranks[0]["steps"] == ranks[1]["steps"]
    used = [i for rank in ranks for batch in rank["train"] for i in batch]
    assert len(used) == len(set(used)) and len(used) >= 24  # each training image at most once, most of the 33 used
    val = sorted(i for rank in ranks for batch in rank["val"] for i in batch)
    assert len(val) == 12 and len(set(val)) == 12  # every validation image exactly once
    result = torchrun("--standalone", "--nproc_per_node=2", "-m", "tresfinetune", "train", str(recipe_path), "-o",
                      str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "x2" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # the val metric the two ranks gathered equals one process's over every validation image once
    model = load_trained_model(tmp_path / "run" / "last.pt").model
    with one_thread():
        _, val_loader, _ = build_loaders(recipe_from_dict(raw))
        scores, targets = collect_scores(model, val_loader, torch.device("cpu"), "single-label", [0, 0, 0],
                                         [1, 1, 1])
    assert len(targets) == 12
    assert compute_metrics(scores, targets, "single-label")["val_top1"] == pytest.approx(rows[-1]["val_top1"])


@pytest.mark.slow
def test_resume_mid_epoch_replays_the_stream_exactly(tmp_path, monkeypatch):
    from tresfinetune import train as train_module
    from tresfinetune.train import TrainingInterrupted

    out = pack_folder(tmp_path, write_colour_folder(tmp_path / "colours"))
    shard_recipe = recipe({"name": "webdataset", "root": str(out), "shuffle_buffer": 6}, transforms=RESIZE_32,
                          epochs=2, batch_size=4)
    straight = train(shard_recipe, output=tmp_path / "straight", progress=False)

    real = train_module.to_model_input
    calls = []

    def ctrl_c_at_the_second_batch_of_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # 4 batches per epoch: the 2nd of epoch 2; the run finishes its step, then stops
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "to_model_input", ctrl_c_at_the_second_batch_of_epoch_two)
    with pytest.raises(TrainingInterrupted):
        train(shard_recipe, output=tmp_path / "stopped", progress=False)
    monkeypatch.setattr(train_module, "to_model_input", real)
    saved = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    resumed = train(resume=tmp_path / "stopped", progress=False)
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-6)
    a = torch.load(straight.run_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed.run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7) for k in a)
