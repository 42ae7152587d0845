"""LoGoNet's 8 local ULKANets run as one grouped network instead of 8 sequential calls.

Path i's channels become channel group i of one tensor (B, n*C, d, h, w): every convolution
runs once with ``groups = n x its own groups`` on the paths' weights concatenated along the
output axis, BatchNorm/InstanceNorm/LayerScale run once on concatenated parameters, LayerNorm
normalises each group's C channels, and decoder concatenations are per group (convolved part by
part, ``conv.conv3d_concat``, without building them). Each path
still reads only its own sub-crop and its own weights (block-diagonal), so the result equals the
loop up to float32 rounding (tests/test_fast_paths.py). The parameters stay in
``local_paths.<i>`` (checkpoints unchanged); BatchNorm running statistics are written back to
each path's buffers after a training step. Why: 8x fewer, larger kernel calls -- the per-call
overhead dominates the local paths on CUDA and in CPU inference; in CPU training of larger paths
the loop is faster, so ``grouping_pays`` chooses (docs/speed.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .conv import Activation, conv3d, conv3d_concat
from .folding import (LKAFold, derived_tensors, fold_lka_block_uncached, fold_uncached, foldable_batchnorm,
                      foldable_lka_block, lka_block_folded, lka_fold_sources, version_key)
from .layers import ConvUnit, DropPath, LayerNorm3d
from .lka import LiveTapConv3d, LKABlock, live_taps
from .ulkanet import ULKAPath

__all__ = ["group_subcrops", "ungroup_subcrops", "add_ungrouped_subcrops_", "add_ungrouped_subcrops",
           "grouped_local_features", "can_group", "grouping_pays", "forget_grouped_running_stats"]

CL = torch.channels_last_3d


def can_group(paths: Sequence[nn.Module]) -> bool:
    """Groupable: at least two paths, every one a ``ULKAPath`` with the same architecture."""
    return len(paths) > 1 and all(isinstance(p, ULKAPath) and p.arch_kwargs == paths[0].arch_kwargs for p in paths)


#: CPU training: group only while one path's sub-crop voxels x first-stage width stay below this
CPU_GROUPING_LIMIT = 2 ** 18


def grouping_pays(paths: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether running the paths as one grouped network beats the loop, for input ``x``.

    * CUDA: always; the paths are launch-bound there and grouping halves LoGoNet's time.
    * CPU inference (no gradients): always. Grouping makes 3.2x fewer kernel calls (LoGoNet-S:
      242 instead of 781 convolutions per patch), and nnUNetPredictor's sliding window runs a
      producer thread whose own OpenMP team makes libgomp stop spinning our worker threads
      between calls, so every call pays a wake-up: measured in that setting, LoGoNet-S per
      32x64x64 tile 0.43 s grouped vs 0.55 s loop (64^3: 0.78 vs 0.82 s; L at 64^3 within 3 %).
      On exactly 2 intra-op threads ``LoGoNet.forward`` runs the loop instead, each path on a
      single-threaded worker beside the global path (lever ``concurrent_paths``), which beats both.
    * CPU training: only while a path is small. Grouping saves per-call overhead, but its wide
      grouped kernels, per-step weight concatenation and 6-D LayerNorm cost more once a path has
      real work. Training step grouped vs loop on the 2-core Xeon: tiny at 32x64x64 0.57 vs
      0.62 s, tiny at 64^3 equal, tiny at 96^3 4.30 vs 4.03 s, S at 64^3 5.45 vs 5.00 s. The
      limit sits between: sub-crop voxels x ``dims[0]`` <= 2^18 (docs/speed.md). On exactly 2
      intra-op threads ``LoGoNet.forward`` runs the loop on the two workers, backward included
      (lever ``concurrent_training``).
    """
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return True
    voxels = x.shape[2:].numel() // len(paths)
    return voxels * int(paths[0].arch_kwargs["dims"][0]) <= CPU_GROUPING_LIMIT


def group_subcrops(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, n*C, D/gd, H/gh, W/gw), channel group i = sub-crop i (z-major order)."""
    b, c, d, h, w = x.shape
    gd, gh, gw = grid
    t = x.reshape(b, c, gd, d // gd, gh, h // gh, gw, w // gw).permute(0, 3, 5, 7, 2, 4, 6, 1)
    t = t.reshape(b, d // gd, h // gh, w // gw, gd * gh * gw * c)  # the one copy, in channels-last order
    return t.permute(0, 4, 1, 2, 3)


def ungroup_subcrops(y: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Inverse of ``group_subcrops``: (B, n*C, d, h, w) -> (B, C, d*gd, h*gh, w*gw), channels-last."""
    b, nc, td, th, tw = y.shape
    gd, gh, gw = grid
    c = nc // (gd * gh * gw)
    t = y.permute(0, 2, 3, 4, 1).reshape(b, td, th, tw, gd, gh, gw, c).permute(0, 4, 1, 5, 2, 6, 3, 7)
    t = t.reshape(b, gd * td, gh * th, gw * tw, c)
    return t.permute(0, 4, 1, 2, 3)


