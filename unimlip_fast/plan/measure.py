"""The real step's peak memory, to check the trace against: the same step run on real tensors.

On CUDA, ``torch.cuda.max_memory_allocated`` over the step less what was allocated before it. On a CPU,
torch's profiler with ``profile_memory``: its allocator events carry the allocated count after every
allocation and free; the peak is their maximum less the count before the step's first allocation (the
count carries over between profiles).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from .trace import run_step


def measured_step_peak(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Config, phase: str) -> int:
    """Bytes the real step (forward, five terms, backward) holds at its peak above what was live before it."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step(model, batch, cfg, phase)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(model, batch, cfg, phase)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not memory:
        raise RuntimeError("the profiler recorded no CPU allocation during the step")
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - before
