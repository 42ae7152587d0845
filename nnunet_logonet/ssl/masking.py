"""Masked slice sequences for Masked LoGoNet pre-training (paper Sec. 3.3.1).

Anchor slices are drawn with rate ``phi1``; each anchor masks itself and its ``chain_length - 1``
preceding slices (chains are clipped at slice 0). Every masked slice draws one patch size ``P``
from ``patch_sizes``, is cut into a ``P x P`` grid (the last row/column of patches is cropped when
``P`` does not divide the slice) and each patch is zeroed with probability ``phi2``; ``"full"`` is one
patch covering the whole slice. Everything runs as tensor operations on the patch's device: the
only Python loop is over the (at most a handful of) patch sizes.

Shapes follow nnU-Net: a batch is ``(B, C, D, H, W)`` and ``slice_axis`` is the index of the
spatial dimension that slices are taken along (2, 3 or 4; default 2, nnU-Net's slice axis after
its transpose).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_logonet.network.arguments import positive_int, probability

__all__ = ["SliceMask", "SliceSequenceMasker", "apply_mask", "sample_slice_mask"]

PatchSize = int | str
DEFAULT_PATCH_SIZES: tuple[PatchSize, ...] = (1, 2, 4, 8, 16, 32, "full")


class SliceMask(NamedTuple):
    """One draw of the masking.

    Attributes:
        voxels: ``(B, 1, D, H, W)`` bool, True where the input is zeroed (broadcasts over channels).
        slices: ``(B, n_slices)`` bool, True for every slice of a chain; the loss is taken on these.
        anchors: ``(B, n_slices)`` bool, the anchor slices the chains were grown from.
    """

    voxels: torch.Tensor
    slices: torch.Tensor
    anchors: torch.Tensor


def check_slice_axis(slice_axis: int) -> int:
    """Return ``slice_axis`` as a dim index 2..4 of a ``(B, C, D, H, W)`` tensor (accepts -3..-1)."""
    if isinstance(slice_axis, (bool, np.bool_)) or not isinstance(slice_axis, Integral) \
            or slice_axis not in (2, 3, 4, -3, -2, -1):
        raise ValueError(
            f"slice_axis must be the spatial dim index of a (B, C, D, H, W) tensor: 2, 3 or 4 "
            f"(or -3, -2, -1), got {slice_axis!r}."
        )
    return int(slice_axis) % 5


class SliceSequenceMasker:
    """Samples and applies the masking of the paper; parameters are validated once here.

    Args:
        phi1: rate of anchor slices, in [0, 1] (paper: 0.1).
        chain_length: M, the number of consecutive slices masked per anchor, >= 1 (paper: 5).
        patch_sizes: candidate patch edge lengths in voxels, positive ints or ``"full"`` (paper:
            1, 2, 4, 8, 16, 32, full). A size at least as large as the slice zeroes the whole slice.
        phi2: probability that a patch of a masked slice is zeroed, in [0, 1] (paper: 0.7).
        slice_axis: dim of the ``(B, C, D, H, W)`` batch that slices are taken along.
    """

    def __init__(
        self,
        *,
        phi1: float = 0.1,
        chain_length: int = 5,
        patch_sizes: Sequence[PatchSize] = DEFAULT_PATCH_SIZES,
        phi2: float = 0.7,
        slice_axis: int = 2,
    ) -> None:
        phi1, phi2 = probability(phi1, "phi1"), probability(phi2, "phi2")
        chain_length = positive_int(chain_length, "chain_length (M)")
        # a sequence, not a set: the order of the sizes is the order of the seeded draws
        if not isinstance(patch_sizes, (list, tuple)) or len(patch_sizes) == 0:
            raise ValueError(
                f"patch_sizes must be a non-empty list or tuple of positive ints or 'full', got {patch_sizes!r}."
            )
        for p in patch_sizes:
            valid_int = isinstance(p, Integral) and not isinstance(p, (bool, np.bool_)) and p >= 1
            if not (valid_int or p == "full"):
                raise ValueError(f"patch_sizes entries must be positive ints or 'full', got {p!r} in {patch_sizes!r}.")
        self.phi1 = phi1
        self.chain_length = chain_length
        self.patch_sizes = tuple(p if p == "full" else int(p) for p in patch_sizes)
        self.phi2 = phi2
        self.slice_axis = check_slice_axis(slice_axis)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(phi1={self.phi1}, chain_length={self.chain_length}, "
            f"patch_sizes={self.patch_sizes}, phi2={self.phi2}, slice_axis={self.slice_axis})"
        )

    def sample(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> SliceMask:
        """Draw a mask for a batch of the given ``(B, C, D, H, W)`` shape (C is ignored)."""
        if len(shape) != 5 or any(not isinstance(s, Integral) or isinstance(s, bool) or s < 1 for s in shape):
            raise ValueError(f"shape must be a 5D batch shape (B, C, D, H, W) with positive sizes, got {tuple(shape)}.")
        if device is None and generator is not None:
            device = generator.device
        batch = int(shape[0])
        in_plane = [d for d in (2, 3, 4) if d != self.slice_axis]
        n_slices, height, width = int(shape[self.slice_axis]), int(shape[in_plane[0]]), int(shape[in_plane[1]])

        anchors = torch.rand(batch, n_slices, generator=generator, device=device) < self.phi1
        # slice s is masked if an anchor sits in [s, s + M - 1]: a max-pool over a right-padded window
        padded = F.pad(anchors[:, None].float(), (0, self.chain_length - 1))
        slices = F.max_pool1d(padded, kernel_size=self.chain_length, stride=1)[:, 0].bool()

        choice = torch.randint(len(self.patch_sizes), (batch, n_slices), generator=generator, device=device)
        zeroed = torch.zeros(batch, n_slices, height, width, dtype=torch.bool, device=device)
        for index, size in enumerate(self.patch_sizes):
            ph = height if size == "full" else min(size, height)
            pw = width if size == "full" else min(size, width)
            grid = (-(-height // ph), -(-width // pw))
            coarse = torch.rand(batch, n_slices, *grid, generator=generator, device=device) < self.phi2
            fine = coarse.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)[:, :, :height, :width]
            zeroed |= fine & (choice == index)[:, :, None, None]
        zeroed &= slices[:, :, None, None]
        # (B, D', H', W') with the slice dim first -> (B, 1, D, H, W) in the batch's own axis order
        voxels = torch.movedim(zeroed, 1, self.slice_axis - 1)[:, None]
        return SliceMask(voxels=voxels, slices=slices, anchors=anchors)

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, SliceMask]:
        """Mask a ``(B, C, D, H, W)`` batch; returns the masked copy and the mask."""
        mask = self.sample(x.shape, generator=generator, device=x.device)
        return apply_mask(x, mask.voxels), mask


def apply_mask(x: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """Return a copy of ``x`` (B, C, D, H, W) with the voxels where ``voxel_mask`` (B, 1, D, H, W) is True zeroed."""
    if voxel_mask.dtype != torch.bool:
        raise ValueError(f"voxel_mask must be a bool tensor, got dtype {voxel_mask.dtype}.")
    if x.ndim != 5 or voxel_mask.shape != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(
            f"voxel_mask must have shape (B, 1, D, H, W) = {(x.shape[0], 1, *x.shape[2:])} for x of shape "
            f"{tuple(x.shape)}, got {tuple(voxel_mask.shape)}."
        )
    return x.masked_fill(voxel_mask, 0)


def sample_slice_mask(
    shape: Sequence[int],
    *,
    phi1: float = 0.1,
    chain_length: int = 5,
    patch_sizes: Sequence[PatchSize] = DEFAULT_PATCH_SIZES,
    phi2: float = 0.7,
    slice_axis: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> SliceMask:
    """Functional form of :class:`SliceSequenceMasker` (validates its arguments on every call)."""
    masker = SliceSequenceMasker(
        phi1=phi1, chain_length=chain_length, patch_sizes=patch_sizes, phi2=phi2, slice_axis=slice_axis
    )
    return masker.sample(shape, generator=generator, device=device)
