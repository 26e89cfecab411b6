"""Training checkpoints: written atomically, read without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts so that
`torch.load(path, weights_only=True)` reads it. Keys (format version 1):

    format, version, model_name, model, ema, inference ("model" or "ema": which weights to predict with),
    class_names, task, input_size, mean, std, thresholds, recipe (the resolved recipe as a dict),
    epoch (epochs completed), step (batches done in the epoch in progress; 0 at an epoch boundary),
    best_metric, best_epoch, epochs_without_improvement, optimizer, scheduler, scaler, rng
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tresfinetune.errors import UserError

CHECKPOINT_FORMAT = "tresfinetune-checkpoint"


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


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    with deferred_interrupts():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_checkpoint(path: str | Path) -> dict:
    """Read a tresfinetune checkpoint; a run folder means its last.pt."""
    from tresfinetune.models.loading import read_file

    path = resolve_checkpoint_path(path, prefer="last.pt")
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is not a tresfinetune checkpoint (for pretrained weights use model.weights)")
    ckpt["path"] = str(path)
    return ckpt


def resolve_checkpoint_path(path: str | Path, prefer: str = "best.pt") -> Path:
    """A file as is; a run folder -> its `prefer` file (best.pt or last.pt), falling back to the other."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in (prefer, "last.pt" if prefer == "best.pt" else "best.pt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"'{path}' holds no checkpoint (no {prefer} or last.pt); is it a run folder?")
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
