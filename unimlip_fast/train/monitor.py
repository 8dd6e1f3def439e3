"""What a run reports: metrics.jsonl, TensorBoard events when installed, a progress display.

Only rank 0 writes. The progress display is a rich bar on a terminal and plain lines otherwise.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..console import make_console


def open_metrics(path: Path, resume_step: int | None):
    """``metrics.jsonl`` opened for appending, holding each step once.

    A fresh run starts it empty. A run resumed at step S keeps the rows up to S and drops later ones
    (the steps after the checkpoint are trained, and logged, again), and a line cut short by a kill.
    """
    kept = []
    if resume_step is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the end of a line whose write a kill interrupted
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.open("a")


class Monitor:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, console: Console | None = None,
                 resume_step: int | None = None):
        """``resume_step``: the step a resumed run continues from (None: a fresh run, empty metrics)."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.console = console or make_console()
        self._metrics = open_metrics(run_dir / "metrics.jsonl", resume_step) if enabled else None
        self._tb = self._open_tensorboard(run_dir / "tb", resume_step) if enabled else None
        self._interactive = enabled and sys.stderr.isatty()
        self._progress = None
        if self._interactive:
            self._progress = Progress(TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                      console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    @staticmethod
    def _open_tensorboard(path: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            return None
        # purge_step: TensorBoard hides earlier events from this step on (the steps logged again).
        return SummaryWriter(str(path), purge_step=(resume_step or 0) + 1)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._tb.add_scalar(key, value, step)
        status = " ".join(f"{k.removeprefix('loss/')}={v:.3f}" for k, v in record.items()
                          if k.startswith("loss/") and isinstance(v, float))
        if self._interactive and status:
            self._progress.update(self._task, completed=step, status=status)
        elif self._interactive:
            retrieval = " ".join(f"{k}={v:g}" for k, v in record.items() if k.startswith("retrieval/"))
            self._progress.console.print(retrieval)
        else:
            extra = " ".join(f"{k}={v:g}" for k, v in record.items() if k.startswith("retrieval/"))
            speed = f"{record['samples_per_s']:.1f} samples/s" if "samples_per_s" in record else ""
            if "accum/extra_forward_samples_per_s" in record:  # gradient accumulation's first pass
                speed += (f" (its extra forward: {record['accum/extra_forward_samples_per_s']:.1f} samples/s, "
                          f"{record['accum/extra_forward_share']:.0%} of the step)")
            self.console.print(f"step {step} {status} {extra} {speed}".strip(), highlight=False)

    def advance(self, step: int) -> None:
        if self._interactive:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
