"""The package's shape, checked on its source: each folder layout named in one module, no import
cycle, one copy of each helper, short parameter lists."""
from __future__ import annotations

import ast
from pathlib import Path

from .helpers import REPO

PACKAGE = REPO / "unimlip_fast"

# File names of a layout, and the modules that own it (paths relative to the package).
LAYOUT_FILES = {
    "unimlip_fast/run_folder.py": {"config.yaml", "metrics.jsonl", "notes.jsonl", "wandb_id.txt", "run.lock",
                                   "text_encoder_config.json", "model.safetensors", "summary.json", "report.html",
                                   "results.json", "best.safetensors", "answers.txt"},
    "unimlip_fast/data/shard_format.py": {"manifest.json", "plan.json"},
    "unimlip_fast/train/checkpoint.py": {"manifest.json", "trainer_state.json"},
    "unimlip_fast/ablation.py": {"results.json", "table.md"},  # the ablation's own folder
}
# Folder names of a layout: flagged where they are joined to a path (``folder / "tokenizer"``).
LAYOUT_FOLDERS = {
    "unimlip_fast/run_folder.py": {"tokenizer", "tb", "checkpoints"},
    "unimlip_fast/data/shard_format.py": {"tokenizer", ".verified"},
    "unimlip_fast/train/checkpoint.py": {"latest"},
}


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def _owned_elsewhere(name: str, module: str, table: dict[str, set[str]]) -> bool:
    owners = [owner for owner, names in table.items() if name in names]
    return bool(owners) and module not in owners


def test_layout_file_names_only_in_the_module_that_owns_the_layout():
    found = []
    for path in package_modules():
        module = relative(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _owned_elsewhere(node.value, module, LAYOUT_FILES):
                    found.append(f"{module}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.JoinedStr):
                parts = [v.value for v in node.values if isinstance(v, ast.Constant)]
                if parts and parts[0].startswith("retrieval_") and module != "unimlip_fast/run_folder.py":
                    found.append(f"{module}:{node.lineno} f{parts[0]!r}...")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
                if isinstance(node.right.value, str) and _owned_elsewhere(node.right.value, module, LAYOUT_FOLDERS):
                    found.append(f"{module}:{node.lineno} / {node.right.value!r}")
    assert found == [], "layout names outside their module (use RunFolder, PackedFolder, ...):\n" + "\n".join(found)
