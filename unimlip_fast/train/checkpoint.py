"""Checkpoints: DeepSpeed's sharded state plus ours, written durably; the last K kept; none run code.

Layout under ``<run>/checkpoints/``: ``step_0000500/`` (DeepSpeed's files, ``trainer_state.json``,
one ``rng_rank<R>.safetensors`` per rank and ``manifest.json``) and ``latest`` (the newest tag).

Writing: everything goes to ``tmp-step_0000500/``; when every rank has finished, rank 0 fsyncs each
file, writes ``manifest.json`` (every file and its size) last, and renames the folder. A checkpoint
is *complete* when its manifest exists and every file it lists is there with its size.

Reading: ``--resume latest`` takes the newest complete checkpoint, whatever ``latest`` says (the
folder it names may be gone, or a kill may have landed between removing an old folder and renaming
the new one, leaving a complete ``tmp-`` folder, which is then promoted); each incomplete one
passed over is named. Nothing is unpickled: the RNG state is tensors and JSON in a safetensors file,
and DeepSpeed's files are read with ``torch.load(weights_only=True)`` (plus the two DeepSpeed
classes its optimizer file holds), so a run folder handed over from elsewhere is safe to resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import weights_file
from ..durable import DiskFullError, disk_full_named, fsync_path, require_free_space, write_atomic
from .distributed import DistEnv, barrier
from .replicas import average_batchnorm_stats

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = "tmp-"
LATEST = "latest"  # the newest tag, written last
_TAG = re.compile(r"^(?:tmp-)?step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, damaged, or would need pickle to load."""


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def rng_file_name(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


# --- RNG state without pickle ---------------------------------------------------------------------


def save_rng_state(path: Path) -> None:
    """Python, NumPy, torch (and CUDA) generator states as tensors plus JSON metadata."""
    from safetensors.torch import save_file

    version, mt, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    plain = {
        "python_version": version,
        "python_gauss_next": gauss_next,
        "numpy_name": np_name,
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    write_atomic(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={"plain": json.dumps(plain)}), what="the RNG state"
    )


def load_rng_state(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            plain = json.loads(f.metadata()["plain"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        mt = tuple(int(v) for v in tensors["python_mt"].tolist())
        random.setstate((plain["python_version"], mt, plain["python_gauss_next"]))
        np.random.set_state(
            (
                plain["numpy_name"],
                tensors["numpy_keys"].numpy().astype(np.uint32),
                plain["numpy_pos"],
                plain["numpy_has_gauss"],
                plain["numpy_gauss"],
            )
        )
        torch.set_rng_state(tensors["torch"])
    except Exception as e:  # noqa: BLE001 - any failure here is a damaged file, said with its name
        raise CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}") from None
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --- DeepSpeed's files, weights only --------------------------------------------------------------


def _deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its optimizer file: plain records, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location=None) -> Any:
    """A DeepSpeed file through ``torch.load`` that never runs code from it; errors name the file and what is wrong."""
    try:
        return weights_file.load_weights_only(path, map_location, _deepspeed_safe_globals())
    except (weights_file.DamagedFileError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None


@contextmanager
def _weights_only_loads(engine):
    """Route every file DeepSpeed reads during ``load_checkpoint`` through :func:`load_weights_only`."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = load_weights_only  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del checkpoint_engine.load


# --- completeness ---------------------------------------------------------------------------------


def write_manifest(folder: Path, step: int, world_size: int) -> None:
    """fsync every file in ``folder``, then record each with its size; the manifest goes last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fsync_path(path)
        files[str(path.relative_to(folder))] = path.stat().st_size
    write_atomic(folder / MANIFEST, json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))
    fsync_path(folder)


def incompleteness(folder: Path, world_size: int | None = None) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is."""
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        return "the folder is gone"
    if not manifest_path.is_file():
        legacy = any(folder.glob("rng_rank*.pt"))
        return (
            "written by an older version (pickled RNG state, no manifest.json); not loaded"
            if legacy
            else "no manifest.json (its write did not finish)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{MANIFEST} is damaged ({type(e).__name__}: {e})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written"
    if world_size is not None and manifest.get("world_size") != world_size:
        return f"written by {manifest.get('world_size')} rank(s), this run has {world_size}"
    return None


def step_of(tag: str) -> int | None:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def checkpoint_folders(ckpt_dir: Path) -> list[Path]:
    """Every checkpoint folder, finished or not, newest step first (a finished one before its tmp-)."""
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None] if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda p: (step_of(p.name), not p.name.startswith(TMP_PREFIX)), reverse=True)


def choose_resume(ckpt_dir: Path, requested: str, world_size: int) -> tuple[str, list[str]]:
    """The tag to resume from and notes on what was passed over (rank 0 only: may rename a folder).

    ``requested`` is ``latest`` (the newest complete checkpoint) or a tag, which must be complete.
    """
    if requested != LATEST:
        if step_of(requested) is None or not (ckpt_dir / requested).is_dir():
            raise CheckpointError(f"no checkpoint {requested!r} in {ckpt_dir}")
        problem = incompleteness(ckpt_dir / requested, world_size)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt_dir / requested} is incomplete: {problem}")
        return requested, []
    notes = []
    pointer = ckpt_dir / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named and not (ckpt_dir / named).is_dir():
        notes.append(f"`latest` names {named}, which is gone")
    for folder in checkpoint_folders(ckpt_dir):
        problem = incompleteness(folder, world_size)
        if problem:
            notes.append(f"checkpoint {folder.name} refused: {problem}")
            continue
        tag = folder.name
        if tag.startswith(TMP_PREFIX):  # complete, but the kill came before its rename: finish it
            final = ckpt_dir / tag.removeprefix(TMP_PREFIX)
            if final.exists():
                shutil.rmtree(final)
            os.replace(folder, final)
            fsync_path(ckpt_dir)
            notes.append(f"{tag} was complete but not yet renamed; renamed to {final.name}")
            tag = final.name
        if notes:
            notes.append(f"resuming from {tag}, the newest complete checkpoint")
        return tag, notes
    detail = "; ".join(notes) if notes else "it holds none"
    raise CheckpointError(f"--resume latest: no complete checkpoint in {ckpt_dir} ({detail})")


# --- save and load --------------------------------------------------------------------------------


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], env: DistEnv, keep_last: int
) -> Path:
    average_batchnorm_stats(engine.module)  # what is saved is what every rank holds
    tag, tmp_tag = tag_of(step), TMP_PREFIX + tag_of(step)
    tmp, final = ckpt_dir / tmp_tag, ckpt_dir / tag
    if env.is_main and tmp.exists():  # left by a write that was killed
        shutil.rmtree(tmp)
    barrier()
    try:
        # A full disk: one line naming the file (not torch's "unexpected pos"); the partial folder
        # goes, the previous complete checkpoint stays.
        with disk_full_named(tmp, lambda: checkpoint_bytes(engine.module, ckpt_dir), "a checkpoint"):
            engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, save_latest=False)
            save_rng_state(tmp / rng_file_name(env.rank))
        barrier()
        if env.is_main:
            with disk_full_named(tmp, lambda: checkpoint_bytes(engine.module, ckpt_dir), "a checkpoint"):
                write_atomic(tmp / TRAINER_STATE, json.dumps(trainer_state))
                write_manifest(tmp, step, env.world_size)
    except DiskFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if env.is_main:
        if final.exists():  # the same step written again (a resumed run stopping where it resumed)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_dir)
        write_atomic(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep_last)
    barrier()
    return final


def checkpoint_bytes(model: torch.nn.Module, ckpt_dir: Path) -> int:
    """About how many bytes one checkpoint of ``model`` takes: the newest complete one's size, or
    (none yet) the weights as trained plus AdamW's two fp32 moments and, under reduced precision,
    its fp32 master copy."""
    for folder in checkpoint_folders(ckpt_dir):
        if incompleteness(folder) is None:
            return sum(json.loads((folder / MANIFEST).read_text())["files"].values())
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    element = params[0].element_size() if params else 4
    return count * element + count * 4 * (2 if element == 4 else 3)


def require_room_for_checkpoint(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Refuse to start a run whose checkpoint folder's disk cannot hold one checkpoint of ``model``."""
    require_free_space(ckpt_dir, checkpoint_bytes(model, ckpt_dir), "one checkpoint")


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints; drop older ones and leftovers of killed writes."""
    finished = [p for p in checkpoint_folders(ckpt_dir) if not p.name.startswith(TMP_PREFIX)]
    for old in finished[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(TMP_PREFIX + "step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: Path, tag: str, env: DistEnv) -> dict[str, Any]:
    """Restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    folder = ckpt_dir / tag
    with _weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(
            str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {folder}")
    load_rng_state(folder / rng_file_name(env.rank))
    return read_trainer_state(folder / TRAINER_STATE)


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is damaged: expected an object, got {type(state).__name__}")
    return state


def export_weights(engine, path: Path, env: DistEnv) -> None:
    """Final weights as one safetensors file (full fp32 tensors, ZeRO-3 shards gathered; BatchNorm
    statistics averaged over the ranks)."""
    from safetensors.torch import save_file

    average_batchnorm_stats(engine.module)

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if env.is_main:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if v.is_floating_point()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in state.items() if not v.is_floating_point()})
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)), what="the weights")
    barrier()
