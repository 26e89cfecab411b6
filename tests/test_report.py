"""report: PNG plots from a run's metrics.jsonl."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from tresfinetune.cli import cli
from tresfinetune.errors import UserError
from tresfinetune.report import read_history, write_report


def write_history(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_plots_of_a_trained_run(single_label_run, tmp_path):
    paths = write_report(single_label_run, output=tmp_path)
    assert [p.name for p in paths] == ["loss.png", "val_metric.png", "lr.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 400


def test_gaps_ema_and_multi_label_columns(tmp_path):
    """Validation every other epoch, EMA columns, mAP instead of top-1; rows out of order are sorted."""
    rows = [{"epoch": e, "train_loss": 1.0 / e, "lr": 1e-3 * e} for e in (3, 1, 2, 4)]
    for row in rows:
        if row["epoch"] % 2 == 0:
            row.update(val_map=50.0 + row["epoch"], ema_val_map=51.0 + row["epoch"])
    run = write_history(tmp_path / "run", rows)
    assert [r["epoch"] for r in read_history(run)] == [1, 2, 3, 4]
    assert [p.name for p in write_report(run)] == ["loss.png", "val_metric.png", "lr.png"]


def test_no_validation_yet_means_no_validation_plot(tmp_path):
    run = write_history(tmp_path / "run", [{"epoch": 1, "train_loss": 0.5, "lr": 0.01}])
    assert [p.name for p in write_report(run)] == ["loss.png", "lr.png"]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no metrics", "has no metrics.jsonl"),
    ("empty", "holds no epochs yet"),
    ("damaged", "not valid JSON"),
])
def test_errors(case, message, tmp_path):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    if case == "damaged":
        (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 0.5}\n{"epoch": 2, "tra')
    with pytest.raises(UserError, match=message):
        write_report(run)


def test_cli(tmp_path):
    run = write_history(tmp_path / "run", [{"epoch": 1, "train_loss": 0.5, "lr": 0.01, "val_top1": 40.0}])
    result = CliRunner().invoke(cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "val_metric.png" in result.output and (run / "val_metric.png").is_file()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "Traceback" not in result.output
