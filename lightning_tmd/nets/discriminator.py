"""The stage-2 discriminator: one Conv3D head per chosen teacher block, each reading that block's
unpatchified hidden state (`WanNet.block_features`) of a noised real or fake clip (Table 3;
docs/method.md §Stage 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ShrinkingConv3d(nn.Conv3d):
    """A Conv3d whose stride applies along an axis only while the input is at least twice the stride long
    there, so a stack of them never shrinks an axis of 2 or more below 2 voxels. At Wan's feature sizes
    (21 x 60 x 104 at 1.3B) every stride applies; at small sizes a 1-voxel map would leave the GroupNorm
    after it one value per group, normalised to zero, and the head would output a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = tuple(s if size >= 2 * s else 1 for s, size in zip(self.stride, x.shape[2:]))
        return F.conv3d(x, self.weight, self.bias, stride, self.padding)


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups of at least two channels each (at most `max_groups`)."""
    return max(1, math.gcd(max_groups, channels // 2))


def conv_block(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Sequential:
    """ShrinkingConv3d -> GroupNorm -> LeakyReLU(0.2), padding 1 on every axis."""
    return nn.Sequential(ShrinkingConv3d(cin, cout, kernel, stride, padding=1),
                         nn.GroupNorm(group_count(cout), cout), nn.LeakyReLU(0.2))


class Conv3DHead(nn.Module):
    """Joint 3-D convolutions that halve time after the first layer and space at every layer (while an
    axis is long enough, see `ShrinkingConv3d`), global average pooling, then an MLP to one logit:
    (B, C, T, H, W) -> (B,)."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int] = (256, 512, 512), mlp_width: int = 256) -> None:
        super().__init__()
        c2, c3, c4 = widths
        self.convs = nn.Sequential(
            conv_block(in_channels, c2, (3, 4, 4), (1, 2, 2)),
            conv_block(c2, c3, (3, 4, 4), (2, 2, 2)),
            conv_block(c3, c4, (3, 3, 3), (2, 2, 2)),
            conv_block(c4, c4, (3, 3, 3), (2, 2, 2)),
        )
        self.mlp = nn.Sequential(nn.Linear(c4, mlp_width), nn.LeakyReLU(0.2), nn.Linear(mlp_width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.convs(features).mean(dim=(2, 3, 4))
        return self.mlp(pooled).squeeze(1)


class Discriminator(nn.Module):
    """One `Conv3DHead` per teacher block in `blocks` (1-based, as `WanNet.block_features` takes them).

    `in_channels` is the teacher's width divided by its patch volume (D / (pt ph pw)).
    """

    def __init__(self, blocks: list[int], in_channels: int, widths: tuple[int, int, int] = (256, 512, 512),
                 mlp_width: int = 256) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("discriminator blocks: give at least one teacher block index")
        self.blocks = list(blocks)
        self.heads = nn.ModuleList(Conv3DHead(in_channels, tuple(widths), mlp_width) for _ in self.blocks)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, number of heads) from the block features, in the order of `blocks`."""
        if len(features) != len(self.heads):
            raise ValueError(f"got {len(features)} feature maps for {len(self.heads)} discriminator heads")
        return torch.stack([head(f.float()) for head, f in zip(self.heads, features)], dim=1)