def _eight_d(out: torch.Tensor, y: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` (B, C, D, H, W) and ``y`` (B, n*C, d, h, w), channels-last, as matching 8-D views."""
    b, c, d, h, w = out.shape
    gd, gh, gw = grid
    td, th, tw = d // gd, h // gh, w // gw
    target = out.permute(0, 2, 3, 4, 1).view(b, gd, td, gh, th, gw, tw, c)
    source = y.permute(0, 2, 3, 4, 1).view(b, td, th, tw, gd, gh, gw, c).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return target, source


def add_ungrouped_subcrops_(out: torch.Tensor, y: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``out += ungroup_subcrops(y, grid)`` in one pass, without building the ungrouped tensor.

    Both channels-last (``out`` (B, C, D, H, W), ``y`` (B, n*C, d, h, w)); ``out`` is returned. For
    inference (``LoGoNet`` adds the local features into the global ones this way when no gradient
    is recorded): the copy of ``ungroup_subcrops`` and the new tensor of the sum were two passes
    over fresh full-resolution memory. Same additions, so the same floats as ``out + ungrouped``.
    """
    target, source = _eight_d(out, y, grid)
    target.add_(source)
    return out


def add_ungrouped_subcrops(base: torch.Tensor, y: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``base + ungroup_subcrops(y, grid)`` in one pass, as a new tensor, with autograd.

    Both channels-last. For training, where ``add_ungrouped_subcrops_`` cannot be used (``base`` is
    saved for the backward of the activation that made it): the sum is written straight from the
    grouped layout into a new tensor in ``base``'s layout, without the ungrouped copy. The backward
    hands ``base`` the incoming gradient and ``y`` that gradient regrouped (``group_subcrops``, the one
    copy the backward of ``ungroup_subcrops`` made too). The same additions, so the same floats.
    """
    return _AddUngrouped.apply(base, y, tuple(grid))


class _AddUngrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, y, grid):  # type: ignore[override]
        ctx.grid = grid
        out = torch.empty_like(base, memory_format=CL)
        target, source = _eight_d(out, y, grid)
        region, _ = _eight_d(base, y, grid)
        torch.add(region, source, out=target)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        return grad, group_subcrops(grad, ctx.grid), None


# ----------------------------------------------------------------------------- grouped ops
def _cat(owner: nn.Module, name: str, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    if tensors[0] is None:
        return None
    return derived_tensors(owner, name, tensors, lambda: torch.cat(list(tensors)))


def _folded(owner: nn.Module, pairs: Sequence[tuple[nn.Conv3d, nn.BatchNorm3d]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (conv, BatchNorm) folded (``conv.fold_batchnorm``), concatenated; cached on the parameters."""
    sources = [t for conv, norm in pairs
               for t in (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)]

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        folded = [fold_uncached(conv, norm) for conv, norm in pairs]
        return torch.cat([w for w, _ in folded]), torch.cat([b for _, b in folded])

    return derived_tensors(owner, "_grouped_folded", sources, make)


def _conv(x: torch.Tensor | Sequence[torch.Tensor], convs: Sequence[nn.Conv3d],
          activation: Activation | None = None) -> torch.Tensor:
    """The grouped convolution (then ``activation``); ``x`` may be the parts of a per-group concatenation."""
    first = convs[0]
    weight = _cat(first, "_grouped_weight", [c.weight for c in convs])
    bias = _cat(first, "_grouped_bias", [c.bias for c in convs])
    groups = first.groups * len(convs)
    if not isinstance(x, torch.Tensor):
        return conv3d_concat(x, weight, bias, first.stride, first.padding, first.dilation, groups, activation)
    padding = first.padding
    if isinstance(first, LiveTapConv3d):
        taps, padding = live_taps(first.kernel_size, x.shape[2:], first.dilation)
        if taps is not None:
            weight = weight[(slice(None), slice(None), *taps)]
    return conv3d(x, weight, bias, first.stride, padding, first.dilation, groups, activation)


def _running_stats(owner: nn.Module, means: list[torch.Tensor], variances: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paths' running means and variances, concatenated; F.batch_norm updates these in place.

    The concatenation is kept on ``owner`` while every path's statistics are those written back from
    it (same tensors, storage and version counter), so a training step does not concatenate them
    again; any other change to a path's statistics (``load_state_dict``, ``.to()``, an edit) rebuilds
    it, and a training step that ran the paths one by one (their BatchNorms update the statistics
    without a version bump) drops it (``forget_grouped_running_stats``).
    """
    cached = owner.__dict__.get("_grouped_running_stats")
    key = version_key(means + variances, generation=False)
    if cached is not None and key is not None and cached[0] == key:
        return cached[1], cached[2]
    return torch.cat(means), torch.cat(variances)


def _remember_running_stats(owner: nn.Module, means: list[torch.Tensor], variances: list[torch.Tensor],
                            mean: torch.Tensor, var: torch.Tensor) -> None:
    if torch.compiler.is_compiling():  # no cache under the compiler (version_key)
        return
    if mean.is_inference():  # made under inference_mode: autograd could not save it in a later step
        owner.__dict__.pop("_grouped_running_stats", None)
        return
    key = version_key(means + variances, generation=False)
    if key is not None:
        owner.__dict__["_grouped_running_stats"] = (key, mean, var, means + variances)


def forget_grouped_running_stats(paths: Sequence[nn.Module]) -> None:
    """Drop the kept concatenations of ``_running_stats``: the paths' BatchNorms ran one by one."""
    for module in paths[0].modules():
        module.__dict__.pop("_grouped_running_stats", None)


def _norm(x: torch.Tensor, norms: Sequence[nn.Module]) -> torch.Tensor:
    """The paths' norms, each in its own mode (a BatchNorm frozen in eval inside a training network
    keeps its statistics); paths whose norms are in different modes are normalised one by one."""
    first = norms[0]
    training = first.training
    one_by_one = (any(n.training is not training for n in norms)
                  # SyncBatchNorm (nnU-Net converts the norms under -num_gpus) reduces its batch statistics
                  # across ranks in training; an unknown norm type is the module's own business
                  or (training and isinstance(first, nn.SyncBatchNorm))
                  or not isinstance(first, (_BatchNorm, nn.InstanceNorm3d)))
    if one_by_one:
        return torch.cat([n(part) for n, part in zip(norms, x.chunk(len(norms), dim=1))], dim=1)
    weight = _cat(first, "_grouped_weight", [n.weight for n in norms])
    bias = _cat(first, "_grouped_bias", [n.bias for n in norms])
    if isinstance(first, _BatchNorm):  # BatchNorm3d, and SyncBatchNorm in eval (running statistics)
        if first.running_mean is None:  # track_running_stats=False: always batch statistics
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, first.eps)
        use_batch_stats = training
        means, variances = [n.running_mean for n in norms], [n.running_var for n in norms]
        mean, var = _running_stats(first, means, variances)
        momentum = first.momentum if first.momentum is not None else 1.0 / float(first.num_batches_tracked + 1)
        out = F.batch_norm(x, mean, var, weight, bias, use_batch_stats, momentum, first.eps)
        if use_batch_stats and first.track_running_stats:
            # written back with multi-tensor ops: 3 launches instead of 3 per path (on CUDA these
            # per-path copies were a third of the training step's operations, docs/speed.md)
            with torch.no_grad():
                n_paths = len(norms)
                torch._foreach_copy_(means, list(mean.chunk(n_paths)))
                torch._foreach_copy_(variances, list(var.chunk(n_paths)))
                torch._foreach_add_([n.num_batches_tracked for n in norms], 1)
            _remember_running_stats(first, means, variances, mean, var)
        return out
    return F.instance_norm(x, None, None, weight, bias, True, 0.0, first.eps)


def _conv_norm(x: torch.Tensor | Sequence[torch.Tensor], module: nn.Module, convs: Sequence[nn.Conv3d],
               norms: Sequence[nn.Module], activation: Activation | None = None) -> torch.Tensor:
    """Grouped ``conv.conv_norm``: the BatchNorms folded into the convolutions (and ``activation``
    fused, without autograd) when ``module`` is in eval."""
    first = convs[0]
    if foldable_batchnorm(module, norms[0]):
        weight, bias = _folded(first, list(zip(convs, norms)))
        parts = [x] if isinstance(x, torch.Tensor) else list(x)
        return conv3d_concat(parts, weight, bias, first.stride, first.padding, first.dilation,
                             first.groups * len(convs), activation)
    y = _norm(_conv(x, convs), norms)
    return y if activation is None else activation(y)


def _conv_unit(x: torch.Tensor | Sequence[torch.Tensor], units: Sequence[ConvUnit]) -> torch.Tensor:
    return _conv_norm(x, units[0], [u.conv for u in units], [u.norm for u in units],
                      Activation("leaky_relu", units[0].act.negative_slope))


def _units(x: torch.Tensor | Sequence[torch.Tensor], seqs: Sequence[nn.Sequential]) -> torch.Tensor:
    for units in zip(*seqs):
        x = _conv_unit(x, units)
    return x


def _layer_norm(x: torch.Tensor, norms: Sequence[LayerNorm3d]) -> torch.Tensor:
    b, nc, d, h, w = x.shape
    n, first = len(norms), norms[0]
    t = x.permute(0, 2, 3, 4, 1).reshape(b, d, h, w, n, nc // n)
    t = F.layer_norm(t, first.normalized_shape, None, None, first.eps)
    weight = _cat(first, "_grouped_weight", [m.weight for m in norms]).view(n, -1)
    bias = _cat(first, "_grouped_bias", [m.bias for m in norms]).view(n, -1)
    return torch.addcmul(bias, t, weight).reshape(b, d, h, w, nc).permute(0, 4, 1, 2, 3)


def _scale(x: torch.Tensor, scales: Sequence[nn.Module]) -> torch.Tensor:
    gamma = _cat(scales[0], "_grouped_gamma", [s.gamma for s in scales])
    return x * gamma.view(1, -1, 1, 1, 1).to(x.dtype)


def _drop_path(x: torch.Tensor, drops: Sequence[nn.Module]) -> torch.Tensor:
    """Stochastic depth with one draw per sample and path, as each path's own DropPath makes."""
    first = drops[0]
    if not isinstance(first, DropPath) or not first.training or first.drop_prob == 0.0:
        return x
    keep = 1.0 - first.drop_prob
    b, nc = x.shape[:2]
    n = len(drops)
    mask = x.new_empty((b, n, 1)).bernoulli_(keep).div_(keep).expand(b, n, nc // n).reshape(b, nc, 1, 1, 1)
    return x * mask


def _lka_fold(blocks: Sequence[LKABlock]) -> LKAFold:
    """The blocks' folds (``folding.fold_lka_block``) concatenated; cached on the parameters."""
    sources = [t for b in blocks for t in lka_fold_sources(b)]

    def make() -> LKAFold:
        return LKAFold(*(torch.cat(parts) for parts in zip(*(fold_lka_block_uncached(b) for b in blocks))))

    return derived_tensors(blocks[0], "_grouped_lka_fold", sources, make)


def _lka_block(x: torch.Tensor, blocks: Sequence[LKABlock]) -> torch.Tensor:
    attn = [b.attn for b in blocks]
    lka = [a.lka for a in attn]

    def gated(u: torch.Tensor) -> torch.Tensor:
        return u * _conv(_conv(_conv(u, [k.conv0 for k in lka]), [k.conv_spatial for k in lka]), [k.conv1 for k in lka])

    mlp = [b.mlp for b in blocks]
    if all(foldable_lka_block(b) for b in blocks):  # eval (folding.py)
        return lka_block_folded(x, _lka_fold(blocks), gated,
                                lambda h: _conv(h, [m.dwconv for m in mlp], Activation("gelu")), groups=len(blocks))
    h = _norm(x, [b.norm1 for b in blocks])
    branch = h + _conv(gated(_conv(h, [a.proj_1 for a in attn], Activation("gelu"))), [a.proj_2 for a in attn])
    x = x + _drop_path(_scale(branch, [b.ls1 for b in blocks]), [b.drop_path1 for b in blocks])
    h = _norm(x, [b.norm2 for b in blocks])
    h = _conv(_conv(_conv(h, [m.fc1 for m in mlp]), [m.dwconv for m in mlp], Activation("gelu")), [m.fc2 for m in mlp])
    return x + _drop_path(_scale(h, [b.ls2 for b in blocks]), [b.drop_path2 for b in blocks])


# ----------------------------------------------------------------------------- the paths
def grouped_local_features(paths: Sequence[ULKAPath], x: torch.Tensor) -> torch.Tensor:
    """Full-resolution decoder features of every path on its channel group of ``x`` (grouped layout)."""
    encoders = [p.encoder for p in paths]
    stem = _units(x, [e.stem for e in encoders])
    features = []
    for stages in zip(*[e.stages for e in encoders]):
        embeds = [s.downsample for s in stages]
        x = _conv_norm(x, embeds[0], [e.proj for e in embeds], [e.norm for e in embeds])
        for blocks in zip(*[s.blocks for s in stages]):
            x = _lka_block(x, blocks)
        x = _layer_norm(x, [s.norm for s in stages])
        features.append(x)

    decoders = [p.decoder for p in paths]
    dec = decoders[0]
    skips = [_units(f, units) for f, units in zip(features, zip(*[d.skips for d in decoders]))]
    y = _units(skips[-1], [d.blocks[0] for d in decoders])
    for j, res in enumerate(range(dec.num_stages, 0, -1), start=1):
        y = dec.upsamples[j - 1](y)
        y = _units((y, skips[res - 2]) if res >= 2 else y, [d.blocks[j] for d in decoders])
    return _units((dec.upsamples[-1](y), stem), [d.final for d in decoders])
