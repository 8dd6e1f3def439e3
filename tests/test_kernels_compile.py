"""Every Triton kernel compiles, with no GPU present, for each card the project claims: sm_80 (A100)
and sm_90a (H100) in bf16 and fp32, sm_70 (V100, FMA dots) in fp16; and each program's shared memory
fits the card's limit per block (V100 96 KiB, A100 164 KiB, H100 228 KiB).

The interpreter runs the kernels' logic on CPU but never lowers them; this catches what only the
compiler rejects (dot shapes, layouts, types, shared memory) on a machine without a device. The
matrix is ``bench/bench_compile.py``'s (which also prints registers and spills); it compiles in
one child process, since this test session runs triton in interpreter mode. Needs triton's CUDA
backend (it ships ptxas); the first run takes minutes, later ones hit triton's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
from bench_compile import CARDS, cases  # noqa: E402 - bench/ is not a package on the path

# DropBlock's count pass is its apply pass less the loads and stores: the same dot loop, the same
# shared memory (bench/RESULTS.md), so the test compiles the apply pass only and the bench both.
# The whole matrix costs ~2 minutes of CPU cold (most of it ptxas); reruns hit triton's cache.
CASES = [case.name for case in cases() if not case.kernel.startswith("dropblock-count")]


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import bench_compile as b; "
        f"print(json.dumps([b.asdict(b.compile_one(c, registers=False)) for c in b.cases() if c.name in {CASES}]))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if "No module named 'triton.backends.nvidia'" in run.stderr:
        pytest.skip("triton has no CUDA backend here")
    assert run.returncode == 0, run.stderr[-3000:]
    return {row["case"]: row for row in json.loads(run.stdout.strip().splitlines()[-1])}


def test_matrix_covers_every_kernel_card_and_dtype():
    for card in CARDS:
        for dtype in card.dtypes:
            names = [n for n in CASES if n.endswith(f"-{dtype}-sm_{card.arch}")]
            kernels = {n.split("-")[0] for n in names}
            assert {"fwd", "bwd_rows", "bwd_cols"} <= kernels, (card.name, dtype)
            assert dtype == "fp32" or "dropblock" in kernels, (card.name, dtype)


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_within_the_cards_shared_memory(compiled, case):
    row = compiled[case]
    assert row["error"] == "", row["error"]
    assert 0 < row["shared"] <= row["shared_limit"], f"{case}: {row['shared']} bytes of shared memory"
