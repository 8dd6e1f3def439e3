"""The planner: model-state accounting, the traced step against the same step run for real, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from unimlip_fast.config import load_config
from unimlip_fast.model import SIMCLR, WARMUP
from unimlip_fast.plan import find_card, plan
from unimlip_fast.plan.measure import measured_step_peak
from unimlip_fast.plan.states import model_states
from unimlip_fast.plan.trace import planned_model, shaped_batch, text_architecture, trace_step

from .helpers import TINY_OVERRIDES, run_cli

ZERO2 = {"zero_optimization": {"stage": 2, "contiguous_gradients": False}}


def tiny(batch: int = 16, *extra: str):
    return load_config(None, [*TINY_OVERRIDES, f"train.batch_size={batch}", *extra])


@pytest.mark.parametrize(
    ("precision", "stage", "expected_per_param"),
    [
        ("bf16", 2, 2 + (2 + 4 + 8) / 8),  # half weights whole; half grads, fp32 master and moments over 8 ranks
        ("bf16", 3, 16 / 8),
        ("fp32", 1, 4 + 4 + 8 / 8),
        ("autocast-bf16", 0, 16),
    ],
)
def test_model_states_follow_the_zero_accounting(precision, stage, expected_per_param):
    ds = {"zero_optimization": {"stage": stage, "contiguous_gradients": False}}
    states = model_states(1000, 0, precision, ds, world_size=8)
    assert states.total == pytest.approx(1000 * expected_per_param)


def test_gradient_buckets_are_deepspeeds_whole_allocation():
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "overlap_comm": True}}
    assert model_states(10, 0, "bf16", ds, 2).buckets == 1000 * 2 * 2  # two buffers of 1000 bf16 elements


def test_frozen_parameters_hold_weights_only():
    states = model_states(0, 1000, "fp32", ZERO2, 1)
    assert (states.weights, states.gradients, states.moments) == (4000, 0, 0)


def test_traced_peak_matches_the_real_step():
    cfg = tiny()
    text = text_architecture(cfg)
    traced = trace_step(cfg, text, "fp32", 8, SIMCLR)
    torch.manual_seed(0)
    model = planned_model(cfg, text, "fp32", device="cpu")
    measured = measured_step_peak(
        model, shaped_batch(cfg, 8, SIMCLR, torch.float32, text.config.vocab_size), cfg, SIMCLR
    )
    assert traced.step_peak == pytest.approx(measured, rel=0.15)


def test_activations_grow_with_the_micro_batch_and_the_views():
    cfg = tiny()
    text = text_architecture(cfg)
    small, large = (trace_step(cfg, text, "fp32", b, SIMCLR) for b in (4, 8))
    warmup = trace_step(cfg, text, "fp32", 8, WARMUP)
    assert small.activations < large.activations
    assert warmup.activations < large.activations  # one view, not three
    assert large.flops == pytest.approx(2 * small.flops, rel=0.05)


def test_half_precision_halves_the_traced_weights():
    cfg = tiny()
    text = text_architecture(cfg)
    fp32, bf16 = (trace_step(cfg, text, p, 4, SIMCLR) for p in ("fp32", "bf16"))
    assert bf16.resident < fp32.resident


def test_hub_encoder_offline_is_bert_base_and_said():
    cfg = load_config(None, ["model.text.encoder=someone/not-a-cached-model"])
    text = text_architecture(cfg)
    assert (text.config.hidden_size, text.config.num_hidden_layers, text.config.vocab_size) == (768, 12, 30522)
    assert "BERT-base" in text.source


@pytest.mark.slow  # several traces of the step (about 30 s on a loaded 2-core machine)
def test_plan_finds_the_largest_micro_batch_and_its_accumulation():
    cfg = tiny(4096, "model.image_size=32")
    result = plan(cfg, ZERO2, find_card("rtx-4090"), gpus=4)
    assert result.fits
    micro, accumulation = result.accumulation
    assert micro * accumulation == 1024 and micro <= result.largest_micro
    states = result.states.total
    assert states + trace_step(cfg, result.text, "fp32", result.largest_micro, SIMCLR).activations <= result.budget
    assert result.samples_per_s > 0 and result.traffic()["gradient_bytes"] > 0


@pytest.mark.slow  # several traces of the step (about 30 s on a loaded 2-core machine)
def test_cli_plan_json(monkeypatch, capsys):
    code = run_cli(
        monkeypatch,
        "plan",
        "demo.yaml",
        *TINY_OVERRIDES,
        "train.batch_size=64",
        "--gpu",
        "v100-32gb",
        "--gpus",
        "2",
        "--json",
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["card"] == "v100-32gb" and out["fits"] and out["gpus"] == 2
    assert set(out["model_states_gib"]) >= {"weights", "gradients", "fp32_master", "adamw_moments"}
    assert out["predicted"]["samples_per_s_per_gpu"] > 0


def test_cli_plan_bad_card_is_one_line(monkeypatch, capsys):
    assert run_cli(monkeypatch, "plan", "demo.yaml", "--gpu", "gtx-480") == 1
    err = capsys.readouterr().err.strip()
    assert "unknown card 'gtx-480'" in err and "\n" not in err


def test_cli_plan_that_cannot_fit_is_one_line(monkeypatch, capsys):
    code = run_cli(monkeypatch, "plan", "demo.yaml", *TINY_OVERRIDES, "model.simclr_hidden=65536", "--gpu", "v100-16gb")
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "does not fit on v100-16gb even at micro-batch 1" in err
