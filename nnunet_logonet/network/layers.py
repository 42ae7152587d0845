"""Small building blocks shared by the LKA encoder, the conv decoder and the LoGoNet head.

Norms are built only from ``nn.BatchNorm3d`` / ``nn.InstanceNorm3d(affine=True)`` so that
``nn.SyncBatchNorm.convert_sync_batchnorm`` converts them for multi-GPU training, and
``LayerNorm3d`` permutes to channels-last, which is free for ``channels_last_3d`` tensors.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .arguments import positive_int
from .buffers import active_pool
from .conv import Conv3d
from .folding import conv_norm_act
from .training_buffers import PooledUpsample3d, pooled_upsample_pays

__all__ = [
    "NORMS",
    "check_norm",
    "make_norm",
    "ConvUnit",
    "LayerNorm3d",
    "LayerScale3d",
    "DropPath",
    "Upsample3d",
    "init_weights",
]

NORMS = ("batch", "instance")


def check_norm(norm: str) -> str:
    """Validate the ``norm`` keyword ('batch' as in the paper, 'instance' as nnU-Net uses)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    return norm


def make_norm(norm: str, channels: int) -> nn.Module:
    """A channel norm for 5-D tensors: ``BatchNorm3d`` or affine ``InstanceNorm3d``."""
    if check_norm(norm) == "batch":
        return nn.BatchNorm3d(channels)
    return nn.InstanceNorm3d(channels, affine=True)


class ConvUnit(nn.Sequential):
    """The paper's decoder "conv unit": Conv3d 3^3 -> norm -> LeakyReLU.

    The convolution has no bias because the norm right after it has its own shift; in eval mode
    a BatchNorm is folded into the convolution (``conv.fold_batchnorm``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, norm: str = "batch") -> None:
        super().__init__()
        in_channels, out_channels = positive_int(in_channels, "in_channels"), positive_int(out_channels, "out_channels")
        self.conv = Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm = make_norm(norm, out_channels)
        self.act = nn.LeakyReLU(negative_slope=1e-2, inplace=True)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``x``: a tensor, or the parts of a channel concatenation (convolved without building it)."""
        return conv_norm_act(self, self.conv, self.norm, self.act, x)


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor (the per-stage norm).

    Normalises in channels-last order (free for ``channels_last_3d`` input) and returns the
    memory format it was given, so a channels-first network does not silently switch layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last_3d)
        y = F.layer_norm(x.permute(0, 2, 3, 4, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        y = y.permute(0, 4, 1, 2, 3)
        return y if channels_last else y.contiguous()


class LayerScale3d(nn.Module):
    """Learnable per-channel scale of a residual branch (init 1e-2 in the paper)."""

    def __init__(self, channels: int, init_value: float = 1e-2) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1, 1).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (written here to avoid importing timm, 3 s and a warning)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Upsample3d(nn.Module):
    """Trilinear upsampling by a per-axis integer factor (the decoder's x2, or x1 on unpooled axes)."""

    def __init__(self, scale: Sequence[int]) -> None:
        super().__init__()
        self.scale = tuple(int(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == (1, 1, 1):
            return x
        scales = [float(s) for s in self.scale]
        shape = (*x.shape[:2], *(size * s for size, s in zip(x.shape[2:], self.scale)))
        pool = active_pool(x, shape)
        if pool is not None:  # inference: into a buffer the network reuses (buffers.py), same floats
            return torch._C._nn.upsample_trilinear3d(x, shape[2:], False, *scales, out=pool.take(shape))
        pool = pooled_upsample_pays(x, shape)
        if pool is not None:  # CPU training: the same, under autograd (training_buffers.py)
            return PooledUpsample3d.apply(pool, x, scales)
        return F.interpolate(x, scale_factor=scales, mode="trilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def init_weights(module: nn.Module) -> None:
    """VAN's initialisation: conv weights N(0, 2 / fan_out), zero biases, unit norms.

    Used as ``network.initialize`` (nnU-Net calls ``network.apply(network.initialize)``).
    Layer scales are left at their init value on purpose. Parameters on ``meta`` (networks built
    only to count shapes, as the planner does) hold no values and are skipped.
    """
    if any(p.is_meta for p in module.parameters(recurse=False)):
        return
    if isinstance(module, nn.Conv3d):
        fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm)):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
