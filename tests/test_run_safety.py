"""Run folders that nothing can spoil: no pickle on resume, incomplete checkpoints refused by name
with a fall-back to the newest complete one, damaged files named, a fresh run refusing an old
folder, one writer per folder, and each step once in metrics.jsonl after a resume."""

import json
import multiprocessing
import os
import shutil
import sys
import time

import pytest
import torch

from unimlip_fast.train.checkpoint import (
    CheckpointError,
    choose_resume,
    incompleteness,
    load_weights_only,
    read_trainer_state,
)
from unimlip_fast.train.claim import RunFolderError, RunLock
from unimlip_fast.train.monitor import open_metrics

from .helpers import REPO, TINY_RUN, run_cli

RUN_ARGS = [
    "pretrain",
    REPO / "configs/demo.yaml",
    "--ds-config",
    REPO / "configs/zero2_fp32.json",
    *TINY_RUN,
    "train.max_steps=4",
    "train.ckpt_every=2",
    "train.keep_last=3",
    "eval.split=",
]
STEP2, STEP4 = "step_0000002", "step_0000004"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def cli(*args) -> int:
    """``run_cli`` for module-scoped fixtures, which have no ``monkeypatch``."""
    with pytest.MonkeyPatch.context() as mp:
        return run_cli(mp, *args)


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss/total" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """4 steps, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("safety") / "run"
    assert cli(*RUN_ARGS, "--run-dir", run) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [STEP2, STEP4]
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


class Planted:
    """Unpickling this creates a file: the proof that code from a checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker) -> None:
    """Replace ``path`` by a pickle that would run code, keeping the manifest's record of it true."""
    torch.save({"optimizer_state_dict": Planted(marker)}, path)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))


def test_a_planted_pickle_is_refused_not_run(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    plant(run_copy / "checkpoints" / STEP4 / OPTIM, marker)
    # a pickled RNG file as older versions wrote it, which they loaded with weights_only=False
    torch.save(Planted(marker), run_copy / "checkpoints" / STEP4 / "rng_rank0.pt")
    assert cli(*RUN_ARGS, "--run-dir", run_copy, "--resume", "latest", "train.max_steps=6") != 0
    err = capsys.readouterr().err
    assert not marker.exists()
    assert OPTIM in err and "refused" in err and "Traceback" not in err


def test_weights_only_loads_refuse_pickles_and_name_damaged_files(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": Planted(marker)}, tmp_path / "planted.pt")
    with pytest.raises(CheckpointError, match=r"planted\.pt holds more than tensors"):
        load_weights_only(tmp_path / "planted.pt")
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pt is damaged"):
        load_weights_only(tmp_path / "garbage.pt")
    (tmp_path / "trainer_state.json").write_text('{"step": 4,')
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is damaged: not valid JSON"):
        read_trainer_state(tmp_path / "trainer_state.json")


def test_rng_state_is_not_pickled(finished_run):
    folder = finished_run / "checkpoints" / STEP4
    assert (folder / "rng_rank0.safetensors").is_file() and not list(folder.glob("rng_rank*.pt"))
    assert incompleteness(folder, world_size=1) is None


def test_incomplete_checkpoints_are_named_and_the_newest_complete_one_used(run_copy):
    ckpt = run_copy / "checkpoints"
    (ckpt / STEP4 / "rng_rank0.safetensors").unlink()
    tag, notes = choose_resume(ckpt, "latest", world_size=1)
    assert tag == STEP2
    assert any(STEP4 in n and "missing rng_rank0.safetensors" in n for n in notes)
    with pytest.raises(CheckpointError, match=f"{STEP4} is incomplete: missing rng_rank0.safetensors"):
        choose_resume(ckpt, STEP4, world_size=1)

    with open(ckpt / STEP2 / OPTIM, "ab") as f:  # a damaged (here: longer) file
        f.write(b"x")
    with pytest.raises(CheckpointError, match=f"{OPTIM} is .* bytes, .* were written"):
        choose_resume(ckpt, "latest", world_size=1)
    (ckpt / STEP2 / "manifest.json").write_text("{")
    assert "manifest.json is damaged" in incompleteness(ckpt / STEP2)


def test_latest_naming_a_gone_folder_and_a_kill_before_the_rename(run_copy):
    ckpt = run_copy / "checkpoints"
    os.replace(ckpt / STEP4, ckpt / ("tmp-" + STEP4))  # the old folder removed, the new one not yet renamed
    tag, notes = choose_resume(ckpt, "latest", world_size=1)
    assert tag == STEP4 and (ckpt / STEP4).is_dir() and not (ckpt / ("tmp-" + STEP4)).exists()
    assert any("gone" in n for n in notes) and any("renamed" in n for n in notes)

    shutil.rmtree(ckpt / STEP4)
    tag, notes = choose_resume(ckpt, "latest", world_size=1)
    assert tag == STEP2 and any(f"`latest` names {STEP4}, which is gone" in n for n in notes)


def test_resume_falls_back_says_so_and_matches_the_uninterrupted_run(finished_run, run_copy, capsys):
    (run_copy / "checkpoints" / STEP4 / "rng_rank0.safetensors").unlink()
    assert cli(*RUN_ARGS, "--run-dir", run_copy, "--resume", "latest") == 0
    err = capsys.readouterr().err
    assert "missing rng_rank0.safetensors" in err and f"resuming from {STEP2}" in err
    whole, resumed = losses(finished_run), losses(run_copy)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6)


def test_a_fresh_run_refuses_a_folder_with_checkpoints(run_copy, capsys):
    before = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    assert cli(*RUN_ARGS, "--run-dir", run_copy) != 0
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--resume latest" in err and "--run-dir" in err
    assert "--overwrite" in err
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == before

    assert cli(*RUN_ARGS, "--run-dir", run_copy, "--overwrite", "train.max_steps=2") == 0
    assert sorted(losses(run_copy)) == [1, 2]
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("step_*")) == [STEP2]


