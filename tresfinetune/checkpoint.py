"""The run checkpoint: its schema (`RunCheckpoint`) and the one place that writes and reads it.

A checkpoint is stored as a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(path, weights_only=True)` reads it, and its keys stay those of format version 1:

    format, version, model_name, class_names, task, input_size, mean, std, thresholds, recipe,
    inference ("model" or "ema": which weights to predict with), model, ema,
    and in last.pt also: epoch, step, best_metric, best_epoch, epochs_without_improvement, loss_sum, loss_count,
    label_prior, prior_estimate (the TrainState fields), optimizer, scheduler, scaler, rng.

best.pt holds the winning weights (as `model`, with `inference` "model") and how to use them; last.pt holds
everything a resumed run needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tresfinetune.errors import UserError
from tresfinetune.files import read_tensor_file, write_atomic, write_failure

CHECKPOINT_FORMAT = "tresfinetune-checkpoint"
CHECKPOINT_VERSION = 1
EMA_PREFIX = "module."  # ModelEma's state dict holds the averaged model under this prefix


@dataclass
class TrainState:
    """Where a run stands; last.pt restores it. `step` counts the batches of the epoch in progress whose optimizer
    step happened, so a resumed run repeats none and skips none."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    loss_sum: float = 0.0  # training loss of the epoch in progress, summed over its batches so far
    loss_count: int = 0
    label_prior: list[float] | None = None  # selective partial-label loss: the prior once estimated
    prior_estimate: dict | None = None  # ... and its running sums while it is being estimated


@dataclass
class RunInfo:
    """What using a trained model needs besides its weights."""

    model_name: str
    class_names: list[str]
    task: str
    input_size: int
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    thresholds: list[float] | None = None  # per class, multi-label runs
    recipe: dict = field(default_factory=dict)  # the run's resolved recipe


@dataclass
class OptimizerState:
    """The training machinery's own state, in last.pt only."""

    optimizer: dict
    scheduler: dict
    scaler: dict
    rng: dict


@dataclass
class RunCheckpoint:
    info: RunInfo
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    inference: str = "model"  # which weights predict, evaluate and export use: "model" or "ema"
    state: TrainState | None = None  # last.pt only
    optimization: OptimizerState | None = None  # last.pt only
    path: Path | None = None  # where it was read from

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights `inference` names, as a model's state dict."""
        if self.inference == "ema":
            if self.ema is None:
                raise UserError(f"{self.path} names 'ema' weights for inference but holds none")
            return {k[len(EMA_PREFIX):]: v for k, v in self.ema.items() if k.startswith(EMA_PREFIX)}
        return self.model

    def to_dict(self) -> dict:
        stored = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **dataclasses.asdict(self.info),
                  "inference": self.inference, "model": self.model, "ema": self.ema}
        if self.state is not None:
            stored.update(dataclasses.asdict(self.state))
        if self.optimization is not None:
            stored.update(dataclasses.asdict(self.optimization))
        return stored

    @classmethod
    def from_dict(cls, stored: dict, path: Path | None = None) -> RunCheckpoint:
        missing = [key for key in ("model_name", "class_names", "task", "input_size", "model") if key not in stored]
        if missing:
            raise UserError(f"'{path}' lacks {', '.join(missing)}; it was not written by tresfinetune train")
        given = {f.name: stored[f.name] for f in dataclasses.fields(RunInfo) if stored.get(f.name) is not None}
        info = RunInfo(**given)
        info.class_names = [str(name) for name in info.class_names]
        info.model_name = str(info.model_name)
        state = optimization = None
        if all(f.name in stored for f in dataclasses.fields(OptimizerState)):  # last.pt
            state = TrainState(**{f.name: stored[f.name] for f in dataclasses.fields(TrainState) if f.name in stored})
            optimization = OptimizerState(**{f.name: stored[f.name] for f in dataclasses.fields(OptimizerState)})
        return cls(info, stored["model"], stored.get("ema"), stored.get("inference", "model"), state, optimization,
                   path)


def is_run_checkpoint(stored: object) -> bool:
    return isinstance(stored, dict) and stored.get("format") == CHECKPOINT_FORMAT


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so a checkpoint being written is finished first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def save_checkpoint(checkpoint: RunCheckpoint, path: str | Path) -> None:
    """Write atomically (a crash or a full disk never leaves half a file, and the previous one stays), with Ctrl-C
    held until the file is complete. WriteFailed (a UserError) names the file and the cause of an OSError."""
    stored = checkpoint.to_dict()
    with deferred_interrupts():
        try:
            write_atomic(path, lambda f: torch.save(stored, f))
        except OSError as e:
            raise write_failure(Path(path), e) from None
        except RuntimeError as e:  # torch.save reports a failed write as "unexpected pos ..." with the OSError below
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError):
                raise write_failure(Path(path), cause) from None
            raise


def load_checkpoint(path: str | Path, prefer: str = "last.pt") -> RunCheckpoint:
    """Read a tresfinetune checkpoint; a run folder means its `prefer` file (falling back to the other)."""
    path = resolve_checkpoint_path(path, prefer)
    stored = read_tensor_file(path)
    if not is_run_checkpoint(stored):
        raise UserError(f"'{path}' is not a tresfinetune checkpoint (for pretrained weights use model.weights)")
    return RunCheckpoint.from_dict(stored, path)


def resolve_checkpoint_path(path: str | Path, prefer: str = "best.pt") -> Path:
    """A file as is; a run folder -> its `prefer` file (best.pt or last.pt), falling back to the other."""
    path = Path(path).expanduser()
    if path.is_dir():
        names = (prefer, "last.pt" if prefer == "best.pt" else "best.pt")
        for name in names:
            if (path / name).is_file():
                return path / name
        raise UserError(f"'{path}' holds no checkpoint (no {names[0]} or {names[1]}); is it a run folder?")
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    return path


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state
def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in restorable_cuda_states(state["cuda"], torch.cuda.device_count()):
            torch.cuda.set_rng_state(cuda_state, index)


def restorable_cuda_states(states: list[torch.Tensor], device_count: int) -> list[tuple[int, torch.Tensor]]:
    """(GPU index, RNG state) pairs to restore: a run resumed on fewer GPUs restores those it has."""
    return list(enumerate(states))[:device_count]
