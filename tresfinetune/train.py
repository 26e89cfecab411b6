"""The training loop: `train(recipe)` is the whole of `tresfinetune train`.

One epoch = shuffle (seeded by epoch), forward under autocast, backward, optimizer step every
`grad_accum_steps` batches, schedule step, EMA update; then validation of the model (and its EMA), one metrics row,
`last.pt`, and `best.pt` when the main metric improved. Everything a resumed run needs is in `last.pt`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from tresfinetune import distributed, partial_labels
from tresfinetune.checkpoint import (
    CHECKPOINT_FORMAT,
    deferred_interrupts,
    load_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
)
from tresfinetune.datasets import build_loaders
from tresfinetune.datasets.source import has_unknown_labels
from tresfinetune.datasets.transforms import to_model_input
from tresfinetune.distributed import World
from tresfinetune.errors import UserError
from tresfinetune.evaluation import MULTI_LABEL, SINGLE_LABEL, collect_scores, compute_metrics, main_metric
from tresfinetune.losses import PartialLabelLoss, build_loss
from tresfinetune.metrics import tune_thresholds
from tresfinetune.models import create_model, head_arguments
from tresfinetune.optim import Mixup, ModelEma, build_optimizer, build_scheduler
from tresfinetune.recipe import Recipe, load_recipe, model_head_arguments, recipe_from_dict, recipe_to_dict
from tresfinetune.runtime import amp_dtype_for, autocast, resolve_device

log = logging.getLogger("tresfinetune")


class TrainingInterrupted(Exception):
    """Ctrl-C (or SIGTERM) during training; `last.pt` was saved and the run can be resumed."""

    def __init__(self, run_dir: Path):
        super().__init__(f"interrupted; resume with: tresfinetune train --resume {run_dir}")
        self.run_dir = run_dir


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def default_run_dir(recipe_path: Path | None, base: Path = Path("runs")) -> Path:
    stem = recipe_path.stem if recipe_path else "run"
    return base / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


class RunLog:
    """metrics.jsonl (one object per epoch), metrics.csv, and TensorBoard events when tensorboard is installed."""

    def __init__(self, run_dir: Path, resume_epoch: int | None):
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        if resume_epoch is not None and self.jsonl.exists():
            # Rows written after the checkpoint we resume from belong to the part being redone.
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["epoch"] <= resume_epoch]
            self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze everything but the head; frozen norm layers also stop updating their statistics."""
    core = _unwrap(model)
    for name, child in core.named_children():
        if name != "head":
            child.requires_grad_(not frozen)
            if frozen:
                child.eval()


def _training_module(model: nn.Module, world: World, device: torch.device, find_unused: bool,
                     compile: bool) -> nn.Module:
    """What the training step calls: `model` in DDP under torchrun (searching for parameters that get no gradient
    only while part of the model is frozen), compiled when the recipe asks."""
    wrapped = model
    if world.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused,
        )
    return torch.compile(wrapped) if compile else wrapped


