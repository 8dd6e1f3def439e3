"""The five Uni-Mlip loss terms, returned by name.

Contrastive terms are global-batch losses: each rank's features are all-gathered with gradients,
the rank's rows are scored against every column, and the trainer's gradient averaging across ranks
then yields exactly the gradient of the single-process loss on the concatenated batch.
A term switched off (weight 0, or not in this phase) is absent from the dict, not zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import LossConfig
from .kernels.ops import LossOps

TERMS = ("itc", "itc_img_fp", "itc_txt_fp", "simclr", "mlm")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [world * B, D] in rank order; gradients flow back to every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def _row_offset(batch_size: int) -> int:
    return dist.get_rank() * batch_size if dist.is_available() and dist.is_initialized() else 0


def compute_terms(features: dict[str, torch.Tensor], cfg: LossConfig, ops: LossOps) -> dict[str, torch.Tensor]:
    terms: dict[str, torch.Tensor] = {}
    scale = features["logit_scale"]
    img, txt = F.normalize(features["img"], dim=-1), F.normalize(features["txt"], dim=-1)
    offset = _row_offset(img.shape[0])
    img_all, txt_all = gather_with_grad(img), gather_with_grad(txt)
    # The (up to) three ITC terms go to one call, so the fused kernel can share the feature loads.
    pairs = {}
    if cfg.itc > 0:
        pairs["itc"] = (img, txt, img_all, txt_all)
    if cfg.itc_img_fp > 0 and "img_perturbed" in features:
        img_fp = F.normalize(features["img_perturbed"], dim=-1)
        pairs["itc_img_fp"] = (img_fp, txt, gather_with_grad(img_fp), txt_all)
    if cfg.itc_txt_fp > 0 and "txt_perturbed" in features:
        txt_fp = F.normalize(features["txt_perturbed"], dim=-1)
        pairs["itc_txt_fp"] = (img, txt_fp, img_all, gather_with_grad(txt_fp))
    if pairs:
        rows_i, rows_t, cols_i, cols_t = zip(*pairs.values())
        losses = ops.itc_terms(list(rows_i), list(rows_t), scale, list(cols_i), list(cols_t), offset)
        terms.update(zip(pairs, losses.unbind(0)))
    if cfg.simclr > 0 and "simclr_a" in features:
        za, zb = F.normalize(features["simclr_a"], dim=-1), F.normalize(features["simclr_b"], dim=-1)
        terms["simclr"] = ops.ntxent(
            za, zb, cfg.simclr_tau, gather_with_grad(za), gather_with_grad(zb), offset, negatives=cfg.simclr_negatives
        )
    if cfg.mlm > 0 and "mlm_logits" in features:
        terms["mlm"] = mlm_loss(features["mlm_logits"], features["mlm_targets"])
    return terms


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE over this rank's masked tokens (targets of -100 are padding rows), their mean (or
    ``reduction="sum"``: a micro-batch's share of the batch's mean, before the division). None masked
    contributes 0, with grad. No host sync: the count stays a tensor."""
    summed = F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=-100)
    if reduction == "sum":
        return summed
    return summed / (targets >= 0).sum().clamp_min(1)


def weights(cfg: LossConfig) -> dict[str, float]:
    return {name: getattr(cfg, name) for name in TERMS}


def total_loss(terms: dict[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    w = weights(cfg)
    return sum(w[name] * value for name, value in terms.items())
