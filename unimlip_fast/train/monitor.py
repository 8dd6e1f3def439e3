"""What a run reports: metrics.jsonl, notes.jsonl, TensorBoard events when installed (and Weights &
Biases when asked), a progress display.

Only rank 0 writes. The progress display is a rich bar on a terminal and plain lines otherwise.
``notes.jsonl`` keeps what the run said (every ``info`` line, markup removed, with the step) and its
facts (commit, devices, precision, ...), one line each, so the run report can show them later.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import render
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..console import make_console
from ..durable import write_atomic
from ..run_folder import RunFolder


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
    write_atomic(path, "".join(line + "\n" for line in kept), what="the metrics kept")
    return path.open("a")


class Monitor:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        enabled: bool,
        console: Console | None = None,
        resume_step: int | None = None,
        report_to: tuple[str, ...] | list[str] = ("tensorboard",),
        config: dict[str, Any] | None = None,
    ):
        """``resume_step``: the step a resumed run continues from (None: a fresh run, empty metrics and notes)."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.run = RunFolder(run_dir)
        self.console = console or make_console()
        self._step = resume_step or 0
        self._metrics = open_metrics(self.run.metrics, resume_step) if enabled else None
        if enabled and resume_step is None:
            self.run.notes.unlink(missing_ok=True)
        self._tb = (
            self._open_tensorboard(self.run.tensorboard, resume_step)
            if enabled and "tensorboard" in report_to
            else None
        )
        self._wandb = self._open_wandb(run_dir, config, resume_step) if enabled and "wandb" in report_to else None
        self._interactive = enabled and sys.stderr.isatty()
        self._progress = None
        if self._interactive:
            self._progress = Progress(
                TextColumn("[bold]pretrain"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
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

    @staticmethod
    def _open_wandb(run_dir: Path, config: dict[str, Any] | None, resume_step: int | None):
        """A wandb run in the run folder, continued by a resumed run; WANDB_MODE=offline (or WANDB_PROJECT,
        ...) as wandb reads them."""
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "train.report_to includes wandb, which is not installed (pip install 'unimlip-fast[wandb]')"
            ) from e
        name = (config or {}).get("name", run_dir.name)
        return wandb.init(
            dir=str(run_dir), name=name, config=config, resume="allow", id=_wandb_id(run_dir, fresh=resume_step is None)
        )

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)
            self._note({"note": render(message).plain})

    def facts(self, facts: dict[str, Any]) -> None:
        """What this start of the run is: kept in notes.jsonl for the run report."""
        if self.enabled:
            self._note({"facts": facts})

    def _note(self, entry: dict[str, Any]) -> None:
        with self.run.notes.open("a") as f:  # a few lines per run: opened for each
            f.write(json.dumps({"step": self._step, "time": round(time.time(), 3), **entry}) + "\n")

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._step = step
        record = {"step": step, "time": round(time.time(), 3), **record}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        status = " ".join(
            f"{k.removeprefix('loss/')}={v:.3f}"
            for k, v in record.items()
            if k.startswith("loss/") and isinstance(v, float)
        )
        if self._interactive and status:
            self._progress.update(self._task, completed=step, status=status)
        elif self._interactive:
            retrieval = " ".join(f"{k}={v:g}" for k, v in record.items() if k.startswith("retrieval/"))
            self._progress.console.print(retrieval)
        else:
            extra = " ".join(f"{k}={v:g}" for k, v in record.items() if k.startswith("retrieval/"))
            speed = f"{record['samples_per_s']:.1f} samples/s" if "samples_per_s" in record else ""
            if "accum/extra_forward_samples_per_s" in record:  # gradient accumulation's first pass
                speed += (
                    f" (its extra forward: {record['accum/extra_forward_samples_per_s']:.1f} samples/s, "
                    f"{record['accum/extra_forward_share']:.0%} of the step)"
                )
            self.console.print(f"step {step} {status} {extra} {speed}".strip(), highlight=False)

    def advance(self, step: int) -> None:
        self._step = step
        if self._interactive:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            wandb.teardown()  # finish() may return before an offline run's file is written; this waits for it
            self._wandb = None


def _wandb_id(run_dir: Path, fresh: bool) -> str:
    """One wandb run per run folder, resumed runs included: the id is kept in the folder."""
    path = RunFolder(run_dir).wandb_id
    if fresh or not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
