"""The shared benchmark harness: time a step, take its peak memory, append CSV rows.

    measure(step, device, warmup=2, repeats=10) -> Measurement(status, median_ms, peak_extra_mib, repeats)
    environment(device) -> {"gpu", "torch", "triton", "commit"}
    append_rows(csv_path, rows)   # one dict per row; the header is written with the first row

``step`` is a zero-argument callable doing all the work of one iteration (forward and backward).
On CUDA the time is the median of ``repeats`` runs between device events, after ``warmup`` runs;
the memory is the peak allocated during one run minus what was allocated before it. A step that
runs out of memory gives status "OOM". On CPU (smoke tests only) the clock is the host's.
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The real data sets: ../shared/data beside the checkout, or $UNIMLIP_SHARED_DATA (gpu_carry.sh).
SHARED_DATA = Path(os.environ.get("UNIMLIP_SHARED_DATA") or REPO.parent / "shared" / "data")
if str(REPO) not in sys.path:  # run as a script from a checkout: import the package beside it
    sys.path.insert(0, str(REPO))

from unimlip_fast.provenance import code_commit  # noqa: E402


@dataclass(frozen=True)
class Measurement:
    status: str  # "ok" or "OOM"
    median_ms: float | None = None
    peak_extra_mib: float | None = None
    repeats: int = 0


def measure(step: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> Measurement:
    cuda = device.type == "cuda"
    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        times = []
        for i in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()  # the one host-device sync per repeat
                times.append(start.elapsed_time(end))
                if i == 0:
                    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
                peak = None
    except torch.OutOfMemoryError:
        if cuda:
            torch.cuda.empty_cache()
        return Measurement("OOM")
    return Measurement("ok", statistics.median(times), peak, repeats)


def environment(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "commit": code_commit()}


def append_rows(csv_path: str | Path, rows: list[dict]) -> None:
    if not rows:
        return
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


class StageClock:
    """Time by stage within one iteration: ``start()``, then ``mark(stage)`` after each stage;
    ``times_ms()`` -> {stage: ms}. Device events on CUDA (one sync, in ``times_ms``), the host's
    clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def mark(self, stage: str) -> None:
        self.marks.append((stage, self._now()))

    def times_ms(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
            return {b[0]: a[1].elapsed_time(b[1]) for a, b in zip(self.marks, self.marks[1:])}
        return {b[0]: (b[1] - a[1]) * 1e3 for a, b in zip(self.marks, self.marks[1:])}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """The best of ``repeats`` square [n, n] x [n, n] matrix products, in TFLOP/s: the peak that model
    FLOPs utilisation is measured against, taken in the same run."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        clock = StageClock(device)
        clock.start()
        torch.mm(a, b)
        clock.mark("mm")
        best = min(best, clock.times_ms()["mm"])
    return 2 * n**3 / (best / 1e3) / 1e12
