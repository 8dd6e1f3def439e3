"""Benchmark: the contrastive terms and DropBlock, reference against fused, forward plus backward.

For each global batch B: the four contrastive terms of a step (three ITC InfoNCE terms at D=768
and SimCLR's NT-Xent at D=256, bf16 features), and each loss alone; then DropBlock on a
[96, 2048, 7, 7] bf16 map against the PyTorch composition. The reference and the fused kernels are
measured in the same run; one CSV row per result, with the card, versions and commit. Where the
reference cannot run its row says OOM; sizes past the time budget say "skipped".

    python bench/bench_losses.py                      # all sizes, rows appended to bench/results.csv
    python bench/bench_losses.py --sizes 768,65536 --csv /tmp/losses.csv

From a prepared GPU script: ``from bench.bench_losses import run; rows = run(csv_path=...)``.
Exits 2 with a message where no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Measurement, append_rows, environment, measure

from unimlip_fast.kernels.ops import REFERENCE_OPS, LossOps

SIZES = (768, 1536, 8192, 32768, 65536, 131072)
ITC_DIM, SIMCLR_DIM, TAU, LOGIT_SCALE = 768, 256, 0.1, 1 / 0.07
DROPBLOCK_SHAPE, DROPBLOCK_P, DROPBLOCK_SIZE = (96, 2048, 7, 7), 0.5, 3
DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"


def _features(b: int, dim: int, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(b, dim, device=device, generator=g, dtype=torch.float32)
    return F.normalize(x, dim=-1).to(dtype).requires_grad_()


def contrastive_steps(
    ops: LossOps, b: int, device: torch.device, dtype: torch.dtype, itc_dim: int = ITC_DIM, simclr_dim: int = SIMCLR_DIM
) -> dict[str, Callable[[], object]]:
    """{op: a zero-argument forward + backward step} on fresh features of global batch ``b``."""
    g = torch.Generator(device=device).manual_seed(0)
    img, img_fp, txt, txt_fp = (_features(b, itc_dim, device, dtype, g) for _ in range(4))
    za, zb = (_features(b, simclr_dim, device, dtype, g) for _ in range(2))
    scale = torch.tensor([LOGIT_SCALE], device=device, requires_grad=True)

    def four_terms():
        itc = ops.itc_terms([img, img_fp, img], [txt, txt, txt_fp], scale)
        loss = itc.sum() + ops.ntxent(za, zb, TAU)
        return torch.autograd.grad(loss, [img, img_fp, txt, txt_fp, za, zb, scale])

    def infonce():
        return torch.autograd.grad(ops.infonce(img, txt, scale), [img, txt, scale])

    def ntxent():
        return torch.autograd.grad(ops.ntxent(za, zb, TAU), [za, zb])

    return {"itc3+simclr": four_terms, "infonce": infonce, "ntxent": ntxent}


def dropblock_step(ops: LossOps, shape, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape, device=device, dtype=dtype)

    def step():
        return torch.autograd.grad(ops.dropblock(x, DROPBLOCK_P, DROPBLOCK_SIZE), x, grad_out)

    return step


def run(
    csv_path: str | Path = DEFAULT_CSV,
    sizes=SIZES,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    time_budget_s: float = 150.0,
    repeats: int = 10,
    itc_dim: int = ITC_DIM,
    simclr_dim: int = SIMCLR_DIM,
    dropblock_shape=DROPBLOCK_SHAPE,
) -> list[dict]:
    """Measure everything, append the rows to ``csv_path`` as they come, and return them.

    Sizes are taken in order; a size whose predicted time would overrun ``time_budget_s`` is
    written as "skipped", with all larger ones. The prediction scales the last size's measured
    step times by B^2 (compile time, spent once at the first size, does not enter it). Large
    batches get fewer repeats (3 from B = 32768)."""
    from unimlip_fast.kernels.ops import triton_ops

    device = torch.device(device)
    env = environment(device)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    impls = [REFERENCE_OPS, triton_ops()]
    rows: list[dict] = []
    started = time.perf_counter()

    def record(bench: str, op: str, impl: str, b: int | str, dim: int | str, result) -> None:
        row = {
            "time": stamp,
            **env,
            "bench": bench,
            "op": op,
            "impl": impl,
            "B": b,
            "D": dim,
            "dtype": str(dtype).removeprefix("torch."),
            "status": result.status,
            "median_ms": None if result.median_ms is None else round(result.median_ms, 4),
            "peak_extra_mib": None if result.peak_extra_mib is None else round(result.peak_extra_mib, 1),
            "repeats": result.repeats,
        }
        rows.append(row)
        append_rows(csv_path, [row])
        print(
            f"{bench:10s} {op:12s} {impl:9s} B={b!s:>7} {row['status']:7s} "
            f"{row['median_ms'] or '-':>10} ms  {row['peak_extra_mib'] or '-':>10} MiB",
            flush=True,
        )

    last = None  # (B, milliseconds of one step of every op and impl that ran) at the last size
    for b in sizes:
        n, warmup = (3, 1) if b >= 32768 else (repeats, 2)
        predicted = 0.0 if last is None else last[1] * (b / last[0]) ** 2 * (n + warmup) / 1e3
        over = time.perf_counter() - started + predicted > time_budget_s
        step_ms = 0.0
        for impl in impls:
            steps = {} if over else _steps_or_oom(impl, b, device, dtype, itc_dim, simclr_dim)
            for op in ("itc3+simclr", "infonce", "ntxent"):
                dim = simclr_dim if op == "ntxent" else itc_dim
                if over:
                    result = Measurement("skipped")
                elif steps is None:
                    result = Measurement("OOM")
                else:
                    result = measure(steps[op], device, warmup=warmup, repeats=n)
                    step_ms += result.median_ms or 0.0
                record("contrastive", op, impl.name, b, dim, result)
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not over:
            last = (b, step_ms)

    for impl in impls:
        step = dropblock_step(impl, dropblock_shape, device, dtype)
        result = measure(step, device, warmup=3, repeats=max(repeats, 20))
        shape = "x".join(map(str, dropblock_shape))
        record("dropblock", f"p{DROPBLOCK_P}-b{DROPBLOCK_SIZE}", impl.name, shape, "-", result)
    return rows


def _steps_or_oom(impl: LossOps, b, device, dtype, itc_dim, simclr_dim):
    try:
        return contrastive_steps(impl, b, device, dtype, itc_dim, simclr_dim)
    except torch.OutOfMemoryError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV file the rows are appended to")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="global batch sizes, comma-separated")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds after which larger sizes are skipped")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_losses: no CUDA device here; the benchmark needs a GPU (nothing was measured).", file=sys.stderr)
        return 2
    run(args.csv, tuple(int(s) for s in args.sizes.split(",")), time_budget_s=args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
