"""Each loss term against a direct computation, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from unimlip_fast.config import LossConfig
from unimlip_fast.kernels.ops import REFERENCE_OPS
from unimlip_fast.objective import compute_terms, total_loss


def direct_infonce(img, txt, scale):
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    n, total = img.shape[0], 0.0
    for i in range(n):
        row = [math.exp(scale * float(img[i] @ txt[j])) for j in range(n)]
        col = [math.exp(scale * float(txt[i] @ img[j])) for j in range(n)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    return total / (2 * n)


def direct_ntxent_cross_view(za, zb, tau):
    """The paper's Eq. 2: each view against the N views of the other side."""
    za, zb = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    n, total = za.shape[0], 0.0
    for x, y in ((za, zb), (zb, za)):
        for i in range(n):
            sims = [math.exp(float(x[i] @ y[k]) / tau) for k in range(n)]
            total += -math.log(sims[i] / sum(sims))
    return total / (2 * n)


def direct_ntxent_all(za, zb, tau):
    """SLIP's: each view against the 2N - 1 other views of both sides."""
    z = F.normalize(torch.cat([za, zb]), dim=-1)
    n2, n = z.shape[0], za.shape[0]
    total = 0.0
    for i in range(n2):
        partner = (i + n) % n2
        sims = [math.exp(float(z[i] @ z[j]) / tau) for j in range(n2) if j != i]
        total += -math.log(math.exp(float(z[i] @ z[partner]) / tau) / sum(sims))
    return total / n2


def features(b=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return {
        "img": r(b, d),
        "txt": r(b, d),
        "img_perturbed": r(b, d),
        "txt_perturbed": r(b, d),
        "simclr_a": r(b, 4),
        "simclr_b": r(b, 4),
        "mlm_logits": r(9, 11),
        "mlm_targets": torch.randint(0, 11, (9,), generator=g),
        "logit_scale": torch.tensor([1 / 0.07], dtype=torch.float64),
    }


@pytest.mark.parametrize("scale", [1.0, 14.29, 100.0])
def test_itc_terms_match_direct(scale):
    f = features()
    f["logit_scale"] = torch.tensor([scale], dtype=torch.float64)
    terms = compute_terms(f, LossConfig(), REFERENCE_OPS)
    assert terms["itc"].item() == pytest.approx(direct_infonce(f["img"], f["txt"], scale), rel=1e-6)
    assert terms["itc_img_fp"].item() == pytest.approx(direct_infonce(f["img_perturbed"], f["txt"], scale), rel=1e-6)
    assert terms["itc_txt_fp"].item() == pytest.approx(direct_infonce(f["img"], f["txt_perturbed"], scale), rel=1e-6)


def test_simclr_matches_direct_ntxent():
    f = features()
    a, b = f["simclr_a"], f["simclr_b"]
    terms = compute_terms(f, LossConfig(simclr_tau=0.1), REFERENCE_OPS)  # the default: the paper's Eq. 2
    assert terms["simclr"].item() == pytest.approx(direct_ntxent_cross_view(a, b, 0.1), rel=1e-9)
    # Eq. 2 is symmetric InfoNCE between the views with the scale fixed at 1 / tau.
    assert direct_ntxent_cross_view(a, b, 0.1) == pytest.approx(direct_infonce(a, b, 1 / 0.1), rel=1e-12)
    terms = compute_terms(f, LossConfig(simclr_tau=0.1, simclr_negatives="all"), REFERENCE_OPS)
    assert terms["simclr"].item() == pytest.approx(direct_ntxent_all(a, b, 0.1), rel=1e-9)


def test_mlm_matches_direct_cross_entropy():
    f = features()
    logp = torch.log_softmax(f["mlm_logits"], dim=-1)
    direct = -logp[torch.arange(9), f["mlm_targets"]].mean().item()
    assert compute_terms(f, LossConfig(), REFERENCE_OPS)["mlm"].item() == pytest.approx(direct, rel=1e-5)


def test_weighted_total_and_switched_off_terms_are_absent():
    f = features()
    cfg = LossConfig(itc_txt_fp=0.0, mlm=0.0)
    terms = compute_terms(f, cfg, REFERENCE_OPS)
    assert set(terms) == {"itc", "itc_img_fp", "simclr"}
    expected = 0.167 * (terms["itc"] + terms["itc_img_fp"]) + 0.5 * terms["simclr"]
    assert total_loss(terms, cfg).item() == pytest.approx(expected.item())
    del f["simclr_a"], f["simclr_b"]  # warm-up phase: no strong views, no SimCLR term
    assert "simclr" not in compute_terms(f, LossConfig(), REFERENCE_OPS)


def test_logit_scale_receives_gradient():
    f = features()
    f["logit_scale"] = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
    compute_terms(f, LossConfig(), REFERENCE_OPS)["itc"].backward()
    assert f["logit_scale"].grad is not None and f["logit_scale"].grad.abs().item() > 0
