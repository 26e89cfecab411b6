"""Command line: parses options, calls plain functions from the library, prints with rich.

Every command is a thin wrapper; the work happens in functions a test or notebook can call directly.
`UserError` from anywhere becomes one red line and exit status 1, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from functools import wraps
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from tresfinetune.errors import UserError

if TYPE_CHECKING:
    from tresfinetune.train import TrainResult

console = Console()
err_console = Console(stderr=True)


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
            err_console.print(f"[bold red]Error:[/] {e}", highlight=False, soft_wrap=True)
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
        err_console.print(f"\n[yellow]Interrupted.[/] Saved {e.run_dir / 'last.pt'}; resume with:")
        err_console.print(f"  tresfinetune train --resume {e.run_dir}", highlight=False, soft_wrap=True)
        sys.exit(130)
    console.print(train_summary_table(result))


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
    """Inspect datasets."""


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
    from tresfinetune.datasets.check import check_data, summary_table, write_preview
    from tresfinetune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    source = build_source(loaded.data)
    report = check_data(loaded, source, show_progress=True)
    console.print(summary_table(report, title=f"{loaded.data.name}: {report['task']}, {source.num_classes} classes"))
    if report["unreadable"]:
        shown = "\n  ".join(report["unreadable"][:10]) + ("\n  ..." if len(report["unreadable"]) > 10 else "")
        console.print(f"[red]{len(report['unreadable'])} unreadable image(s):[/]\n  {shown}", highlight=False)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        console.print(f"report written to {json_path}", highlight=False)
    if preview:
        console.print(f"preview written to {write_preview(loaded, preview, source)}", highlight=False)


def main() -> None:
    cli(prog_name="tresfinetune")
