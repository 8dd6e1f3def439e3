"""The fast step equals the reference step: the same five terms and every gradient (and, fused AdamW
against torch's default, the weights after one step), on the same batch, with each speed-up on alone and
all together. Both steps run in float64, so that two paths equal in exact arithmetic agree to
rounding whatever order a CPU's kernels sum in (in fp32, NHWC convolutions and fused attention
reorder the sums, and BatchNorm magnifies the difference in the gradient of a bias before it, whose
exact value is 0).
Compilation here uses the ``aot_eager`` backend (dynamo's graph capture and AOT autograd, as
inductor gets them, without the C++ build that takes minutes on a CPU); the GPU check compiles with
inductor. The image trunk and the text tower compile to one graph each, with no break."""

import dataclasses

import pytest
import torch

from unimlip_fast.config import load_config
from unimlip_fast.model import SIMCLR, WARMUP, build_model, build_tokenizer
from unimlip_fast.objective import compute_terms, total_loss
from unimlip_fast.train.fast import REFERENCE_STEP, FastChoices, apply_fast, resolve_fast
from unimlip_fast.train.schedule import build_optimizer

from .helpers import CAPTIONS, TINY_OVERRIDES

# Dropout inside the compiled text tower would draw from inductor's own generator: off here. The
# text-embedding dropout and DropBlock run outside the compiled parts and stay on.
OVERRIDES = TINY_OVERRIDES + ["model.text.hidden_dropout=0.0"]
ALL_ON = FastChoices(channels_last=True, compile=True, sdpa=True, fused_adamw=True)
VARIANTS = {
    **{
        key: dataclasses.replace(REFERENCE_STEP, **{key: True})
        for key in ("channels_last", "compile", "sdpa", "fused_adamw")
    },
    "all": ALL_ON,
}


def _step(cfg, tokenizer, batch, choices: FastChoices, phase: str):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, tokenizer).train().double()
    with torch.no_grad():  # realistic BatchNorm statistics before the SimCLR phase freezes them
        model.visual(
            torch.randn(
                32,
                3,
                cfg.model.image_size,
                cfg.model.image_size,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(2),
            )
        )
    apply_fast(model, choices, compile_backend="aot_eager")
    torch.manual_seed(1)  # the same DropBlock and text dropout draws in both steps
    features = model(batch, phase)
    terms = compute_terms(features, cfg.loss, model.ops)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"), fused=choices.fused_adamw)
    optimizer.step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {k: v.detach() for k, v in terms.items()}, grads, weights, features


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(None, OVERRIDES)
    tokenizer = build_tokenizer(cfg.model.text, CAPTIONS)
    g = torch.Generator().manual_seed(0)
    b, size, length = 6, cfg.model.image_size, cfg.model.text.context_length
    tok = tokenizer(CAPTIONS[:b], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    ids, labels = tok["input_ids"].clone(), torch.full((b, length), -100)
    labels[:, 2], ids[:, 2] = ids[:, 2], tokenizer.mask_token_id
    tok["attention_mask"][-1, 12:] = 0  # padding that attention must ignore
    # Images that differ by more than noise, so the SimCLR head's BatchNorm does not divide by ~0.
    shift = torch.linspace(-2, 2, b, dtype=torch.float64)[:, None, None, None]
    batch = {
        **{
            view: torch.randn(b, 3, size, size, generator=g, dtype=torch.float64) + shift
            for view in ("image", "image_a", "image_b")
        },
        "input_ids": ids,
        "attention_mask": tok["attention_mask"],
        "mlm_labels": labels,
    }
    reference = {phase: _step(cfg, tokenizer, batch, REFERENCE_STEP, phase) for phase in (SIMCLR,)}
    return cfg, tokenizer, batch, reference


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_step_equals_reference(setup, variant):
    cfg, tokenizer, batch, reference = setup
    ref_terms, ref_grads, ref_weights, _ = reference[SIMCLR]
    terms, grads, weights, features = _step(cfg, tokenizer, batch, VARIANTS[variant], SIMCLR)
    assert set(terms) == {"itc", "itc_img_fp", "itc_txt_fp", "simclr", "mlm"}
    for name in terms:
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-10, atol=1e-10, msg=_named(name))
    assert set(grads) == set(ref_grads) and ref_grads["visual.conv1.weight"].abs().sum() > 0
    # float64 rounding, relative to the largest gradient entry of the same layer (a bias before
    # BatchNorm has a gradient of 0 in exact arithmetic, so its own size is no scale).
    layer_scale = {}
    for name, grad in ref_grads.items():
        layer = name.rsplit(".", 1)[0]
        layer_scale[layer] = max(layer_scale.get(layer, 0.0), grad.abs().max().item())
    for name in grads:
        scale = layer_scale[name.rsplit(".", 1)[0]]
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-8, atol=1e-9 * scale + 1e-14, msg=_named(name))
    if variant == "fused_adamw":  # the same gradients, so the same AdamW update
        for name in weights:
            torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-12, atol=1e-14, msg=_named(name))


