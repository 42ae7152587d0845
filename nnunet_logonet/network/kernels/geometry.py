"""Shape rules shared by the convolution kernels: 'same' padding, depthwise, channels-last rows."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["triple", "is_same_padding", "is_same_depthwise", "to_rows", "from_rows"]


def triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    """An int or a 3-sequence as a 3-tuple of ints (kernel, stride, padding, dilation)."""
    return (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)  # type: ignore[return-value]


def is_same_padding(weight: torch.Tensor, stride, padding, dilation) -> bool:
    """Stride 1, odd kernel, 'same' padding: output voxel v sees input voxels v + t, t the tap offset."""
    return all(s == 1 for s in stride) and all(
        k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in zip(weight.shape[2:], padding, dilation))


def is_same_depthwise(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Depthwise (multiplier 1), stride 1, odd kernel, 'same' padding: the flipped-kernel backward holds."""
    return (
        groups == x.shape[1] == weight.shape[0]
        and weight.shape[1] == 1
        and is_same_padding(weight, stride, padding, dilation)
    )


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B*D*H*W, C): a view for a channels-last tensor."""
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


def from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B*D*H*W, C) -> (B, C, D, H, W) with ``like``'s batch and spatial size, channels-last (a view)."""
    b, _, d, h, w = like.shape
    return rows.view(b, d, h, w, rows.shape[1]).permute(0, 4, 1, 2, 3)
