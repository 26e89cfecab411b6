"""Stopping a training run cleanly: Ctrl-C, and the signals schedulers send before they kill a job.

Kubernetes, Slurm and `docker stop` send SIGTERM and kill the job after a grace period (30 s on Kubernetes, 10 s
for docker); Slurm can send SIGUSR1 earlier (`--signal`). While `StopRequests` is active, SIGINT, SIGTERM and
SIGUSR1 only record the request: the training loop finishes the optimizer step in progress, saves last.pt at that
step and exits, so a resumed run repeats nothing and skips nothing. A second Ctrl-C stops at once (last.pt then
holds the last step checkpoint).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """A context manager; `signal` is the first stop signal received while it was active, or None."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: the user wants out now
        if self.signal is None:
            self.signal = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def parse_checkpoint_every(value: str) -> tuple[int | None, float | None]:
    """`checkpoint_every` as (optimizer steps, None) for "500", or (None, seconds) for "90s", "10m", "1h".
    ValueError for anything else."""
    text = str(value).strip().lower()
    if text.isdigit() and int(text) > 0:
        return int(text), None
    units = {"s": 1, "m": 60, "h": 3600}
    if len(text) > 1 and text[-1] in units:
        number = float(text[:-1])
        if number > 0:
            return None, number * units[text[-1]]
    raise ValueError(value)