def test_a_second_process_cannot_write_a_locked_run(tmp_path, capsys):
    holder = RunLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(RunFolderError, match=f"in use by pid {os.getpid()} on host"):
            RunLock(tmp_path).acquire()
        assert cli(*RUN_ARGS, "--run-dir", tmp_path) != 0
        assert f"in use by pid {os.getpid()}" in capsys.readouterr().err
    finally:
        holder.release()
    second = RunLock(tmp_path)
    second.acquire()  # free again once released (a killed holder releases it too: the kernel drops flocks)
    second.release()


def test_a_lock_is_never_held_on_a_lock_file_removed_before_the_flock(tmp_path, monkeypatch):
    """Between our open of run.lock and our flock, another process's failed start removes the folder
    it made (its lock still held) and a third start makes a new one: the flock we then get is on a
    file nobody else opens. The lock must be on the file that is on disk, so exactly one of us holds it."""
    import fcntl

    import unimlip_fast.train.claim as claim

    run = tmp_path / "run"
    run.mkdir()
    real_flock, replaced = fcntl.flock, []

    def flock_after_the_file_is_replaced(fd, operation):
        if not replaced:
            replaced.append(True)
            shutil.rmtree(run)  # the failed start removes the folder it made
            run.mkdir()  # another start makes it again and creates its own run.lock
            (run / "run.lock").write_text("")
        return real_flock(fd, operation)

    monkeypatch.setattr(claim.fcntl, "flock", flock_after_the_file_is_replaced)
    first = RunLock(run)
    first.acquire()
    try:
        held, on_disk = os.fstat(first._fd), os.stat(first.path)
        assert (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino), "the lock is on a removed file"
        with pytest.raises(RunFolderError, match="in use by pid"):
            RunLock(run).acquire()  # the third start is refused: the lock on the file on disk is held
    finally:
        first.release()


def test_a_lock_on_a_folder_removed_while_starting_is_one_line(tmp_path, monkeypatch):
    import fcntl

    import unimlip_fast.train.claim as claim

    run = tmp_path / "run"
    run.mkdir()
    real_flock = fcntl.flock

    def flock_then_the_folder_goes(fd, operation):
        real_flock(fd, operation)
        shutil.rmtree(run, ignore_errors=True)

    monkeypatch.setattr(claim.fcntl, "flock", flock_then_the_folder_goes)
    with pytest.raises(RunFolderError, match="was removed while this run was starting"):
        RunLock(run).acquire()


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss/total": float(s)}) for s in range(1, 7)]
    path.write_text("\n".join(rows) + '\n{"step": 7, "loss/to')  # the last line cut by a kill
    open_metrics(path, resume_step=4).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    open_metrics(path, resume_step=None).close()
    assert path.read_text() == ""


def test_a_start_refused_by_the_lock_never_deletes_the_winners_folder(tmp_path, monkeypatch, capsys):
    """Two starts found the folder missing; the other took the lock first and has not logged a step
    yet: the one refused leaves the folder alone."""
    run = tmp_path / "runs" / "shared"
    winner = RunLock(run)
    real_acquire = RunLock.acquire

    def the_other_process_wins(self):
        if not winner.held:  # between this start's mkdir and its lock, the other one takes it
            run.mkdir(parents=True, exist_ok=True)
            real_acquire(winner)
            (run / "config.yaml").write_text("the winner's\n")
        real_acquire(self)

    monkeypatch.setattr(RunLock, "acquire", the_other_process_wins)
    try:
        assert cli(*RUN_ARGS, "--run-dir", run) != 0
        assert "in use by pid" in capsys.readouterr().err
        assert (run / "config.yaml").read_text() == "the winner's\n" and (run / "run.lock").is_file()
    finally:
        winner.release()


