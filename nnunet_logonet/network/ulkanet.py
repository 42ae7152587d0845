"""ULKANet: U-shaped network with a 3D LKA encoder and a conv decoder (Masked LoGoNet, KDD 2024).

ULKANet is the paper's single-path model (its ablation baseline) and the building block of
LoGoNet's global and local paths. The constructor takes only JSON-serialisable keywords so
nnU-Net can build it from ``plans.json`` (``cls(input_channels=..., num_classes=...,
deep_supervision=..., **arch_kwargs)``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .arguments import boolean
from .buffers import ReusesOutputBuffers, pooled_outputs
from .classifier_weights import ExplainsMissingClassifiers
from .decoder import ULKADecoder
from .derived import note_unversioned_writes
from .encoder import ULKAEncoder
from .layers import init_weights
from .memory import conv_feature_map_size
from .presets import arch_kwargs_for_preset, jsonable, validate_arch
from .shapes import (
    Triple,
    check_patch_size,
    deepest_map_divisors,
    deepest_map_voxels,
    embedding_strides,
    positive_int,
    required_patch_multiple,
)

__all__ = ["ULKAPath", "ULKANet", "check_input_tensor", "check_deepest_map", "norm_needs_statistics", "validate_arch"]


def check_input_tensor(x: torch.Tensor, input_channels: int, multiple: Triple) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating-point (B >= 1, input_channels, D, H, W) tensor with
    sizes divisible by ``multiple``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor input, got {type(x).__name__}; convert it with torch.as_tensor")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point input (the weights' dtype, e.g. float32), got {x.dtype}; "
                         f"convert it with x.float()")
    if x.ndim != 5:
        raise ValueError(f"expected a 5-D input (batch, channels, z, y, x), got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"expected a batch of at least one sample, got shape {tuple(x.shape)}")
    if x.shape[1] != input_channels:
        raise ValueError(f"expected {input_channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    spatial = tuple(x.shape[2:])
    if any(s % m for s, m in zip(spatial, multiple)):
        raise ValueError(
            f"expected spatial size divisible by {list(multiple)} per axis, got {list(spatial)}; "
            f"pad or crop the input (e.g. to {[-(-s // m) * m for s, m in zip(spatial, multiple)]})"
        )


def norm_needs_statistics(norm: str, deepest_norm: nn.Module) -> bool:
    """Whether the norms of the deepest feature map compute statistics of the input: instance norm always
    (each sample by its own), batch norm in training mode, judged by ``deepest_norm`` (a BatchNorm of the
    deepest map) rather than by the network, so that BatchNorms frozen in eval inside a training network
    (which normalise with their running statistics) pass."""
    return norm == "instance" or deepest_norm.training


def check_deepest_map(x: torch.Tensor, norm: str, deepest_voxels: int) -> None:
    """Raise ``ValueError`` when a norm of the deepest feature map would compute statistics of a single
    value per channel (PyTorch would stop inside the norm, naming neither the patch nor the fix). Call it
    where ``norm_needs_statistics``. Under multi-GPU training (``SyncBatchNorm``) batch statistics span
    the ranks, so a batch norm is not judged by this rank's batch."""
    if norm == "batch" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return
    values = deepest_voxels if norm == "instance" else x.shape[0] * deepest_voxels
    if values <= 1:
        start = (f"input of shape {tuple(x.shape)} leaves a feature map of a single voxel (the bottleneck, or a "
                 f"local path's deepest map): ")
        if norm == "instance":
            raise ValueError(start + "its instance norms would normalise one value per channel and sample, which "
                             "neither training nor inference can do; use a patch twice as large on one axis (or "
                             "norm='batch' with a batch of 2 or more)")
        raise ValueError(start + f"with a batch of {x.shape[0]} its batch norms would normalise one value per channel, "
                                 "which training cannot do; use a batch of 2 or more or a patch twice as large on one "
                                 "axis")


