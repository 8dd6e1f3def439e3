"""Stopping a run on SIGINT or SIGTERM: the step in progress ends, a checkpoint is saved, the run exits.

While :func:`stop_on_signals` is active (the whole of a pretraining run, in the main thread), the
first SIGINT or SIGTERM only records the request; the training loop ends after its current step
(:func:`stop_requested`), the trainer saves a checkpoint and raises :class:`TrainingStopped` (a
``KeyboardInterrupt``: a caller training several runs, ``ablate``, stops too; the CLI exits 130).
A second signal interrupts at once. Processes forked from the trainer (DataLoader workers, which
a Ctrl-C reaches as well, being in the same process group) ignore the signal: the trainer shuts
them down when it stops, and a worker killed mid-batch would fail the batch the trainer waits for.

With several ranks, the ranks agree (one all-reduce) every ``every`` steps, so that all of them
stop after the same step and meet in the checkpoint's collectives.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .distributed import DistEnv, all_ranks_agree

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: list[str] = []  # the name of the signal that asked this process to stop


class TrainingStopped(KeyboardInterrupt):
    """A run stopped on a signal after saving a checkpoint. ``announced``: its message was already
    logged (by the trainer, mid-run); otherwise whoever catches it says it."""

    def __init__(self, message: str, announced: bool = False):
        super().__init__(message)
        self.announced = announced

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "stopped"


def _on_signal(trainer_pid: int):
    def handler(signum: int, frame) -> None:
        if os.getpid() != trainer_pid:  # a forked worker: the trainer stops it
            return
        if _requested:  # the second signal: stop now
            raise KeyboardInterrupt
        _requested.append(signal.Signals(signum).name)

    return handler


@contextmanager
def stop_on_signals(what: str, env: DistEnv | None = None) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into a stop request for the code inside (main thread only; elsewhere a
    no-op). A request that came too late to stop it (``what`` had reached its last step) is not
    forgotten: :class:`TrainingStopped` is raised once it is done, so a caller does not go on. With
    several ranks (``env``), a code inside that ends normally ends with one more agreement, so a signal
    to one rank in the run's last steps stops every rank alike: all exit as stopped, none as done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _requested.clear()
    handler = _on_signal(os.getpid())
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
        if _signalled_anywhere(env):
            raise TrainingStopped(f"stopped on {stop_signal() or 'a signal to another rank'}: {what} had just finished")
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        _requested.clear()


def stop_signal() -> str | None:
    """The signal that asked this process to stop (``SIGINT``, ``SIGTERM``), or None."""
    return _requested[0] if _requested else None


def stop_requested(env: DistEnv, step: int, every: int) -> bool:
    """Whether the run should stop after ``step``: this process was signalled or, with several
    ranks, any rank was (asked every ``every`` steps, where all ranks ask together)."""
    if env.world_size == 1:
        return bool(_requested)
    if step % max(1, every):
        return False
    return _signalled_anywhere(env)


def _signalled_anywhere(env: DistEnv | None) -> bool:
    """Whether this process or, with several ranks (all of which must call this together), any rank
    was asked to stop."""
    if env is None or env.world_size == 1:
        return bool(_requested)
    return not all_ranks_agree(not _requested, env.device if env.device.type == "cuda" else torch.device("cpu"))
