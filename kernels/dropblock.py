"""DropBlock (Ghiasi et al., 2018) on a feature map.

Plain-PyTorch reference (test oracle and fallback). Block centres are drawn where a whole
block fits, with the seed rate gamma = p / b^2 * HW / ((H - b + 1)(W - b + 1)), then dilated
to b x b blocks. Normalisation is by the kept fraction of the whole tensor (Ghiasi's
reference and timm): out = x * mask * numel(mask) / sum(mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dropblock_gamma(p: float, block_size: int, height: int, width: int) -> float:
    """Seed rate that drops a fraction ``p`` of the map in expectation."""
    fits = (height - block_size + 1) * (width - block_size + 1)
    return p / block_size**2 * (height * width) / fits


def dropblock_mask_reference(noise: torch.Tensor, p: float, block_size: int) -> torch.Tensor:
    """Block mask [N, C, H, W] (1 kept, 0 dropped) from uniform noise of the same shape."""
    _, _, h, w = noise.shape
    b = min(block_size, h, w)
    b -= 1 - b % 2  # a map smaller than the block takes the largest odd block that fits
    gamma = dropblock_gamma(p, b, h, w)
    half = b // 2
    centres = torch.zeros(h, w, dtype=torch.bool, device=noise.device)
    centres[half : h - half, half : w - half] = True
    seeds = ((noise < gamma) & centres).to(noise.dtype)
    return 1.0 - F.max_pool2d(seeds, kernel_size=b, stride=1, padding=half)


def dropblock_reference(
    x: torch.Tensor,  # [N, C, H, W]
    p: float,
    block_size: int,
    noise: torch.Tensor | None = None,  # [N, C, H, W] uniform in [0, 1); drawn if None
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if p <= 0.0:
        return x
    if noise is None:
        noise = torch.rand(x.shape, device=x.device, generator=generator)
    mask = dropblock_mask_reference(noise.float(), p, block_size)
    scale = mask.numel() / mask.sum().clamp_min(1.0)
    return x * (mask * scale).to(x.dtype)
