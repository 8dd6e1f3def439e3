"""The modified ResNet image encoder of CLIP and PMC-CLIP.

Differences from torchvision's ResNet: a stem of three 3x3 convolutions followed by an average
pool; anti-aliased strided blocks (an average pool before conv3 and on the downsample path instead
of a strided convolution); the last BatchNorm of each block initialised to zero; attention pooling
(a mean token attending over the flattened map, with learned positions) in place of global pooling.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class _Fp32StatsMixin:
    """BatchNorm that normalises in fp32 whatever the dtype of its input and parameters.

    DeepSpeed's bf16/fp16 modes cast the parameters but not the buffers, which leaves a bf16 weight
    beside fp32 running statistics; PyTorch's kernel refuses that mix. Here the statistics stay
    fp32 and the output takes the input's dtype. Matching dtypes take the stock path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.running_mean.dtype == self.weight.dtype:
            return super().forward(x)
        factor = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        out = F.batch_norm(
            x.float(),
            self.running_mean,
            self.running_var,
            self.weight.float(),
            self.bias.float(),
            self.training or not self.track_running_stats,
            factor or 0.0,
            self.eps,
        )
        return out.to(x.dtype)


class BatchNorm2d(_Fp32StatsMixin, nn.BatchNorm2d):
    pass


class BatchNorm1d(_Fp32StatsMixin, nn.BatchNorm1d):
    pass


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """A mean token, plus learned positions, attends over the flattened map (CLIP's QKV pooling)."""

    def __init__(self, spatial_dim: int, width: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, width) / width**0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, output_dim]
        n, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [N, HW + 1, C]
        x = x + self.positional_embedding.to(x.dtype)
        heads = lambda t: t.view(n, t.shape[1], self.num_heads, c // self.num_heads).transpose(1, 2)
        q, k, v = heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, C / heads]
        return self.c_proj(out.transpose(1, 2).reshape(n, c))


class ModifiedResNet(nn.Module):
    def __init__(self, layers: list[int], output_dim: int, heads: int = 0, image_size: int = 224, width: int = 64):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"model.image_size must be a multiple of 32, got {image_size}")
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        self.memory_format = torch.contiguous_format  # train.channels_last: torch.channels_last
        self.feature_dim = width * 32
        self.attnpool = AttentionPool2d(image_size // 32, self.feature_dim, heads or width * 32 // 64, output_dim)
        self._init_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_parameters(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                nn.init.zeros_(block.bn3.weight)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:  # [N, 3, H, W] -> [N, 32 * width, H / 32, W / 32]
        x = x.to(self.conv1.weight.dtype, memory_format=self.memory_format)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.trunk(x))


def set_batchnorm_stats_frozen(module: nn.Module, frozen: bool) -> None:
    """Frozen: BatchNorm normalises with, and no longer updates, its running mean and variance.

    The affine weight and bias still receive gradients. This is Uni-Mlip's SimCLR-phase freeze.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(module.training and not frozen)