def _named(name: str):
    """assert_close's own message (the largest differences and where), led by the parameter's name."""
    return lambda message: f"{name}: {message}"


def test_channels_last_really_runs_nhwc(setup):
    cfg, tokenizer, batch, _ = setup
    model = build_model(cfg.model, cfg.loss, tokenizer)
    apply_fast(model, FastChoices(channels_last=True))
    feature_map = model.visual.trunk(batch["image"])
    assert feature_map.is_contiguous(memory_format=torch.channels_last) and not feature_map.is_contiguous()


@pytest.mark.parametrize("sdpa", [True, False])
def test_sdpa_switch_chooses_the_attention_kernel(setup, sdpa):
    """On, attention runs SDPA's fused CPU kernel; off, its math backend (matmul, softmax, matmul)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpNames(TorchDispatchMode):
        names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    cfg, tokenizer, batch, _ = setup
    model = build_model(cfg.model, cfg.loss, tokenizer)
    apply_fast(model, FastChoices(sdpa=sdpa))
    with OpNames() as ops:
        model(batch, WARMUP)
    fused = {name for name in ops.names if "scaled_dot_product" in name}
    assert bool(fused) == sdpa, fused


@pytest.mark.parametrize("phase", [WARMUP, SIMCLR])
def test_trunk_and_text_tower_compile_without_graph_breaks(setup, phase):
    from unimlip_fast.model.visual import set_batchnorm_stats_frozen

    cfg, tokenizer, batch, _ = setup
    model = build_model(cfg.model, cfg.loss, tokenizer).train()
    apply_fast(model, FastChoices(channels_last=True, sdpa=True))
    set_batchnorm_stats_frozen(model.visual, phase == SIMCLR)
    for part, args in (
        (model.visual.trunk, (batch["image"],)),
        (model.text, (batch["input_ids"], batch["attention_mask"])),
    ):
        explained = torch._dynamo.explain(part)(*args)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.interpreter
@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("phase", [WARMUP, SIMCLR])
def test_forward_and_objective_capture_as_one_graph(setup, kernels, phase):
    # The fused kernels read their seed and check their operands' alignment inside their custom ops,
    # where tensors are real: nothing between the batch and the total loss reads a value or an
    # address, so dynamo captures the whole forward and the five terms without a break.
    from unimlip_fast.kernels.ops import REFERENCE_OPS, triton_ops

    cfg, tokenizer, batch, _ = setup
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    model = build_model(cfg.model, cfg.loss, tokenizer).train()
    model.ops = triton_ops() if kernels == "triton" else REFERENCE_OPS

    def step_loss(batch):
        return total_loss(compute_terms(model(batch, phase), cfg.loss, model.ops), cfg.loss)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step_loss)(batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_fast_setting_resolves_per_device_and_key():
    cfg = load_config(None, ["train.fast=auto"])
    assert resolve_fast(cfg.train, torch.device("cpu")) == REFERENCE_STEP
    assert resolve_fast(cfg.train, torch.device("cuda")) == ALL_ON
    cfg = load_config(None, ["train.fast=true", "train.compile=false"])
    assert resolve_fast(cfg.train, torch.device("cpu")) == dataclasses.replace(ALL_ON, compile=False)
    assert "off by key: compile" in resolve_fast(cfg.train, torch.device("cpu")).note(True, torch.device("cpu"))
    assert resolve_fast(load_config(None, ["train.fast=false"]).train, torch.device("cuda")) == REFERENCE_STEP
    from unimlip_fast.config import ConfigError

    with pytest.raises(ConfigError, match="train.fast must be true, false or auto"):
        load_config(None, ["train.fast=sometimes"])


@pytest.mark.slow
def test_fast_step_trains_through_the_trainer(tmp_path, monkeypatch, capsys):
    """train.fast=true through pretrain and DeepSpeed (ZeRO-2): both phases compile (aot_eager here),
    the choices and the compile times are logged, and it trains."""
    import functools
    import json

    from unimlip_fast.train import engine

    from .helpers import REPO

    monkeypatch.setattr(engine, "apply_fast", functools.partial(apply_fast, compile_backend="aot_eager"))
    cfg = load_config(
        REPO / "configs/demo.yaml",
        OVERRIDES
        + [
            "data.format=phantom",
            "data.phantom_size=48",
            "data.num_workers=0",
            "train.batch_size=8",
            "train.log_every=1",
            "train.max_steps=3",
            "train.simclr_start=2",
            "eval.split=",
            "train.fast=true",
        ],
    )
    summary = engine.pretrain(cfg, str(REPO / "configs/zero2_fp32.json"), tmp_path / "run")
    out = " ".join(capsys.readouterr().err.split())  # the run's notes, as rich wrapped them
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 0
    assert "fast: channels-last, torch.compile (image trunk, text tower), fused SDPA attention, fused AdamW" in out
    assert "compile: the first warmup step took" in out and "compile: the first simclr step took" in out
    assert "non-finite check: in DeepSpeed's optimizer step" in out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss/total"] for m in metrics if "loss/total" in m]
    assert len(losses) == 3 and all(v == v for v in losses)
