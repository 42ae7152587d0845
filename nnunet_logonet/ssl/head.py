"""Pre-training head of Masked LoGoNet: per-slice logits for every clusterer (paper Sec. 3.3).

It maps the network's last feature map (before the segmentation classifier, full resolution) to,
for every slice and every clusterer, logits over that clusterer's k clusters. It knows nothing of
segmentation classes, and none of its parameter names contains ``seg_layers``, so nnU-Net's
``-pretrained_weights`` loader never confuses it with the classifier.

Each slice's features are average-pooled to a small ``grid x grid`` in-plane map rather than to a
single vector: the pseudo-labels are k-means clusters of raw slices and depend on where things
are in the plane, which global pooling would throw away.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_logonet.network.arguments import int_list, positive_int
from nnunet_logonet.ssl.masking import check_slice_axis

__all__ = ["SlicePseudoLabelHead"]


class SlicePseudoLabelHead(nn.Module):
    """``(B, C, D, H, W)`` features -> ``(B, n_slices, sum(ks))`` logits (clusterer i: offsets[i]:offsets[i+1]).

    Args:
        in_channels: C, channels of the feature map.
        ks: number of clusters of every clusterer (``SliceClusterBank.ks``, after fitting).
        slice_axis: dim of the feature map that slices are taken along (as for the masking).
        grid: each slice is average-pooled to ``grid x grid`` in-plane cells.
        hidden: width of the hidden layer of the MLP on the pooled slice.
    """

    def __init__(
        self,
        in_channels: int,
        ks: Sequence[int],
        *,
        slice_axis: int = 2,
        grid: int = 4,
        hidden: int = 256,
    ) -> None:
        super().__init__()
        in_channels, grid, hidden = (positive_int(value, name) for name, value in
                                     (("in_channels", in_channels), ("grid", grid), ("hidden", hidden)))
        self.ks = int_list(ks, "ks")
        self.offsets = (0, *torch.tensor(self.ks).cumsum(0).tolist())
        self.slice_axis = check_slice_axis(slice_axis)
        self.grid = grid
        pooled = in_channels * grid * grid
        self.norm = nn.LayerNorm(pooled)
        self.fc1 = nn.Linear(pooled, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, sum(self.ks))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """A new head's weights; also what a resumed pre-training's head restarts from when its bank was
        refitted differently (the LayerNorm's learned scale and shift are reset too)."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}.")
        if features.ndim != 5 or features.shape[1] != self.norm.normalized_shape[0] // self.grid**2:
            raise ValueError(
                f"features must be (B, {self.norm.normalized_shape[0] // self.grid ** 2}, D, H, W), "
                f"got shape {tuple(features.shape)}."
            )
        planes = torch.movedim(features, self.slice_axis, 1)  # (B, S, C, h, w)
        batch, n_slices = planes.shape[:2]
        pooled = F.adaptive_avg_pool2d(planes.flatten(0, 1), self.grid).reshape(batch, n_slices, -1)
        return self.fc2(self.act(self.fc1(self.norm(pooled))))

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """One ``(..., k_i)`` view per clusterer."""
        return list(torch.split(logits, self.ks, dim=-1))
