"""The wheel: what it carries, and the README's main command run from it in an empty folder."""

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from unimlip_fast.run_folder import RunFolder

from .helpers import REPO, TINY_RUN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the source tree, so setuptools' build/ folder lands outside the checkout
    (a stale one there would be packed into later wheels)."""
    out = tmp_path_factory.mktemp("wheel")
    leave_out = shutil.ignore_patterns(".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*cache")
    source = shutil.copytree(REPO, out / "source", ignore=leave_out)
    build = [sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", out]
    built = subprocess.run(build, cwd=out, capture_output=True, text=True)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stderr[-3000:]}"
    (path,) = out.glob("unimlip_fast-*.whl")
    return path


def test_the_wheel_carries_kernels_and_configs_as_files(wheel):
    with zipfile.ZipFile(wheel) as z:
        entries = {info.filename: info for info in z.infolist()}
    shipped = {
        "unimlip_fast/kernels/contrastive_triton.py": REPO / "kernels/contrastive_triton.py",
        "unimlip_fast/kernels/dropblock_triton.py": REPO / "kernels/dropblock_triton.py",
        "unimlip_fast/configs/demo.yaml": REPO / "configs/demo.yaml",
        "unimlip_fast/configs/paper.yaml": REPO / "configs/paper.yaml",
        "unimlip_fast/configs/zero2.json": REPO / "configs/zero2.json",
    }
    for name, source in shipped.items():
        assert name in entries, f"{name} is not in {wheel.name}"
        with zipfile.ZipFile(wheel) as z:
            assert z.read(name) == source.read_bytes(), f"{name} differs from {source}"
    recipes = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*") if p.is_file()}
    carried = {n.removeprefix("unimlip_fast/configs/") for n in entries if n.startswith("unimlip_fast/configs/")}
    assert recipes <= carried, f"recipes missing from the wheel: {sorted(recipes - carried)}"
    links = [n for n, info in entries.items() if stat.S_ISLNK(info.external_attr >> 16)]
    assert not links, f"symlinks in the wheel: {links}"


def test_the_main_command_runs_from_the_wheel_in_an_empty_folder(wheel, tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", site, wheel]
    subprocess.run(install, check=True, capture_output=True)
    # The wheel alone on the path: no checkout, no editable install, not the working folder (-P), no hub.
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONHOME", "PYTHONSTARTUP"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(site), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    python = [sys.executable, "-P"]
    where = (
        "import unimlip_fast, unimlip_fast.kernels.ops as ops; from unimlip_fast.config import find_config_file; "
        "print(unimlip_fast.__file__, ops.__file__, find_config_file('zero2.json'), find_config_file('demo.yaml'))"
    )
    found = subprocess.run([*python, "-c", where], cwd=work, env=env, capture_output=True, text=True, check=True)
    paths = found.stdout.split()
    assert len(paths) == 4 and all(Path(p).is_relative_to(site) for p in paths), f"not the wheel's install: {paths}"

    # the README's command, made small: the shipped demo recipe and zero2.json, found by bare name
    tiny = [*TINY_RUN, "train.epochs=1"]
    command = [*python, "-m", "unimlip_fast.cli", "pretrain", "--ds-config", "zero2.json", *tiny]
    done = subprocess.run([*command, "--run-dir", "run"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    run = RunFolder(work / "run")
    assert run.is_finished(), run.missing()
    assert sorted(p.name for p in work.iterdir()) == ["run"], "the run wrote outside its run folder"
