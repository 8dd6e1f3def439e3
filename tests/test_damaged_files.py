"""Damaged weight files are one line naming the file: a pickle or a truncated file under the name
``model.safetensors`` (eval, report, ``unimlip_fast.load``), and a ``model.init_from`` pickle that
would run code (refused, not run, and no advice on how to load it anyway)."""

from __future__ import annotations

import json

import pytest
import torch

import unimlip_fast
from unimlip_fast.weights_file import CodeInFileError, DamagedFileError, load_weights_only, read_safetensors

from .helpers import TINY_OVERRIDES, make_run_folder, pretrain_tiny, run_cli


class Planted:
    """Unpickling this creates a file: the proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("damaged_files") / "run", TINY_OVERRIDES)


def damage(run, how: str, tmp_path):
    weights = run / "model.safetensors"
    if how == "pickle":
        torch.save({"w": torch.zeros(3)}, weights)
    else:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return weights


@pytest.mark.parametrize("how", ["pickle", "truncated"])
def test_a_damaged_model_safetensors_is_named(how, finished, tmp_path, monkeypatch, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    weights = damage(run, how, tmp_path)
    with pytest.raises(DamagedFileError, match=f"^{weights} is damaged or not a safetensors file"):
        unimlip_fast.load(run, device="cpu")
    code = run_cli(monkeypatch, "eval", "retrieval", "--checkpoint", run, "--data", "phantom:16", "--split", "test")
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith(f"error: {weights} is damaged or not a safetensors file")
    assert len(err.splitlines()) == 1 and "SafetensorError" not in err
    (run / "metrics.jsonl").write_text('{"step": 1, "loss/total": 1.0, "lr": 0.001, "phase": "warmup"}\n')
    (run / "summary.json").write_text(
        json.dumps(
            {
                "steps": 1,
                "epochs": 1,
                "wall_s": 1.0,
                "skipped_records": {},
                "skipped_samples": {},
                "nonfinite_steps": 0,
                "run_dir": str(run),
                "commit": "x",
                "retrieval": {},
            }
        )
    )
    run_cli(monkeypatch, "report", run, "--data", "phantom:16", "--split", "test")
    out = capsys.readouterr()
    assert str(weights) in (out.out + out.err).replace("\n", "") and "Traceback" not in out.err


def test_read_safetensors_and_load_weights_only_name_the_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(DamagedFileError, match="empty.safetensors is damaged"):
        read_safetensors(tmp_path / "empty.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"\0garbage" * 8)
    with pytest.raises(DamagedFileError, match=r"garbage\.pt is damaged or not a checkpoint file"):
        load_weights_only(tmp_path / "garbage.pt")


def test_an_init_from_pickle_with_code_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    planted = tmp_path / "pmc_clip.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1), "hook": Planted(marker)}}, planted)
    with pytest.raises(CodeInFileError):
        load_weights_only(planted)
    code = pretrain_tiny(
        monkeypatch,
        tmp_path / "run",
        "train.max_steps=1",
        "eval.split=",
        f"model.init_from={planted}",
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and not marker.exists()
    assert err.startswith(f"error: {planted} holds more than tensors and plain values: code (")
    assert "refused" in err and "weights_only" not in err and "trust" not in err and "safe_globals" not in err
