"""The CLI under torchrun with two CPU ranks (the same code path a multi-GPU job takes, gloo here), and
a plain process's world of one."""

import json
import os
import subprocess
import sys

import pytest

from unimlip_fast.train.distributed import free_port

from .helpers import REPO, TINY_RUN


@pytest.mark.slow
def test_torchrun_two_ranks_train_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "unimlip_fast.cli",
        "pretrain",
        str(REPO / "configs/demo.yaml"),
        "--run-dir",
        str(run),
        *TINY_RUN,
        "train.max_steps=4",
        "train.batch_size=8",
        "eval.split=test",
    ]
    first = subprocess.run(base + ["train.stop_after_steps=2"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 rank(s) x 4 = batch 8" in first.stderr
    base[base.index("--master-port") + 1] = str(free_port())
    second = subprocess.run(base + ["--resume", "latest"], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss/total" in line
    ]
    assert steps == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["retrieval"]["n"] > 0
    assert (run / "checkpoints" / "step_0000004" / "rng_rank1.safetensors").is_file()


_WORLD_OF_ONE = """
import os, subprocess, sys
from unimlip_fast.train.distributed import init_distributed
assert init_distributed().world_size == 1
print("left", *sorted(k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ))
child = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
print("child", child.returncode, child.stdout.strip(), child.stderr.strip()[-400:])
"""


def test_a_plain_process_leaves_no_launcher_variables_to_the_processes_it_starts():
    # A plain run that left RANK and MASTER_PORT behind made every process it started (a test's
    # subprocess, a tool run from a notebook) a "launched" rank of one that tried to listen on the
    # port the first still held: EADDRINUSE.
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "PYTHONPATH": str(REPO)}
    env["DS_ACCELERATOR"] = "cpu"
    child = "from unimlip_fast.train.distributed import init_distributed; print(init_distributed().world_size)"
    done = subprocess.run(
        [sys.executable, "-c", _WORLD_OF_ONE, child], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "left" in lines, lines  # nothing after "left"
    assert any(line.startswith("child 0 1") for line in lines), lines
