"""Training throughput of `tresfinetune train` against a bare PyTorch loop on the same model, batch and data.

The bare loop steps AdamW over batches already in memory as tensors; `train()` runs the whole engine (loader with
the recipe's pipeline, progress bars, loss checks, metrics) over the same digits images. Goal: overhead <= 10%.

    .venv/bin/python benchmarks/train_overhead.py [--steps 12] [--size 64] [--batch 32] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tresfinetune.datasets import build_loaders
from tresfinetune.datasets.transforms import to_model_input
from tresfinetune.models import create_model
from tresfinetune.recipes import recipe_from_dict
from tresfinetune.train import train


def make_recipe(size: int, batch: int, steps: int) -> dict:
    resize = [{"Resize": {"height": size, "width": size}}]
    return {
        "model": {"name": "tresnet_m", "weights": "none"},
        "input_size": size,
        "data": {"name": "digits", "limit": batch * steps, "val_fraction": 0.2},
        "transforms": {"train": resize, "val": resize},
        "epochs": 1,
        "batch_size": batch,
        "workers": 0,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "constant"},
        "loss": {"name": "cross_entropy", "options": {"label_smoothing": 0.0}},
    }


def bare_loop(raw: dict) -> float:
    """img/s of forward + backward + AdamW step over the recipe's training images, pre-loaded as tensors."""
    recipe = recipe_from_dict(raw)
    train_loader, _, source = build_loaders(recipe)
    train_loader.sampler.set_epoch(0)
    cpu = torch.device("cpu")
    batches = [(to_model_input(images, cpu, [0.0] * 3, [1.0] * 3), targets) for images, targets in train_loader]
    torch.manual_seed(0)
    model = create_model("tresnet_m", num_classes=len(source.class_names)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    start, seen = time.perf_counter(), 0
    for images, targets in batches:
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def engine(raw: dict) -> float:
    """img/s that `tresfinetune train` reports for its training epoch (validation not included)."""
    with tempfile.TemporaryDirectory() as folder:
        train(recipe_from_dict(raw), output=Path(folder) / "run", progress=True, console=Console(quiet=True))
        row = json.loads((Path(folder) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return row["train_img_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = make_recipe(args.size, args.batch, args.steps)

    results: dict[str, list[float]] = {"bare loop": [], "tresfinetune train": []}
    for _ in range(args.rounds):  # interleaved, so drifting machine load hits both alike
        results["bare loop"].append(bare_loop(raw))
        results["tresfinetune train"].append(engine(raw))

    bare, ours = max(results["bare loop"]), max(results["tresfinetune train"])
    table = Table(title=f"tresnet_m training, {args.size}px, batch {args.batch}, {args.steps} steps, "
                        f"{args.threads} threads, best of {args.rounds}")
    table.add_column("loop")
    table.add_column("img/s", justify="right")
    table.add_column("runs", justify="right")
    for name, values in results.items():
        table.add_row(name, f"{max(values):.1f}", ", ".join(f"{v:.1f}" for v in values))
    Console().print(table)
    print(f"overhead: {(1 - ours / bare) * 100:.1f}% (goal <= 10%)")


if __name__ == "__main__":
    main()
