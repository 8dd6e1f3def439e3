"""Symmetric image-text InfoNCE with a learnable logit scale.

This file holds the plain-PyTorch reference: the test oracle for the fused kernel and the
fallback where Triton cannot run.

Shapes: the rows are this rank's features, the columns the features of the global batch
(all ranks gathered, this rank's included, in rank order). Row ``i`` is the positive of
column ``row_offset + i``. With one process, rows and columns are the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def infonce_reference(
    img: torch.Tensor,  # [B, D] L2-normalised image features (local rows)
    txt: torch.Tensor,  # [B, D] L2-normalised text features (local rows)
    scale: torch.Tensor,  # [1] logit scale, already exponentiated
    img_all: torch.Tensor | None = None,  # [N, D] gathered image features (columns)
    txt_all: torch.Tensor | None = None,  # [N, D] gathered text features (columns)
    row_offset: int = 0,
) -> torch.Tensor:
    """Mean over local rows of (CE(image -> texts) + CE(text -> images)) / 2, in at least fp32
    (float64 inputs stay float64: the tests' exact oracle)."""
    img_all = img if img_all is None else img_all
    txt_all = txt if txt_all is None else txt_all
    targets = torch.arange(img.shape[0], device=img.device) + row_offset
    acc = torch.promote_types(img.dtype, torch.float32)
    scale = scale.to(acc)
    logits_per_image = scale * (img.to(acc) @ txt_all.to(acc).T)
    logits_per_text = scale * (txt.to(acc) @ img_all.to(acc).T)
    return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets))


def itc_terms_reference(
    imgs: Sequence[torch.Tensor],  # K x [B, D] local image rows, one per term
    txts: Sequence[torch.Tensor],  # K x [B, D] local text rows
    scale: torch.Tensor,  # [1] shared logit scale, already exponentiated
    imgs_all: Sequence[torch.Tensor] | None = None,  # K x [N, D] gathered image columns
    txts_all: Sequence[torch.Tensor] | None = None,  # K x [N, D] gathered text columns
    row_offset: int = 0,
) -> torch.Tensor:
    """[K] InfoNCE losses, term k on (imgs[k], txts[k]): the composition the fused op must match."""
    imgs_all = imgs if imgs_all is None else imgs_all
    txts_all = txts if txts_all is None else txts_all
    return torch.stack(
        [infonce_reference(i, t, scale, ia, ta, row_offset) for i, t, ia, ta in zip(imgs, txts, imgs_all, txts_all)]
    )
