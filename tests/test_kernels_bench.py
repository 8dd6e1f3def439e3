"""bench/bench_losses.py runs end to end on tiny sizes on CPU (interpreter), and refuses cleanly
without a GPU when run as a script. Timings here mean nothing; the code path is what is tested."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = [pytest.mark.usefixtures("one_blas_thread"), pytest.mark.interpreter]
REPO = Path(__file__).resolve().parents[1]


def test_every_row_is_written_and_the_budget_skips_larger_sizes(tmp_path):
    from bench.bench_losses import run

    out = tmp_path / "losses.csv"
    rows = run(
        out,
        sizes=(8, 4096),
        device="cpu",
        dtype=torch.float32,
        repeats=1,
        time_budget_s=5.0,
        itc_dim=16,
        simclr_dim=8,
        dropblock_shape=(2, 4, 7, 7),
    )
    assert len(rows) == 2 * 2 * 3 + 2
    assert {r["status"] for r in rows if r["B"] != 4096} == {"ok"}
    assert {r["status"] for r in rows if r["B"] == 4096} == {"skipped"}  # 8 -> 4096 predicts 2**18 times longer
    assert {r["impl"] for r in rows} == {"reference", "triton"}
    with out.open() as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(rows)
    assert {"gpu", "torch", "triton", "commit", "median_ms", "peak_extra_mib"} <= set(written[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_script_exits_2_without_a_gpu():
    run = subprocess.run([sys.executable, "bench/bench_losses.py"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr
