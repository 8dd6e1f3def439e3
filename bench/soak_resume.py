"""Soak: the demo recipe killed with SIGKILL at random moments and resumed each time must end where
the uninterrupted run ends, every logged step once.

    nice -n 5 python bench/soak_resume.py --out /tmp/soak --kills 20 --max-steps 24 --ckpt-every 3 train.batch_size=32

1. The reference: ``configs/demo.yaml`` (phantom data), ``train.max_steps`` steps, run once, whole.
2. The soak: the same command in another run folder, killed ``--kills`` times with SIGKILL (the whole
   process group, data workers included) and restarted with ``--resume latest`` each time (or fresh
   while no checkpoint exists). Each kill picks a moment at random:
   - ``startup``: while the process is still importing, building the model or loading a checkpoint;
   - ``training``: at a random time within 1.5 checkpoint intervals after the session's first step;
   - ``checkpoint``: inside the session's first checkpoint write (while a ``tmp-step_*`` folder exists).
   Within two checkpoints of the end, only startup and checkpoint kills, so the run cannot finish
   before the last kill.
3. After the last kill the run finishes; its ``metrics.jsonl`` must hold steps 1..N once each and
   every logged loss term must equal the reference's (the largest difference is reported).

Everything (both run folders, each session's log, ``soak.json``) goes under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command(run_dir: Path, args, resume: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "unimlip_fast.cli",
        "pretrain",
        str(REPO / "configs/demo.yaml"),
        "--ds-config",
        str(REPO / "configs/zero2.json"),
        "--run-dir",
        str(run_dir),
        f"train.max_steps={args.max_steps}",
        f"train.ckpt_every={args.ckpt_every}",
        "train.log_every=1",
        *args.overrides,
    ]
    return cmd + (["--resume", "latest"] if resume else [])


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
    )  # its own process group: the kill takes the workers too


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss/total" in row:
                steps.append(row["step"])
    return steps


def writing_checkpoint(run_dir: Path, since: float) -> str | None:
    """The checkpoint being written: a ``tmp-step_*`` folder made after ``since`` (one left by an
    earlier kill does not count: the next write of that step replaces it)."""
    ckpt = run_dir / "checkpoints"
    for path in sorted(ckpt.glob("tmp-step_*")) if ckpt.is_dir() else []:
        try:
            if path.stat().st_mtime >= since:
                return path.name
        except FileNotFoundError:  # renamed meanwhile
            continue
    return None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``--resume latest`` has something to find (a finished folder, or a written one not yet renamed)."""
    ckpt = run_dir / "checkpoints"
    return ckpt.is_dir() and (
        (ckpt / "latest").exists() or any(ckpt.glob("step_*")) or any(ckpt.glob("tmp-step_*/manifest.json"))
    )


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


def wait_for_moment(
    proc: subprocess.Popen, run_dir: Path, mode: str, rng: random.Random, args, start_steps: int
) -> bool:
    """Sleep until the chosen moment; False if the process ended first."""
    deadline = time.time() + args.session_timeout
    if mode == "startup":
        end = time.time() + rng.uniform(0.5, args.startup_s)
        while time.time() < end:
            if proc.poll() is not None:
                return False
            time.sleep(0.05)
        return True
    if mode == "training":
        # once this session has logged a step (it rewrites metrics.jsonl when it starts), a random
        # time within the next 1.5 x ckpt_every steps
        metrics, launched = run_dir / "metrics.jsonl", time.time()
        while (
            not metrics.is_file()
            or metrics.stat().st_mtime <= launched
            or max(logged_steps(run_dir), default=0) <= start_steps
        ):
            if proc.poll() is not None or time.time() > deadline:
                return proc.poll() is None
            time.sleep(0.1)
        end = time.time() + rng.uniform(0, 1.5 * args.ckpt_every * args.step_s)
        while time.time() < end:
            if proc.poll() is not None:
                return False
            time.sleep(0.02)
        return True
    # "checkpoint": inside this session's first checkpoint write
    launched = time.time()
    while True:
        if proc.poll() is not None or time.time() > deadline:
            return proc.poll() is None
        if writing_checkpoint(run_dir, launched):
            time.sleep(rng.uniform(0, args.ckpt_write_s))
            return True
        time.sleep(0.002)


def session_note(log: Path) -> str:
    lines = [
        line.strip()
        for line in log.read_text(errors="replace").splitlines()
        if any(k in line for k in ("refused", "renamed", "gone", "resuming from", "resumed from", "error"))
    ]
    return " | ".join(lines)


