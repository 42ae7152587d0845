"""LoGoNet: a global ULKANet plus one local ULKANet per sub-crop (Masked LoGoNet, KDD 2024).

Karimi Monsefi et al., "Masked LoGoNet: Fast and Accurate 3D Image Analysis for Medical
Domain", KDD 2024, arXiv:2402.06190. The global path sees the whole patch; the patch is also cut
into ``local_grid`` sub-crops, each seen only by its own shallow ULKANet (``local_stages``
encoder stages, separate weights). The stitched local features are added to the global ones and
a head (Conv3d 3^3 -> norm -> GELU -> 1x1x1 classifier) predicts the segmentation.

nnU-Net additions: deep-supervision classifiers on the global decoder at /2 .. /2^S (they always
exist; ``decoder.deep_supervision`` only chooses the output), every classifier under
``head.seg_layers`` so ``-pretrained_weights`` transfers everything else, per-axis strides and
grids for anisotropic patches.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from .buffers import ReusesOutputBuffers, pooled_outputs
from .classifier import Classifier3d
from .classifier_weights import ExplainsMissingClassifiers
from .concurrent_paths import (
    concurrent_paths_pay,
    concurrent_training_pays,
    run_concurrently,
    run_concurrently_with_autograd,
)
from .conv import Conv3d
from .derived import note_unversioned_writes
from .folding import conv_norm_act, hooked
from .levers import lever_enabled
from .grouped import (
    add_ungrouped_subcrops,
    add_ungrouped_subcrops_,
    can_group,
    forget_grouped_running_stats,
    group_subcrops,
    grouped_local_features,
    grouping_pays,
    ungroup_subcrops,
)
from .layers import init_weights, make_norm
from .memory import conv_feature_map_size, counting_feature_maps, meta_call, meta_input
from .partition import add_subcrops, add_subcrops_, split_subcrops, stitch_subcrops
from .arguments import boolean
from .presets import arch_kwargs_for_preset, jsonable, validate_arch, validate_local_paths
from .shapes import (
    check_patch_size,
    deepest_map_divisors,
    deepest_map_voxels,
    positive_int,
    required_patch_multiple,
)
from .ulkanet import ULKAPath, check_deepest_map, check_input_tensor, norm_needs_statistics

__all__ = ["LoGoHead", "LoGoNet"]


def _stitch_pays(lever: str, out: torch.Tensor, *local: torch.Tensor) -> bool:
    """Whether the local features go into ``out`` without a stitched copy (levers ``stitch_in_place``,
    ``stitch_add``): on the CPU, every tensor channels-last and of ``out``'s dtype, the lever on.

    ``stitch_in_place`` (``add_ungrouped_subcrops_``) also needs no autograd: in training the global
    features are saved for the backward of the activation that made them and must not change, so
    ``stitch_add`` (``add_subcrops``, ``add_ungrouped_subcrops``) writes the sum to a new tensor. On
    CUDA the copies are fast kernels, and neither change was timed there.
    """
    return (
        out.device.type == "cpu"
        and not (lever == "stitch_in_place" and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and all(t.dtype == out.dtype for t in local)
        and all(t.is_contiguous(memory_format=torch.channels_last_3d) for t in (out, *local))
        and lever_enabled(lever)
    )


def _first_output(path: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A local path's full-resolution features (the only ones LoGoNet reads from it)."""
    return path(x)[0]