class ULKAPath(nn.Module):
    """Encoder + decoder returning decoder features (LoGoNet's global and local paths).

    With ``num_classes`` the decoder also carries ``seg_layers`` (that is ``ULKANet``).
    """

    def __init__(
        self,
        input_channels: int,
        *,
        strides: Sequence[Sequence[int]],
        dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratios: Sequence[float],
        decoder_channels: Sequence[int] | None = None,
        stem_channels: Sequence[int] = (32, 64),
        norm: str = "batch",
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-2,
        num_classes: int | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        input_channels = positive_int(input_channels, "input_channels")
        if num_classes is not None:
            num_classes = positive_int(num_classes, "num_classes")
        deep_supervision = boolean(deep_supervision, "deep_supervision")
        cfg = validate_arch(
            strides=strides,
            dims=dims,
            depths=depths,
            mlp_ratios=mlp_ratios,
            decoder_channels=decoder_channels,
            stem_channels=stem_channels,
            norm=norm,
            drop_path_rate=drop_path_rate,
            layer_scale_init=layer_scale_init,
        )
        self.input_channels = input_channels
        self.strides = cfg["strides"]
        #: normalised constructor keywords (JSON-ready), e.g. to rebuild or compare architectures
        self.arch_kwargs = jsonable(cfg)
        self.encoder = ULKAEncoder(
            input_channels,
            embed_strides=embedding_strides(cfg["strides"]),
            dims=cfg["dims"],
            depths=cfg["depths"],
            mlp_ratios=cfg["mlp_ratios"],
            stem_channels=cfg["stem_channels"],
            norm=cfg["norm"],
            drop_path_rate=cfg["drop_path_rate"],
            layer_scale_init=cfg["layer_scale_init"],
        )
        self.decoder = ULKADecoder(
            encoder_channels=cfg["dims"],
            stem_channels=cfg["stem_channels"][-1],
            strides=cfg["strides"],
            decoder_channels=cfg["decoder_channels"],
            norm=cfg["norm"],
            num_classes=num_classes,
            deep_supervision=deep_supervision,
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder features at resolutions 0 .. S, highest first (no input check: hot path)."""
        stem, features = self.encoder(x)
        return self.decoder.forward_features(stem, features)

    forward = forward_features


class ULKANet(ExplainsMissingClassifiers, ReusesOutputBuffers, ULKAPath):
    """Single-path ULKANet for segmentation, buildable by nnU-Net from plans.

    Args:
        input_channels: image channels.
        num_classes: output channels (nnU-Net's ``num_classes``, background included).
        deep_supervision: return one output per decoder resolution /1 .. /2^S (highest first)
            instead of one tensor; switchable later through ``decoder.deep_supervision``.
        strides: nnU-Net per-resolution strides, ``len(dims) + 2`` entries, first ``[1, 1, 1]``.
        dims, depths, mlp_ratios: per-stage LKA width, block count and MLP ratio (Table 9).
        decoder_channels: decoder width per resolution (full res first), ``len(dims) + 2``.
        stem_channels: full-resolution stem widths (input -> 32 -> 64 in the paper).
        norm: 'batch' (paper) or 'instance' (nnU-Net's choice at batch size 2).
        drop_path_rate: stochastic depth of the last block (linear from 0).
        layer_scale_init: initial layer scale of every LKA branch.

    Each input spatial size must be a multiple of ``required_patch_multiple(strides)``.
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        deep_supervision: bool = False,
        *,
        strides: Sequence[Sequence[int]],
        dims: Sequence[int],
        depths: Sequence[int],
        mlp_ratios: Sequence[float],
        decoder_channels: Sequence[int] | None = None,
        stem_channels: Sequence[int] = (32, 64),
        norm: str = "batch",
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-2,
    ) -> None:
        if num_classes is None:  # ULKAPath takes None for "no classifier"; a segmentation network needs one
            raise ValueError("num_classes must be an int >= 1, got None")
        super().__init__(
            input_channels,
            strides=strides,
            dims=dims,
            depths=depths,
            mlp_ratios=mlp_ratios,
            decoder_channels=decoder_channels,
            stem_channels=stem_channels,
            norm=norm,
            drop_path_rate=drop_path_rate,
            layer_scale_init=layer_scale_init,
            num_classes=num_classes,
            deep_supervision=deep_supervision,
        )
        self.num_classes = int(num_classes)
        self.patch_multiple = required_patch_multiple(self.strides)
        self._deepest_divisors = deepest_map_divisors(self.strides)
        self.apply(init_weights)
        # channels_last_3d weights make every conv (and so every activation) channels-last:
        # 2-4x faster 3D convs on CPU, depthwise ones above all (docs/architecture.md)
        self.to(memory_format=torch.channels_last_3d)

    initialize = staticmethod(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input_tensor(x, self.input_channels, self.patch_multiple)
        if norm_needs_statistics(self.arch_kwargs["norm"], self.decoder.blocks[0][0].norm):
            check_deepest_map(x, self.arch_kwargs["norm"], deepest_map_voxels(x.shape[2:], self._deepest_divisors))
        if self.training:  # BatchNorm statistics, then the optimizer, change tensors unversioned (derived.py)
            note_unversioned_writes()
        with pooled_outputs(self, x) as x:  # large outputs into kept buffers (buffers.py, training_buffers.py)
            stem, features = self.encoder(x)
            return self.decoder(stem, features)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Voxels x channels of all conv/norm/upsampling outputs for one sample (nnU-Net planner).

        Sizes that are not a valid multiple are counted at the next valid size up.
        """
        return conv_feature_map_size(self, self.input_channels, input_size, self.patch_multiple, self.arch_kwargs)

    @classmethod
    def from_preset(
        cls,
        name: str,
        input_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        deep_supervision: bool = False,
        **overrides: Any,
    ) -> "ULKANet":
        """Build preset ``name`` ('tiny', 'S', 'L'), checking that ``patch_size`` fits its strides."""
        strides = overrides.pop("strides", None)
        kwargs = arch_kwargs_for_preset(name, strides, model="ULKANet", **overrides)
        check_patch_size(patch_size, kwargs["strides"])
        return cls(input_channels, num_classes, deep_supervision, **kwargs)
