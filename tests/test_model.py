import math

import pytest
import torch

from unimlip_fast.data.masking import mlm_row_cap
from unimlip_fast.model import SIMCLR, WARMUP, build_model
from unimlip_fast.model.visual import Bottleneck, ModifiedResNet
from unimlip_fast.objective import compute_terms, total_loss


@pytest.fixture
def model(tiny_cfg, tiny_tokenizer):
    torch.manual_seed(0)
    return build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer).train()


def test_features_per_phase(model, tiny_batch):
    warm = model(tiny_batch, WARMUP)
    assert {"img", "img_perturbed", "txt", "txt_perturbed", "mlm_logits", "mlm_targets", "logit_scale"} == set(warm)
    simclr = model(tiny_batch, SIMCLR)
    assert simclr["simclr_a"].shape == (6, 16) and simclr["simclr_b"].shape == (6, 16)
    assert warm["img"].shape == warm["txt"].shape == (6, 32)
    # A fixed number of rows (the masking's cap per caption), the masked ones first: one per caption here.
    rows = 6 * mlm_row_cap(tiny_batch["mlm_labels"].shape[1])
    assert simclr["mlm_logits"].shape == (rows, model.fusion.head.out_features)
    targets = simclr["mlm_targets"]
    assert torch.equal(targets[:6], tiny_batch["mlm_labels"][:, 2]) and (targets[6:] == -100).all()
    assert simclr["logit_scale"].shape == (1,)


def _bn_snapshot(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def test_simclr_phase_freezes_batchnorm_statistics_but_not_affine(model, tiny_batch, tiny_cfg):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before_stats = _bn_snapshot(model.visual)
    before_affine = model.visual.bn1.weight.detach().clone()
    loss = total_loss(compute_terms(model(tiny_batch, SIMCLR), tiny_cfg.loss, model.ops), tiny_cfg.loss)
    loss.backward()
    opt.step()
    after = _bn_snapshot(model.visual)
    assert all(torch.equal(before_stats[n], after[n]) for n in before_stats), "running statistics moved"
    assert not torch.equal(before_affine, model.visual.bn1.weight), "affine weights must still learn"
    # The SimCLR head's own BatchNorm is not part of the image encoder: it keeps learning statistics.
    assert model.simclr_head.net[1].training


def test_warmup_phase_updates_batchnorm_statistics(model, tiny_batch):
    before = _bn_snapshot(model.visual)
    model(tiny_batch, WARMUP)
    after = _bn_snapshot(model.visual)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_freeze_can_be_disabled(tiny_cfg, tiny_tokenizer, tiny_batch):
    tiny_cfg.loss.freeze_bn_stats = False
    model = build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer).train()
    before = _bn_snapshot(model.visual)
    model(tiny_batch, SIMCLR)
    assert any(not torch.equal(before[n], b) for n, b in _bn_snapshot(model.visual).items())


def test_switched_off_terms_build_no_heads(tiny_cfg, tiny_tokenizer, tiny_batch):
    tiny_cfg.loss.simclr = tiny_cfg.loss.mlm = tiny_cfg.loss.itc_img_fp = 0.0
    model = build_model(tiny_cfg.model, tiny_cfg.loss, tiny_tokenizer)
    assert model.simclr_head is None and model.fusion is None
    assert set(model(tiny_batch, SIMCLR)) == {"img", "txt", "txt_perturbed", "logit_scale"}


def test_text_embedding_uses_attention_mask_and_cls_position(model, tiny_tokenizer):
    model.eval()
    ids = tiny_tokenizer(["ct of the head"], padding="max_length", max_length=24, return_tensors="pt")
    a = model.encode_text(ids["input_ids"], ids["attention_mask"])
    noisy = ids["input_ids"].clone()
    noisy[ids["attention_mask"] == 0] = 7  # garbage under the padding must not matter
    b = model.encode_text(noisy, ids["attention_mask"])
    torch.testing.assert_close(a, b)
    # The [CLS] state is taken where the tokenizer put [CLS], not at a hard-coded id or index.
    shifted = torch.cat([torch.tensor([[tiny_tokenizer.pad_token_id]]), ids["input_ids"][:, :-1]], dim=1)
    mask = torch.cat([torch.zeros(1, 1, dtype=torch.long), ids["attention_mask"][:, :-1]], dim=1)
    states, sentence = model.text(shifted, mask)
    torch.testing.assert_close(sentence, states[:, 1])


def test_logit_scale_init_and_no_clamp_in_forward(model):
    """The trainer clamps the parameter after each step (tests/test_replicas.py); the forward
    pass only exponentiates it, so its gradient is never cut."""
    assert model.logit_scale.shape == (1,)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)
    assert model.scale().item() == pytest.approx(math.exp(5.0), rel=1e-6)


def test_modified_resnet_architecture():
    net = ModifiedResNet([3, 4, 6, 3], output_dim=768, image_size=224, width=64)
    assert [m.kernel_size for m in (net.conv1, net.conv2, net.conv3)] == [(3, 3)] * 3
    assert isinstance(net.avgpool, torch.nn.AvgPool2d)
    strided = net.layer2[0]
    assert isinstance(strided.avgpool, torch.nn.AvgPool2d) and strided.conv2.stride == (1, 1)
    assert isinstance(strided.downsample[0], torch.nn.AvgPool2d)
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in net.modules() if isinstance(b, Bottleneck))
    assert net.attnpool.positional_embedding.shape == (7 * 7 + 1, 2048)
    assert 37e6 < sum(p.numel() for p in net.parameters()) < 39e6  # CLIP's RN50 visual at embed 768
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 768)


def test_strong_views_fed_without_simclr_reach_the_batchnorm_statistics(tiny_cfg, tiny_tokenizer, tiny_batch):
    """data.strong_views=on with loss.simclr=0: no SimCLR features, but the strong views go through
    the image encoder, so unfrozen statistics see them (Table 3's views-without-SimCLR row)."""
    from unimlip_fast.config import load_config

    from .helpers import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES + ["loss.simclr=0", "loss.freeze_bn_stats=false", "data.strong_views=on"])
    stats = []
    for batch in ({k: v for k, v in tiny_batch.items() if k not in ("image_a", "image_b")}, tiny_batch):
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.loss, tiny_tokenizer).train()
        features = model(batch, SIMCLR)
        assert "simclr_a" not in features and features["img"].shape[0] == 6
        stats.append(model.visual.bn1.running_mean.clone())
    assert not torch.allclose(stats[0], stats[1])
