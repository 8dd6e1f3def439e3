"""Writes through a temporary file: one helper for the package; a full disk (an injected ENOSPC, or
a library's own wording with no space left, or a real small file system) is one line naming the
path, the megabytes free and needed, leaves no partial file, keeps the last complete checkpoint, and
a start is refused when one checkpoint cannot fit."""

from __future__ import annotations

import errno
import json
import re

import pytest
import torch

from unimlip_fast import durable
from unimlip_fast.durable import MB, DiskFullError, NotEnoughSpaceError, write_atomic
from unimlip_fast.train.checkpoint import (
    LATEST,
    TMP_PREFIX,
    checkpoint_bytes,
    checkpoint_folders,
    incompleteness,
    require_room_for_checkpoint,
    save_checkpoint,
)
from unimlip_fast.train.distributed import DistEnv
from unimlip_fast.train.monitor import open_metrics

from .helpers import REPO, pretrain_tiny, small_file_system

ENV = DistEnv(0, 1, 0, torch.device("cpu"))


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "old")
    write_atomic(target, b"new bytes")
    write_atomic(tmp_path / "b.bin", lambda p: p.write_bytes(b"x" * 10))
    assert target.read_bytes() == b"new bytes" and (tmp_path / "b.bin").read_bytes() == b"x" * 10
    assert leftovers(tmp_path) == []


def test_enospc_names_the_path_free_and_needed_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"the last complete file")
    monkeypatch.setattr(durable, "free_bytes", lambda path: 3 * MB)

    def fill_the_disk(tmp):
        tmp.write_bytes(b"\0" * (7 * MB))
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as e:
        write_atomic(target, fill_the_disk, what="the weights")
    assert str(e.value) == f"no space left on device writing {target} (3 MB free, the weights needs about 7 MB)"
    assert target.read_bytes() == b"the last complete file" and leftovers(tmp_path) == []


def test_a_library_error_on_a_full_disk_is_told_as_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "free_bytes", lambda path: 0)

    def torch_zip_writer(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 116416 vs 116312")

    with pytest.raises(DiskFullError, match=r"no space left on device writing .*x\.pt \(0 MB free"):
        write_atomic(tmp_path / "x.pt", torch_zip_writer)
    assert leftovers(tmp_path) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    def broken(tmp):
        raise ValueError("not about space")

    with pytest.raises(ValueError, match="not about space"):
        write_atomic(tmp_path / "x", broken)
    assert leftovers(tmp_path) == []


def test_metrics_on_a_full_disk_name_the_file_and_leave_no_empty_temporary(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1}) + "\n")
    monkeypatch.setattr(durable, "free_bytes", lambda path: 0)
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".tmp") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(DiskFullError, match=re.escape(f"writing {metrics} (0 MB free")):
        open_metrics(metrics, resume_step=1)
    assert leftovers(tmp_path) == [] and metrics.read_text() == '{"step": 1}\n'


class FakeEngine:
    """What save_checkpoint asks of a DeepSpeed engine; ``fail`` makes its write run out of disk."""

    def __init__(self, fail: bool = False):
        self.module = torch.nn.Linear(4, 4)
        self.fail = fail

    def save_checkpoint(self, folder: str, tag: str, save_latest: bool) -> None:
        path = f"{folder}/{tag}/mp_rank_00_model_states.pt"
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        if self.fail:
            raise RuntimeError(". unexpected pos 116416 vs 116312")


def test_a_checkpoint_on_a_full_disk_keeps_the_last_complete_one(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    save_checkpoint(FakeEngine(), ckpt_dir, 2, {"step": 2}, ENV, keep_last=2)
    size = checkpoint_bytes(FakeEngine().module, ckpt_dir)
    monkeypatch.setattr(durable, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError) as e:
        save_checkpoint(FakeEngine(fail=True), ckpt_dir, 4, {"step": 4}, ENV, keep_last=2)
    assert str(e.value).startswith(
        f"no space left on device writing {ckpt_dir / (TMP_PREFIX + 'step_0000004')} "
        "(0 MB free, a checkpoint needs about"
    )
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [LATEST, "step_0000002"]  # the partial folder is gone
    assert incompleteness(ckpt_dir / "step_0000002") is None and (ckpt_dir / LATEST).read_text() == "step_0000002"
    assert size == sum(p.stat().st_size for p in (ckpt_dir / "step_0000002").rglob("*") if p.name != "manifest.json")


def test_a_start_is_refused_when_one_checkpoint_cannot_fit(tmp_path, monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # about 12 MB with AdamW's moments
    monkeypatch.setattr(durable, "free_bytes", lambda path: 5 * MB)
    with pytest.raises(NotEnoughSpaceError, match=r"5 MB free, one checkpoint needs about 11 MB"):
        require_room_for_checkpoint(model, tmp_path)
    monkeypatch.setattr(durable, "free_bytes", lambda path: 50 * MB)
    require_room_for_checkpoint(model, tmp_path)


@pytest.mark.slow
def test_a_run_on_a_really_full_disk_stops_in_one_line_and_keeps_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A tiny run (checkpoints of about 21 MB) on a 32 MB file system: the first checkpoint fits, the
    second does not; the run exits 1 naming the folder it was writing, the MB free and the MB a
    checkpoint needs, and step 1's checkpoint stays complete and latest."""
    with small_file_system(tmp_path / "small", 32) as disk:
        run = disk / "run"
        code = pretrain_tiny(
            monkeypatch,
            run,
            "train.max_steps=2",
            "train.ckpt_every=1",
            "train.keep_last=2",
            "train.report_to=[]",
            "eval.split=",
        )
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert code == 1, err[-2000:]
        ckpt_dir = run / "checkpoints"
        assert re.fullmatch(
            rf"error: no space left on device writing {re.escape(str(ckpt_dir / TMP_PREFIX))}step_0000002 "
            r"\(\d+ MB free, a checkpoint needs about \d+ MB\)",
            last,
        ), last
        assert (ckpt_dir / LATEST).read_text() == "step_0000001" and incompleteness(ckpt_dir / "step_0000001") is None
        assert [p.name for p in checkpoint_folders(ckpt_dir)] == ["step_0000001"]  # the partial one is gone


def test_every_write_through_a_temporary_file_uses_the_one_helper():
    """No module but durable.py makes its own temporary file to rename (``.tmp`` names, ``os.replace``
    of a file)."""
    offenders = []
    for path in sorted((REPO / "unimlip_fast").rglob("*.py")):
        if path.name == "durable.py":
            continue
        text = path.read_text()
        if '.tmp"' in text or ".tmp'" in text or "tmp.replace(" in text:
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_pretrain_refuses_to_start_on_a_disk_that_cannot_hold_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(durable, "free_bytes", lambda path: MB // 2)
    run = tmp_path / "run"
    code = pretrain_tiny(
        monkeypatch,
        run,
        "train.max_steps=2",
        "eval.split=",
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith(
        f"error: not enough space on the disk of {run / 'checkpoints'}: 0 MB free, one checkpoint needs about "
    )
    assert not run.exists()


def test_files_written_by_a_library_get_the_same_mode_as_the_rest(tmp_path):
    from safetensors.torch import save_file

    write_atomic(tmp_path / "w.safetensors", lambda p: save_file({"a": torch.zeros(2)}, str(p)))
    write_atomic(tmp_path / "a.json", "{}")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["w.safetensors"] == modes["a.json"] == modes["plain.txt"]
