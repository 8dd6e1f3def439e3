"""Benchmark: the planner's traced step against the same step run for real (fp32, on this machine's CPU).

For each micro-batch the planner's fake-tensor trace (``unimlip_fast/plan/trace.py``) gives the bytes the
step holds at its peak above what was live before it (gradients, activations, temporaries); the same step
(bench_step.py's small model, random weights, a random batch of the same shapes, the SimCLR phase's five
terms, forward and backward) then runs for real and ``unimlip_fast/plan/measure.py`` takes its peak (on a CPU
from torch's profiler's allocator events, on CUDA from ``max_memory_allocated``). The error is
(traced - measured) / measured. FLOPs per sample: the trace's count against
bench_step.py's ``count_flops_per_sample`` on the real model and batch (the same FLOP counter, so they must
be equal).

    python bench/bench_plan.py                       # micro-batches 4,8,16,32; rows to bench/results.csv
    python bench/bench_plan.py --batches 8 --csv /tmp/plan.csv
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import append_rows, environment
from bench_step import MODELS, Reference, count_flops_per_sample

from unimlip_fast.config import Config, load_config
from unimlip_fast.model import SIMCLR
from unimlip_fast.plan.measure import measured_step_peak
from unimlip_fast.plan.trace import planned_model, shaped_batch, text_architecture, trace_step

DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
CONTEXT = 77
VOCAB = 8192


def small_config(batch: int) -> Config:
    return load_config(
        None,
        MODELS["small"]
        + [
            "model.text.encoder=random-bert",
            f"model.text.vocab_size={VOCAB}",
            f"model.text.context_length={CONTEXT}",
            f"train.batch_size={batch}",
        ],
    )


def real_step(cfg: Config, batch_size: int, device: torch.device) -> tuple[int, float]:
    """(peak bytes the real step allocated above what was live before it, FLOPs per sample by bench_step)."""
    torch.manual_seed(0)
    text = text_architecture(cfg)
    model = planned_model(cfg, text, "fp32", device="cpu").to(device)
    batch = {k: v.to(device) for k, v in shaped_batch(cfg, batch_size, SIMCLR, torch.float32, VOCAB).items()}
    peak = measured_step_peak(model, batch, cfg, SIMCLR)
    model.zero_grad(set_to_none=True)
    reference = Reference.__new__(Reference)  # bench_step's FLOP count over the same model, without its AdamW
    reference.model, reference.cfg, reference.device = model, cfg, device
    reference.optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return peak, count_flops_per_sample(reference, batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--batches", default="4,8,16,32")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = environment(device)
    worst = 0.0
    for batch_size in (int(b) for b in args.batches.split(",")):
        cfg = small_config(batch_size)
        traced = trace_step(cfg, text_architecture(cfg), "fp32", batch_size, SIMCLR)
        measured, flops_measured = real_step(cfg, batch_size, device)
        error = (traced.step_peak - measured) / measured
        worst = max(worst, abs(error))
        flops_traced = traced.flops / batch_size
        row = {
            "bench": "plan",
            "time": stamp,
            "device": "CUDA" if device.type == "cuda" else "CPU",
            "model": "small",
            "batch": batch_size,
            "traced_step_peak_mib": round(traced.step_peak / 2**20, 1),
            "measured_step_peak_mib": round(measured / 2**20, 1),
            "error_pct": round(100 * error, 1),
            "traced_gflops_per_sample": round(flops_traced / 1e9, 4),
            "bench_step_gflops_per_sample": round(flops_measured / 1e9, 4),
            "flops_equal": flops_traced == flops_measured,
            "note": "fp32, SimCLR phase, 5 terms, 3 views at 64px, context 77; peak above the resident "
            "weights and batch (gradients, activations, temporaries)",
            **env,
        }
        append_rows(args.csv, [row])
        print(
            "  ".join(
                f"{k}={row[k]}"
                for k in (
                    "batch",
                    "traced_step_peak_mib",
                    "measured_step_peak_mib",
                    "error_pct",
                    "traced_gflops_per_sample",
                    "bench_step_gflops_per_sample",
                    "flops_equal",
                )
            ),
            flush=True,
        )
    print(f"largest |error|: {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
