"""Feature-map size estimate for nnU-Net's planner (``compute_conv_feature_map_size``).

nnU-Net's planner compares ``network.compute_conv_feature_map_size(patch_size)`` (voxels x
channels of the feature maps of one sample) against a reference value to pick the patch size.
dynamic_network_architectures adds up the output of every convolution; we do the same for
every convolution, norm (BatchNorm/InstanceNorm/LayerNorm) and upsampling output, found by
running the model on the ``meta`` device: no memory is allocated, no FLOPs are spent and the
count cannot drift from the real forward pass.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from .layers import Upsample3d

__all__ = ["COUNTED_MODULES", "conv_feature_map_size"]

COUNTED_MODULES = (nn.Conv3d, nn.modules.batchnorm._NormBase, nn.LayerNorm, Upsample3d)


def conv_feature_map_size(model: nn.Module, input_channels: int, input_size: Sequence[int]) -> int:
    """Sum of ``numel`` of every counted module output for one sample of spatial ``input_size``."""
    meta = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict(keep_vars=True).items()}
    total = 0

    def count(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if output is not _inputs[0]:  # identity upsampling on unpooled axes stores nothing new
            total += output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, COUNTED_MODULES)]
    try:
        with torch.no_grad():
            x = torch.empty((1, input_channels, *(int(s) for s in input_size)), device="meta")
            functional_call(model, meta, (x,), tie_weights=False, strict=False)
    finally:
        for h in handles:
            h.remove()
    return int(total)
