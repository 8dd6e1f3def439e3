"""The package's shape, checked on its source: each folder layout named in one module, no import
cycle, one copy of each helper, short parameter lists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .helpers import REPO

PACKAGE = REPO / "unimlip_fast"

# File names of a layout, and the modules that own it (paths relative to the package).
LAYOUT_FILES = {
    "unimlip_fast/run_folder.py": {
        "config.yaml",
        "metrics.jsonl",
        "notes.jsonl",
        "wandb_id.txt",
        "run.lock",
        "text_encoder_config.json",
        "model.safetensors",
        "summary.json",
        "report.html",
        "results.json",
        "best.safetensors",
        "answers.txt",
    },
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


# Top-level folders that are subpackages of unimlip_fast (pyproject.toml's package-dir), as namespace packages.
MAPPED_FOLDERS = {"kernels": "unimlip_fast.kernels", "configs": "unimlip_fast.configs"}


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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, at module level or inside a function (deferred):
    for ``from X import name``, ``X.name`` when that is a module, else ``X``."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.add(submodule if submodule in known else origin)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: those packages are imported too, except
    # the ones that hold ``path`` (already being imported when it runs).
    own = {".".join(here.split(".")[:k]) for k in range(1, here.count(".") + 2)}
    parents = {".".join(name.split(".")[:k]) for name in found for k in range(1, name.count(".") + 1)}
    return {name for name in found | (parents - own) if name in known and name != here}


def import_cycles() -> list[list[str]]:
    """Every cycle of the package's import graph (deferred imports included), each once."""
    modules = {module_name(path): path for path in package_modules()}
    graph = {name: imported_modules(path, set(modules)) for name, path in modules.items()}
    cycles, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycle = stack[stack.index(nxt) :]
                start = cycle.index(min(cycle))
                key = tuple(cycle[start:] + cycle[:start])
                if key not in done:
                    done.add(key)
                    cycles.append(list(key))
            elif nxt not in finished:
                visit(nxt, stack + [nxt])
        finished.add(node)

    finished: set[str] = set()
    for name in sorted(graph):
        if name not in finished:
            visit(name, [name])
    return cycles


def test_no_import_cycle():
    cycles = import_cycles()
    assert cycles == [], "import cycles (deferred imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_data_layer_knows_no_model():
    """data/ reads, packs and loads; the tokenizer's resolution lives outside model/ (text_encoders.py)."""
    modules = {module_name(path) for path in package_modules()}
    found = {
        module_name(path): sorted(
            name for name in imported_modules(path, modules) if name.startswith("unimlip_fast.model")
        )
        for path in sorted((PACKAGE / "data").glob("*.py"))
    }
    assert {name: models for name, models in found.items() if models} == {}


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check is not vacuous: two modules importing each other, one of them inside a function."""
    package = tmp_path / "unimlip_fast"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import g\n")
    (package / "b.py").write_text("def g():\n    from . import a\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert import_cycles() == [["unimlip_fast.a", "unimlip_fast.b"]]


MAX_PARAMETERS = 7


def _decorated_with(node: ast.AST, attribute: str) -> bool:
    """``node`` carries ``@x.attribute`` or ``@x.attribute(...)``."""
    for decorator in getattr(node, "decorator_list", []):
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == attribute:
            return True
    return False


def _exempt(node: ast.AST) -> bool:
    """A Typer command (one parameter per command-line option is its interface, not a long call)
    and a Triton kernel (its parameters are the launch's pointers, sizes and compile-time tiles)."""
    return _decorated_with(node, "command") or _decorated_with(node, "jit")


def long_parameter_lists(paths: list[Path]) -> dict[str, str]:
    """``{"module function": "where (count)"}`` for functions and lambdas with more than
    :data:`MAX_PARAMETERS` parameters (a method's ``self`` or ``cls`` not counted, as ruff's PLR0913)."""
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        methods = {
            id(f)
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef)
            for f in c.body
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not _exempt(node):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                count = len(names) + bool(args.vararg) + bool(args.kwarg)
                if id(node) in methods and names and names[0] in ("self", "cls"):
                    count -= 1
                if count > MAX_PARAMETERS:
                    name = getattr(node, "name", "lambda")
                    found[f"{relative(path)} {name}"] = f"{relative(path)}:{node.lineno} {name} ({count})"
    return found


def test_no_function_takes_more_than_seven_parameters():
    """The package and the kernels shipped in it."""
    found = long_parameter_lists(package_modules() + sorted((REPO / "kernels").rglob("*.py")))
    assert found == {}, f"functions with more than {MAX_PARAMETERS} parameters:\n" + "\n".join(found.values())


def test_the_parameter_check_counts(tmp_path, monkeypatch):
    """Eight parameters are found; a method's seven besides ``self``, a Triton kernel's and a command's are not."""
    module = tmp_path / "m.py"
    module.write_text(
        "def f(a, b, c, d, e, f, g, h): ...\n"
        "class C:\n    def m(self, a, b, c, d, e, f, g): ...\n"
        "@triton.jit\ndef kernel(a, b, c, d, e, f, g, h): ...\n"
        "@app.command()\ndef cli(a, b, c, d, e, f, g, h): ...\n"
        "@other.decorator\ndef g(a, b, c, d, e, f, g, h): ...\n"
    )
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert list(long_parameter_lists([module])) == ["m.py f", "m.py g"]


def test_the_packaging_lists_every_package_and_shadows_nothing():
    """pyproject.toml names every package (discovery does not follow package-dir); the mapped top-level
    folders have no __init__.py, so run from the repository root no package of ours is named ``kernels``
    or ``configs``; and the package holds no symlink into them."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {package: folder for folder, package in MAPPED_FOLDERS.items()}
    packages = {module_name(init) for init in PACKAGE.rglob("__init__.py")}
    for folder, package in MAPPED_FOLDERS.items():
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow another {folder!r}"
        subfolders = [path for path in (REPO / folder).rglob("*") if path.is_dir() and path.name != "__pycache__"]
        packages |= {package} | {".".join([package, *path.relative_to(REPO / folder).parts]) for path in subfolders}
    assert sorted(setuptools["packages"]) == sorted(packages)
    assert [path for path in PACKAGE.rglob("*") if path.is_symlink()] == []
