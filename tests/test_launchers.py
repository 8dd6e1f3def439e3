"""The CLI under torchrun with two CPU ranks: the same code path a multi-GPU job takes (gloo here)."""

import json
import os
import subprocess
import sys

import pytest

from unimlip_fast.train.distributed import free_port

from .helpers import REPO, TINY_RUN

pytestmark = pytest.mark.slow


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
