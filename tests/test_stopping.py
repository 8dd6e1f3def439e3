"""SIGINT or SIGTERM to a running pretraining: it ends the step in progress, saves a checkpoint,
and exits 130 with one line saying where it stopped; DataLoader workers (which a Ctrl-C reaches
too) do not fail the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from unimlip_fast.train.checkpoint import incompleteness

from .helpers import REPO, TINY_RUN, cli_ranks


def steps_logged(run_dir) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"loss/total"' in line)


@pytest.mark.slow
@pytest.mark.parametrize("sig, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_signal_stops_the_run_with_a_checkpoint(sig, to_group, tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "unimlip_fast.cli",
        "pretrain",
        REPO / "configs/demo.yaml",
        "--ds-config",
        REPO / "configs/zero2_fp32.json",
        "--run-dir",
        run,
        *TINY_RUN,
        "data.num_workers=2",
        "train.max_steps=100000",
        "train.ckpt_every=0",
        "eval.split=",
    ]
    # A plain process of this session may have set MASTER_PORT for itself (and still listen on it): the
    # run is a plain process of its own and picks its own port.
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [str(a) for a in args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # its own group: a Ctrl-C reaches every worker
    try:
        deadline = time.monotonic() + 240  # a guard against a hang, not a measurement
        while steps_logged(run) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped on {signal.Signals(sig).name} after step ") and "--resume latest" in last
    step = int(last.split("after step ")[1].split(":")[0])
    assert step >= 2 and steps_logged(run) == step
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{step:07d}" and incompleteness(run / "checkpoints" / tag) is None
    assert json.loads((run / "checkpoints" / tag / "trainer_state.json").read_text())["step"] == step
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_a_signal_too_late_to_stop_a_run_still_stops_its_caller():
    """A run that reached its last step when the signal came finishes, then raises: ablate does not
    start its next row."""
    from unimlip_fast.train.stopping import TrainingStopped, stop_on_signals, stop_signal

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped, match="^stopped on SIGINT: the run in x had just finished$"):
        with stop_on_signals("the run in x"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # let the handler run
            assert stop_signal() == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before and stop_signal() is None
    with stop_on_signals("the run in y"):  # no signal: nothing raised
        pass


def test_a_second_signal_interrupts_at_once():
    from unimlip_fast.train.stopping import stop_on_signals

    with pytest.raises(KeyboardInterrupt) as e:
        with stop_on_signals("the run in x"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert type(e.value) is KeyboardInterrupt


def kill_left(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """A scheduler's SIGTERM to rank 1 alone: both ranks stop after the same step (the next one where
    they agree, a log step), write one complete checkpoint together, exit 130; the run resumes from it."""
    run, log_every, stop_logs, resume_logs = tmp_path / "run", 3, tmp_path / "stop", tmp_path / "resume"
    stop_logs.mkdir()
    resume_logs.mkdir()
    args = [
        "pretrain",
        REPO / "configs/demo.yaml",
        "--ds-config",
        REPO / "configs/zero2_fp32.json",
        "--run-dir",
        run,
        *TINY_RUN,
        f"train.log_every={log_every}",
        "train.ckpt_every=0",
        "eval.split=",
    ]
    ranks = cli_ranks([*args, "train.max_steps=100000"], 2, stop_logs)
    try:
        deadline = time.monotonic() + 240  # a guard against a hang, not a measurement
        while steps_logged(run) < 1 and all(p.poll() is None for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(p.poll() is None for p in ranks), (stop_logs / "rank0.err").read_text()[-2000:]
        ranks[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in ranks]
    finally:
        kill_left(ranks)
    errs = [(stop_logs / f"rank{r}.err").read_text() for r in range(2)]
    assert codes == [130, 130], [e[-1500:] for e in errs]
    last = [e.strip().splitlines()[-1] for e in errs]
    assert last[1].startswith("rank 1: stopped on SIGTERM after step ") and last[0].startswith(
        "stopped on a signal to another rank after step "
    ), last
    stopped = [int(line.split("after step ")[1].split(":")[0]) for line in last]
    step = stopped[0]
    assert stopped == [step, step] and step % log_every == 0 and steps_logged(run) == step // log_every
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{step:07d}" and incompleteness(run / "checkpoints" / tag) is None
    assert json.loads((run / "checkpoints" / tag / "trainer_state.json").read_text())["step"] == step
    assert "Traceback" not in errs[0] + errs[1]

    ranks = cli_ranks([*args, "--resume", "latest", f"train.max_steps={step + 1}"], 2, resume_logs)
    try:
        codes = [p.wait(timeout=180) for p in ranks]
    finally:
        kill_left(ranks)
    assert codes == [0, 0], (resume_logs / "rank0.err").read_text()[-2000:]
    assert f"resumed from {tag} at step {step}" in (resume_logs / "rank0.err").read_text()
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 1


@pytest.mark.slow
def test_a_signal_to_one_rank_too_late_to_stop_the_run_ends_every_rank_alike(tmp_path):
    """Rank 1 signalled where the ranks do not agree again before the run's end (no log step left):
    the run finishes on both, then both exit as stopped (130), not one as done and one as stopped."""
    from unimlip_fast.run_folder import RunFolder

    run, logs = RunFolder(tmp_path / "run"), tmp_path / "logs"
    logs.mkdir()
    args = [
        "pretrain",
        REPO / "configs/demo.yaml",
        "--ds-config",
        REPO / "configs/zero2_fp32.json",
        "--run-dir",
        run.path,
        *TINY_RUN,
        "train.log_every=1000",  # no agreement on stopping before the end
        "train.ckpt_every=2",
        "train.max_steps=8",
    ]
    ranks = cli_ranks(args, 2, logs)
    try:
        deadline = time.monotonic() + 240  # a guard against a hang, not a measurement
        while not list(run.checkpoints.glob("step_*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(p.poll() is None for p in ranks), (logs / "rank0.err").read_text()[-2000:]
        ranks[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=240) for p in ranks]
    finally:
        kill_left(ranks)
    errs = [(logs / f"rank{r}.err").read_text() for r in range(2)]
    assert codes == [130, 130], [e[-1500:] for e in errs]
    assert run.is_finished(), run.missing()
    assert json.loads(run.summary.read_text())["steps"] == 8
    last = [e.strip().splitlines()[-1] for e in errs]
    assert last[0] == f"stopped on a signal to another rank: the run in {run.path} had just finished", last
    assert last[1] == f"stopped on SIGTERM: the run in {run.path} had just finished", last
    assert "Traceback" not in errs[0] + errs[1]
