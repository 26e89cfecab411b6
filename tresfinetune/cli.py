"""Command line: parses options, calls plain functions from the library, prints with rich.

Every command is a thin wrapper; the work happens in functions a test or notebook can call directly.
`UserError` from anywhere becomes one red line and exit status 1, never a traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from functools import wraps
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from tresfinetune.distributed import error_prefix
from tresfinetune.errors import UserError

if TYPE_CHECKING:
    from tresfinetune.train import TrainingInterrupted, TrainResult

console = Console()
err_console = Console(stderr=True)
MAX_CLASSES_SHOWN = 40  # data check prints per-class label counts up to this many classes


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logger = logging.getLogger("tresfinetune")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def user_errors(func):
    """Turn the user's mistakes into one clear message and a non-zero exit."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as e:
            prefix = error_prefix(e.shared)
            if prefix is not None:
                err_console.print(f"[bold red]Error:[/] {prefix}{e}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except FileNotFoundError as e:
            err_console.print(f"[bold red]Error:[/] file not found: {e.filename or e}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/]")
            sys.exit(130)

    return wrapper


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key (dotted, e.g. data.root=~/photos); repeatable.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="More logging.")
@click.version_option(package_name="tresfinetune")
def cli(verbose: bool) -> None:
    """Fine-tune ImageNet-pretrained TResNet models."""
    _setup_logging(verbose)


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@set_option
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Run folder (default runs/<recipe>-<time>).")
@click.option("--resume", type=click.Path(), help="Continue a run: its folder or its last.pt.")
@user_errors
def train(recipe: str | None, overrides: tuple[str, ...], output: str | None, resume: str | None) -> None:
    """Fine-tune a model as RECIPE describes (e.g. recipes/flowers.yaml)."""
    from tresfinetune.train import TrainingInterrupted, train_from_cli

    try:
        result = train_from_cli(recipe, overrides, output, resume, console=console)
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            _print_interrupted(e)
        sys.exit(e.exit_status)
    console.print(train_summary_table(result))


def _print_interrupted(e: TrainingInterrupted) -> None:
    last = e.run_dir / "last.pt"
    name = signal.Signals(e.signum).name
    if e.saved:
        err_console.print(f"\n[yellow]Stopped ({name}) after a completed step.[/] Saved {last}; resume with:")
    elif last.exists():
        err_console.print(f"\n[yellow]Interrupted mid-step.[/] {last} holds the last step checkpoint; resume with:")
    else:
        err_console.print("\n[yellow]Interrupted[/] before the first checkpoint; nothing to resume.")
        return
    err_console.print(f"  tresfinetune train --resume {e.run_dir}", highlight=False, soft_wrap=True)


def train_summary_table(result: TrainResult) -> Table:
    table = Table(title=f"Run {result.run_dir}", show_lines=False)
    if not result.history:
        return table
    keys = [k for k in result.history[-1] if k not in ("epoch_seconds",)]
    for key in keys:
        table.add_column(key, justify="right")
    for row in result.history:
        style = "bold green" if row["epoch"] == result.best_epoch else ""
        table.add_row(*[_fmt(row.get(k)) for k in keys], style=style)
    best = f"{result.best_metric:.2f}" if result.best_metric is not None else "n/a"
    table.caption = f"best {best} at epoch {result.best_epoch}: {result.best_checkpoint}"
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.4f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


@cli.group()
def data() -> None:
    """Inspect datasets and pack them as shards."""


