"""evaluate: the run's own validation numbers come back, plots and JSON land where promised, errors are clear."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from tresfinetune.cli import cli
from tresfinetune.errors import UserError
from tresfinetune.evaluate import evaluate
from tresfinetune.models.from_checkpoint import load_trained_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def data_root(run_dir: Path) -> Path:
    return Path(load_trained_model(run_dir).info.recipe["data"]["root"])


def best_value(run_dir: Path, metric: str) -> float:
    """What training recorded for the weights it kept in best.pt (raw or EMA, whichever won)."""
    return max(max(row.get(metric, -1), row.get("ema_" + metric, -1)) for row in history(run_dir))


def test_single_label_reproduces_the_training_validation(single_label_run, tmp_path):
    result = evaluate(single_label_run, json_path=tmp_path / "eval.json", workers=0)
    report = result.report
    assert report["top1"] == pytest.approx(best_value(single_label_run, "val_top1"))
    assert report["top5"] == pytest.approx(best_value(single_label_run, "val_top5"))
    assert report["split"] == "val" and report["num_samples"] == 6  # 2 of 8 per class held out
    assert [c["name"] for c in report["per_class"]] == ["blue", "green", "red"]
    assert sum(map(sum, report["confusion_matrix"])) == 6
    assert json.loads((tmp_path / "eval.json").read_text())["top1"] == report["top1"]
    assert result.plot == tmp_path / "eval_confusion_matrix.png"
    assert Image.open(result.plot).size[0] > 100


def test_multi_label_reports_map_and_threshold_metrics(multi_label_run, tmp_path):
    report = evaluate(multi_label_run, json_path=tmp_path / "m.json", workers=0).report
    assert report["map"] == pytest.approx(best_value(multi_label_run, "val_map"))
    assert set(report["at_tuned_thresholds"]) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    assert set(report["at_0.5"]) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    assert [r["name"] for r in report["per_class"]] == ["blue", "red"]
    assert all("threshold" in r and 0 <= r["ap"] <= 100 for r in report["per_class"])
    assert (tmp_path / "m_ap_per_class.png").is_file()


def test_moved_data_with_set_override_and_other_split(single_label_run, tmp_path):
    """The recipe in the checkpoint points at the old data folder; --set data.root points at the new one."""
    ckpt = shutil.copy(single_label_run / "best.pt", tmp_path / "best.pt")
    moved = shutil.copytree(data_root(single_label_run), tmp_path / "moved")
    report = evaluate(ckpt, overrides=[f"data.root={moved}"], split="train", tta="flip", workers=0).report
    assert report["split"] == "train" and report["num_samples"] == 18 and report["tta"] == "flip"
    assert (tmp_path / "eval_train_confusion_matrix.png").is_file()  # no --json: next to the checkpoint


def test_errors_name_the_problem(single_label_run, multi_label_run, tmp_path):
    with pytest.raises(UserError, match="no split 'test'"):
        evaluate(single_label_run, split="test", plot=False, workers=0)
    with pytest.raises(UserError, match="does not exist"):
        evaluate(single_label_run, overrides=[f"data.root={tmp_path / 'gone'}"], plot=False)
    halves = data_root(multi_label_run)
    with pytest.raises(UserError, match="do not match the checkpoint"):
        # The multi-label data has classes blue and red; the checkpoint knows blue, green and red.
        evaluate(single_label_run, plot=False, workers=0,
                 overrides=["data.name=multilabel_csv", f"data.root={halves}", "data.csv=labels.csv"])


def test_cli_prints_tables_and_fails_cleanly(single_label_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", str(single_label_run), "--json", str(tmp_path / "e.json"),
                                 "--workers", "0"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "top-1 accuracy" in result.output and "Per class" in result.output
    assert "e_confusion_matrix.png" in result.output

    result = runner.invoke(cli, ["evaluate", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "Traceback" not in result.output and "does not exist" in result.output
