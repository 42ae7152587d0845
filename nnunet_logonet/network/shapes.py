"""Stride and patch-size arithmetic shared by the network and the nnU-Net planner.

The network is described by nnU-Net-style *per-resolution* strides (``arch_kwargs['strides']``):
entry 0 is the full-resolution stem and is always ``[1, 1, 1]``; entry ``i > 0`` is the per-axis
downsampling from resolution ``i - 1`` to resolution ``i``. With the isotropic default
``[[1, 1, 1]] + [[2, 2, 2]] * 5`` the decoder works at /1, /2, /4, /8, /16 and /32.

The LKA encoder does not downsample once per resolution: its stage 1 embeds with
``strides[1] * strides[2]`` (the paper's stride 4 on a cubic patch) and stage ``k >= 2`` with
``strides[k + 1]``. A LoGoNet local path uses only the first ``local_stages`` stages, i.e. the
first ``local_stages + 2`` resolutions, on a patch divided by ``local_grid``.
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Sequence

import numpy as np

from .arguments import positive_int

Triple = tuple[int, int, int]

__all__ = [
    "Triple",
    "positive_int",
    "as_triple",
    "normalize_strides",
    "isotropic_strides",
    "cumulative_strides",
    "embedding_strides",
    "embedding_kernel",
    "required_patch_multiple",
    "nearest_valid_patch_sizes",
    "check_patch_size",
    "deepest_map_divisors",
    "deepest_map_voxels",
]


def as_triple(value: int | Sequence[int], name: str, minimum: int = 1) -> Triple:
    """Return ``value`` as a per-axis (z, y, x) triple of ints ``>= minimum``.

    Accepts an int (broadcast to all axes), a tuple or a JSON list.
    """
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = (int(value),) * 3
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {value!r}") from None
    if len(items) != 3 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be 3 ints (one per spatial axis), got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} entries must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in items)  # type: ignore[return-value]


def normalize_strides(strides: Sequence[Sequence[int]], num_stages: int | None = None) -> tuple[Triple, ...]:
    """Validate nnU-Net-style per-resolution strides and return them as a tuple of triples.

    Args:
        strides: one per-axis stride triple per resolution; the first must be ``[1, 1, 1]``.
        num_stages: number of LKA encoder stages; if given, ``len(strides)`` must be
            ``num_stages + 2`` (stem resolution, the extra /2 resolution, one per stage).
    """
    try:
        entries = [as_triple(s, f"strides[{i}]") for i, s in enumerate(strides)]
    except TypeError:
        raise ValueError(f"strides must be a list of per-axis triples, got {strides!r}") from None
    expected_len = None if num_stages is None else num_stages + 2
    if len(entries) < 3 or (expected_len is not None and len(entries) != expected_len):
        want = expected_len if expected_len is not None else ">= 3"
        raise ValueError(
            f"strides must have {want} entries (one per decoder resolution: stem, /2, then one per "
            f"encoder stage), got {len(entries)}: {strides!r}"
        )
    if entries[0] != (1, 1, 1):
        raise ValueError(f"strides[0] is the full-resolution stem and must be [1, 1, 1], got {list(entries[0])}")
    return tuple(entries)


def isotropic_strides(num_stages: int = 4) -> list[list[int]]:
    """The paper's cubic-patch strides (stage-1 stride 4, then 2): ``[[1,1,1]] + [[2,2,2]] * (S+1)``."""
    return [[1, 1, 1]] + [[2, 2, 2] for _ in range(num_stages + 1)]


def cumulative_strides(strides: Sequence[Sequence[int]]) -> tuple[Triple, ...]:
    """Total downsampling of every resolution (what nnU-Net's deep-supervision scales invert)."""
    cum = np.cumprod(np.asarray(normalize_strides(strides), dtype=np.int64), axis=0)
    return tuple(tuple(int(v) for v in row) for row in cum)  # type: ignore[misc]


def embedding_strides(strides: Sequence[Sequence[int]]) -> tuple[Triple, ...]:
    """Per-stage patch-embedding strides: stage 1 ``strides[1] * strides[2]``, stage k ``strides[k+1]``."""
    s = normalize_strides(strides)
    first = tuple(a * b for a, b in zip(s[1], s[2]))
    return (first,) + tuple(s[3:])  # type: ignore[return-value]


