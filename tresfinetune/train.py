"""The training loop: `train(recipe)` is the whole of `tresfinetune train`.

Read it as torchvision's reference script: `_build` makes the run's parts once (a `Training`), `_restore` picks
the `TrainState` up from last.pt, then every epoch `train_one_epoch` (shuffle by epoch, forward under autocast,
backward, optimizer step every `grad_accum_steps` batches, schedule step, EMA update), `validate` (the model and its
EMA), `choose_best`, and `save_epoch` (last.pt, and best.pt when the main metric improved). Everything a resumed run
needs is in last.pt; its schema is checkpoint.RunCheckpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
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
from torch.utils.data import DataLoader

from tresfinetune import distributed, partial_labels
from tresfinetune.checkpoint import (
    OptimizerState,
    RunCheckpoint,
    RunInfo,
    TrainState,
    deferred_interrupts,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tresfinetune.datasets import build_loaders
from tresfinetune.datasets.loaders import dataset_has_unknown_labels
from tresfinetune.datasets.transforms import to_model_input
from tresfinetune.distributed import World
from tresfinetune.errors import UserError
from tresfinetune.files import WriteFailed, cause_of, write_text
from tresfinetune.inference import collect_scores
from tresfinetune.losses import PartialLabelLoss, build_loss
from tresfinetune.metrics import compute_metrics, main_metric, tune_thresholds
from tresfinetune.models import convert_sync_norm, create_model, head_arguments
from tresfinetune.optim import Mixup, ModelEma, build_optimizer, build_scheduler
from tresfinetune.recipe import Recipe, model_head_arguments, recipe_to_dict
from tresfinetune.recipes import load_recipe, recipe_from_dict
from tresfinetune.runtime import amp_dtype_for, autocast, resolve_device, unwrap_model
from tresfinetune.stopping import StopRequests, parse_checkpoint_every
from tresfinetune.tasks import MULTI_LABEL, SINGLE_LABEL


class TrainingInterrupted(Exception):
    """Ctrl-C, SIGTERM or SIGUSR1 stopped training; `saved` tells whether last.pt was written at the step it
    stopped (else last.pt is the last step checkpoint, if any)."""

    def __init__(self, run_dir: Path, signum: int = signal.SIGINT, saved: bool = True):
        super().__init__(f"interrupted; resume with: tresfinetune train --resume {run_dir}")
        self.run_dir, self.signum, self.saved = run_dir, signum, saved

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


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


@dataclass
class Training:
    """What one run trains with, built once by `_build`: where it runs, its data, model, loss and optimizer."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    world: World
    info: RunInfo  # class names, task, sizes: what every checkpoint of the run carries
    train_loader: DataLoader
    val_loader: DataLoader
    model: nn.Module
    ema: ModelEma | None
    criterion: nn.Module
    loss_name: str
    partial: str | None  # how unknown labels are treated (multi-label data), see partial_labels.py
    mixup: Mixup
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    channels_last: bool
    prior_estimate: partial_labels.PriorEstimate | None = None
    train_model: nn.Module | None = None  # what the step calls: the model, in DDP and compiled as asked
    searching_unused: bool = False  # DDP looks for parameters without gradient (while the backbone is frozen)
    stop: StopRequests = field(default_factory=StopRequests)
    checkpoint_every: tuple[int | None, float | None] = (None, None)  # (optimizer steps, seconds): one is set
    steps_done: int = 0  # optimizer steps in this process's lifetime
    last_saved: tuple[int, float] = (0, 0.0)  # (steps_done, time.monotonic()) when last.pt was last written

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


@dataclass
class EpochStats:
    train_loss: float
    seconds: float
    images: int  # this process's


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
        self._rewrite()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()

    def _rewrite(self) -> None:
        """Both files whole and atomically: a full disk leaves the previous ones, never half a row."""
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        write_text(self.csv, table.getvalue())

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
    for name, child in unwrap_model(model).named_children():
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
        if ckpt.state is None:
            raise UserError(f"'{ckpt.path}' holds weights only; resume from the run's last.pt")
        recipe = recipe_from_dict(ckpt.info.recipe, overrides)
        run_dir = ckpt.path.parent
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


