"""Spacing-aware strides and patch sizes for LoGoNet, in nnU-Net's conventions.

nnU-Net chooses how often to halve each axis from the voxel spacing (an axis is only pooled while
its spacing is within 2x of the finest one) and from the feature-map size left at the bottleneck.
LoGoNet always has 5 downsampling steps (stage-1 patch embedding = 2 of them, then 3 stages), so
here the number of steps is fixed and each step decides per axis whether it halves or keeps
that axis. The result is the per-resolution stride list that ``LoGoNet(strides=...)`` takes and
from which nnU-Net derives its deep-supervision scales.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunet_logonet.network import required_patch_multiple

#: Downsampling steps of ULKANet: stage-1 patch embedding (stride 4 = two steps) + 3 stages.
NUM_DOWNSAMPLING_STEPS = 5


def plan_strides(spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = 2,
                 num_steps: int = NUM_DOWNSAMPLING_STEPS) -> list[list[int]]:
    """Per-resolution strides (first entry ``[1, 1, 1]``) following nnU-Net's anisotropy rule.

    At each step an axis is halved when (a) its current spacing is less than twice the finest
    current spacing among the axes still poolable and (b) its feature map stays at least
    ``min_edge`` voxels. Thick-slice axes are therefore kept at stride 1 until the in-plane axes
    have caught up, like nnU-Net's ``get_pool_and_conv_props``.
    """
    if len(spacing) != 3 or len(patch_size) != 3:
        raise ValueError(f"LoGoNet is 3D: expected 3 spacings and 3 patch sizes, got {list(spacing)} "
                         f"and {list(patch_size)}")
    current_spacing = np.array(spacing, dtype=float)  # a copy: the caller's spacing stays intact
    current_size = np.array(patch_size, dtype=float)
    strides = [[1, 1, 1]]
    for _ in range(num_steps):
        poolable = [a for a in range(3) if current_size[a] / 2 >= min_edge]
        step = [1, 1, 1]
        if poolable:
            finest = min(current_spacing[a] for a in poolable)
            for a in poolable:
                if current_spacing[a] / finest < 2:
                    step[a] = 2
        for a in range(3):
            if step[a] == 2:
                current_spacing[a] *= 2
                current_size[a] /= 2
        strides.append(step)
    return strides


def round_to_multiple(patch_size: Sequence[int], multiple: Sequence[int],
                      upper: Sequence[int] | None = None) -> list[int]:
    """Round each axis to the nearest multiple (never below one multiple, never above ``upper``
    rounded up to a multiple)."""
    out = []
    for i, (p, m) in enumerate(zip(patch_size, multiple)):
        r = max(m, int(round(p / m)) * m)
        if upper is not None:
            cap = max(m, int(np.ceil(upper[i] / m)) * m)
            r = min(r, cap)
        out.append(int(r))
    return out


def choose_local_grid(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                      default_grid: Sequence[int] = (2, 2, 2), local_stages: int = 2,
                      min_local_edge: int = 2) -> list[int]:
    """Local sub-crop grid: the paper's 2 per axis, except an axis whose sub-crop would leave the
    local path fewer than ``min_local_edge`` voxels at its deepest stage stays unsplit."""
    local_total = np.prod(np.asarray(strides[1:2 + local_stages]), axis=0)
    grid = []
    for a, g in enumerate(default_grid):
        sub = patch_size[a] / g
        ok = sub == int(sub) and sub % local_total[a] == 0 and sub / local_total[a] >= min_local_edge
        grid.append(int(g) if ok else 1)
    return grid


def consistent_topology(spacing: Sequence[float], patch_size: Sequence[int],
                        upper: Sequence[int] | None = None, min_edge: int = 2,
                        default_grid: Sequence[int] = (2, 2, 2), local_stages: int = 2,
                        use_local: bool = True) -> tuple[list[int], list[list[int]], list[int]]:
    """Strides, local grid and a patch size the network accepts, consistent with each other.

    Strides depend on the patch (bottleneck size) and the valid patch depends on the strides, so
    this iterates until both agree (two or three rounds in practice).
    """
    patch = [int(p) for p in patch_size]
    for _ in range(8):
        strides = plan_strides(spacing, patch, min_edge=min_edge)
        grid = choose_local_grid(patch, strides, default_grid, local_stages) if use_local else [1, 1, 1]
        multiple = required_patch_multiple(strides, grid, local_stages)
        new_patch = round_to_multiple(patch, multiple, upper)
        if new_patch == patch and plan_strides(spacing, patch, min_edge=min_edge) == strides:
            return patch, strides, grid
        patch = new_patch
    return patch, strides, grid
