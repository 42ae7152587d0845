"""Cutting a patch into LoGoNet's local sub-crops and stitching the local outputs back.

Both directions are one view + permute + copy (no Python loop), and keep the memory format of
the input (``channels_last_3d`` stays channels-last), so the local paths can later be run as one
batched computation on the stacked tiles.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

__all__ = ["is_channels_last", "split_subcrops", "stitch_subcrops", "subcrop_views", "add_subcrops", "add_subcrops_"]


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


def subcrop_views(x: torch.Tensor, grid: Sequence[int]) -> list[torch.Tensor]:
    """The sub-crops of ``x`` (B, C, D, H, W) as views into it, in ``split_subcrops``' order (z-major)."""
    sizes = [n // g for n, g in zip(x.shape[2:], grid)]
    return [x[(slice(None), slice(None), *(slice(i * s, (i + 1) * s) for i, s in zip(index, sizes)))]
            for index in itertools.product(*(range(g) for g in grid))]


def add_subcrops(base: torch.Tensor, tiles: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
    """``base + stitch_subcrops(torch.stack(tiles), grid)`` in one pass, as a new tensor, with autograd.

    Every tile is added to its region of ``base`` straight into the result (``base``'s layout), so
    neither the stacked tiles nor the stitched tensor is built: at 64^3, batch 2, the 16-channel
    full-resolution features of LoGoNet-S's local paths are 33 MB, and those were two copies (plus
    their page faults) per training step. The backward hands ``base`` the incoming gradient and
    each tile its region of it (views, no copy). The same additions, so the same floats.
    """
    return _AddSubcrops.apply(base, tuple(grid), *tiles)


def add_subcrops_(out: torch.Tensor, tiles: Sequence[torch.Tensor], grid: Sequence[int]) -> torch.Tensor:
    """``out += stitch_subcrops(torch.stack(tiles), grid)`` in place, tile by tile into its region (no
    autograd: inference); returns ``out``."""
    for region, tile in zip(subcrop_views(out, grid), tiles):
        region.add_(tile)
    return out


class _AddSubcrops(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, grid, *tiles):  # type: ignore[override]
        ctx.grid = grid
        out = torch.empty_like(base)
        for target, region, tile in zip(subcrop_views(out, grid), subcrop_views(base, grid), tiles):
            torch.add(region, tile, out=target)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        return (grad, None, *subcrop_views(grad, ctx.grid))
