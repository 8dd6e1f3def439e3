"""Where results come from: the code's commit."""
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
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