def _train(recipe: Recipe, run_dir: Path, ckpt: RunCheckpoint | None, device: torch.device, world: World,
           console: Console, show_progress: bool) -> TrainResult:
    seed_everything(recipe.seed, recipe.deterministic)
    run = _build(recipe, run_dir, ckpt, device, world)
    state = _restore(run, ckpt, console)
    run_log = None
    try:
        # The run folder appears only once data, weights and model are known to be good: a failed start leaves
        # nothing.
        if world.is_main:
            _create_run_dir(run_dir)
            write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
            console.print(_start_line(run))
            run_log = RunLog(run_dir, state.epoch if ckpt is not None else None)
        result = TrainResult(run_dir, run_log.rows if run_log else [], state.best_metric, state.best_epoch)
        run.last_saved = (0, time.monotonic())
        with run.stop:
            _run_epochs(run, state, result, run_log, console, show_progress)
    except _StopRequested as e:
        raise TrainingInterrupted(run_dir, e.signum) from None
    except KeyboardInterrupt:  # a second Ctrl-C: out now, mid-step; last.pt stays the last step checkpoint
        raise TrainingInterrupted(run_dir, saved=False) from None
    except WriteFailed as e:
        raise UserError(f"{e}. The checkpoints already written are intact: once there is room (or the run folder "
                        f"has moved), resume with: tresfinetune train --resume {run_dir}", shared=True) from None
    except _NonFiniteLoss as e:
        raise UserError(
            f"the training loss became NaN/inf at epoch {e.epoch + 1}, batch {e.step + 1}; stopped. The last good "
            f"checkpoint is {run_dir / 'last.pt'}. Try a lower optimizer.lr, clip_grad_norm: 1.0, or amp: none",
            shared=True,
        ) from None
    finally:
        if run_log is not None:
            run_log.close()
    return result


def _create_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == Path(p.anchor))
        cause = f"{existing} is a file, not a folder" if not existing.is_dir() else cause_of(e, existing)
        raise UserError(f"cannot create the run folder {run_dir}: {cause}; pick another place with -o") from None


