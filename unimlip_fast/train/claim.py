"""Claiming a run folder: one writer at a time, and a fresh run never lands on an old one.

- **Lock**: rank 0 holds an exclusive ``flock`` on the folder's lock file (which records pid, host and
  start time) for the whole run; a second process gets an error naming the holder. The kernel drops
  the lock when its process dies, so a killed run leaves nothing to clean up.
- **Refusal**: a run started without ``--resume`` in a folder that holds checkpoints is refused
  (pruning would delete them and ``metrics.jsonl`` would mix two runs); the message says how to go
  on: ``--resume latest``, another ``--run-dir``, or ``--overwrite`` (which deletes what a run wrote).
- **Resume**: the checkpoint to resume from is chosen once, on rank 0 (see
  :func:`.checkpoint.choose_resume`), and handed to every rank.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..run_folder import RunFolder
from .checkpoint import LATEST, TMP_PREFIX, checkpoint_folders, choose_resume, incompleteness
from .distributed import DistEnv, broadcast_from_main


class RunFolderError(RuntimeError):
    """A run folder that is in use, or holds another run."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = RunFolder(run_dir).lock
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = self._lock_the_file_on_disk()
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.write(fd, json.dumps(record).encode())
        self._fd = fd

    def _lock_the_file_on_disk(self, attempts: int = 5) -> int:
        """An fd holding the flock of the file now at ``self.path``. A lock taken on a file that was
        removed between our open and our flock (a failed start deleting the folder it made, the lock
        still held) guards nothing: another process can lock the new file at the same path. So the
        locked file is compared with the one on disk, and a stale one is let go and opened again."""
        for _ in range(attempts):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                raise RunFolderError(
                    f"run folder {self.path.parent} was removed while this run was starting "
                    f"(another process's start failed and removed the folder it had made); start again"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise RunFolderError(
                    f"run folder {self.path.parent} is in use by {_describe_holder(holder)}; "
                    f"wait for that run to end or choose another --run-dir"
                ) from None
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # closing drops the stale lock
        raise RunFolderError(f"{self.path} kept being replaced while this run tried to lock it; start again")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process (it has not yet written its pid)"


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    """A run without --resume: refuse a folder holding checkpoints, or (--overwrite) clear it."""
    ckpt_dir = RunFolder(run_dir).checkpoints
    # a tmp- folder counts once complete (its rename was cut off); an unfinished one holds nothing
    found = [
        p.name for p in checkpoint_folders(ckpt_dir) if not p.name.startswith(TMP_PREFIX) or incompleteness(p) is None
    ]
    if (ckpt_dir / LATEST).is_file():
        found.append(LATEST)
    if not found:
        return
    if not overwrite:
        raise RunFolderError(
            f"run folder {run_dir} already holds checkpoints ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}): continue that run with --resume latest, "
            f"start a new one with another --run-dir, or pass --overwrite to delete them "
            f"and its metrics and start over"
        )
    for path in RunFolder(run_dir).outputs:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@contextmanager
def claim_run_folder(
    run_dir: Path, env: DistEnv, resume: str | None, overwrite: bool
) -> Iterator[tuple[str | None, list[str]]]:
    """Lock ``run_dir`` for this run (rank 0) and yield (tag to resume from or None, notes on the choice).

    Rank 0 decides and every rank gets its decision, errors included, so no rank waits on one that failed.
    A run that fails before its first step removes the folder when this process created it (an
    atomic ``mkdir``: of two processes that both found it missing, one only) and, the lock still
    held, no other run is using it: a start refused by the lock never deletes anything.
    """
    if resume and overwrite:
        raise RunFolderError("--overwrite starts a run over; it cannot be combined with --resume")
    lock = RunLock(run_dir)
    decision: dict = {}
    made_here = False
    made_parents = [p for p in run_dir.parents if not p.exists()]  # nearest first (``runs/``)
    if env.is_main:
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                run_dir.mkdir()
                made_here = True
            except FileExistsError:
                pass
            lock.acquire()
            if resume:
                tag, notes = choose_resume(RunFolder(run_dir).checkpoints, resume, env.world_size)
                decision = {"tag": tag, "notes": notes}
            else:
                check_fresh_start(run_dir, overwrite)
                decision = {"tag": None, "notes": []}
        except Exception as e:
            if lock.held:
                _remove_if_made_here(run_dir, made_here, made_parents)
            lock.release()
            broadcast_from_main({"error": f"{type(e).__name__}: {e}"})
            raise
    decision = broadcast_from_main(decision)
    if "error" in decision:
        raise RunFolderError(f"rank 0 could not open the run folder: {decision['error']}")
    try:
        yield decision["tag"], decision["notes"]
    except BaseException:
        if env.is_main:
            _remove_if_made_here(run_dir, made_here, made_parents)
        raise
    finally:
        lock.release()


def _remove_if_made_here(run_dir: Path, made_here: bool, made_parents: list[Path]) -> None:
    """A failed start's folder goes when this process made it and no step ran (call with the lock held)."""
    if made_here and RunFolder(run_dir).never_started():
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in made_parents:  # removed only when empty: another run may have started in it since
            try:
                parent.rmdir()
            except OSError:
                break