def embedding_kernel(stride: Sequence[int]) -> Triple:
    """Patch-embedding kernel per axis: ``2 * stride - 1`` (7 for 4, 3 for 2) and 3 where stride is 1.

    Stride 1 keeps a 3-wide kernel so thick-slice axes still mix neighbouring slices, like
    nnU-Net's 3^3 convolutions on unpooled axes; padding ``k // 2`` keeps ``size / stride``.
    """
    return tuple(3 if s <= 2 else 2 * s - 1 for s in stride)  # type: ignore[return-value]


def required_patch_multiple(
    strides: Sequence[Sequence[int]],
    local_grid: int | Sequence[int] = (1, 1, 1),
    local_stages: int = 2,
) -> Triple:
    """Per-axis multiple every patch size must be: ``lcm(global stride, grid * local stride)``.

    The global stride is the product of all strides; the local stride the product of the first
    ``local_stages + 2`` (the resolutions a local path uses). With ``local_grid`` (1, 1, 1) (a
    ULKANet) this is the global stride.
    """
    s = normalize_strides(strides)
    grid = as_triple(local_grid, "local_grid")
    if not isinstance(local_stages, Integral) or isinstance(local_stages, (bool, np.bool_)) \
            or not 1 <= local_stages <= len(s) - 2:
        raise ValueError(f"local_stages must be an int in [1, {len(s) - 2}], got {local_stages!r}")
    total = np.prod(np.asarray(s, dtype=np.int64), axis=0)
    local = np.prod(np.asarray(s[: local_stages + 2], dtype=np.int64), axis=0) * np.asarray(grid)
    return tuple(math.lcm(int(a), int(b)) for a, b in zip(total, local))  # type: ignore[return-value]


def nearest_valid_patch_sizes(patch_size: Sequence[int], multiple: Sequence[int]) -> tuple[Triple, Triple]:
    """Nearest valid sizes per axis, rounded down (at least one multiple) and up."""
    down = tuple(max(m, (p // m) * m) for p, m in zip(patch_size, multiple))
    up = tuple(-(-p // m) * m for p, m in zip(patch_size, multiple))
    return down, up  # type: ignore[return-value]


def check_patch_size(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    local_grid: int | Sequence[int] = (1, 1, 1),
    local_stages: int = 2,
) -> Triple:
    """Return ``patch_size`` as a triple, or raise ``ValueError`` naming the required multiple.

    The message states the per-axis multiple and the nearest valid sizes rounded down and up,
    so a planner or user can fix the plans directly.
    """
    size = as_triple(patch_size, "patch_size")
    multiple = required_patch_multiple(strides, local_grid, local_stages)
    if any(p % m for p, m in zip(size, multiple)):
        down, up = nearest_valid_patch_sizes(size, multiple)
        raise ValueError(
            f"patch size {list(size)} is not valid for strides {[list(x) for x in normalize_strides(strides)]}, "
            f"local_grid {list(as_triple(local_grid, 'local_grid'))}, local_stages {local_stages}: every axis "
            f"must be a multiple of {list(multiple)} (lcm of the total stride and local grid x local stride). "
            f"Nearest valid sizes: {list(down)} (round down, at least one multiple) or {list(up)} (round up)."
        )
    return size


def deepest_map_divisors(
    strides: Sequence[Sequence[int]],
    local_grid: int | Sequence[int] = (1, 1, 1),
    local_stages: int | None = None,
) -> tuple[Triple, ...]:
    """What an input's size is divided by to give the deepest feature maps a norm sees: the total stride
    (the global bottleneck) and, with ``local_stages``, a local path's stride times the sub-crop grid
    (its deepest map). The networks keep these, so ``forward`` only divides (``deepest_map_voxels``)."""
    s = normalize_strides(strides)
    divisors = [tuple(math.prod(axis) for axis in zip(*s))]
    if local_stages is not None:
        grid = as_triple(local_grid, "local_grid")
        divisors.append(tuple(math.prod(axis) * g for axis, g in zip(zip(*s[: local_stages + 2]), grid)))
    return tuple(divisors)  # type: ignore[return-value]


def deepest_map_voxels(spatial_size: Sequence[int], divisors: Sequence[Triple]) -> int:
    """Voxels of the smallest of those maps for an input of ``spatial_size``. A norm computing statistics
    needs more than one value per channel (instance norm: these voxels; batch norm in training: these
    voxels x the batch size). Plain Python: the networks call it in ``forward``, which torch.compile traces."""
    return min(math.prod(int(a) // b for a, b in zip(spatial_size, divisor)) for divisor in divisors)