class LoGoHead(nn.Module):
    """Fused-feature head and all classifiers; owns the ``deep_supervision`` runtime flag.

    ``seg_layers[0]`` is the paper's classifier after Conv3d 3^3 -> norm -> GELU on the fused
    full-resolution features; ``seg_layers[r]`` (r >= 1) classify the global decoder features at
    resolution r for deep supervision.
    """

    def __init__(
        self, channels: Sequence[int], num_classes: int, *, norm: str = "batch", deep_supervision: bool = False
    ) -> None:
        super().__init__()
        self.conv = Conv3d(channels[0], channels[0], kernel_size=3, padding=1)
        self.norm = make_norm(norm, channels[0])
        self.act = nn.GELU()
        self.seg_layers = nn.ModuleList([Classifier3d(c, num_classes, kernel_size=1) for c in channels])
        self.deep_supervision = bool(deep_supervision)

    def forward(self, fused: torch.Tensor, global_features: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        out = self.seg_layers[0](conv_norm_act(self, self.conv, self.norm, self.act, fused))
        if not self.deep_supervision:
            return out
        return [out] + [seg(f) for seg, f in zip(self.seg_layers[1:], global_features[1:])]


class LoGoNet(ExplainsMissingClassifiers, ReusesOutputBuffers):
    """Global + local ULKANets with a shared head, buildable by nnU-Net from plans.

    Args:
        input_channels: image channels.
        num_classes: output channels (background included).
        deep_supervision: return outputs at /1 .. /2^S (highest first) instead of one tensor;
            switchable later through ``decoder.deep_supervision`` (``decoder`` is the head).
        strides: nnU-Net per-resolution strides, ``len(dims) + 2`` entries, first ``[1, 1, 1]``.
        dims, depths, mlp_ratios: per-stage LKA width, block count and MLP ratio (Table 9).
        local_grid: sub-crops per axis (paper: 2, 2, 2); 1 leaves an axis unsplit.
        local_stages: encoder stages of every local path (paper: 2).
        decoder_channels: decoder width per resolution (full res first), ``len(dims) + 2``;
            local paths use the first ``local_stages + 2``.
        stem_channels: full-resolution stem widths (input -> 32 -> 64 in the paper).
        norm: 'batch' (paper) or 'instance'.
        drop_path_rate: stochastic depth of the last block of each path (linear from 0).
        layer_scale_init: initial layer scale of every LKA branch.

    Each input spatial size must be a multiple of
    ``required_patch_multiple(strides, local_grid, local_stages)``.
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
        local_grid: Sequence[int] = (2, 2, 2),
        local_stages: int = 2,
        decoder_channels: Sequence[int] | None = None,
        stem_channels: Sequence[int] = (32, 64),
        norm: str = "batch",
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-2,
    ) -> None:
        super().__init__()
        num_classes = positive_int(num_classes, "num_classes")
        input_channels = positive_int(input_channels, "input_channels")
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
        num_stages = len(cfg["dims"])
        self.local_grid, local_stages = validate_local_paths(local_grid, local_stages, num_stages)
        self.local_stages = local_stages
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.strides = cfg["strides"]
        self.patch_multiple = required_patch_multiple(self.strides, self.local_grid, local_stages)
        self._deepest_divisors = deepest_map_divisors(self.strides, self.local_grid, local_stages)
        #: normalised constructor keywords (JSON-ready), e.g. to rebuild or compare architectures
        self.arch_kwargs = jsonable({**cfg, "local_grid": self.local_grid, "local_stages": local_stages})

        self.global_path = ULKAPath(input_channels, **cfg)
        n, k = math.prod(self.local_grid), local_stages
        local_cfg = dict(
            cfg,
            strides=cfg["strides"][: k + 2],
            dims=cfg["dims"][:k],
            depths=cfg["depths"][:k],
            mlp_ratios=cfg["mlp_ratios"][:k],
            decoder_channels=cfg["decoder_channels"][: k + 2],
        )
        self.local_paths = nn.ModuleList([ULKAPath(input_channels, **local_cfg) for _ in range(n)])
        self.head = LoGoHead(
            cfg["decoder_channels"][: num_stages + 1], num_classes, norm=cfg["norm"], deep_supervision=deep_supervision
        )
        self.apply(init_weights)
        # channels_last_3d weights make every conv (and so every activation) channels-last:
        # 2-4x faster 3D convs on CPU, depthwise ones above all (docs/architecture.md)
        self.to(memory_format=torch.channels_last_3d)

    initialize = staticmethod(init_weights)

    @property
    def decoder(self) -> LoGoHead:
        """What nnU-Net's ``set_deep_supervision_enabled`` sets ``deep_supervision`` on."""
        return self.head

    def forward_local(self, x: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """Full-resolution local features: every sub-crop through its own path, stitched back.

        Sub-crop i only ever reaches ``local_paths[i]``, so no local output depends on another
        sub-crop (tested). With the fast paths on (the default) the paths run as one grouped
        network (network/grouped.py) where that is faster (``grouping_pays``: CUDA, CPU inference,
        CPU training of small paths); ``reference_kernels()`` runs the plain loop. (On 2 CPU threads
        ``forward`` does not come here: the paths run side by side, levers ``concurrent_paths`` in inference
        and ``concurrent_training`` in training.)

        With ``add_to`` (the global features) the result is ``add_to + local features``; without
        autograd on the CPU the grouped local features are added into ``add_to`` in place
        (lever ``stitch_in_place``), which then holds the result; otherwise on the CPU the sum is
        written in one pass into a new tensor, without building the stitched local features
        (lever ``stitch_add``).
        """
        if (lever_enabled("grouped_local_paths") and can_group(self.local_paths) and grouping_pays(self.local_paths, x)
                and not self._local_paths_hooked()):
            grouped = grouped_local_features(list(self.local_paths), group_subcrops(x, self.local_grid))
            if add_to is not None and _stitch_pays("stitch_in_place", add_to, grouped):
                return add_ungrouped_subcrops_(add_to, grouped, self.local_grid)
            if add_to is not None and _stitch_pays("stitch_add", add_to, grouped):
                return add_ungrouped_subcrops(add_to, grouped, self.local_grid)
            local = ungroup_subcrops(grouped, self.local_grid)
        else:
            if self.training:  # their BatchNorms update the statistics unversioned
                forget_grouped_running_stats(self.local_paths)
            tiles = split_subcrops(x, self.local_grid)
            return self._stitched([path(tile)[0] for path, tile in zip(self.local_paths, tiles)], add_to)
        return local if add_to is None else add_to + local

    def _local_paths_hooked(self) -> bool:
        """Whether a forward hook watches a module of a local path: the grouped network never calls
        them, so the paths then run one by one. The modules are listed once per ``train()``/``eval()``
        (a walk over 8 x 237 modules of LoGoNet-S takes ~0.5 ms; ``modules()`` itself ~4 ms)."""
        modules = self.__dict__.get("_local_path_modules")
        if modules is None:
            modules = [m for path in self.local_paths for m in path.modules()]
            self.__dict__["_local_path_modules"] = modules
        return hooked(*modules)

    def train(self, mode: bool = True):
        self.__dict__.pop("_local_path_modules", None)
        return super().train(mode)

    def _stitched(self, outs: Sequence[torch.Tensor], add_to: torch.Tensor | None) -> torch.Tensor:
        """The local paths' outputs (sub-crop order) stitched into full-resolution features, plus ``add_to``."""
        if add_to is not None and _stitch_pays("stitch_in_place", add_to, *outs):
            return add_subcrops_(add_to, outs, self.local_grid)
        if add_to is not None and _stitch_pays("stitch_add", add_to, *outs):
            return add_subcrops(add_to, outs, self.local_grid)
        local = stitch_subcrops(torch.stack(list(outs)), self.local_grid)
        return local if add_to is None else add_to + local

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input_tensor(x, self.input_channels, self.patch_multiple)
        if norm_needs_statistics(self.arch_kwargs["norm"], self.global_path.decoder.blocks[0][0].norm):
            check_deepest_map(x, self.arch_kwargs["norm"], deepest_map_voxels(x.shape[2:], self._deepest_divisors))
        if self.training:  # BatchNorm statistics, then the optimizer, change tensors unversioned (derived.py)
            note_unversioned_writes()
        with pooled_outputs(self, x) as x:  # large outputs into kept buffers (buffers.py, training_buffers.py)
            if concurrent_paths_pay(self, x):
                # the 9 paths side by side on two single-threaded workers, global first (concurrent_paths.py)
                tiles = split_subcrops(x, self.local_grid)
                global_features, *outs = run_concurrently(
                    [partial(self.global_path, x)] + [partial(_first_output, path, tile)
                                                      for path, tile in zip(self.local_paths, tiles)])
                fused = self._stitched(outs, add_to=global_features[0])
            elif concurrent_training_pays(self, x):
                # the same in training, each path's backward on the workers too (concurrent_paths.py)
                forget_grouped_running_stats(self.local_paths)
                global_features, *outs = run_concurrently_with_autograd(
                    [self.global_path] + [partial(_first_output, path) for path in self.local_paths],
                    [x, *split_subcrops(x, self.local_grid)])
                fused = self._stitched(outs, add_to=global_features[0])
            else:
                global_features = self.global_path(x)
                # the global full-resolution features are only read here (deep supervision reads the others)
                fused = self.forward_local(x, add_to=global_features[0])
            return self.head(fused, global_features)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Voxels x channels of all conv/norm/upsampling outputs for one sample (nnU-Net planner).

        Sizes that are not a valid multiple are counted at the next valid size up.
        """
        return conv_feature_map_size(self, self.input_channels, input_size, self.patch_multiple, self.arch_kwargs,
                                     trace=LoGoNet._trace_feature_map_size)

    def _trace_feature_map_size(self, input_channels: int, input_size: Sequence[int]) -> int:
        """What a full trace of ``forward`` counts, with one local path traced instead of all:
        the paths are the same network on sub-crops of one size, so they count alike (tested
        against the full trace). The planner counts every candidate topology, and the 8 local
        paths were most of each trace's time."""
        with counting_feature_maps(self) as counted:
            x = meta_input(input_channels, input_size)
            global_features = meta_call(self.global_path, x)
            before_local = counted()
            meta_call(self.local_paths[0], split_subcrops(x, self.local_grid)[0])
            one_local_path = counted() - before_local
            # stitching adds the local features to global_features[0]: no counted module, same shape
            meta_call(self.head, torch.empty_like(global_features[0]), global_features)
            return counted() + (len(self.local_paths) - 1) * one_local_path

    @classmethod
    def from_preset(
        cls,
        name: str,
        input_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        deep_supervision: bool = False,
        **overrides: Any,
    ) -> "LoGoNet":
        """Build preset ``name`` ('tiny', 'S', 'L'), checking that ``patch_size`` fits it."""
        strides = overrides.pop("strides", None)
        kwargs = arch_kwargs_for_preset(name, strides, model="LoGoNet", **overrides)
        check_patch_size(patch_size, kwargs["strides"], kwargs["local_grid"], kwargs["local_stages"])
        return cls(input_channels, num_classes, deep_supervision, **kwargs)