def _build(recipe: Recipe, run_dir: Path, ckpt: RunCheckpoint | None, device: torch.device,
           world: World) -> Training:
    """Data, model (pretrained or resumed weights), EMA, loss, optimizer and schedule of a run."""
    train_loader, val_loader, source = build_loaders(recipe, rank=world.rank, world_size=world.size, device=device)
    info = RunInfo(recipe.model.name, list(source.class_names), source.task, recipe.input_size,
                   list(recipe.data.mean), list(recipe.data.std), recipe=recipe_to_dict(recipe))
    model = _build_model(recipe, ckpt, len(info.class_names)).to(device)
    model.set_grad_checkpointing(recipe.grad_checkpointing)
    channels_last = recipe.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, recipe.ema) if recipe.ema else None
    if ema is not None and ckpt is not None and ckpt.ema is not None:
        ema.load_state_dict(ckpt.ema)
    if world.distributed and recipe.sync_bn:
        convert_sync_norm(model)

    loss_name = recipe.loss.name or ("cross_entropy" if info.task == SINGLE_LABEL else "asl")
    criterion = build_loss(loss_name, info.task, **recipe.loss.options)
    has_unknowns = info.task == MULTI_LABEL and dataset_has_unknown_labels(train_loader.dataset)
    partial = partial_labels.choose_partial_mode(recipe.loss.partial, info.task, has_unknowns)
    if has_unknowns or partial not in (None, "negative"):
        criterion = PartialLabelLoss(criterion, partial, recipe.loss.prior_threshold, recipe.loss.likelihood_topk,
                                     recipe.loss.gamma_unknown)
    mixup = Mixup(recipe.mixup, len(info.class_names))
    if mixup.enabled and info.task == MULTI_LABEL:
        raise UserError("mixup/cutmix work on single-label data only; remove the mixup section for multi-label runs")

    optimizer = build_optimizer(model, recipe)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / recipe.grad_accum_steps))
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch)
    amp_dtype = amp_dtype_for(recipe.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Training(recipe, run_dir, device, world, info, train_loader, val_loader, model, ema, criterion.to(device),
                    loss_name, partial, mixup, optimizer, scheduler, scaler, amp_dtype, channels_last,
                    checkpoint_every=parse_checkpoint_every(recipe.checkpoint_every))


def _build_model(recipe: Recipe, ckpt: RunCheckpoint | None, num_classes: int) -> nn.Module:
    if ckpt is None:
        return create_model(recipe.model.name, num_classes=num_classes, weights=recipe.model.weights,
                            norm=recipe.model.norm, **model_head_arguments(recipe))
    # Resuming rebuilds the head the run trained (its groups may have come from the pretrained file).
    model = create_model(recipe.model.name, num_classes=num_classes, norm=recipe.model.norm,
                         **head_arguments(ckpt.model))
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError:
        raise UserError(f"the weights in '{ckpt.path}' do not fit a {recipe.model.name} with {num_classes} "
                        f"classes; did the dataset or data.* settings change since the run started?") from None
    return model


def _restore(run: Training, ckpt: RunCheckpoint | None, console: Console) -> TrainState:
    """The state to start from: a fresh one, or a resumed run's (with its optimizer, schedule and RNGs)."""
    recipe, state = run.recipe, TrainState()
    if ckpt is not None:
        saved = ckpt.optimization
        run.optimizer.load_state_dict(saved.optimizer)
        run.scheduler.load_state_dict(saved.scheduler)
        if run.scaler.is_enabled() and saved.scaler:  # empty when the run started with bf16 or without AMP
            run.scaler.load_state_dict(saved.scaler)
        set_rng_state(saved.rng)
        state = ckpt.state
        if run.world.is_main:
            where = f"epoch {state.epoch + 1}" + (f", batch {state.step + 1}" if state.step else "")
            console.print(f"Resuming [bold]{run.run_dir}[/] at {where}")
    if state.epoch >= recipe.epochs:
        raise UserError(f"'{run.run_dir}' already finished {state.epoch} epochs; raise it with --set epochs=N")
    run.searching_unused = state.epoch < recipe.freeze_backbone_epochs
    run.train_model = _training_module(run.model, run.world, run.device, run.searching_unused, recipe.compile)
    if run.partial == "selective":
        if recipe.loss.prior:
            run.criterion.set_prior(partial_labels.read_prior(recipe.loss.prior, run.info.class_names))
        elif state.label_prior is not None:
            run.criterion.set_prior(state.label_prior)
        else:
            # Only rank 0's partial sums are in last.pt; the others restart theirs.
            run.prior_estimate = partial_labels.PriorEstimate(
                len(run.info.class_names), state.prior_estimate if run.world.is_main else None)
    return state


def _start_line(run: Training) -> str:
    recipe, world, info = run.recipe, run.world, run.info
    effective = recipe.batch_size * world.size * recipe.grad_accum_steps
    return (
        f"Training [bold]{recipe.model.name}[/] on [bold]{recipe.data.name}[/] ({info.task}, "
        f"{len(info.class_names)} classes, {len(run.train_loader.dataset)} train / {len(run.val_loader.dataset)} val "
        f"images) at {recipe.input_size}px on {run.device}{' x' + str(world.size) if world.distributed else ''}; "
        f"batch {recipe.batch_size}"
        + (f" per process, effective {effective}" if effective != recipe.batch_size else "")
        + f"; amp {str(run.amp_dtype).removeprefix('torch.') if run.amp_dtype else 'off'}"
        + (f"; {run.loss_name}, unknown labels: {_describe_partial(run.partial, recipe)}" if run.partial else "")
        + f"; run folder {run.run_dir}"
    )


def _run_epochs(run: Training, state: TrainState, result: TrainResult, run_log: RunLog | None, console: Console,
                show_progress: bool) -> None:
    """Train, validate, choose the best and save, epoch after epoch, until the last or early stopping."""
    recipe, world = run.recipe, run.world
    metric_name = main_metric(run.info.task)
    progress = _progress(console, show_progress)
    epoch_bar = progress.add_task("epochs", total=recipe.epochs, completed=state.epoch, info="")
    with progress:
        for epoch in range(state.epoch, recipe.epochs):
            stats = train_one_epoch(run, state, epoch, progress)
            row = {"epoch": epoch + 1, "train_loss": round(stats.train_loss, 6),
                   "lr": run.optimizer.param_groups[0]["lr"]}
            candidates = {}
            if (epoch + 1) % recipe.val_every == 0 or epoch + 1 == recipe.epochs:
                candidates = validate(run, row, progress)
            row["epoch_seconds"] = round(stats.seconds, 2)
            row["train_img_per_s"] = round(stats.images * world.size / max(stats.seconds, 1e-9), 1)
            # The epoch counts as done once its row and last.pt are written; Ctrl-C waits for both.
            with deferred_interrupts():
                state.epoch, state.step, state.loss_sum, state.loss_count = epoch + 1, 0, 0.0, 0
                improved_by = choose_best(state, row, candidates, metric_name)
                if world.is_main:
                    run_log.add(row)
                    save_epoch(run, state, improved_by, candidates)
                    console.print(_summary_line(row, metric_name, improved_by is not None, recipe.epochs))
            run.last_saved = (run.steps_done, time.monotonic())
            progress.update(epoch_bar, completed=epoch + 1)
            distributed.barrier(world)
            result.best_metric, result.best_epoch = state.best_metric, state.best_epoch
            patience = recipe.early_stopping_patience
            if patience is not None and state.epochs_without_improvement >= patience:
                if world.is_main:
                    console.print(f"Stopping early: no improvement of {metric_name} for {patience} epochs")
                result.stopped_early = True
                break


def train_one_epoch(run: Training, state: TrainState, epoch: int, progress: Progress) -> EpochStats:
    """One pass over the training data (the rest of it when resumed mid-epoch), an optimizer step every
    `grad_accum_steps` batches. One host sync per optimizer step: reading the loss to check it."""
    recipe, world, loader = run.recipe, run.world, run.train_loader
    skip, accum = state.step, recipe.grad_accum_steps
    batches = _start_epoch(run, epoch, skip)
    bar = progress.add_task(f"epoch {epoch + 1}", total=len(loader), completed=skip, info="")
    started, images_seen = time.perf_counter(), 0
    pending_loss, pending_count = torch.zeros((), device=run.device), 0
    run.optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in batches:
        last_of_group = (step + 1) % accum == 0 or step + 1 == len(loader)
        pending_loss += _forward_backward(run, images, targets, last_of_group)
        pending_count += 1
        images_seen += len(images)
        if not last_of_group:
            continue
        _optimizer_step(run)
        loss_value = pending_loss.item()
        # One collective for all ranks to agree: a NaN, a stop signal, or rank 0's clock saying last.pt is due.
        flags = [not math.isfinite(loss_value), run.stop.requested, world.is_main and _checkpoint_time_due(run)]
        nonfinite, stop, time_due = distributed.any_rank_each(flags, world, run.device)
        if nonfinite:
            raise _NonFiniteLoss(epoch, step)
        state.loss_sum += loss_value
        state.loss_count += pending_count
        state.step = step + 1
        if run.prior_estimate is not None:  # after the loss's host sync, so it costs no extra wait
            state.prior_estimate = run.prior_estimate.state()
        run.steps_done += 1
        if stop or time_due or _checkpoint_steps_due(run):
            if world.is_main:
                save_checkpoint(_last_checkpoint(run, state), run.run_dir / "last.pt")
            run.last_saved = (run.steps_done, time.monotonic())
        if stop:  # every rank stops after the same step
            raise _StopRequested(run.stop.signal or signal.SIGTERM)
        rate = images_seen * world.size / (time.perf_counter() - started)
        progress.update(bar, completed=step + 1, info=f"loss {loss_value / pending_count:.4f}  "
                        f"lr {run.optimizer.param_groups[0]['lr']:.2e}  {rate:.0f} img/s")
        pending_loss.zero_()
        pending_count = 0
    progress.remove_task(bar)
    loss_sum, loss_count = distributed.all_reduce_sum([state.loss_sum, float(state.loss_count)], world, run.device)
    seconds = time.perf_counter() - started
    if run.prior_estimate is not None and epoch + 1 >= recipe.loss.prior_epochs:
        state.label_prior = _finish_prior(run)
        run.criterion.set_prior(state.label_prior)
        run.prior_estimate = state.prior_estimate = None
    return EpochStats(loss_sum / max(1.0, loss_count), seconds, images_seen)


def _start_epoch(run: Training, epoch: int, skip: int) -> Iterator[tuple[int, tuple]]:
    """Reshuffle for this epoch, freeze or unfreeze the backbone; (step, batch) pairs from step `skip` on."""
    loader, recipe = run.train_loader, run.recipe
    starts_later = hasattr(loader.sampler, "set_start")
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if starts_later:
        # Resumed mid-epoch, the sampler starts after the batches already trained on: they are not even loaded.
        loader.sampler.set_start(skip * loader.batch_size)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    if run.searching_unused and epoch >= recipe.freeze_backbone_epochs:
        # The backbone trains from now on: DDP's per-step search for unused parameters would be waste.
        run.searching_unused = False
        run.train_model = _training_module(run.model, run.world, run.device, False, recipe.compile)
    run.train_model.train()
    _set_backbone_frozen(run.model, epoch < recipe.freeze_backbone_epochs)
    if starts_later:
        return enumerate(loader, start=skip)
    # A stream without a sampler to start from (shards) is read through the batches already trained on.
    return itertools.islice(enumerate(loader), skip, None)


def _forward_backward(run: Training, images: torch.Tensor, targets: torch.Tensor,
                      last_of_group: bool) -> torch.Tensor:
    """Loss of one batch (detached, on the device) after its backward; DDP reduces gradients on a group's last."""
    images = to_model_input(images, run.device, run.recipe.data.mean, run.recipe.data.std, run.memory_format)
    targets = targets.to(run.device, non_blocking=True)
    if run.mixup.enabled:
        images, targets = run.mixup(images, targets)
    sync = nullcontext() if last_of_group or not run.world.distributed else run.train_model.no_sync()
    with sync, autocast(run.device, run.amp_dtype):
        logits = run.train_model(images)
        loss = run.criterion(logits.float(), targets)
    if run.prior_estimate is not None:
        run.prior_estimate.update(logits)
    run.scaler.scale(loss / run.recipe.grad_accum_steps).backward()
    return loss.detach()


def _checkpoint_steps_due(run: Training) -> bool:
    """checkpoint_every: N optimizer steps since last.pt was written (after this step's count)."""
    every_steps, _ = run.checkpoint_every
    return every_steps is not None and run.steps_done - run.last_saved[0] >= every_steps


def _checkpoint_time_due(run: Training) -> bool:
    """checkpoint_every: a duration since last.pt was written (rank 0's clock decides for every rank)."""
    _, every_seconds = run.checkpoint_every
    return every_seconds is not None and time.monotonic() - run.last_saved[1] >= every_seconds


def _optimizer_step(run: Training) -> None:
    if run.recipe.clip_grad_norm:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.recipe.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)


