"""Overlapping patch embedding that opens every LKA encoder stage.

Conv3d(kernel k, stride s, padding k // 2) + norm, per axis: k = 7 for s = 4 (paper stage 1),
k = 3 for s = 2 (paper stages 2-4) and for s = 1 (unpooled axes of anisotropic plans; our choice,
see ``shapes.embedding_kernel``). Padding k // 2 maps a size divisible by s to exactly size / s.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .conv import Conv3d
from .folding import conv_norm
from .layers import make_norm
from .shapes import as_triple, embedding_kernel

__all__ = ["PatchEmbed3d"]


class PatchEmbed3d(nn.Module):
    """Strided convolution + norm that downsamples by ``stride`` and projects to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: Sequence[int], norm: str = "batch") -> None:
        super().__init__()
        self.stride = as_triple(stride, "patch embedding stride")
        kernel = embedding_kernel(self.stride)
        self.proj = Conv3d(
            in_channels, out_channels, kernel_size=kernel, stride=self.stride, padding=tuple(k // 2 for k in kernel)
        )
        self.norm = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm(self, self.proj, self.norm, x)