def _wait_for(path, what: str) -> None:
    deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
    while not path.exists():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def _start_in_race(role: str, run, sync, args: list[str]) -> None:
    """``unimlip-fast pretrain ARGS`` in a spawned process, one of two starting in the same missing
    folder; its exit code is the process's, its stderr goes to ``sync/ROLE.err``. The race is played
    in its worst order, each process waiting on a file the other writes: ``first`` makes the folder,
    then ``second`` (finding it made) takes the lock before ``first`` tries, and holds it, before its
    first step, until ``first`` has been refused."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # each a plain run of its own
        os.environ.pop(key, None)
    err = open(sync / f"{role}.err", "w")
    os.dup2(err.fileno(), 2)
    torch.set_num_threads(1)
    real_acquire = RunLock.acquire

    def first_acquire(self):
        _wait_for(sync / "second_locked", "the other start to take the lock")
        try:
            real_acquire(self)
        finally:
            (sync / "first_tried").touch()

    def second_acquire(self):
        real_acquire(self)
        (sync / "second_locked").touch()
        _wait_for(sync / "first_tried", "the other start to be refused")  # still before any step
        kept = sorted(p.name for p in run.iterdir()) if run.is_dir() else ["(folder gone)"]
        (sync / "kept_after_refusal.json").write_text(json.dumps(kept))

    if role == "first":
        RunLock.acquire = first_acquire
    else:
        _wait_for(run, "the other start to make the run folder")
        RunLock.acquire = second_acquire
    from unimlip_fast.cli import main

    sys.argv = ["unimlip-fast", *args]
    main()


@pytest.mark.slow
def test_two_processes_starting_in_one_missing_folder(tmp_path):
    """Real processes: the one that made the folder is refused by the lock, with the winner named,
    and the winner's folder and files survive the refused start's clean-up; the winner trains."""
    run, sync = tmp_path / "runs" / "shared", tmp_path / "sync"
    sync.mkdir()
    spawn = multiprocessing.get_context("spawn")
    args = [str(a) for a in [*RUN_ARGS, "--run-dir", run, "train.max_steps=2"]]
    procs = {role: spawn.Process(target=_start_in_race, args=(role, run, sync, args)) for role in ("first", "second")}
    for proc in procs.values():
        proc.start()
    for proc in procs.values():
        proc.join(timeout=150)
    for proc in procs.values():
        if proc.is_alive():
            proc.kill()
    codes = {role: proc.exitcode for role, proc in procs.items()}
    assert sorted(codes.values()) == [0, 1], {role: (sync / f"{role}.err").read_text()[-2000:] for role in procs}
    assert codes["second"] == 0, (sync / "second.err").read_text()[-2000:]
    err = (sync / "first.err").read_text()
    assert f"run folder {run} is in use by pid {procs['second'].pid} on host" in " ".join(err.split())
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # what the winner held when the other was refused was left alone (later files could hide a deletion)
    assert json.loads((sync / "kept_after_refusal.json").read_text()) == ["run.lock"]
    assert sorted(losses(run)) == [1, 2]
    assert (run / "checkpoints" / "latest").read_text().strip() == STEP2
    for name in ("config.yaml", "model.safetensors", "summary.json"):
        assert (run / name).is_file(), name


def test_a_failed_start_removes_the_folder_and_the_runs_folder_it_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(*RUN_ARGS, "data.format=csv", f"data.path={tmp_path / 'missing.csv'}") != 0
    assert "missing.csv" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no runs/ left behind


def test_a_resume_says_when_it_rewrites_a_config_that_is_not_plain_yaml(run_copy, capsys):
    config = run_copy / "config.yaml"
    config.write_text("!!python/object:os.system {}\n" + config.read_text())
    assert cli(*RUN_ARGS, "--run-dir", run_copy, "--resume", "latest", "train.max_steps=5") == 0
    err = capsys.readouterr().err.replace("\n", " ")
    assert f"{config} held other settings or text than this run's and was rewritten" in err
    assert not config.read_text().startswith("!!python")


def test_report_names_a_config_that_is_not_plain_yaml(run_copy, monkeypatch, capsys):
    config = run_copy / "config.yaml"
    config.write_text("model: !!python/object:os.system {}\n")
    assert run_cli(monkeypatch, "report", run_copy) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: not valid YAML") and len(err.splitlines()) == 1
