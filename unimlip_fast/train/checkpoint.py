"""Checkpoints: DeepSpeed's sharded state plus ours, written atomically; the last K kept.

Layout under ``<run>/checkpoints/``: ``step_000500/`` (DeepSpeed's files, ``trainer_state.json`` and
one ``rng_rank<R>.pt`` per rank) and ``latest`` (the newest complete tag). A checkpoint is written
as ``tmp-step_000500/`` and renamed only when every rank has finished, so a crash mid-write never
leaves a half checkpoint where ``--resume latest`` would find it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import DistEnv, barrier


def _tag(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], env: DistEnv,
                    keep_last: int) -> Path:
    tag, tmp_tag = _tag(step), "tmp-" + _tag(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tmp_tag / f"rng_rank{env.rank}.pt")
    barrier()
    if env.is_main:
        _write_atomic(ckpt_dir / tmp_tag / "trainer_state.json", json.dumps(trainer_state))
        final = ckpt_dir / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep_last)
    barrier()
    return ckpt_dir / tag


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in tags[: max(0, len(tags) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def load_checkpoint(engine, ckpt_dir: Path, tag: str, env: DistEnv) -> dict[str, Any]:
    """Restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{env.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((ckpt_dir / tag / "trainer_state.json").read_text())


def export_weights(engine, path: Path, env: DistEnv) -> None:
    """Final weights as one safetensors file (full fp32 tensors, ZeRO-3 shards gathered)."""
    from safetensors.torch import save_file

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if env.is_main:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if v.is_floating_point()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in state.items() if not v.is_floating_point()})
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    barrier()
