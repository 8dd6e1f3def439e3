"""What a run ran on: commit, devices, precision, ZeRO stage, library versions (for the run report)."""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .distributed import DistEnv
from .ds_config import precision_of

_LIBRARIES = ("torch", "deepspeed", "transformers", "triton", "nvidia-dali-cuda130", "nvidia-dali-cuda120")


def source_commit() -> str:
    """The git commit of the code that runs (``+dirty`` with uncommitted changes to tracked files)."""
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"unknown (not a git checkout; unimlip-fast {_version('unimlip-fast')})"
    return commit + ("+dirty" if dirty else "")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def environment_facts(env: DistEnv, ds_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
        "world_size": env.world_size,
        "device": device_description(env.device),
        "precision": precision_of(ds_config),
        "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "versions": {
            "python": platform.python_version(),
            **{name: v for name in _LIBRARIES if (v := _version(name)) is not None},
        },
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
