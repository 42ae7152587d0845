"""Feature-map size estimate for nnU-Net's planner (``compute_conv_feature_map_size``).

nnU-Net's planner compares ``network.compute_conv_feature_map_size(patch_size)`` (voxels x
channels of the feature maps of one sample) against a reference value to pick the patch size.
dynamic_network_architectures adds up the output of every convolution; we add up the output of
every convolution, norm (BatchNorm/InstanceNorm/LayerNorm) and upsampling, found by running the
model on the ``meta`` device (no memory, no FLOPs, and the count cannot drift from the forward).

Every feature map of a valid patch is ``patch / cumulative stride`` voxels, so the total is
exactly ``count(minimal valid patch) * prod(patch // minimal patch)``: one trace per
architecture (cached, since nnU-Net's planner rebuilds the network for every candidate patch)
serves every patch size. A patch that is not a valid multiple is counted at the next valid size
up, the size the network would be run at after padding.
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .levers import reference_kernels
from .layers import Upsample3d
from .shapes import Triple, as_triple, nearest_valid_patch_sizes

__all__ = [
    "COUNTED_MODULES",
    "conv_feature_map_size",
    "counting_feature_maps",
    "meta_call",
    "meta_input",
    "trace_feature_map_size",
]

COUNTED_MODULES = (nn.Conv3d, nn.modules.batchnorm._NormBase, nn.LayerNorm, Upsample3d)
_CACHE: dict[tuple, int] = {}


@contextlib.contextmanager
def counting_feature_maps(model: nn.Module) -> Iterator[Callable[[], int]]:
    """While open, every counted module of ``model`` adds its output's ``numel`` to a total
    (read with the yielded function); the model is in eval mode, without autograd and with the
    reference kernels, so every counted module really runs; its modes are restored on exit."""
    total = 0

    def count(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if output is not inputs[0]:  # identity upsampling on unpooled axes stores nothing new
            total += output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, COUNTED_MODULES)]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()  # train-mode norms refuse a 1-voxel map with batch 1; shapes are the same
        # plain modules: folded norms and grouped local paths would skip the counting hooks
        with torch.no_grad(), reference_kernels():
            yield lambda: total
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


def meta_call(module: nn.Module, *args: Any) -> Any:
    """``module(*args)`` with its parameters and buffers swapped for ``meta`` tensors: shapes
    only, no memory, no arithmetic; the module itself is untouched."""
    meta = {name: torch.empty_like(t, device="meta") for name, t in module.state_dict(keep_vars=True).items()}
    return functional_call(module, meta, args, tie_weights=False, strict=False)


def meta_input(input_channels: int, input_size: Sequence[int]) -> torch.Tensor:
    """One sample of ``input_size`` on ``meta``."""
    return torch.empty((1, input_channels, *(int(s) for s in input_size)), device="meta")


def trace_feature_map_size(model: nn.Module, input_channels: int, input_size: Sequence[int]) -> int:
    """Sum of ``numel`` of every counted module output for one sample, traced on ``meta``."""
    with counting_feature_maps(model) as counted:
        meta_call(model, meta_input(input_channels, input_size))
        return counted()


def conv_feature_map_size(
    model: nn.Module,
    input_channels: int,
    input_size: Sequence[int],
    multiple: Triple,
    signature: dict[str, Any],
    trace: Callable[[nn.Module, int, Sequence[int]], int] = trace_feature_map_size,
) -> int:
    """Feature-map voxels x channels of one sample at ``input_size`` (see module docstring).

    ``signature`` (the model's normalised constructor keywords) keys the cache together with
    the module and parameter counts and the deep-supervision flag. ``trace`` counts one sample
    at the minimal valid size (a model may count faster than the full trace, with the same result).
    """
    size = nearest_valid_patch_sizes(as_triple(input_size, "input_size"), multiple)[1]
    key = (
        type(model).__name__,
        input_channels,
        json.dumps(signature, sort_keys=True),
        bool(getattr(model.decoder, "deep_supervision", False)),
        sum(1 for _ in model.modules()),
        sum(p.numel() for p in model.parameters()),
    )
    if key not in _CACHE:
        _CACHE[key] = trace(model, input_channels, multiple)
    return _CACHE[key] * math.prod(s // m for s, m in zip(size, multiple))
