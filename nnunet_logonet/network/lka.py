"""3D Large Kernel Attention (LKA) and the LKA block of ULKANet's encoder.

LKA (Guo et al., "Visual Attention Network", 2022) approximates a ~21^3 kernel by a depthwise
5^3 conv, a depthwise 7^3 conv with dilation 3 and a 1x1x1 conv; its output gates the input.
The block follows Algorithm 2 of Masked LoGoNet (Karimi Monsefi et al., KDD 2024):
``x = x + ls1 * attn(norm1(x)); x = x + ls2 * mlp(norm2(x))``. The authors' research code adds
the branch to itself instead of to ``x`` (``x + drop_path(x)``); that is not reproduced.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arguments import positive_int, real_number
from .conv import Conv3d, conv3d
from .folding import conv_act, fold_lka_block, foldable_lka_block, lka_block_folded
from .layers import DropPath, LayerScale3d, make_norm

__all__ = ["LiveTapConv3d", "live_taps", "LKA3d", "LKAAttention", "LKAMlp", "LKABlock"]


class LiveTapConv3d(Conv3d):
    """Stride-1 'same' depthwise convolution that skips taps which can only ever see padding.

    On a map smaller than the (dilated) kernel, e.g. the 19^3 footprint of LKA's 7^3 dilation-3
    convolution on a 3^3 bottleneck, the outer taps multiply zeros for every output voxel. They
    are sliced off the weight before the call: the output and all gradients are exactly those
    of the full convolution (the dropped taps' true gradient is zero), the state-dict is
    unchanged, and CPU kernels avoid their pathological huge-padding paths.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps, padding = live_taps(self.kernel_size, x.shape[2:], self.dilation)
        if taps is None:
            return super().forward(x)
        weight = self.weight[(slice(None), slice(None), *taps)]
        return conv3d(x, weight, self.bias, 1, padding, self.dilation, self.groups)


def live_taps(kernel_size: Sequence[int], size: Sequence[int], dilation: Sequence[int]
              ) -> tuple[tuple[slice, ...] | None, tuple[int, ...]]:
    """(kernel slices that can see data, their 'same' padding); slices ``None`` when all taps can."""
    radius = [min(k // 2, (n - 1) // d) for k, n, d in zip(kernel_size, size, dilation)]
    padding = tuple(r * d for r, d in zip(radius, dilation))
    if all(r == k // 2 for r, k in zip(radius, kernel_size)):
        return None, padding
    return tuple(slice(k // 2 - r, k // 2 + r + 1) for r, k in zip(radius, kernel_size)), padding


class LKA3d(nn.Module):
    """depthwise 5^3 -> depthwise 7^3 (dilation 3) -> 1x1x1; the result multiplies the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        dim = positive_int(dim, "dim")
        self.conv0 = LiveTapConv3d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.conv_spatial = LiveTapConv3d(dim, dim, kernel_size=7, padding=9, dilation=3, groups=dim)
        self.conv1 = Conv3d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv1(self.conv_spatial(self.conv0(x)))


class LKAAttention(nn.Module):
    """Attention branch: 1x1 -> GELU -> LKA3d -> 1x1, with its own inner shortcut."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj_1 = Conv3d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.lka = LKA3d(dim)
        self.proj_2 = Conv3d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj_2(self.lka(conv_act(self.proj_1, self.act, x)))


class LKAMlp(nn.Module):
    """MLP branch: 1x1 expand -> depthwise 3^3 -> GELU -> 1x1 back."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = Conv3d(dim, hidden_dim, kernel_size=1)
        self.dwconv = Conv3d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Conv3d(hidden_dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(conv_act(self.dwconv, self.act, self.fc1(x)))


class LKABlock(nn.Module):
    """Transformer-like block with LKA instead of self-attention (paper Algorithm 2)."""

    def __init__(
        self,
        dim: int,
        *,
        mlp_ratio: float = 4.0,
        norm: str = "batch",
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-2,
    ) -> None:
        super().__init__()
        dim = positive_int(dim, "dim")
        hidden = int(dim * real_number(mlp_ratio, "mlp_ratio", minimum=0.0, exclusive_minimum=True))
        if hidden < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio!r} gives a {dim}-channel block an MLP of int({dim} * {mlp_ratio}) "
                             f"= 0 channels; it must be at least 1 / {dim}")
        drop_path = real_number(drop_path, "drop_path", minimum=0.0, maximum=1.0, exclusive_maximum=True)
        self.norm1 = make_norm(norm, dim)
        self.attn = LKAAttention(dim)
        self.ls1 = LayerScale3d(dim, layer_scale_init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = make_norm(norm, dim)
        self.mlp = LKAMlp(dim, hidden)
        self.ls2 = LayerScale3d(dim, layer_scale_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if foldable_lka_block(self):  # eval: norms and layer scales inside the 1x1x1 convolutions (folding.py)
            mlp = self.mlp
            return lka_block_folded(x, fold_lka_block(self), self.attn.lka,
                                    lambda h: conv_act(mlp.dwconv, mlp.act, h))
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
