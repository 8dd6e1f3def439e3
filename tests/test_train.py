"""End to end through the CLI's entry point on tiny synthetic data: train, checkpoint, resume, evaluate."""

import json

import pytest
import torch

from .helpers import REPO, TINY_RUN, read_metrics, run_cli

__all__ = ["TINY_RUN", "run_cli"]  # read from here by older test modules; helpers.py is their home


def test_pretrain_then_eval_retrieval(tmp_path, monkeypatch):
    run = tmp_path / "run"
    code = run_cli(
        monkeypatch,
        "pretrain",
        REPO / "configs/demo.yaml",
        "--ds-config",
        REPO / "configs/zero2.json",
        "--run-dir",
        run,
        *TINY_RUN,
        "train.max_steps=5",
        "train.ckpt_every=2",
        "eval.split=",
    )
    assert code == 0
    metrics = [m for m in read_metrics(run) if "loss/total" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 0  # 5 of 6 steps per epoch
    assert [m["phase"] for m in metrics] == ["warmup"] * 3 + ["simclr"] * 2  # simclr_start=3: after 3 steps
    assert "loss/simclr" not in metrics[0] and "loss/simclr" in metrics[-1]
    for term in ("itc", "itc_img_fp", "itc_txt_fp", "mlm"):
        assert all(f"loss/{term}" in m for m in metrics)
    for key in ("lr", "logit_scale", "samples_per_s", "data_time_s", "step_time_s", "memory_gb"):
        assert key in metrics[-1]
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_0000004", "step_0000005"]  # keep_last=2, no temporary folders left
    assert (run / "checkpoints/latest").read_text() == "step_0000005"

    out = tmp_path / "retrieval.json"
    assert (
        run_cli(
            monkeypatch,
            "eval",
            "retrieval",
            "--checkpoint",
            run,
            "--data",
            "phantom:64",
            "--split",
            "test",
            "--json",
            out,
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert set(results) >= {"n", "i2t", "t2i", "n_duplicates_dropped"}
    assert set(results["i2t"]) >= {"R@1", "R@5", "R@10", "median_rank"}
    assert results["n"] + results["n_duplicates_dropped"] == 64


def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    common = ["--ds-config", REPO / "configs/zero2_fp32.json", *TINY_RUN, "train.max_steps=6", "eval.split="]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(monkeypatch, "pretrain", REPO / "configs/demo.yaml", "--run-dir", whole, *common) == 0
    assert (
        run_cli(
            monkeypatch, "pretrain", REPO / "configs/demo.yaml", "--run-dir", parts, *common, "train.stop_after_steps=4"
        )
        == 0
    )
    assert not (parts / "model.safetensors").exists()  # stopped, not finished
    assert (
        run_cli(monkeypatch, "pretrain", REPO / "configs/demo.yaml", "--run-dir", parts, *common, "--resume", "latest")
        == 0
    )
    a = {m["step"]: m for m in read_metrics(whole) if "loss/total" in m}
    b = {m["step"]: m for m in read_metrics(parts) if "loss/total" in m}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):  # the steps after the resume, SimCLR phase included
        for key in ("loss/total", "loss/itc", "loss/simclr", "loss/mlm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_unknown_config_key_is_one_clear_line(tmp_path, monkeypatch, capsys):
    code = run_cli(monkeypatch, "pretrain", REPO / "configs/demo.yaml", "--run-dir", tmp_path, "train.max_stepz=3")
    err = capsys.readouterr().err
    assert code != 0 and "unknown config key train.max_stepz" in err and "train.max_steps" in err
    assert "Traceback" not in err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, monkeypatch, capsys):
    code = run_cli(
        monkeypatch,
        "pretrain",
        REPO / "configs/demo.yaml",
        "--run-dir",
        tmp_path / "new",
        *TINY_RUN,
        "--resume",
        "latest",
    )
    assert code != 0 and "no complete checkpoint" in capsys.readouterr().err


def test_eval_errors_are_clear(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, "eval", "retrieval", "--checkpoint", tmp_path, "--data", "dicom:/x") != 0
    assert "FORMAT:PATH" in capsys.readouterr().err
    assert run_cli(monkeypatch, "eval", "retrieval", "--checkpoint", tmp_path, "--data", "phantom:8") != 0
    assert "checkpoint incomplete" in capsys.readouterr().err


@pytest.mark.parametrize(
    "ds_json, precision, micro_batch",
    [
        ("zero2.json", "as-configured", 0),
        ("zero2_bf16.json", "as-configured", 0),
        ("zero1.json", "fp32", 0),
        ("zero3.json", "fp32", 0),
        ("zero2.json", "as-configured", 4),
        ("zero2_bf16.json", "as-configured", 4),
    ],
)
def test_deepspeed_configs_train(tmp_path, monkeypatch, ds_json, precision, micro_batch):
    """DeepSpeed's torch_autocast (bf16) and its bf16 mode, which casts parameters but not the
    BatchNorm buffers, both train, the statistics staying fp32, with and without accumulation in
    micro-batches; so do ZeRO-1 and ZeRO-3 (whose sharded weights are gathered for the safetensors
    export). fp16 is refused by DeepSpeed on a CPU."""
    run = tmp_path / "run"
    assert (
        run_cli(
            monkeypatch,
            "pretrain",
            REPO / "configs/demo.yaml",
            "--ds-config",
            REPO / "configs" / ds_json,
            "--run-dir",
            run,
            *TINY_RUN,
            "train.max_steps=4",
            f"train.cpu_precision={precision}",
            f"train.micro_batch_size={micro_batch}",
            "eval.split=",
        )
        == 0
    )
    metrics = [m for m in read_metrics(run) if "loss/total" in m]
    assert len(metrics) == 4 and all(m["loss/total"] == m["loss/total"] for m in metrics)
    assert {m["phase"] for m in metrics} == {"warmup", "simclr"}
    if micro_batch:
        assert all(m["accum/micro_batch"] == micro_batch for m in metrics)
    from safetensors.torch import load_file

    weights = load_file(str(run / "model.safetensors"))
    assert weights["visual.bn1.running_var"].dtype == torch.float32
    assert not torch.equal(weights["visual.bn1.running_var"], torch.ones_like(weights["visual.bn1.running_var"]))


def test_batchnorm_with_bf16_parameters_matches_fp32():
    from unimlip_fast.model.visual import BatchNorm2d

    torch.manual_seed(0)
    ref, mixed = BatchNorm2d(4), BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    mixed.load_state_dict(ref.state_dict())
    mixed.weight.data, mixed.bias.data = mixed.weight.data.bfloat16(), mixed.bias.data.bfloat16()
    x = torch.randn(8, 4, 5, 5)
    out = mixed(x.bfloat16())
    assert out.dtype == torch.bfloat16 and mixed.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref(x), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(mixed.running_mean, ref.running_mean, atol=1e-2, rtol=1e-2)


def test_runs_in_one_process_free_their_engines(tmp_path):
    """A finished run leaves no DeepSpeed engine (and so no model or optimizer state) alive: a
    process that trains several runs in turn (``ablate``) holds one at a time."""
    import gc
    import weakref

    from deepspeed.runtime.engine import DeepSpeedEngine

    from unimlip_fast.config import load_config
    from unimlip_fast.train.engine import pretrain

    def live_engines() -> list:
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, DeepSpeedEngine)]

    # Engines that other tests of this process made themselves (with deepspeed.initialize) are
    # theirs: only the runs made here count.
    before = weakref.WeakSet(live_engines())
    for n in range(2):
        cfg = load_config(REPO / "configs/demo.yaml", TINY_RUN + ["train.max_steps=2", "data.phantom_size=48"])
        pretrain(cfg, str(REPO / "configs/zero2_fp32.json"), tmp_path / f"run{n}")
    assert not [engine for engine in live_engines() if engine not in before]
