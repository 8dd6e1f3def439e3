"""BatchNorm statistics agree across ranks once frozen and in what is exported; the logit scale is
clamped after the optimizer step (also in DeepSpeed's master copy), never in the forward pass."""

import math
import os

import pytest
import torch

from unimlip_fast.config import load_config
from unimlip_fast.model import SIMCLR, WARMUP, build_model, build_tokenizer
from unimlip_fast.objective import compute_terms, total_loss

from .helpers import CAPTIONS, REPO, TINY_OVERRIDES, spawn_ranks

TINY_RUN = TINY_OVERRIDES + [
    "data.format=phantom",
    "data.phantom_size=96",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.lr=1e-3",
    "eval.split=",
]


def _bn_buffers(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "running_" in k}


def _rank_main(rank, world, out_dir):
    import unimlip_fast.train.engine as engine_module
    from unimlip_fast.model.unimlip import UniMlip

    seen = {}
    forward = UniMlip.forward

    def recording_forward(self, batch, phase=WARMUP):
        if phase == WARMUP or SIMCLR not in seen:  # the last warm-up step's statistics, the first SimCLR step's
            seen[phase] = _bn_buffers(self.visual)
        return forward(self, batch, phase)

    export = engine_module.export_weights

    def recording_export(engine, path, env):
        export(engine, path, env)
        seen["exported"] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    UniMlip.forward, engine_module.export_weights = recording_forward, recording_export
    cfg = load_config(REPO / "configs/demo.yaml", TINY_RUN + ["train.max_steps=5", "train.simclr_start=3"])
    engine_module.pretrain(cfg, str(REPO / "configs/zero2_fp32.json"), os.path.join(out_dir, "run"))
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_freeze_and_export_the_same_batchnorm_statistics(tmp_path):
    """Each rank sees different samples, so their statistics differ in the warm-up phase; from the
    first SimCLR step (statistics frozen) every rank holds the same, and the export is every rank's."""
    from safetensors.torch import load_file

    spawn_ranks(_rank_main, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    name = "bn1.running_mean"
    assert not torch.allclose(ranks[0][WARMUP][name], ranks[1][WARMUP][name]), "vacuous: ranks already agree"
    for key, value in ranks[0][SIMCLR].items():
        torch.testing.assert_close(ranks[1][SIMCLR][key], value, rtol=0, atol=0, msg=key)
    exported = load_file(str(tmp_path / "run" / "model.safetensors"))
    for rank in ranks:
        assert set(rank["exported"]) == set(exported)
        for key, value in rank["exported"].items():
            torch.testing.assert_close(exported[key], value.to(exported[key].dtype), rtol=0, atol=0, msg=key)


def test_average_batchnorm_stats_is_a_no_op_on_one_process():
    from unimlip_fast.train.replicas import average_batchnorm_stats

    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2) * 5)
    before = _bn_buffers(bn)
    assert average_batchnorm_stats(torch.nn.Sequential(bn)) == 1
    for key, value in before.items():
        torch.testing.assert_close(_bn_buffers(bn)[key], value, rtol=0, atol=0)


@pytest.fixture
def tiny_model_and_batch(tiny_cfg, tiny_tokenizer, tiny_batch):
    torch.manual_seed(0)
    return tiny_cfg, build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer).train(), tiny_batch


def test_logit_scale_past_the_cap_still_gets_its_gradient(tiny_model_and_batch):
    cfg, model, batch = tiny_model_and_batch
    with torch.no_grad():
        model.logit_scale.fill_(math.log(cfg.model.logit_scale_max) + 0.5)
    features = model(batch, WARMUP)
    assert features["logit_scale"].item() == pytest.approx(cfg.model.logit_scale_max * math.exp(0.5), rel=1e-5)
    total_loss(compute_terms(features, cfg.loss, model.ops), cfg.loss).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0


@pytest.mark.parametrize("ds_json", ["zero2_fp32.json", "zero2_bf16.json", "zero3.json"])
def test_logit_scale_clamped_after_each_step_in_the_master_copy(ds_json):
    """A loss that pushes the scale up with a large learning rate: after every step the module's
    value and DeepSpeed's fp32 master are at the cap, so the next step starts from it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from unimlip_fast.train.distributed import init_distributed
    from unimlip_fast.train.ds_config import load_ds_config, resolve_ds_config
    from unimlip_fast.train.replicas import clamp_parameter_
    from unimlip_fast.train.schedule import build_optimizer

    env = init_distributed()
    cfg = load_config(
        None,
        TINY_OVERRIDES
        + [
            "model.logit_scale_init=99.0",
            "train.lr=0.1",
            "train.batch_size=6",
            "train.grad_clip=0.0",
            "loss.mlm=0",
            "loss.simclr=0",
        ],
    )
    tokenizer = build_tokenizer(cfg.model.text, CAPTIONS)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, tokenizer)
    ds = resolve_ds_config(load_ds_config(str(REPO / "configs" / ds_json)), cfg, env.world_size)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg.train, env.device), config=ds, dist_init_required=False
    )
    tok = tokenizer(CAPTIONS[:6], padding="max_length", max_length=24, return_tensors="pt")
    batch = {"image": torch.randn(6, 3, 64, 64), **tok}
    cap = math.log(cfg.model.logit_scale_max)
    for step in range(3):
        features = engine(batch, WARMUP)
        if step:  # the working copy the forward pass sees (gathered where ZeRO-3 partitions it)
            assert features["logit_scale"].item() == pytest.approx(cfg.model.logit_scale_max, rel=2e-2)
        loss = total_loss(compute_terms(features, cfg.loss, model.ops), cfg.loss) - features["logit_scale"].sum()
        engine.backward(loss)
        engine.step()
        clamp_parameter_(model.logit_scale, 0.0, cap)
        master = safe_get_full_fp32_param(model.logit_scale)
        assert master is not None and master.item() == pytest.approx(cap, abs=1e-6)
        assert model.scale().item() == pytest.approx(cfg.model.logit_scale_max, rel=2e-2)  # readable, as logs need
