"""The GPU path's hygiene without a GPU: every parameter, buffer and batch tensor on torch's ``meta`` device.

An op mixing a meta tensor with one made on the CPU by default fails, and so does a host sync (``.item()``,
``bool(t)``, ``.tolist()``): each names its line. Covered: the pretraining step of both phases (model, the five
terms through the reference ops, DropBlock, MLM, AdamW), both passes of the contrastive-exact accumulation,
the fine-tuning steps (classification, VQA), the embed/encode path and retrieval's scoring; the fused
ops as the custom ops ``unimlip::contrastive`` and ``unimlip::dropblock``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unimlip_fast.config import load_config
from unimlip_fast.eval.retrieval import positive_pairs, ranks_of_positives
from unimlip_fast.finetune.classify import ImageClassifier, masked_bce
from unimlip_fast.finetune.vqa import VQAModel
from unimlip_fast.kernels.ops import REFERENCE_OPS, triton_ops
from unimlip_fast.model import SIMCLR, WARMUP, build_model, build_tokenizer
from unimlip_fast.objective import compute_terms, total_loss
from unimlip_fast.train.accumulate import GradientAccumulator
from unimlip_fast.train.schedule import build_optimizer

from .helpers import CAPTIONS, TINY_OVERRIDES

META = torch.device("meta")


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, [*TINY_OVERRIDES, "train.batch_size=8", "train.micro_batch_size=4"])


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, build_tokenizer(cfg.model.text, CAPTIONS)).to(META).train()
    assert all(t.device == META for t in [*model.parameters(), *model.buffers()])
    return model


def meta_batch(cfg, b: int = 8) -> dict[str, torch.Tensor]:
    size, length = cfg.model.image_size, cfg.model.text.context_length
    batch = {k: torch.empty(b, 3, size, size, device=META) for k in ("image", "image_a", "image_b")}
    for key in ("input_ids", "attention_mask", "mlm_labels"):
        batch[key] = torch.empty(b, length, dtype=torch.long, device=META)
    return batch


@pytest.mark.parametrize("ops", ["reference", "triton"])
@pytest.mark.parametrize("phase", [WARMUP, SIMCLR])
def test_pretraining_step_on_meta(cfg, model, phase, ops):
    """With the fused ops too: ``unimlip::contrastive`` and ``unimlip::dropblock`` run on meta by their fake
    implementations, forward and the registered backward."""
    model.ops = triton_ops() if ops == "triton" else REFERENCE_OPS
    optimizer = build_optimizer(model, cfg.train, META)
    terms = compute_terms(model(meta_batch(cfg), phase), cfg.loss, model.ops)
    assert set(terms) == ({"itc", "itc_img_fp", "itc_txt_fp", "mlm"} | ({"simclr"} if phase == SIMCLR else set()))
    loss = total_loss(terms, cfg.loss)
    assert loss.device == META
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > len(list(model.parameters())) // 2 and all(g.device == META for g in grads)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class MetaEngine:
    """What GradientAccumulator uses of a DeepSpeed engine: the call, backward, and a step per micro-batch."""

    def __init__(self, model, optimizer, micro_batches: int):
        self.module, self.optimizer, self.micro_batches, self.steps = model, optimizer, micro_batches, 0

    def __call__(self, batch, phase):
        return self.module(batch, phase)

    def backward(self, loss, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.micro_batches == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("phase", [WARMUP, SIMCLR])
def test_accumulated_step_on_meta(cfg, model, phase):
    engine = MetaEngine(model, build_optimizer(model, cfg.train, META), micro_batches=2)
    accumulator = GradientAccumulator(engine, cfg, REFERENCE_OPS, 4, META, 1)
    terms, loss = accumulator.forward(meta_batch(cfg), phase)
    assert loss.device == META and terms["mlm"].device == META
    accumulator.backward()
    engine.step()
    assert engine.steps == 2


def test_classification_step_on_meta(cfg, model):
    classifier = ImageClassifier(model.visual, cfg.model.embed_dim, 5).to(META)
    optimizer = torch.optim.AdamW(classifier.parameters())
    logits = classifier(torch.empty(4, 3, 64, 64, device=META))
    loss = masked_bce(logits, torch.empty(4, 5, device=META))
    loss.backward()
    optimizer.step()


def test_vqa_step_on_meta(cfg, model):
    vqa = VQAModel(model, n_answers=7, image_size=cfg.model.image_size).to(META)
    optimizer = torch.optim.AdamW(vqa.parameters())
    length = cfg.model.text.context_length
    ids = torch.empty(4, length, dtype=torch.long, device=META)
    logits = vqa(torch.empty(4, 3, 64, 64, device=META), ids, torch.empty_like(ids))
    F.cross_entropy(logits, torch.empty(4, dtype=torch.long, device=META)).backward()
    optimizer.step()


def test_encode_and_retrieval_scoring_on_meta(cfg, model):
    model.eval()
    with torch.no_grad():
        batch = meta_batch(cfg, 6)
        img = F.normalize(model.encode_image(batch["image"]).float(), dim=-1)
        txt = F.normalize(model.encode_text(batch["input_ids"], batch["attention_mask"]).float(), dim=-1)
    ranks = ranks_of_positives(img @ txt.T, positive_pairs(CAPTIONS[:6], device=META))
    assert ranks.shape == (6,) and ranks.device == META


def test_masked_bce_matches_the_selected_mean():
    logits, target = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    target[0, 1] = target[2, 3] = float("nan")
    known = ~torch.isnan(target)
    expected = F.binary_cross_entropy_with_logits(logits[known], target[known])
    assert torch.allclose(masked_bce(logits, target), expected)
    assert masked_bce(logits, torch.full_like(target, float("nan"))) == 0


def test_fused_dropblock_is_one_custom_op_with_fake_and_autograd():
    """``unimlip::dropblock``: on meta through its fake implementation (forward and the registered backward);
    opcheck runs the real kernel against the fake shapes and the autograd registration."""
    from unimlip_fast.kernels.dropblock_triton import dropblock_triton

    x = torch.empty(2, 4, 7, 7, device=META, requires_grad=True)
    dropblock_triton(x, 0.5, 3, seed=1).sum().backward()
    assert x.grad.device == META and x.grad.shape == x.shape
    assert torch.ops.unimlip.dropblock.default is not None


@pytest.mark.interpreter
def test_fused_dropblock_opcheck():
    from unimlip_fast.kernels.dropblock_triton import dropblock_op

    torch.library.opcheck(dropblock_op, (torch.randn(2, 4, 7, 7, requires_grad=True), 0.5, 3, torch.tensor([1]), 0))