def train(
    recipe: Recipe | None = None,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    console: Console | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) a run; returns where it went and its metrics.

    `resume` is a run folder or a `last.pt`; the run continues in that folder with the recipe it was started with,
    plus `overrides` (e.g. a larger `epochs`).
    """
    console = console or Console()
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if "optimizer" not in ckpt:
            raise UserError(f"'{ckpt['path']}' holds weights only; resume from the run's last.pt")
        recipe = recipe_from_dict(ckpt["recipe"], overrides)
        run_dir = Path(ckpt["path"]).parent
    elif recipe is None:
        raise UserError("give a recipe to train, or --resume a run")
    else:
        run_dir = Path(output).expanduser() if output else default_run_dir(recipe.source_path)
        if (run_dir / "last.pt").exists():
            raise UserError(f"'{run_dir}' already holds a run; continue it with --resume {run_dir} or pick another -o")

    world = distributed.world_from_environment()
    device = resolve_device(recipe.device)
    device = distributed.process_device(device, world, torch.cuda.device_count() if device.type == "cuda" else 0)
    distributed.init_world(world, device)
    run_dir = distributed.broadcast_object(run_dir, world)
    try:
        return _train(recipe, run_dir, ckpt, device, world, console, progress and world.is_main)
    finally:
        distributed.close_world(world)


def _train(
    recipe: Recipe, run_dir: Path, ckpt: dict | None, device: torch.device, world: World, console: Console,
    show_progress: bool,
) -> TrainResult:
    seed_everything(recipe.seed, recipe.deterministic)
    train_loader, val_loader, source = build_loaders(recipe, rank=world.rank, world_size=world.size, device=device)
    task, class_names = source.task, list(source.class_names)
    num_classes = len(class_names)
    # Training from a checkpoint restores its weights below; the pretrained file is needed only at the start.
    weights = None if ckpt is not None else recipe.model.weights
    # Resuming rebuilds the head the run trained (its groups may have come from the pretrained file).
    head = head_arguments(ckpt["model"]) if ckpt is not None else model_head_arguments(recipe)
    model = create_model(recipe.model.name, num_classes=num_classes, weights=weights, norm=recipe.model.norm,
                         **head)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:
            raise UserError(f"the weights in '{ckpt['path']}' do not fit a {recipe.model.name} with {num_classes} "
                            f"classes; did the dataset or data.* settings change since the run started?") from None
    model.set_grad_checkpointing(recipe.grad_checkpointing)
    model.to(device)
    channels_last = recipe.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, recipe.ema) if recipe.ema else None
    if ema is not None and ckpt is not None and ckpt.get("ema") is not None:
        ema.load_state_dict(ckpt["ema"])

    loss_name = recipe.loss.name or ("cross_entropy" if task == SINGLE_LABEL else "asl")
    criterion = build_loss(loss_name, task, **recipe.loss.options)
    has_unknowns = task == MULTI_LABEL and has_unknown_labels(train_loader.dataset.samples)
    partial = partial_labels.choose_partial_mode(recipe.loss.partial, task, has_unknowns)
    if has_unknowns or partial not in (None, "negative"):
        criterion = PartialLabelLoss(criterion, partial, recipe.loss.prior_threshold, recipe.loss.likelihood_topk,
                                     recipe.loss.gamma_unknown)
    criterion.to(device)
    mixup = Mixup(recipe.mixup, num_classes)
    if mixup.enabled and task == MULTI_LABEL:
        raise UserError("mixup/cutmix work on single-label data only; remove the mixup section for multi-label runs")

    accum = recipe.grad_accum_steps
    steps_per_epoch = max(1, math.ceil(len(train_loader) / accum))
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch)
    amp_dtype = amp_dtype_for(recipe.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    if world.distributed and recipe.sync_bn:
        from tresfinetune.models import convert_sync_norm

        convert_sync_norm(model)

    state = {"epoch": 0, "step": 0, "best_metric": None, "best_epoch": None, "epochs_without_improvement": 0,
             "loss_sum": 0.0, "loss_count": 0, "label_prior": None, "prior_estimate": None}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt["scaler"]:  # empty when the run started with bf16 or without AMP
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        for key in state:
            state[key] = ckpt.get(key, state[key])
        if world.is_main:
            where = f"epoch {state['epoch'] + 1}" + (f", batch {state['step'] + 1}" if state["step"] else "")
            console.print(f"Resuming [bold]{run_dir}[/] at {where}")
    if state["epoch"] >= recipe.epochs:
        raise UserError(f"'{run_dir}' already finished {state['epoch']} epochs; raise it with --set epochs=N")
    searching_unused = state["epoch"] < recipe.freeze_backbone_epochs
    train_model = _training_module(model, world, device, searching_unused, recipe.compile)
    prior_estimate = None  # selective loss: the label prior estimated from the first loss.prior_epochs epochs
    if partial == "selective":
        if recipe.loss.prior:
            criterion.set_prior(partial_labels.read_prior(recipe.loss.prior, class_names))
        elif state["label_prior"] is not None:
            criterion.set_prior(state["label_prior"])
        else:
            # Only rank 0's partial sums are in last.pt; the others restart theirs.
            prior_estimate = partial_labels.PriorEstimate(num_classes, state["prior_estimate"] if world.is_main
                                                          else None)

    metric_name = main_metric(task)
    # The run folder appears only once data, weights and model are known to be good: a failed start leaves nothing.
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    run_log = RunLog(run_dir, state["epoch"] if ckpt is not None else None) if world.is_main else None
    result = TrainResult(run_dir, run_log.rows if run_log else [], state["best_metric"], state["best_epoch"])

    def checkpoint(path: Path, weights_only: bool = False, thresholds: list | None = None,
                   inference: str = "model") -> None:
        """last.pt holds the whole training state; best.pt (weights_only) just the winning weights."""
        payload = {
            "format": CHECKPOINT_FORMAT, "version": 1, "model_name": recipe.model.name,
            "class_names": class_names, "task": task, "input_size": recipe.input_size,
            "mean": list(recipe.data.mean), "std": list(recipe.data.std), "thresholds": thresholds,
            "recipe": recipe_to_dict(recipe), "inference": "model", "model": model.state_dict(), "ema": None,
        }
        if weights_only:
            payload["model"] = (ema.module if inference == "ema" else model).state_dict()
        else:
            if ema is not None:
                payload.update(ema=ema.state_dict(), inference="ema")
            payload.update(state)
            payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                           scaler=scaler.state_dict(), rng=rng_state())
        save_atomic(payload, path)

    if world.is_main:
        effective = recipe.batch_size * world.size * accum
        console.print(
            f"Training [bold]{recipe.model.name}[/] on [bold]{recipe.data.name}[/] ({task}, {num_classes} classes, "
            f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images) at {recipe.input_size}px "
            f"on {device}{' x' + str(world.size) if world.distributed else ''}; batch {recipe.batch_size}"
            + (f" per process, effective {effective}" if effective != recipe.batch_size else "")
            + f"; amp {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'off'}"
            + (f"; {loss_name}, unknown labels: {_describe_partial(partial, recipe)}" if partial else "")
            + f"; run folder {run_dir}"
        )

    progress = _progress(console, show_progress)
    epoch_bar = progress.add_task("epochs", total=recipe.epochs, completed=state["epoch"], info="")
    step_bar = progress.add_task("train", total=len(train_loader), info="")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    interrupted = False
    try:
        with progress:
            for epoch in range(state["epoch"], recipe.epochs):
                state["epoch"] = epoch
                if hasattr(train_loader.sampler, "set_epoch"):
                    train_loader.sampler.set_epoch(epoch)
                if hasattr(train_loader.dataset, "set_epoch"):
                    train_loader.dataset.set_epoch(epoch)
                if searching_unused and epoch >= recipe.freeze_backbone_epochs:
                    # The backbone trains from now on: DDP's per-step search for unused parameters would be waste.
                    searching_unused = False
                    train_model = _training_module(model, world, device, searching_unused, recipe.compile)
                train_model.train()
                _set_backbone_frozen(model, epoch < recipe.freeze_backbone_epochs)
                skip = state["step"]
                progress.reset(step_bar, total=len(train_loader), completed=skip, description=f"epoch {epoch + 1}")
                started, images_seen = time.perf_counter(), 0
                pending_loss = torch.zeros((), device=device)
                pending_count = 0
                optimizer.zero_grad(set_to_none=True)
                for step, (images, targets) in enumerate(train_loader):
                    if step < skip:
                        continue  # resumed mid-epoch: these batches were already trained on
                    images = to_model_input(images, device, recipe.data.mean, recipe.data.std, memory_format)
                    targets = targets.to(device, non_blocking=True)
                    if mixup.enabled:
                        images, targets = mixup(images, targets)
                    last_of_group = (step + 1) % accum == 0 or step + 1 == len(train_loader)
                    sync = nullcontext() if last_of_group or not world.distributed else train_model.no_sync()
                    with sync, autocast(device, amp_dtype):
                        logits = train_model(images)
                        loss = criterion(logits.float(), targets)
                    if prior_estimate is not None:
                        prior_estimate.update(logits)
                    scaler.scale(loss / accum).backward()
                    pending_loss += loss.detach()
                    pending_count += 1
                    images_seen += len(images)
                    if last_of_group:
                        if recipe.clip_grad_norm:
                            scaler.unscale_(optimizer)
                            nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        if ema is not None:
                            ema.update(model)
                        # One host sync per optimizer step: read the loss, check it, commit the step.
                        loss_value = pending_loss.item()
                        if distributed.any_rank(not math.isfinite(loss_value), world, device):
                            raise _NonFiniteLoss(epoch, step)
                        state["loss_sum"] += loss_value
                        state["loss_count"] += pending_count
                        state["step"] = step + 1
                        if prior_estimate is not None:  # after the loss's host sync, so it costs no extra wait
                            state["prior_estimate"] = prior_estimate.state()
                        rate = images_seen * world.size / (time.perf_counter() - started)
                        progress.update(
                            step_bar, completed=step + 1,
                            info=f"loss {loss_value / pending_count:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}"
                            f"  {rate:.0f} img/s",
                        )
                        pending_loss.zero_()
                        pending_count = 0
                loss_sum, loss_count = distributed.all_reduce_sum(
                    [state["loss_sum"], float(state["loss_count"])], world, device
                )
                train_loss = loss_sum / max(1.0, loss_count)
                epoch_seconds = time.perf_counter() - started
                if prior_estimate is not None and epoch + 1 >= recipe.loss.prior_epochs:
                    state["label_prior"] = _finish_prior(prior_estimate, world, device, run_dir, class_names)
                    criterion.set_prior(state["label_prior"])
                    prior_estimate = state["prior_estimate"] = None

                row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6),
                       "lr": optimizer.param_groups[0]["lr"]}
                validate = (epoch + 1) % recipe.val_every == 0 or epoch + 1 == recipe.epochs
                candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {}
                if validate:
                    progress.update(step_bar, description="validate", info="")
                    for which, net in (("model", model), ("ema", ema.module if ema else None)):
                        if net is None:
                            continue
                        scores, targets = collect_scores(net, val_loader, device, task, recipe.data.mean,
                                                         recipe.data.std, amp_dtype, channels_last)
                        scores = distributed.gather_arrays(scores, world)
                        targets = distributed.gather_arrays(targets, world)
                        candidates[which] = (scores, targets)
                        row.update(compute_metrics(scores, targets, task, "val_" if which == "model" else "ema_val_"))
                row["epoch_seconds"] = round(epoch_seconds, 2)
                row["train_img_per_s"] = round(images_seen * world.size / max(epoch_seconds, 1e-9), 1)

                # The epoch counts as done once its row and last.pt are written; Ctrl-C waits for both.
                with deferred_interrupts():
                    state.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_count=0)
                    improved_by = None
                    if candidates:
                        # The raw weights and their EMA compete; the better one becomes best.pt.
                        values = {w: row.get(("" if w == "model" else "ema_") + metric_name, -1.0) for w in candidates}
                        best_now = max(values, key=values.get)
                        if state["best_metric"] is None or values[best_now] > state["best_metric"]:
                            state.update(best_metric=values[best_now], best_epoch=epoch + 1)
                            state["epochs_without_improvement"] = 0
                            improved_by = best_now
                        else:
                            state["epochs_without_improvement"] += 1
                    if world.is_main:
                        run_log.add(row)
                        checkpoint(run_dir / "last.pt")
                        if improved_by is not None:
                            thresholds = None
                            if task == MULTI_LABEL:
                                thresholds = tune_thresholds(*candidates[improved_by]).tolist()
                            checkpoint(run_dir / "best.pt", weights_only=True, thresholds=thresholds,
                                       inference=improved_by)
                        console.print(_summary_line(row, metric_name, improved_by is not None, recipe.epochs))
                progress.update(epoch_bar, completed=epoch + 1)
                distributed.barrier(world)
                result.best_metric, result.best_epoch = state["best_metric"], state["best_epoch"]
                patience = recipe.early_stopping_patience
                if patience is not None and state["epochs_without_improvement"] >= patience:
                    if world.is_main:
                        console.print(f"Stopping early: no improvement of {metric_name} for {patience} epochs")
                    result.stopped_early = True
                    break
    except KeyboardInterrupt:
        interrupted = True
    except _NonFiniteLoss as e:
        raise UserError(
            f"the training loss became NaN/inf at epoch {e.epoch + 1}, batch {e.step + 1}; stopped. The last good "
            f"checkpoint is {run_dir / 'last.pt'}. Try a lower optimizer.lr, clip_grad_norm: 1.0, or amp: none",
            shared=True,
        ) from None
    finally:
        if run_log is not None:
            run_log.close()
    if interrupted:
        # state["step"] counts the batches whose optimizer step happened, so the resume repeats none and skips none.
        if world.is_main:
            checkpoint(run_dir / "last.pt")
        raise TrainingInterrupted(run_dir)
    return result


def _describe_partial(partial: str, recipe: Recipe) -> str:
    if partial != "selective" or recipe.loss.prior:
        return partial
    return f"selective, ignored during the first {recipe.loss.prior_epochs} epoch(s), which estimate the label prior"


def _finish_prior(estimate: partial_labels.PriorEstimate, world: World, device: torch.device, run_dir: Path,
                  class_names: list[str]) -> list[float]:
    """The label prior from every rank's sums; rank 0 writes it as the run's class_prior.csv."""
    *total, count = distributed.all_reduce_sum(estimate.state()["total"] + [float(estimate.count)], world, device)
    prior = (np.asarray(total) / max(count, 1.0)).tolist()
    if world.is_main:
        partial_labels.write_prior(run_dir / partial_labels.PRIOR_FILE, class_names, np.asarray(prior))
    return prior


class _NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int):
        self.epoch, self.step = epoch, step


def _summary_line(row: dict, metric_name: str, improved: bool, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    for key in ("val_top1", "val_top5", "val_map", "ema_val_top1", "ema_val_map"):
        if key in row:
            parts.append(f"{key} {row[key]:.2f}")
    parts.append(f"{row['train_img_per_s']:.0f} img/s")
    parts.append(f"{row['epoch_seconds']:.1f}s")
    return "  ".join(parts) + ("  [green]best[/]" if improved else "")


def train_from_cli(
    recipe_path: str | None, overrides: tuple[str, ...], output: str | None, resume: str | None,
    console: Console | None = None,
) -> TrainResult:
    """`tresfinetune train`: a recipe file, or --resume alone (a recipe given with --resume is ignored)."""
    if resume is not None:
        return train(resume=resume, overrides=overrides, console=console)
    if recipe_path is None:
        raise UserError("give a recipe (e.g. tresfinetune train recipes/digits.yaml) or --resume RUN_DIR")
    recipe = load_recipe(recipe_path, overrides)
    return train(recipe, output=output, console=console)