def soak(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference, soaked = out / "reference", out / "soaked"
    rng = random.Random(args.seed)
    report: dict = {"command": " ".join(command(soaked, args, False)[1:]), "kills": []}

    started = reference_started = time.time()
    if not (reference / "summary.json").is_file():
        proc = launch(command(reference, args, False) + ["--overwrite"], out / "reference.log")
        if proc.wait() != 0:
            raise SystemExit(f"the reference run failed: see {out / 'reference.log'}")
    report["reference_wall_s"] = round(time.time() - started, 1)
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "loss/total" in r]
    args.step_s = args.step_s or (times[-1] - times[0]) / max(1, len(times) - 1)
    timing = out / "reference_timing.json"  # a rerun with the same --out reuses the reference run
    if not timing.is_file():
        timing.write_text(json.dumps({"startup_s": max(1.0, times[0] - reference_started - args.step_s)}))
    args.startup_s = args.startup_s or json.loads(timing.read_text())["startup_s"]
    report.update(step_s=round(args.step_s, 2), startup_s=round(args.startup_s, 1))

    started = time.time()
    session = 0
    first = True
    while len(report["kills"]) < args.kills:
        session += 1
        resume = not first and has_checkpoint(soaked)
        log = out / f"session_{session:02d}.log"
        cmd = command(soaked, args, resume) + (["--overwrite"] if first else [])
        first = False
        start_steps = latest_step(soaked) if resume else 0
        # near the end a training kill could let the run finish before the last kill: startup and
        # checkpoint kills only (a kill inside a write loses that checkpoint, so the run stays put)
        near_end = latest_step(soaked) + 2 * args.ckpt_every >= args.max_steps
        mode = (
            rng.choices(["startup", "checkpoint"], weights=[0.3, 0.7])
            if near_end
            else rng.choices(["startup", "training", "checkpoint"], weights=[0.15, 0.45, 0.4])
        )[0]
        t0 = time.time()
        proc = launch(cmd, log)
        alive = wait_for_moment(proc, soaked, mode, rng, args, start_steps)
        if not alive:
            code = proc.wait()
            if code == 0:
                raise SystemExit(f"the run finished after {len(report['kills'])} kills; raise --max-steps")
            raise SystemExit(f"session {session} failed with exit code {code}: see {log}")
        inside = writing_checkpoint(soaked, t0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        report["kills"].append(
            {
                "session": session,
                "mode": mode,
                "after_s": round(time.time() - t0, 2),
                "resumed": resume,
                "inside_checkpoint_write": inside,
                "last_logged_step": max(logged_steps(soaked), default=0),
                "log": session_note(log),
            }
        )
        print(
            f"kill {len(report['kills'])}: {mode} after {time.time() - t0:.1f}s, step "
            f"{report['kills'][-1]['last_logged_step']}, inside write: {inside}",
            flush=True,
        )

    session += 1
    log = out / f"session_{session:02d}.log"
    proc = launch(command(soaked, args, has_checkpoint(soaked)), log)
    if proc.wait() != 0:
        raise SystemExit(f"the final session failed: see {log}")
    report["final_session_log"] = session_note(log)
    report["soak_wall_s"] = round(time.time() - started, 1)
    return compare(reference, soaked, report)


def compare(reference: Path, soaked: Path, report: dict) -> dict:
    def rows(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r]

    ref, got = rows(reference), rows(soaked)
    steps = [r["step"] for r in got]
    report["steps"] = len(ref)
    report["duplicate_rows"] = len(steps) - len(set(steps))
    report["steps_match"] = steps == [r["step"] for r in ref]
    diffs = [abs(a[k] - b[k]) for a, b in zip(ref, got) for k in a if k.startswith("loss/") and k in b]
    report["max_abs_loss_diff"] = max(diffs) if diffs else None
    report["final_loss_reference"] = ref[-1]["loss/total"]
    report["final_loss_soaked"] = got[-1]["loss/total"] if got else None
    report["final_loss_equal"] = report["final_loss_reference"] == report["final_loss_soaked"]
    report["kills_inside_checkpoint_writes"] = sum(1 for k in report["kills"] if k["inside_checkpoint_write"])
    report["ok"] = report["steps_match"] and report["duplicate_rows"] == 0 and report["final_loss_equal"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="more recipe overrides for both runs, e.g. train.batch_size=32")
    parser.add_argument("--out", required=True, help="folder for both runs, the session logs and soak.json")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=24, help="train.max_steps of both runs")
    parser.add_argument("--ckpt-every", type=int, default=3, help="train.ckpt_every of both runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument(
        "--startup-s",
        type=float,
        default=0.0,
        help="startup kills land in [0.5, this] seconds (0: the reference's time to its first step)",
    )
    parser.add_argument("--step-s", type=float, default=0.0, help="seconds per step (0: from the reference)")
    parser.add_argument("--ckpt-write-s", type=float, default=0.05, help="checkpoint kills land this far into a write")
    parser.add_argument("--session-timeout", type=float, default=600.0)
    args = parser.parse_args()
    report = soak(args)
    (Path(args.out) / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "kills"}, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
