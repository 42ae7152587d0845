"""ULKANet's encoder: a full-resolution conv stem and four LKA stages.

Each stage = patch embedding, ``depth`` LKA blocks, LayerNorm over channels (VAN / timm
``pvt_v2`` layout, so checkpoint keys read ``stages.<i>.downsample|blocks|norm``). The stem
(input -> 32 -> 64 conv units in the paper) is kept at full resolution for the decoder's last
concatenation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arguments import int_list, positive_int
from .embedding import PatchEmbed3d
from .layers import ConvUnit, LayerNorm3d
from .lka import LKABlock
from .shapes import Triple

__all__ = ["LKAStage", "ULKAEncoder"]


class LKAStage(nn.Module):
    """Patch embedding -> LKA blocks -> LayerNorm."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        *,
        stride: Sequence[int],
        depth: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        norm: str = "batch",
        layer_scale_init: float = 1e-2,
    ) -> None:
        super().__init__()
        self.downsample = PatchEmbed3d(in_channels, dim, stride=stride, norm=norm)
        self.blocks = nn.Sequential(
            *[
                LKABlock(dim, mlp_ratio=mlp_ratio, norm=norm, drop_path=drop_path[j], layer_scale_init=layer_scale_init)
                for j in range(depth)
            ]
        )
        self.norm = LayerNorm3d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.downsample(x)))


class ULKAEncoder(nn.Module):
    """Stem + LKA stages. ``forward`` returns the stem output and one feature map per stage.

    Args:
        input_channels: image channels.
        embed_strides: per-stage patch-embedding strides (``shapes.embedding_strides``).
        dims, depths, mlp_ratios: per-stage width, number of LKA blocks, MLP expansion.
        stem_channels: widths of the full-resolution conv units.
        drop_path_rate: stochastic depth, linearly increasing from 0 over all blocks.
    """

    def __init__(
        self,
        input_channels: int,
        *,
        embed_strides: Sequence[Triple],
        dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratios: Sequence[float],
        stem_channels: Sequence[int],
        norm: str = "batch",
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-2,
    ) -> None:
        super().__init__()
        input_channels = positive_int(input_channels, "input_channels")
        dims = int_list(dims, "dims")
        depths = int_list(depths, "depths", length=len(dims))
        for name, values in (("embed_strides", embed_strides), ("mlp_ratios", mlp_ratios)):
            if len(values) != len(dims):
                raise ValueError(f"{name} must have one entry per stage ({len(dims)}, as dims), got {len(values)}: "
                                 f"{values!r}")
        widths = [input_channels, *int_list(stem_channels, "stem_channels")]
        self.stem = nn.Sequential(*[ConvUnit(a, b, norm=norm) for a, b in zip(widths[:-1], widths[1:])])
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start, in_channels = [], 0, input_channels
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stages.append(
                LKAStage(
                    in_channels,
                    dim,
                    stride=embed_strides[i],
                    depth=depth,
                    mlp_ratio=mlp_ratios[i],
                    drop_path=rates[start : start + depth],
                    norm=norm,
                    layer_scale_init=layer_scale_init,
                )
            )
            start, in_channels = start + depth, dim
        self.stages = nn.ModuleList(stages)
        self.stem_channels = widths[-1]
        self.output_channels = tuple(dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.stem(x), self.forward_stages(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One feature map per LKA stage. The stages start from the input, not from the stem, whose output
        only the decoder's last units read (so the two are independent; benchmark/path_balance.py)."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
