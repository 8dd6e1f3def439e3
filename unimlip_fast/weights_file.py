"""Reading weight files without running code from them; a damaged one is one line naming the file.

- :func:`read_safetensors`: a ``.safetensors`` file; anything else under that name (a pickle, a
  truncated or empty file) is a :class:`DamagedFileError` naming it.
- :func:`load_weights_only`: a torch file through ``torch.load(weights_only=True)``; a pickle that
  would call code when loaded is refused (:class:`CodeInFileError`, naming the file and what it
  would call, with no advice on how to load it anyway), a damaged one named.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable
from typing import Any

import torch


class DamagedFileError(ValueError):
    """A weight file that cannot be read as what its name says."""


class CodeInFileError(DamagedFileError):
    """A pickle that would run code when loaded: refused."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library's error (SafetensorError, ...) names no file
        raise DamagedFileError(f"{path} is damaged or not a safetensors file ({_first_line(e)})") from None


def load_weights_only(path: str | os.PathLike, map_location=None, allowed: Iterable[Any] = ()) -> Any:
    """``torch.load(weights_only=True)``, with the classes in ``allowed`` let through."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if code:
            raise CodeInFileError(
                f"{path} holds more than tensors and plain values: code ({code.group(1)}) that "
                "loading it would run; refused, nothing loaded"
            ) from None
        detail = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
        detail = detail.split(". Please")[0] or _first_line(e)
        raise DamagedFileError(f"{path} is damaged or not a checkpoint file: {detail}") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DamagedFileError(
            f"{path} is damaged or not a checkpoint file: {type(e).__name__}: {_first_line(e)}"
        ) from None
