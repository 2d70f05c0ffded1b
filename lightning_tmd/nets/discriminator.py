"""The stage-2 discriminator: one Conv3D head per chosen teacher block, each reading that block's
unpatchified hidden state (`WanNet.block_features`) of a noised real or fake clip (METHOD §4.1)."""

from __future__ import annotations

import math

import torch
from torch import nn


def conv_block(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int],
               max_groups: int = 32) -> nn.Sequential:
    """Conv3d -> GroupNorm -> LeakyReLU(0.2), padding 1 on every axis."""
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, padding=1),
                         nn.GroupNorm(math.gcd(max_groups, cout), cout), nn.LeakyReLU(0.2))


class Conv3DHead(nn.Module):
    """Joint 3-D convolutions that halve time after the first layer and space at every layer, global
    average pooling, then an MLP to one logit: (B, C, T, H, W) -> (B,)."""

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
