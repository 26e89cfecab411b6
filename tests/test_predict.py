"""load_trained_model and predict: the real model of a tiny trained run on real image files."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import COLOURS, colour_image

from tresfinetune.cli import cli
from tresfinetune.errors import UserError
from tresfinetune.models.from_checkpoint import load_trained_model
from tresfinetune.predict import predict, write_predictions

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py


def data_root(run_dir: Path) -> Path:
    return Path(load_trained_model(run_dir).info.recipe["data"]["root"])


def make_photo_folder(root: Path) -> dict[str, str]:
    """Colour images in nested folders plus files predict must skip or report; returns {file name: colour}."""
    rng = np.random.default_rng(7)
    truth = {}
    for i, name in enumerate(COLOURS):
        folder = root / ("deeper/and/deeper" if i == 2 else f"set{i}")
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(2):
            path = folder / f"{name}{j}.{'PNG' if j else 'jpg'}"
            colour_image(COLOURS[name], rng, size=(50, 37)).save(path, format="PNG" if j else "JPEG")
            truth[path.name] = name
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return truth


def test_run_folder_means_best_checkpoint_with_its_metadata(single_label_run):
    trained = load_trained_model(single_label_run)
    model, info = trained.model, trained.info
    assert trained.path == single_label_run / "best.pt" and trained.architecture == "tresnet_m"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert info.class_names == ["blue", "green", "red"] and info.task == "single-label"
    assert info.input_size == 32 and info.mean == [0, 0, 0] and info.std == [1, 1, 1]
    assert info.thresholds is None and info.recipe["data"]["name"] == "folder"
    stored = torch.load(single_label_run / "best.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key]), key


def test_last_checkpoint_predicts_with_its_ema_weights(single_label_run):
    ckpt = torch.load(single_label_run / "last.pt", weights_only=True)
    assert ckpt["inference"] == "ema"
    model = load_trained_model(single_label_run / "last.pt").model
    weight = model.state_dict()["body.conv1.0.weight"]
    assert torch.equal(weight, ckpt["ema"]["module.body.conv1.0.weight"])
    assert not torch.equal(weight, ckpt["model"]["body.conv1.0.weight"])


def test_checkpoint_errors_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_trained_model(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_trained_model(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a tresfinetune checkpoint"):
        load_trained_model(tmp_path / "plain.pt")


def test_predict_walks_folders_skips_unreadable_files_and_names_the_right_class(single_label_run, tmp_path):
    truth = make_photo_folder(tmp_path / "photos")
    result = predict([tmp_path / "photos"], checkpoint=single_label_run, top_k=3, batch_size=4)

    assert sorted(Path(p.path).name for p in result.predictions) == sorted(truth)
    assert [Path(path).name for path, _ in result.unreadable] == ["broken.png"]
    for p in result.predictions:
        assert p.labels[0] == p.top_label == truth[Path(p.path).name]
        assert len(p.labels) == 3 and p.probabilities == sorted(p.probabilities, reverse=True)
        assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)  # top-3 of 3 classes: all the probability


def test_predictions_do_not_depend_on_the_batch(single_label_run, tmp_path):
    make_photo_folder(tmp_path / "photos")
    one = predict([tmp_path / "photos"], checkpoint=single_label_run, batch_size=1)
    many = predict([tmp_path / "photos"], checkpoint=single_label_run, batch_size=5)
    assert [p.path for p in one.predictions] == [p.path for p in many.predictions]
    for a, b in zip(one.predictions, many.predictions, strict=True):
        assert a.labels == b.labels
        np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-4, atol=1e-6)


def test_single_label_threshold_hides_unlikely_classes(single_label_run):
    image = next(data_root(single_label_run).rglob("*.png"))
    result = predict([image], checkpoint=single_label_run, top_k=3, threshold=0.9)
    (p,) = result.predictions
    assert all(prob >= 0.9 for prob in p.probabilities) and len(p.labels) <= 1


def test_multi_label_uses_the_tuned_thresholds(multi_label_run):
    root = data_root(multi_label_run)
    thresholds = torch.load(multi_label_run / "best.pt", weights_only=True)["thresholds"]
    result = predict([root], checkpoint=multi_label_run)
    assert result.task == "multi-label" and result.thresholds == pytest.approx(thresholds)
    # With threshold 0 every class is listed, so every class's probability is known.
    everything = predict([root], checkpoint=multi_label_run, threshold=0.0)
    assert all(sorted(p.labels) == ["blue", "red"] for p in everything.predictions)

    truth = {}
    for line in (root / "labels.csv").read_text().splitlines()[1:]:
        name, labels = line.split(",")
        truth[name] = set(labels.split())
    exact = 0
    for p, full in zip(result.predictions, everything.predictions, strict=True):
        probability = dict(zip(full.labels, full.probabilities, strict=True))
        passing = {c for c, t in zip(result.class_names, thresholds, strict=True) if probability[c] >= t}
        assert set(p.labels) == passing
        assert p.probabilities == sorted(p.probabilities, reverse=True)
        exact += set(p.labels) == truth[Path(p.path).name]
    assert exact >= 0.8 * len(result.predictions)


def test_output_formats(single_label_run, tmp_path):
    make_photo_folder(tmp_path / "photos")
    result = predict([tmp_path / "photos"], checkpoint=single_label_run, top_k=2)
    rows = list(csv.DictReader(write_predictions(result, tmp_path / "p.csv").read_text().splitlines()))
    assert len(rows) == 6 and all(len(r["labels"].split(";")) == 2 for r in rows)
    document = json.loads(write_predictions(result, tmp_path / "p.json").read_text())
    assert document["class_names"] == ["blue", "green", "red"] and len(document["predictions"]) == 6
    assert document["unreadable"][0]["path"].endswith("broken.png")
    lines = write_predictions(result, tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == [r["path"] for r in rows]
    with pytest.raises(UserError, match=r"\.csv"):
        write_predictions(result, tmp_path / "p.txt")


def test_cli_uses_the_latest_run_and_lists_unreadable_files(single_label_run, tmp_path, monkeypatch):
    (tmp_path / "runs" / "colours").mkdir(parents=True)
    shutil.copy(single_label_run / "best.pt", tmp_path / "runs" / "colours" / "best.pt")
    make_photo_folder(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["predict", "photos", "--top-k", "2", "-o", "out.jsonl"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "runs/colours/best.pt" in result.output and "most recent run" in result.output
    assert "broken.png" in result.output and "red0.jpg" in result.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("case", ["missing path", "nothing readable", "no runs"])
def test_cli_errors_are_one_line_without_traceback(case, single_label_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"nope")
    args = {"missing path": ["predict", "nowhere.png", "-c", str(single_label_run)],
            "nothing readable": ["predict", "bad.png", "-c", str(single_label_run)],
            "no runs": ["predict", "bad.png"]}[case]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "Error:" in result.output
    expected = {"missing path": "'nowhere.png' does not exist", "nothing readable": "none of the 1 file(s)",
                "no runs": "no --checkpoint given"}[case]
    assert expected in result.output