@data.command("check")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@click.option("--preview", type=click.Path(dir_okay=False), help="Write a PNG grid of augmented training samples.")
@user_errors
def data_check(recipe: str, overrides: tuple[str, ...], json_path: str | None, preview: str | None) -> None:
    """Read every image of RECIPE's dataset once: counts per split and class, unreadable files, overlaps."""
    import json

    from tresfinetune.datasets import build_source
    from tresfinetune.datasets.check import check_data, label_table, label_warnings, summary_table, write_preview
    from tresfinetune.recipes import load_recipe

    loaded = load_recipe(recipe, overrides)
    source = build_source(loaded.data)
    report = check_data(loaded, source, show_progress=True)
    console.print(summary_table(report, title=f"{loaded.data.name}: {report['task']}, {source.num_classes} classes"))
    if report["task"] == "multi-label":
        if source.num_classes <= MAX_CLASSES_SHOWN:
            for split in report["splits"]:
                console.print(label_table(report, split))
        else:
            console.print(f"positives / negatives / unknowns per class: see --json ({source.num_classes} classes)")
        for line in label_warnings(report):
            console.print(f"[yellow]warning:[/] {line}", highlight=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", highlight=False)
    if report["unreadable"]:
        shown = "\n  ".join(report["unreadable"][:10]) + ("\n  ..." if len(report["unreadable"]) > 10 else "")
        console.print(f"[red]{len(report['unreadable'])} unreadable image(s):[/]\n  {shown}", highlight=False)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        console.print(f"report written to {json_path}", highlight=False)
    if preview:
        console.print(f"preview written to {write_preview(loaded, preview, source)}", highlight=False)


@data.command("speed")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True,
              help="Which loader to time.")
