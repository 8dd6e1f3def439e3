"""What a run reports: metrics.jsonl, TensorBoard events when installed, a progress display.

Only rank 0 writes. The progress display is a rich bar on a terminal and plain lines otherwise.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Monitor:
    def __init__(self, run_dir: Path, total_steps: int, enabled: bool, console: Console | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.console = console or Console(stderr=True)
        self._metrics = (run_dir / "metrics.jsonl").open("a") if enabled else None
        self._tb = self._open_tensorboard(run_dir / "tb") if enabled else None
        self._interactive = enabled and sys.stderr.isatty()
        self._progress = None
        if self._interactive:
            self._progress = Progress(TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                      console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total_steps, status="")
            self._progress.start()

    @staticmethod
    def _open_tensorboard(path: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra
            return None
        return SummaryWriter(str(path))

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
            self._progress.console.print(" ".join(f"{k}={v:g}" for k, v in record.items() if k.startswith("retrieval/")))
        else:
            extra = " ".join(f"{k}={v:g}" for k, v in record.items() if k.startswith("retrieval/"))
            speed = f"{record['samples_per_s']:.1f} samples/s" if "samples_per_s" in record else ""
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
