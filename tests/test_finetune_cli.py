"""`finetune classify` and `finetune vqa` end to end through the CLI, tiny: one process and two ranks."""

import json
import os
import subprocess
import sys

import pytest

from unimlip_fast.train.distributed import free_port

from .helpers import REPO, SHARED_DATA, finetuning_base_run, run_cli, write_chexpert, write_slake

FAST = ["data.image_size=32", "data.num_workers=0", "train.batch_size=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return finetuning_base_run(tmp_path_factory.mktemp("pretrained") / "run")


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_classify_chexpert_shaped(tmp_path, monkeypatch, run_dir):
    release = write_chexpert(tmp_path / "data")
    out, js = tmp_path / "ft", tmp_path / "r.json"
    code = run_cli(
        monkeypatch,
        "finetune",
        "classify",
        "--checkpoint",
        run_dir,
        "--data",
        f"chexpert:{release}",
        "--fraction",
        "0.5",
        "--run-dir",
        out,
        "--json",
        js,
        *FAST,
        "train.epochs=3",
        "train.patience=1",
        "data.val_fraction=0.25",
        "data.uncertainty=u-ignore",
    )
    assert code == 0
    results = json.loads(js.read_text())
    assert set(results) >= {"macro_auc", "per_label", "n_train", "n_test", "fraction"}
    assert results["fraction"] == 0.5 and results["n_test"] == 8
    assert 0 < results["n_train"] < 18 and results["fraction_drawn"] == pytest.approx(results["n_train"] / 18, abs=1e-3)
    assert set(results["per_label"]) == {"No Finding", "Cardiomegaly"}  # the rest have one class in the test split
    assert results["macro_auc"] == pytest.approx(sum(results["per_label"].values()) / 2)
    assert results["skipped"]["test"] == {"not_frontal": 4, "missing_image": 1, "unknown_label_value": 1}
    epochs = _metrics(out)
    assert [m["epoch"] for m in epochs] == list(range(1, results["epochs_run"] + 1))
    assert results["epochs_run"] - results["best_epoch"] <= 1  # patience 1
    assert max(m["val_macro_auc"] for m in epochs) == pytest.approx(results["val_macro_auc"], abs=1e-5)
    assert (out / "best.safetensors").is_file() and (out / "config.yaml").is_file()


@pytest.mark.slow
def test_classify_nih1000_tenth_of_the_labels(tmp_path, monkeypatch, run_dir):
    nih = SHARED_DATA / "nih1000"
    if not nih.is_dir():
        pytest.skip(f"real NIH data not found at {nih}")
    js = tmp_path / "r.json"
    assert (
        run_cli(
            monkeypatch,
            "finetune",
            "classify",
            "--checkpoint",
            run_dir,
            "--data",
            f"nih:{nih}",
            "--fraction",
            "0.1",
            "--run-dir",
            tmp_path / "ft",
            "--json",
            js,
            *FAST,
            "train.epochs=1",
        )
        == 0
    )
    results = json.loads(js.read_text())
    assert results["n_test"] == 200 and 50 <= results["n_train"] <= 70
    assert {"Pneumothorax", "Emphysema", "Hernia"} <= set(results["excluded_labels"])  # no positive in test
    assert 0 <= results["macro_auc"] <= 1 and len(results["per_label"]) == 11


def test_vqa_slake_shaped(tmp_path, monkeypatch, run_dir):
    root = write_slake(tmp_path / "slake")
    out, js = tmp_path / "ft", tmp_path / "r.json"
    code = run_cli(
        monkeypatch,
        "finetune",
        "vqa",
        "--checkpoint",
        run_dir,
        "--data",
        f"slake:{root}",
        "--run-dir",
        out,
        "--json",
        js,
        *FAST,
        "train.epochs=2",
        "model.learnable_tokens=4",
        "train.freeze_text=true",
        "train.freeze_image=true",
    )
    assert code == 0
    results = json.loads(js.read_text())
    assert set(results) >= {"open", "closed", "overall", "n_test", "n_unseen_answers"}
    assert results["n_test"] == 9 and results["n_unseen_answers"] == 1  # "spleen" never seen in training
    assert results["open"] <= 4 / 5  # the unseen open answer cannot be right
    assert (out / "model.safetensors").is_file()
    assert (out / "answers.txt").read_text().split("\n")[:4] != [""]
    assert len(_metrics(out)) == 2


def test_vqa_majority_baseline_on_vqa_rad(tmp_path, monkeypatch):
    root = SHARED_DATA / "vqa_rad"
    if not root.is_dir():
        pytest.skip(f"real VQA-RAD data not found at {root}")
    js = tmp_path / "b.json"
    code = run_cli(monkeypatch, "finetune", "vqa", "--data", f"vqa-rad:{root}", "--majority-baseline", "--json", js)
    assert code == 0
    results = json.loads(js.read_text())
    assert results["n_test"] == 451 and results["n_unseen_answers"] > 0
    closed = json.loads((root / "testset.json").read_text())
    expected = (
        sum(
            " ".join(str(q["answer"]).split()).lower() == results["majority_answers"]["CLOSED"]
            for q in closed
            if q["answer_type"].strip() == "CLOSED"
        )
        / 272
    )
    assert results["closed"] == pytest.approx(expected)


def test_unfinished_run_and_bad_data_are_one_line(tmp_path, monkeypatch, capsys, run_dir):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    release = write_chexpert(tmp_path / "data", n_patients=4, bad_rows=False)
    assert (
        run_cli(
            monkeypatch,
            "finetune",
            "classify",
            "--checkpoint",
            half,
            "--data",
            f"chexpert:{release}",
            "--run-dir",
            tmp_path / "o",
            *FAST,
        )
        == 1
    )
    err = " ".join(capsys.readouterr().err.split())
    assert "not a finished pretraining run" in err and "Traceback" not in err
    assert run_cli(monkeypatch, "finetune", "classify", "--checkpoint", run_dir, "--data", "xray:/x") != 0
    assert (
        run_cli(
            monkeypatch,
            "finetune",
            "vqa",
            "--checkpoint",
            run_dir,
            "--data",
            f"slake:{tmp_path}",
            "--run-dir",
            tmp_path / "o2",
        )
        == 1
    )
    assert "train.json not found" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_two_ranks_under_torchrun(tmp_path, run_dir):
    """Classification and VQA with two gloo ranks: the same results files, the global batch split."""
    release, slake = write_chexpert(tmp_path / "data"), write_slake(tmp_path / "slake")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for task, data, extra in (
        ("classify", f"chexpert:{release}", ["data.val_fraction=0.25"]),
        ("vqa", f"slake:{slake}", ["model.learnable_tokens=4"]),
    ):
        out = tmp_path / task
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "unimlip_fast.cli",
            "finetune",
            task,
            "--checkpoint",
            str(run_dir),
            "--data",
            data,
            "--run-dir",
            str(out),
            *FAST,
            "train.epochs=2",
            *extra,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 rank(s), global batch 8" in proc.stderr
        results = json.loads((out / "results.json").read_text())
        assert results["n_test"] == (8 if task == "classify" else 9)