@click.option("--batches", default=20, show_default=True, help="Batches to time (after one untimed warm-up batch).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the numbers as JSON here.")
@user_errors
def data_speed(recipe: str, overrides: tuple[str, ...], split: str, batches: int, json_path: str | None) -> None:
    """Images per second RECIPE's loader delivers with its workers, without a model: does the data keep up?"""
    import json

    from tresfinetune.datasets.speed import loader_speed, speed_table
    from tresfinetune.recipes import load_recipe

    result = loader_speed(load_recipe(recipe, overrides), split, batches)
    console.print(speed_table(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        console.print(f"numbers written to {json_path}", highlight=False)


@data.command("pack")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder for the shards.")
@click.option("--shard-size", default="500MB", show_default=True, help="Largest shard (e.g. 500MB, 1GiB).")
@click.option("--max-side", help="Store images no larger than this (pixels, longer side), or 'auto': as small as the "
              "recipe's transforms allow without enlarging any pixel. Default: as they are.")
@user_errors
def data_pack(recipe: str, overrides: tuple[str, ...], out: str, shard_size: str, max_side: str | None) -> None:
    """Write RECIPE's train and val splits as WebDataset shards plus dataset.json, for data.name: webdataset."""
    import shlex

    from rich.progress import Progress

    from tresfinetune.datasets.pack import pack
    from tresfinetune.recipes import load_recipe

    loaded = load_recipe(recipe, overrides)
    with Progress(transient=True, console=err_console) as bar:
        tasks: dict[str, int] = {}

        def progress(split: str, done: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(f"packing {split}", total=None)
            bar.update(tasks[split], completed=done)

        command = ["tresfinetune", "data", "pack", recipe, *(f"--set={o}" for o in overrides), "--out", out,
                   "--shard-size", shard_size, *(["--max-side", max_side] if max_side else [])]
        metadata = pack(loaded, out, shard_size, max_side, command=shlex.join(command), progress=progress)
    table = Table(title=f"{out}: {metadata['task']}, {len(metadata['class_names'])} classes")
    for column in ("split", "images", "shards", "MB", "left out"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, entry in metadata["splits"].items():
        table.add_row(split, str(entry["images"]), str(len(entry["shards"])),
                      f"{sum(s['bytes'] for s in entry['shards']) / 1e6:.1f}",
                      f"[red]{len(entry['skipped'])}[/]" if entry["skipped"] else "0")
    console.print(table)
    console.print(f"train from them with: data: {{name: webdataset, root: {out}}}", highlight=False)


@cli.command()
@click.argument("checkpoint", type=click.Path())
@set_option
@click.option("--split", help="Split to evaluate (default: the recipe's data.val_split).")
@click.option("--tta", type=click.Choice(["flip"]), help="Test-time augmentation: average with the mirrored image.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report as JSON here.")
@click.option("--device", help="cpu, cuda or cuda:N (default: the recipe's device).")
@click.option("--batch-size", type=int, help="Images per batch (default: the recipe's).")
@click.option("--workers", type=int, help="Data loading processes (default: the recipe's).")
@user_errors
def evaluate(checkpoint: str, overrides: tuple[str, ...], split: str | None, tta: str | None, json_path: str | None,
             device: str | None, batch_size: int | None, workers: int | None) -> None:
    """Metrics of CHECKPOINT (a .pt file or a run folder) on a split of its dataset."""
    from tresfinetune.evaluate import evaluate as run_evaluation
    from tresfinetune.evaluate import evaluation_tables

    result = run_evaluation(checkpoint, overrides, split=split, tta=tta, json_path=json_path, device=device,
                            batch_size=batch_size, workers=workers)
    for table in evaluation_tables(result.report):
        console.print(table)
    if result.json_path:
        console.print(f"report written to {result.json_path}", highlight=False)
    if result.plot:
        console.print(f"plot written to {result.plot}", highlight=False)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--checkpoint", "-c", type=click.Path(), help="Checkpoint or run folder (default: latest run in runs/).")
@click.option("--top-k", default=5, show_default=True, help="Classes shown per image (single-label).")
@click.option("--threshold", type=float, help="Multi-label: one threshold for all classes instead of the tuned ones; "
              "single-label: hide classes below this probability.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Also write predictions: .csv, .json or .jsonl.")
@click.option("--batch-size", default=32, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=0, show_default=True, help="Image decoding processes.")
@user_errors
def predict(paths: tuple[str, ...], checkpoint: str | None, top_k: int, threshold: float | None, output: str | None,
            batch_size: int, device: str, workers: int) -> None:
    """Classify image files and folders of images (recursively) with a trained model."""
    from tresfinetune.predict import predict as run_prediction
    from tresfinetune.predict import predictions_table, write_predictions

    result = run_prediction(paths, checkpoint, top_k=top_k, threshold=threshold, batch_size=batch_size,
                            device=device, workers=workers)
    if result.predictions:
        console.print(predictions_table(result, top_k))
    if result.unreadable:
        err_console.print(f"[yellow]{len(result.unreadable)} file(s) could not be read and were skipped:[/]")
        for path, reason in result.unreadable:
            err_console.print(f"  {path}: {reason}", highlight=False, soft_wrap=True)
    if not result.predictions:
        raise UserError(f"none of the {len(result.unreadable)} file(s) could be read as an image")
    if output:
        console.print(f"predictions written to {write_predictions(result, output)}", highlight=False)


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "export_format", type=click.Choice(["onnx", "torchscript"]),
              help="File format (default: from the --output suffix, .onnx or .pt).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="File to write.")
@user_errors
def export(checkpoint: str, export_format: str | None, output: str) -> None:
    """Write CHECKPOINT's model, fused for inference, as ONNX or TorchScript (verified against PyTorch)."""
    from tresfinetune.export import export_model

    result = export_model(checkpoint, output, export_format)
    console.print(f"wrote {result.path} ({result.format}, {len(result.metadata['class_names'])} classes, "
                  f"{result.metadata['input_size']}px)", highlight=False)
    console.print(f"  fused model vs PyTorch: max difference {result.fused_difference:.1e} (relative)", highlight=False)
    if result.file_difference is not None:
        console.print(f"  exported file via {result.runtime} vs PyTorch: max difference "
                      f"{result.file_difference:.1e} (relative)", highlight=False)
    else:
        console.print("  onnxruntime is not installed: the file was checked structurally only", highlight=False)


@cli.command()
@click.option("--model", "model_name", default="tresnet_m", show_default=True, help="Architecture.")
@click.option("--input-size", default=224, show_default=True, help="Image side in pixels.")
@click.option("--batch-size", default="32", show_default=True,
              help="A number, or 'auto': 90% of the largest that fits.")
@click.option("--amp", is_flag=True, help="Mixed precision (bf16, or fp16 on GPUs without bf16).")
@click.option("--channels-last", is_flag=True, help="NHWC memory layout.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
@click.option("--grad-checkpointing", is_flag=True,
              help="Also measure with activations recomputed in backward, and show the trade.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--fused", is_flag=True, help="Measure inference on the fused model (norms folded into convs).")
@click.option("--steps", default=10, show_default=True, help="Timed steps per measurement.")
@click.option("--warmup", default=2, show_default=True, help="Untimed steps before them.")
@click.option("--threads", type=int, help="CPU threads (default: PyTorch's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the numbers as JSON here.")
@user_errors
def benchmark(model_name: str, input_size: int, batch_size: str, amp: bool, channels_last: bool, use_compile: bool,
              grad_checkpointing: bool, device: str, fused: bool, steps: int, warmup: int, threads: int | None,
              json_path: str | None) -> None:
    """Training and inference speed (img/s) and peak memory, like the paper's speed table."""
    import json

    from tresfinetune.throughput import benchmark as run_benchmark
    from tresfinetune.throughput import benchmark_checkpointing, benchmark_table, describe_trade, parse_batch_size

    options = dict(input_size=input_size, batch_size=parse_batch_size(batch_size), amp=amp,
                   channels_last=channels_last, compile=use_compile, device=device, fused=fused, warmup=warmup,
                   steps=steps, threads=threads)
    # --grad-checkpointing measures the model both ways, to show the trade.
    if grad_checkpointing:
        results, trade = benchmark_checkpointing(model_name, **options)
    else:
        results = [run_benchmark(model_name, **options)]
    console.print(benchmark_table(results))
    numbers = results[0].as_dict()
    if grad_checkpointing:
        console.print(describe_trade(trade), highlight=False)
        numbers = {"plain": numbers, "grad_checkpointing": results[1].as_dict(), "trade": trade}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(numbers, f, indent=2)
        console.print(f"numbers written to {json_path}", highlight=False)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Folder for the PNGs (default: the run folder).")
@user_errors
def report(run_dir: str, output: str | None) -> None:
    """PNG plots of RUN_DIR's training loss, validation metric and learning rate per epoch."""
    from tresfinetune.report import write_report

    for path in write_report(run_dir, output):
        console.print(f"wrote {path}", highlight=False)


@cli.command()
@user_errors
def models() -> None:
    """The TResNet variants: size, cost and pretrained weights tags (use a tag as model.weights)."""
    from tresfinetune.models import describe_models

    table = Table(title="TResNet models", show_lines=True)
    table.add_column("model", style="bold")
    table.add_column("params (M)", justify="right")
    table.add_column("GFLOPs@224", justify="right")
    table.add_column("default res", justify="right")
    table.add_column("pretrained tags (ImageNet top-1 %)")
    for row in describe_models():
        tags = []
        for tag in row["tags"]:
            details = [f"{tag['top1']:.1f}" if tag["top1"] is not None else None,
                       f"{tag['input_size']}px" if tag["input_size"] != row["default_resolution"] else None,
                       tag["note"] or None]
            details = [d for d in details if d]
            tags.append(f"{tag['tag']}" + (f" ({', '.join(details)})" if details else ""))
        table.add_row(row["name"], f"{row['params'] / 1e6:.1f}", f"{row['gflops_224']:.1f}",
                      str(row["default_resolution"]), "\n".join(tags))
    console.print(table)
    console.print("GFLOPs are multiply-adds per 224x224 image, as in the TResNet paper.", highlight=False)


def main() -> None:
    cli(prog_name="tresfinetune")
