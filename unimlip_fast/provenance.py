"""Where results come from: the code's commit, and which weights (a digest of the model's state)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files), or
    ``$UNIMLIP_COMMIT`` (set where the checkout travelled without ``.git``), or ``unknown``."""
    if os.environ.get("UNIMLIP_COMMIT"):
        return os.environ["UNIMLIP_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def state_digest(state: dict) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes in name order: the same weights give
    the same digest whatever file, folder or format they were read from."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