def validate(run: Training, row: dict, progress: Progress) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validation metrics of the model and of its EMA, added to `row`; their (scores, targets), gathered from
    every process, by which weights produced them."""
    bar = progress.add_task("validate", total=None, info="")
    candidates = {}
    for which, net in (("model", run.model), ("ema", run.ema.module if run.ema else None)):
        if net is None:
            continue
        scores, targets = collect_scores(net, run.val_loader, run.device, run.info.task, run.recipe.data.mean,
                                         run.recipe.data.std, run.amp_dtype, run.channels_last)
        scores = distributed.gather_arrays(scores, run.world)
        targets = distributed.gather_arrays(targets, run.world)
        candidates[which] = (scores, targets)
        row.update(compute_metrics(scores, targets, run.info.task, "val_" if which == "model" else "ema_val_"))
    progress.remove_task(bar)
    return candidates


def choose_best(state: TrainState, row: dict, candidates: dict, metric_name: str) -> str | None:
    """The raw weights and their EMA compete; returns which one ("model" or "ema") beat the best so far, if any."""
    if not candidates:
        return None
    values = {which: row.get(("" if which == "model" else "ema_") + metric_name, -1.0) for which in candidates}
    best_now = max(values, key=values.get)
    if state.best_metric is None or values[best_now] > state.best_metric:
        state.best_metric, state.best_epoch, state.epochs_without_improvement = values[best_now], state.epoch, 0
        return best_now
    state.epochs_without_improvement += 1
    return None


def save_epoch(run: Training, state: TrainState, improved_by: str | None, candidates: dict) -> None:
    """last.pt, and best.pt when the epoch improved: the winning weights, with tuned thresholds (multi-label)."""
    save_checkpoint(_last_checkpoint(run, state), run.run_dir / "last.pt")
    if improved_by is None:
        return
    thresholds = None
    if run.info.task == MULTI_LABEL:
        thresholds = tune_thresholds(*candidates[improved_by]).tolist()
    winner = run.ema.module if improved_by == "ema" else run.model
    info = dataclasses.replace(run.info, thresholds=thresholds)
    save_checkpoint(RunCheckpoint(info, winner.state_dict()), run.run_dir / "best.pt")


def _last_checkpoint(run: Training, state: TrainState) -> RunCheckpoint:
    """Everything a resumed run needs."""
    optimization = OptimizerState(run.optimizer.state_dict(), run.scheduler.state_dict(), run.scaler.state_dict(),
                                  rng_state())
    return RunCheckpoint(run.info, run.model.state_dict(), run.ema.state_dict() if run.ema else None,
                         "ema" if run.ema else "model", dataclasses.replace(state), optimization)


def _describe_partial(partial: str, recipe: Recipe) -> str:
    if partial != "selective" or recipe.loss.prior:
        return partial
    return f"selective, ignored during the first {recipe.loss.prior_epochs} epoch(s), which estimate the label prior"


def _finish_prior(run: Training) -> list[float]:
    """The label prior from every rank's sums; rank 0 writes it as the run's class_prior.csv."""
    estimate = run.prior_estimate
    *total, count = distributed.all_reduce_sum(estimate.state()["total"] + [float(estimate.count)], run.world,
                                               run.device)
    prior = (np.asarray(total) / max(count, 1.0)).tolist()
    if run.world.is_main:
        partial_labels.write_prior(run.run_dir / partial_labels.PRIOR_FILE, run.info.class_names, np.asarray(prior))
    return prior


class _StopRequested(Exception):
    def __init__(self, signum: int):
        self.signum = signum


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
