"""Command line: parses options, calls plain functions from the library, prints with rich.

Every command is a thin wrapper; the work happens in functions a test or notebook can call directly.
`UserError` from anywhere becomes one red line and exit status 1, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from functools import wraps

import click
from rich.console import Console
from rich.logging import RichHandler

from tresfinetune.errors import UserError

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
            err_console.print(f"[bold red]Error:[/] {e}", highlight=False)
            sys.exit(1)
        except FileNotFoundError as e:
            err_console.print(f"[bold red]Error:[/] file not found: {e.filename or e}", highlight=False)
            sys.exit(1)

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


def main() -> None:
    cli(prog_name="tresfinetune")
