"""Cutting a patch into LoGoNet's local sub-crops and stitching the local outputs back.

Both directions are one view + permute + copy (no Python loop), and keep the memory format of
the input (``channels_last_3d`` stays channels-last), so the local paths can later be run as one
batched computation on the stacked tiles.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["is_channels_last", "split_subcrops", "stitch_subcrops"]


def is_channels_last(x: torch.Tensor) -> bool:
    """True when a 5-D tensor is laid out ``channels_last_3d`` (and not also plain contiguous)."""
    return x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def split_subcrops(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (gd*gh*gw, B, C, D/gd, H/gh, W/gw); tile order is z-major (C order)."""
    b, c, d, h, w = x.shape
    gd, gh, gw = grid
    td, th, tw = d // gd, h // gh, w // gw
    if is_channels_last(x):
        t = x.permute(0, 2, 3, 4, 1).reshape(b, gd, td, gh, th, gw, tw, c)
        t = t.permute(1, 3, 5, 0, 2, 4, 6, 7).reshape(gd * gh * gw, b, td, th, tw, c)
        return t.permute(0, 1, 5, 2, 3, 4)
    t = x.reshape(b, c, gd, td, gh, th, gw, tw)
    return t.permute(2, 4, 6, 0, 1, 3, 5, 7).reshape(gd * gh * gw, b, c, td, th, tw)


def stitch_subcrops(tiles: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of ``split_subcrops``: (n, B, C, d, h, w) -> (B, C, d*gd, h*gh, w*gw)."""
    n, b, c, td, th, tw = tiles.shape
    gd, gh, gw = grid
    if tiles[0].is_contiguous(memory_format=torch.channels_last_3d) and not tiles[0].is_contiguous():
        t = tiles.permute(0, 1, 3, 4, 5, 2).reshape(gd, gh, gw, b, td, th, tw, c)
        t = t.permute(3, 0, 4, 1, 5, 2, 6, 7).reshape(b, gd * td, gh * th, gw * tw, c)
        return t.permute(0, 4, 1, 2, 3)
    t = tiles.reshape(gd, gh, gw, b, c, td, th, tw)
    return t.permute(3, 4, 0, 5, 1, 6, 2, 7).reshape(b, c, gd * td, gh * th, gw * tw)
