"""Partial labels (1 positive, 0 negative, -1 unknown): loss modes, metrics on known entries, readers, data check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from tresfinetune.cli import cli
from tresfinetune.datasets import build_source
from tresfinetune.datasets.check import check_data
from tresfinetune.errors import UserError
from tresfinetune.losses import AsymmetricLoss, BinaryCrossEntropy, PartialLabelLoss, build_loss
from tresfinetune.metrics import (
    average_precision_per_class,
    mean_average_precision,
    multilabel_threshold_metrics,
    tune_thresholds,
)
from tresfinetune.partial_labels import read_prior, write_prior
from tresfinetune.recipe import DataConfig
from tresfinetune.recipes import recipe_from_dict


def partial_batch(seed: int, n: int = 6, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, 2, (n, c)), dtype=torch.float32)
    targets = torch.tensor(rng.choice([-1.0, 0.0, 1.0], (n, c), p=[0.4, 0.4, 0.2]), dtype=torch.float32)
    return logits, targets


def asl_entries(logits: torch.Tensor, y: torch.Tensor, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8):
    """SPEC.md section 6, entry by entry, for 0/1 targets."""
    p = torch.sigmoid(logits.double())
    p_neg = (1 - p + clip).clamp(max=1)
    positive = -torch.log(p.clamp(min=eps)) * (1 - p) ** gamma_pos
    negative = -torch.log(p_neg.clamp(min=eps)) * (1 - p_neg) ** gamma_neg
    return torch.where(y == 1, positive, negative)


# ---- loss -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["asl", "bce"])
def test_negative_mode_equals_the_dense_loss_with_unknown_as_zero(name):
    logits, targets = partial_batch(0)
    dense = build_loss(name, "multi-label")(logits, targets.clamp(min=0))
    partial = PartialLabelLoss(build_loss(name, "multi-label"), "negative")(logits, targets)
    assert torch.equal(partial, dense)


@pytest.mark.parametrize("name", ["asl", "bce"])
def test_ignore_mode_gives_unknowns_exactly_zero_gradient(name):
    logits, targets = partial_batch(1)
    logits.requires_grad_(True)
    loss = PartialLabelLoss(build_loss(name, "multi-label"), "ignore")(logits, targets)
    loss.backward()
    unknown = targets == -1
    assert unknown.any() and (logits.grad[unknown] == 0).all()
    assert (logits.grad[~unknown] != 0).all()


def test_ignore_mode_values_against_the_formula():
    logits, targets = partial_batch(2)
    known = targets != -1
    expected = asl_entries(logits, targets)[known].sum()
    got = PartialLabelLoss(AsymmetricLoss(), "ignore")(logits, targets)  # ASL sums, as the reference does
    assert torch.allclose(got.double(), expected, rtol=1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert torch.allclose(PartialLabelLoss(BinaryCrossEntropy(), "ignore")(logits, targets), bce)  # mean over known


def test_selective_mode_ignores_likely_classes_and_the_most_likely_unknowns():
    logits = torch.tensor([[3.0, -1.0, 0.5, -2.0], [-3.0, 2.0, -0.5, 1.0]])
    targets = torch.tensor([[-1.0, -1.0, -1.0, 1.0], [-1.0, -1.0, 0.0, -1.0]])
    loss = PartialLabelLoss(AsymmetricLoss(), "selective", prior_threshold=0.3, likelihood_topk=0)
    # Without a prior (the warm-up epochs), unknowns are ignored.
    assert torch.equal(loss.counted(logits, targets), targets != -1)
    loss.set_prior(torch.tensor([0.5, 0.1, 0.1, 0.1]))  # class 0 is common: its unknowns are ignored
    expected = torch.tensor([[False, True, True, True], [False, True, True, True]])
    assert torch.equal(loss.counted(logits, targets), expected)
    # likelihood_topk 1 x batch 2: the two most likely unknowns of the batch (logits 3.0 and 2.0) are ignored too.
    loss.likelihood_topk = 1
    expected = torch.tensor([[False, True, True, True], [False, False, True, True]])
    assert torch.equal(loss.counted(logits, targets), expected)
    entries = asl_entries(logits, targets.clamp(min=0))
    assert torch.allclose(loss(logits, targets).double(), entries[expected].sum(), rtol=1e-5)
    loss.likelihood_topk = 5  # 10 picks, 5 unknowns: every unknown is ignored
    assert torch.equal(loss.counted(logits, targets), targets != -1)


def test_partial_loss_rejects_bad_options():
    with pytest.raises(UserError, match="loss.partial"):
        PartialLabelLoss(AsymmetricLoss(), "maybe")
    with pytest.raises(UserError, match="asl and bce"):
        PartialLabelLoss(build_loss("asl_single", "single-label"), "ignore")


def test_prior_file_round_trip(tmp_path):
    write_prior(tmp_path / "prior.csv", ["cat", "dog"], np.array([0.25, 0.01]))
    assert read_prior(tmp_path / "prior.csv", ["dog", "cat"]).tolist() == [0.01, 0.25]
    with pytest.raises(UserError, match="no prior for 1 class"):
        read_prior(tmp_path / "prior.csv", ["cat", "bird"])


# ---- metrics --------------------------------------------------------------------------------------------------------


def random_partial(seed: int, n: int = 80, c: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, c)) < 0.3).astype(np.int64)
    scores = np.round(rng.random((n, c)) * 0.7 + truth * 0.3, 2)  # rounding makes ties
    targets = np.where(rng.random((n, c)) < 0.35, -1, truth)
    return scores, targets


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_equals_sklearn_on_the_known_entries(seed):
    scores, targets = random_partial(seed)
    expected = []
    for c in range(scores.shape[1]):
        known = targets[:, c] != -1
        expected.append(average_precision_score(targets[known, c], scores[known, c]) * 100)
    assert np.allclose(average_precision_per_class(scores, targets), expected)
    assert mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) == pytest.approx(
        np.mean(expected))


def test_classes_without_known_positives_are_left_out_of_map():
    scores, targets = random_partial(5)
    targets[:, 2] = np.where(targets[:, 2] == 1, -1, targets[:, 2])  # class 2: positives all unknown
    per_class = average_precision_per_class(scores, targets)
    assert np.isnan(per_class[2]) and mean_average_precision(scores, targets) == pytest.approx(np.nanmean(per_class))


def test_threshold_metrics_and_tuning_skip_unknowns():
    scores, targets = random_partial(6)
    thresholds = np.full(scores.shape[1], 0.5)
    got = multilabel_threshold_metrics(scores, targets, thresholds)
    predicted, known = scores >= 0.5, targets != -1
    correct = (predicted & (targets == 1)).sum()
    assert got["OP"] == pytest.approx(correct / (predicted & known).sum() * 100)
    assert got["OR"] == pytest.approx(correct / (targets == 1).sum() * 100)

    tuned = tune_thresholds(scores, targets)
    for c in range(scores.shape[1]):
        known_c = targets[:, c] != -1
        best = max(f1_score(targets[known_c, c], scores[known_c, c] >= t) for t in scores[known_c, c])
        assert f1_score(targets[known_c, c], scores[known_c, c] >= tuned[c]) == pytest.approx(best)
        assert 0 <= tuned[c] <= 1


# ---- readers --------------------------------------------------------------------------------------------------------


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), np.uint8)).save(path)


def test_multilabel_csv_one_column_per_class_reads_unknowns(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i)
    (tmp_path / "y.csv").write_text("file,cat,dog,split\n0.png,1,,train\n1.png,-1,0,train\n2.png,0,1,val\n")
    source = build_source(DataConfig(name="multilabel_csv", root=str(tmp_path), csv="y.csv"))
    assert [t.tolist() for _, t in source.split("train")] == [[1, -1], [-1, 0]]
    assert [t.tolist() for _, t in source.split("val")] == [[0, 1]]


def test_multilabel_csv_list_form_with_negative_column(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"{i}.png", i)
    (tmp_path / "y.csv").write_text("file,labels,absent,split\n0.png,cat,dog,train\n1.png,,cat bird,train\n"
                                    "2.png,bird,,val\n")
    config = DataConfig(name="multilabel_csv", root=str(tmp_path), csv="y.csv", negative_column="Absent")
    source = build_source(config)
    assert source.class_names == ["bird", "cat", "dog"]
    assert [t.tolist() for _, t in source.split("train")] == [[-1, 1, 0], [0, 0, -1]]
    assert [t.tolist() for _, t in source.split("val")] == [[1, -1, -1]]
    with pytest.raises(UserError, match="has no column 'missing'"):
        build_source(DataConfig(name="multilabel_csv", root=str(tmp_path), csv="y.csv", negative_column="missing"))


def write_openimages(root: Path) -> None:
    (root / "oidv6-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n/m/011k07,Tortoise\n/m/0cmf2,Airplane\n/m/01yrx,Cat\n/m/0unused,Unused\n")
    (root / "oidv6-train-annotations-human-imagelabels.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n"
        "000a1,verification,/m/01yrx,1\n000a1,verification,/m/0cmf2,0\n"
        "000a2,crowdsource-verification,/m/011k07,1\n"
        "000a3,verification,/m/01yrx,0\n"  # its image is not on disk
    )
    (root / "validation-annotations-human-imagelabels.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n000b1,verification,/m/0cmf2,1\n000b1,verification,/m/0xnew,1\n")
    for split, ids in (("train", ["000a1", "000a2"]), ("validation", ["000b1"])):
        for i, image_id in enumerate(ids):
            write_image(root / split / f"{image_id}.jpg", i)


def test_openimages_reads_its_csv_layout(tmp_path):
    write_openimages(tmp_path)
    source = build_source(DataConfig(name="openimages", root=str(tmp_path)))
    assert source.task == "multi-label"
    # Classes the training labels use, in LabelName order, named by their descriptions.
    assert source.class_names == ["Tortoise", "Cat", "Airplane"]
    train = source.split("train")
    assert [Path(s.image).name for s in train] == ["000a1.jpg", "000a2.jpg"]
    assert [np.asarray(s.target).tolist() for s in train] == [[-1, 1, 0], [1, -1, -1]]
    val = source.split("validation")
    assert [np.asarray(s.target).tolist() for s in val] == [[-1, -1, 1]]  # /m/0xnew is not a training class


def test_openimages_targets_reach_the_batches_with_their_unknowns(tmp_path):
    from tresfinetune.datasets import build_loaders

    write_openimages(tmp_path)
    recipe = recipe_from_dict({"data": {"name": "openimages", "root": str(tmp_path)}, "input_size": 32,
                               "batch_size": 2, "workers": 0,
                               "transforms": {"train": [{"Resize": {"height": 32, "width": 32}}],
                                              "val": [{"Resize": {"height": 32, "width": 32}}]}})
    train_loader, val_loader, _ = build_loaders(recipe)
    images, targets = next(iter(val_loader))
    assert images.shape == (1, 32, 32, 3) and targets.tolist() == [[-1, -1, 1]]
    _, targets = next(iter(train_loader))
    assert targets.dtype == torch.float32 and sorted(targets.tolist()) == [[-1, 1, 0], [1, -1, -1]]


def test_openimages_errors(tmp_path):
    with pytest.raises(UserError, match="oidv6-train-annotations-human-imagelabels.csv"):
        write_image(tmp_path / "x.jpg")
        build_source(DataConfig(name="openimages", root=str(tmp_path)))
    write_openimages(tmp_path)
    (tmp_path / "validation-annotations-human-imagelabels.csv").write_text("ImageID,LabelName\n")
    with pytest.raises(UserError, match="Confidence"):
        build_source(DataConfig(name="openimages", root=str(tmp_path))).split("val")


def test_voc_difficult_as_unknown(tmp_path):
    from test_datasets import write_voc

    write_voc(tmp_path)
    source = build_source(DataConfig(name="voc2007", root=str(tmp_path), use_difficult="unknown"))
    first = source.split("train")[0].target
    assert first[source.class_names.index("dog")] == 1 and first[source.class_names.index("person")] == -1
    assert (first == -1).sum() == 1 and (first == 0).sum() == 18
    with pytest.raises(UserError, match="true, false or unknown"):
        recipe_from_dict({"data": {"name": "voc2007", "use_difficult": "sometimes"}})


# ---- data check -----------------------------------------------------------------------------------------------------


def test_data_check_counts_positives_negatives_unknowns(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png", i)
    (tmp_path / "y.csv").write_text("file,cat,dog,split\n0.png,1,,train\n1.png,-1,0,train\n2.png,1,-1,train\n"
                                    "3.png,0,1,val\n")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"data: {{name: multilabel_csv, root: '{tmp_path}', csv: y.csv}}\ninput_size: 32\n")
    report = check_data(recipe_from_dict({"data": {"name": "multilabel_csv", "root": str(tmp_path), "csv": "y.csv"}}),
                        threads=1)
    labels = report["splits"]["train"]["labels"]
    assert labels["per_class"] == {"cat": {"positives": 2, "negatives": 0, "unknowns": 1},
                                   "dog": {"positives": 0, "negatives": 1, "unknowns": 2}}
    assert labels["overall"] == {"positives": 2, "negatives": 1, "unknowns": 3}
    assert labels["without_positives"] == ["dog"]
    assert report["splits"]["val"]["labels"]["without_positives"] == ["cat"]

    result = CliRunner().invoke(cli, ["data", "check", str(recipe_path), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "split 'train': 1 class(es) have no positive image: dog" in result.output
    assert "unknowns" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["splits"]["train"]["labels"]["overall"]["unknowns"] == 3


# ---- training -------------------------------------------------------------------------------------------------------


def write_partial_colour_csv(root: Path, n: int = 20) -> None:
    """Red and/or blue squares; one label in three is unknown (empty cell or -1)."""
    rng = np.random.default_rng(0)
    lines = ["image,red,blue"]
    for i in range(n):
        image = np.full((40, 40, 3), 128, np.uint8)
        red, blue = i % 2 == 0, i % 3 == 0
        if red:
            image[2:18, 2:18] = (255, 0, 0)
        if blue:
            image[22:38, 22:38] = (0, 0, 255)
        image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"img{i}.png")
        cells = [str(int(red)), str(int(blue))]
        cells[i % 2] = ("", "-1", cells[i % 2])[i % 3]
        lines.append(f"img{i}.png,{','.join(cells)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def partial_run_recipe(root: Path, **loss) -> dict:
    return {
        "model": {"name": "tresnet_m", "weights": "none"}, "input_size": 32,
        "data": {"name": "multilabel_csv", "root": str(root), "csv": "labels.csv", "val_fraction": 0.3},
        "transforms": {"train": [{"Resize": {"height": 32, "width": 32}}],
                       "val": [{"Resize": {"height": 32, "width": 32}}]},
        "epochs": 2, "batch_size": 8, "workers": 0, "optimizer": {"name": "adamw", "lr": 0.002},
        "loss": {"name": "asl", **loss},
    }


def run_and_read_start_line(recipe: dict, output: Path, **kwargs) -> tuple[object, str]:
    import io

    from rich.console import Console

    from tresfinetune.train import train

    buffer = io.StringIO()
    result = train(recipe_from_dict(recipe) if recipe else None, output=output, progress=False,
                   console=Console(file=buffer, width=400), **kwargs)
    return result, buffer.getvalue()


@pytest.mark.parametrize("mode", [None, "negative", "ignore"])
def test_training_with_each_plain_mode(tmp_path, mode):
    write_partial_colour_csv(tmp_path)
    result, output = run_and_read_start_line(partial_run_recipe(tmp_path, partial=mode), tmp_path / "run")
    assert f"unknown labels: {mode or 'ignore'}" in output  # ignore is the default on data with unknowns
    assert all(0 <= row["val_map"] <= 100 and np.isfinite(row["train_loss"]) for row in result.history)
    assert not (tmp_path / "run" / "class_prior.csv").exists()
    if mode == "ignore":  # evaluate reads the same partial targets and leaves the unknowns out
        from tresfinetune.evaluate import evaluate

        report = evaluate(tmp_path / "run", workers=0, plot=False).report
        assert report["map"] == pytest.approx(max(row["val_map"] for row in result.history))
        assert sum(row["unknowns"] for row in report["per_class"]) > 0


def test_selective_training_estimates_the_prior_and_resumes_with_it(tmp_path):
    from tresfinetune.checkpoint import load_checkpoint

    write_partial_colour_csv(tmp_path)
    recipe = partial_run_recipe(tmp_path, partial="selective", prior_threshold=0.5, likelihood_topk=1)
    recipe["epochs"] = 1
    _, output = run_and_read_start_line(recipe, tmp_path / "run")
    assert "unknown labels: selective, ignored during the first 1 epoch(s)" in output
    prior = read_prior(tmp_path / "run" / "class_prior.csv", ["red", "blue"])
    assert ((prior > 0) & (prior < 1)).all()
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert np.allclose(last.state.label_prior, prior, rtol=1e-5) and last.state.prior_estimate is None

    result, _ = run_and_read_start_line(None, None, resume=tmp_path / "run", overrides=["epochs=2"])
    assert [row["epoch"] for row in result.history] == [1, 2] and np.isfinite(result.history[-1]["train_loss"])
    # A prior from a file replaces the estimate and the warm-up.
    recipe.update(epochs=1, loss={"name": "bce", "partial": "selective", "prior": str(tmp_path / "run" /
                                                                                       "class_prior.csv")})
    _, output = run_and_read_start_line(recipe, tmp_path / "from_file")
    assert "bce, unknown labels: selective;" in output and not (tmp_path / "from_file" / "class_prior.csv").exists()


def test_partial_on_single_label_data_is_a_clear_error(tmp_path):
    raw = {"model": {"name": "tresnet_m", "weights": "none"}, "input_size": 32, "data": {"name": "digits", "limit": 20},
           "epochs": 1, "workers": 0, "loss": {"partial": "ignore"}}
    with pytest.raises(UserError, match="multi-label data only"):
        run_and_read_start_line(raw, tmp_path / "run")


@pytest.mark.slow
def test_torchrun_gathers_partial_targets_and_the_prior(tmp_path):
    """Two processes: the prior sums and the validation targets (with their -1) come from both ranks."""
    import yaml
    from test_distributed import torchrun

    write_partial_colour_csv(tmp_path, n=20)  # 16 train images: one global batch of 16, no padding
    recipe = partial_run_recipe(tmp_path, partial="selective")
    recipe.update(epochs=1, sync_bn=True, deterministic=True, optimizer={"name": "sgd", "lr": 0.01})
    recipe["data"]["val_fraction"] = 0.2
    runs = {}
    for processes, batch in ((1, 16), (2, 8)):
        path = tmp_path / f"r{processes}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "batch_size": batch}))
        done = torchrun("--standalone", f"--nproc_per_node={processes}", "-m", "tresfinetune", "train", str(path),
                        "-o", str(tmp_path / f"run{processes}"))
        assert done.returncode == 0, done.stdout + done.stderr
        runs[processes] = tmp_path / f"run{processes}"
    one, two = (read_prior(runs[p] / "class_prior.csv", ["red", "blue"]) for p in (1, 2))
    assert np.allclose(one, two, rtol=1e-4)
    maps = [json.loads((runs[p] / "metrics.jsonl").read_text().splitlines()[0])["val_map"] for p in (1, 2)]
    assert maps[0] == pytest.approx(maps[1], abs=1e-6)


def test_gamma_unknown_focuses_unknowns_counted_as_negatives():
    logits, targets = partial_batch(3)
    loss = PartialLabelLoss(AsymmetricLoss(gamma_neg=1, gamma_pos=0, clip=0), "negative", gamma_unknown=3)
    dense = targets.clamp(min=0)
    expected = torch.where(targets == -1, asl_entries(logits, dense, gamma_neg=3, gamma_pos=0, clip=0),
                           asl_entries(logits, dense, gamma_neg=1, gamma_pos=0, clip=0))
    assert torch.allclose(loss(logits, targets).double(), expected.sum(), rtol=1e-5)
    with pytest.raises(UserError, match="gamma_unknown"):
        PartialLabelLoss(BinaryCrossEntropy(), "negative", gamma_unknown=2)


def test_recipe_checks_the_partial_keys():
    with pytest.raises(UserError, match="loss.partial.*did you mean 'ignore'"):
        recipe_from_dict({"loss": {"partial": "ignor"}})
    with pytest.raises(UserError, match="loss.prior_threshold"):
        recipe_from_dict({"loss": {"prior_threshold": 2}})
    with pytest.raises(UserError, match="loss.prior_epochs"):
        recipe_from_dict({"loss": {"prior_epochs": 0}})
    with pytest.raises(UserError, match="selective only"):
        recipe_from_dict({"loss": {"partial": "ignore", "prior": "prior.csv"}})
