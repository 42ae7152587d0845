"""Depthwise 3D convolutions (LKA's 5^3 and dilated 7^3, the MLP's 3^3) on oneDNN's fast kernels.

oneDNN's 3D depthwise backward runs 10-50x below its forward, and its dilated kernel 10-30x below
its undilated one (docs/speed.md, levers ``depthwise_input_grad``, ``depthwise_weight_grad``,
``depthwise_weight_slices``, ``dilated_phases``). Every route here computes the same products as
the plain call, grouped differently:

* a dilated convolution runs undilated on the d^3 phases of its input (``same_depthwise_forward``);
* the input gradient is the forward convolution of the output gradient with the flipped kernel;
* the weight gradient takes the fastest exact route for its shape (``depthwise_weight_grad_route``):
  phases, 2D depth slices, or 16-channel grouped blocks, 512 channels per call.

``python -m nnunet_logonet.benchmark.depthwise_grad`` times every route on the machine it runs on.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..levers import lever_enabled

__all__ = ["SameDepthwiseConv3d", "same_depthwise_forward", "depthwise_weight_grad", "depthwise_weight_grad_route",
           "depthwise_weight_grad_by_slices", "depth_slices_pay", "dilated_phases_pay", "to_phases", "from_phases"]


#: channels per oneDNN call for a depthwise weight gradient (see ``depthwise_weight_grad``)
DEPTHWISE_GRAD_CHUNK = 512
#: channels per group of the grouped convolution whose weight gradient holds the depthwise one
DEPTHWISE_GRAD_BLOCK = 16


#: smallest in-plane size at which kernels wider than 3 take the depth-slice path (below it the 2D
#: kernel over a few 4 x 4 planes was slower than the 3D one: 5^3 on [2, 128-256, 4^3])
DEPTHWISE_SLICES_MIN_PLANE = 8
#: kernels wider than 3 take the depth-slice path on AVX2 only. Measured (16-channel blocks -> slices,
#: 5^3): AMD EPYC (AVX2) [2, 64, 16^3] 36 -> 14 ms; Xeon Cascade Lake (AVX-512) [2, 64, 16^3]
#: 11.6 -> 22.6 ms, [2, 64, 32^3] 70 -> 126 ms, [2, 512, 8^3] 10 -> 34 ms: oneDNN's 2D depthwise
#: weight gradient for 5 x 5 is the slower one there, so wide kernels keep the blocks
DEPTHWISE_SLICES_WIDE_KERNELS = torch.backends.cpu.get_cpu_capability() == "AVX2"
#: smallest channels x voxels per sample for the depth-slice path: its 2 x (kernel depth) oneDNN calls
#: cost ~1.2 ms, more than the whole 3D weight gradient of small maps ([2, 128, 4^3]: 1.25 vs 1.05 ms;
#: [2, 512, 4^3]: 1.3 vs 4.3 ms; AMD EPYC, ad-hoc script)
DEPTHWISE_SLICES_MIN_ELEMENTS = 16384
#: planes this narrow (an in-plane side of at most 2 voxels) take at most DEPTHWISE_SLICES_NARROW_CHUNK
#: channels per 2D call: oneDNN's 2D depthwise weight gradient falls off a cliff there beyond ~3000
#: channels (AMD EPYC Zen 4, 3^3, ms, one call -> 2048-channel calls: [2, 8192, 2^3] 172 -> 9.6,
#: [2, 4096, 2^3] 93 -> 4.7, [2, 6144, 2^3] 120 -> 7.2, [2, 8192, 2x2x4] 164 -> 11, [2, 8192, 2x1x2]
#: 143 -> 9.6; 4 x 4 and 3 x 3 planes do not: [2, 8192, 2x4x4] 1.0 ms in one call; the 3D kernel
#: took 13-23 ms on those maps; ad-hoc script): the grouped local paths' bottleneck, 8 x 1024 channels
DEPTHWISE_SLICES_NARROW_PLANE = 2
DEPTHWISE_SLICES_NARROW_CHUNK = 2048
#: the dilated weight gradient goes to the phases (``dilated_phases_pay``) except on AVX2: there oneDNN
#: runs the phases' grouped weight gradient with its generic ``x64:gemm:jit`` kernel, and its dilated 3D
#: kernel is 3-5x faster. Measured (3D -> phases, batch 2, dilation 3, ms, ``python -m
#: nnunet_logonet.benchmark.depthwise_grad``) on an AMD EPYC Zen 4 whose hypervisor hides AVX-512 (2026-12-06):
#: 7^3 on [64, 16^3] 31.4 vs 150.6, [64, 24^3] 87.9 vs 282.1, 5^3 on [64, 12^3] 6.1 vs 26.7; the AVX-512 Zen 4
#: under AVX2 instruction-set caps gave the same (19.3 vs 106.1, 71.0 vs 210.9). The one earlier AVX2 figure,
#: an AMD EPYC Zen 3 (2026-11-26, [64, 24^3] 83 -> 37 ms), said the opposite; no AVX2 CPU has since
DILATED_PHASES_WEIGHT_GRAD = torch.backends.cpu.get_cpu_capability() != "AVX2"


def depth_slices_pay(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     dilation: Sequence[int]) -> bool:
    """Undilated 'same' depthwise convolutions of at least DEPTHWISE_SLICES_MIN_ELEMENTS per sample:
    3^3 always, wider kernels on planes of 8 x 8 or more where DEPTHWISE_SLICES_WIDE_KERNELS. Dilated
    ones lose (7^3, dilation 3, [2, 64, 16^3]: 42 -> 136 ms) and go elsewhere."""
    if any(d != 1 for d in dilation) or grad_out.shape != x.shape or x[0].numel() < DEPTHWISE_SLICES_MIN_ELEMENTS:
        return False
    if max(weight.shape[3:]) <= 3:
        return True
    return DEPTHWISE_SLICES_WIDE_KERNELS and min(x.shape[3:]) >= DEPTHWISE_SLICES_MIN_PLANE


def dilated_phases_pay(x: torch.Tensor, weight: torch.Tensor, dilation: Sequence[int]) -> bool:
    """A dilated depthwise weight gradient is computed on the input's phases (``to_phases``) where
    each phase is at least ``k // 2 + 2`` voxels wide in every dimension, k the kernel size there.

    On the phases it is an undilated weight gradient (16-channel grouped blocks) over a batch of
    d^3 x N small volumes, against oneDNN's dilated 3D depthwise kernel on the original map. Xeon
    Cascade Lake, batch 2, dilation 3 (3D -> phases, ms): 7^3 on [64, 16^3] 82 -> 31, [64, 24^3]
    213 -> 60, [32, 32^3] 312 -> 130, [512, 16^3] 794 -> 337, [64, 13^3] (phases 5 wide) 56 -> 24;
    5^3 on [64, 12^3] (4 wide) 18 -> 6; 3^3 on [512, 8^3] (3 wide) 30 -> 10. Where the phases are
    narrower the padding dominates and it loses: 7^3 on [64, 12^3] (4 wide) 37 -> 150, 5^3 on
    [64, 8^3] (3 wide) 7.7 -> 38, 3^3 on [128, 6^3] (2 wide) 2.3 -> 6.9 (ad-hoc script). AVX2 CPUs keep
    oneDNN's dilated kernel (``DILATED_PHASES_WEIGHT_GRAD``); the forward and the input gradient of the
    same convolution run on the phases everywhere (``same_depthwise_forward``).
    """
    if all(d == 1 for d in dilation) or not DILATED_PHASES_WEIGHT_GRAD:
        return False
    return all(-(-size // d) >= k // 2 + 2 for size, d, k in zip(x.shape[2:], dilation, weight.shape[2:]))


def depthwise_weight_grad_by_slices(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    padding: Sequence[int]) -> torch.Tensor:
    """An undilated 'same' depthwise weight gradient from oneDNN's 2D depthwise kernel.

    Depth tap ``a`` of the kernel pairs output slice z with input slice z + a - padding, so its
    (kh, kw) weight gradient is the 2D depthwise weight gradient over every such pair of slices,
    taken as a batch: the same products and sums, only grouped per depth tap. A channels-last
    sample ``[C, D, H, W]`` seen as ``[D, C, H, W]`` is a channels-last batch of slices (a view),
    so nothing is copied. oneDNN's 2D depthwise kernel is far faster than its 3D one (AMD EPYC,
    3^3, [2, 512, 8^3]: 15.7 ms 3D, 14.4 ms grouped blocks, 1.9 ms by slices; [2, 512, 16^3]: 83 ->
    20 ms; [2, 16, 32^3]: 36 -> 2.5 ms; ad-hoc script). On planes with a side of at most
    DEPTHWISE_SLICES_NARROW_PLANE voxels the channels go DEPTHWISE_SLICES_NARROW_CHUNK per call
    (channels are independent, so the chunks are exact).
    """
    if min(x.shape[3:]) <= DEPTHWISE_SLICES_NARROW_PLANE and weight.shape[0] > DEPTHWISE_SLICES_NARROW_CHUNK:
        step = DEPTHWISE_SLICES_NARROW_CHUNK
        return torch.cat([depthwise_weight_grad_by_slices(grad_out[:, i:i + step], x[:, i:i + step], weight[i:i + step],
                                                          padding) for i in range(0, weight.shape[0], step)]
                         ).contiguous(memory_format=torch.channels_last_3d)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last_3d)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    channels, _, kd, kh, kw = weight.shape
    depth = x.shape[2]
    plane_weight = torch.empty((channels, 1, kh, kw), dtype=weight.dtype, device=weight.device,
                               memory_format=torch.channels_last)
    taps = []
    for a in range(kd):
        shift = a - padding[0]
        lo, hi = max(0, -shift), min(depth, depth - shift)
        tap = torch.zeros((channels, 1, kh, kw), dtype=weight.dtype, device=weight.device)
        for n in range(x.shape[0]) if lo < hi else ():
            tap += torch.ops.aten.convolution_backward(
                grad_out[n].transpose(0, 1)[lo:hi], x[n].transpose(0, 1)[lo + shift:hi + shift], plane_weight, None,
                [1, 1], list(padding[1:]), [1, 1], False, [0, 0], channels, [False, True, False])[1]
        taps.append(tap)
    return torch.stack(taps, 2).contiguous(memory_format=torch.channels_last_3d)


def depthwise_weight_grad_route(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                dilation: Sequence[int], slices: bool = True, phases: bool = True) -> str:
    """The route ``depthwise_weight_grad`` takes: "phases" (dilated, ``dilated_phases_pay``), "slices"
    (undilated, ``depth_slices_pay``), else "blocks" (undilated) or "3d" (oneDNN's dilated kernel).
    ``python -m nnunet_logonet.benchmark.depthwise_grad`` times each route beside this choice."""
    if phases and grad_out.shape == x.shape and dilated_phases_pay(x, weight, dilation):
        return "phases"
    if slices and depth_slices_pay(grad_out, x, weight, dilation):
        return "slices"
    return "blocks" if all(d == 1 for d in dilation) else "3d"


def depthwise_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          padding: Sequence[int], dilation: Sequence[int], slices: bool = True,
                          phases: bool = True) -> torch.Tensor:
    """The weight gradient of a depthwise convolution from oneDNN's faster kernels.

    oneDNN's 3D depthwise weight gradient runs at 1-5 GMAC/s here. With ``phases`` (the lever
    "dilated_phases") a dilated one where that pays (``dilated_phases_pay``) is the undilated
    weight gradient over the d^3 phases of its input and output gradient: a dilation-d convolution
    pairs only voxels of the same phase, d apart, so the products and sums are the same (the zero
    padding of the phases pairs with zero gradients). With ``slices`` (the lever
    "depthwise_weight_slices") undilated ones where that pays (``depth_slices_pay``) come from its
    2D kernel over depth slices (``depthwise_weight_grad_by_slices``); the others take two exact detours:

    * Undilated: it is the diagonal of the weight gradient of a grouped convolution with
      DEPTHWISE_GRAD_BLOCK channels per group (entry (c, c) of a group sums grad_out[c] times
      x[c], the same products in the same kernel). oneDNN's grouped kernel is 2-4x faster even
      though it computes the block x block products ([2, 512, 16^3], 3^3: 50 ms -> 11 ms); the
      result was equal bit for bit in every shape measured. Dilated ones lose (2x slower) and keep
      the depthwise kernel.
    * DEPTHWISE_GRAD_CHUNK channels per call: oneDNN is 2-5x slower per channel on one wide call
      over a small volume (the grouped local paths' MLP at 8 x 1024 channels on 4^3: 62 ms vs
      14 ms); channels are independent, so the chunks are exact.
    """
    route = depthwise_weight_grad_route(grad_out, x, weight, dilation, slices, phases)
    if route == "phases":
        undilated = [p // d for p, d in zip(padding, dilation)]
        # blocks, not slices: on the phases' batch of d^3 x N small volumes the slices were slower
        return depthwise_weight_grad(to_phases(grad_out, dilation), to_phases(x, dilation), weight, undilated,
                                     [1, 1, 1], slices=False)
    if route == "slices":
        return depthwise_weight_grad_by_slices(grad_out, x, weight, padding)
    channels = x.shape[1]
    k = weight.shape[2:]
    block = math.gcd(DEPTHWISE_GRAD_BLOCK, channels) if all(d == 1 for d in dilation) else 1
    step = DEPTHWISE_GRAD_CHUNK
    chunks = []
    for start in range(0, channels, step):
        stop = min(start + step, channels)
        width = stop - start
        g, xi = grad_out[:, start:stop], x[:, start:stop]
        if channels > step:
            g = g.contiguous(memory_format=torch.channels_last_3d)
            xi = xi.contiguous(memory_format=torch.channels_last_3d)
        # the grouped weight's values are never read, only its shape
        grouped = weight[start:stop] if block == 1 else torch.empty(
            (width, block, *k), dtype=weight.dtype, device=weight.device, memory_format=torch.channels_last_3d)
        grad = torch.ops.aten.convolution_backward(
            g, xi, grouped, None, [1, 1, 1], list(padding), list(dilation), False, [0, 0, 0], width // block,
            [False, True, False])[1]
        if block > 1:  # (width/block, block out, block in, k...) -> the diagonal out == in
            grad = grad.reshape(width // block, block, block, *k).diagonal(dim1=1, dim2=2)
            grad = grad.permute(0, 4, 1, 2, 3).reshape(width, 1, *k)
        chunks.append(grad)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def to_phases(x: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """(N, C, D, H, W) -> (N*d0*d1*d2, C, ceil(D/d0), ...), channels-last: sample n's phase (a, b, c)
    holds x[n, :, a::d0, b::d1, c::d2], zero-padded at the far end to a whole number of steps."""
    n, c = x.shape[:2]
    d0, d1, d2 = dilation
    m0, m1, m2 = (-(-size // step) for size, step in zip(x.shape[2:], dilation))
    pad = (0, m2 * d2 - x.shape[4], 0, m1 * d1 - x.shape[3], 0, m0 * d0 - x.shape[2])
    if any(pad):
        x = F.pad(x, pad)
    t = x.permute(0, 2, 3, 4, 1).reshape(n, m0, d0, m1, d1, m2, d2, c).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return t.reshape(n * d0 * d1 * d2, m0, m1, m2, c).permute(0, 4, 1, 2, 3)


def from_phases(y: torch.Tensor, dilation: Sequence[int], size: Sequence[int],
                memory_format: torch.memory_format) -> torch.Tensor:
    """Inverse of ``to_phases`` (cropped back to ``size``), in ``memory_format``."""
    nd, c, m0, m1, m2 = y.shape
    d0, d1, d2 = dilation
    n = nd // (d0 * d1 * d2)
    t = y.permute(0, 2, 3, 4, 1).reshape(n, d0, d1, d2, m0, m1, m2, c).permute(0, 4, 1, 5, 2, 6, 3, 7)
    t = t.reshape(n, m0 * d0, m1 * d1, m2 * d2, c)[:, : size[0], : size[1], : size[2]].permute(0, 4, 1, 2, 3)
    return t.contiguous(memory_format=memory_format)


def same_depthwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           padding: Sequence[int], dilation: Sequence[int], use_phases: bool = True) -> torch.Tensor:
    """oneDNN's stride-1 'same' depthwise convolution; a dilated one runs undilated on phases.

    oneDNN's dilated 3D depthwise kernel runs at 1-7 GMAC/s here, 10-30x below its undilated one
    (LKA's 7^3 dilation-3 convolution on [2, 64, 16^3]: 22 ms vs 2 ms). A dilation-d convolution only
    ever combines voxels that lie d apart, so it splits exactly into d^3 undilated convolutions with
    the same kernel, one per phase ``x[a::d, b::d, c::d]`` (the space-to-batch identity behind atrous
    convolution): the phases go into the batch, one undilated call convolves them, and the result
    is interleaved back. Same products and sums as the dilated call; two copies of the map.
    ``use_phases=False`` calls oneDNN's dilated kernel (the lever "dilated_phases" off).
    """
    channels = x.shape[1]
    if all(d == 1 for d in dilation) or not use_phases:
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), dilation, channels)
    fmt = torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format
    phases = to_phases(x, dilation).contiguous(memory_format=torch.channels_last_3d)
    radius = [p // d for p, d in zip(padding, dilation)]
    y = torch.mkldnn_convolution(phases, weight.contiguous(memory_format=torch.channels_last_3d), bias, radius,
                                 (1, 1, 1), (1, 1, 1), channels)
    return from_phases(y, dilation, x.shape[2:], fmt)


class SameDepthwiseConv3d(torch.autograd.Function):
    """Forward by ``same_depthwise_forward``; input gradient as the same forward with the flipped
    kernel (exact); weight gradient oneDNN's on the original layout (see ``depthwise_weight_grad``).
    Each of the three follows its lever (read at the forward), else oneDNN's own call."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        ctx.phases = lever_enabled("dilated_phases")
        ctx.flipped_input_grad = lever_enabled("depthwise_input_grad")
        ctx.blocked_weight_grad = lever_enabled("depthwise_weight_grad")
        ctx.weight_grad_slices = lever_enabled("depthwise_weight_slices")
        return same_depthwise_forward(x, weight, bias, padding, dilation, ctx.phases)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        plain = [False, False, False]
        if ctx.needs_input_grad[0] and ctx.flipped_input_grad:
            flipped = weight.flip((2, 3, 4)).contiguous(memory_format=torch.channels_last_3d)
            grad_x = same_depthwise_forward(grad_out, flipped, None, ctx.padding, ctx.dilation, ctx.phases)
        else:
            plain[0] = ctx.needs_input_grad[0]
        if ctx.needs_input_grad[1] and ctx.blocked_weight_grad:
            grad_w = depthwise_weight_grad(grad_out, x, weight, ctx.padding, ctx.dilation, ctx.weight_grad_slices,
                                           ctx.phases)
        else:
            plain[1] = ctx.needs_input_grad[1]
        if any(plain):
            grads = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1, 1], list(ctx.padding), list(ctx.dilation), False, [0, 0, 0],
                x.shape[1], plain)
            grad_x = grads[0] if plain[0] else grad_x
            grad_w = grads[1] if plain[1] else grad_w
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None, None
