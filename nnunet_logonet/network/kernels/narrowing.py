"""The weight gradient of a narrowing convolution computed as the widening one's (AVX2 CPUs).

Lever ``narrowing_weight_grad`` (docs/speed.md): on AVX2, oneDNN's weight gradient of a convolution
with fewer output than input channels (the full-resolution 64 -> 16 units) runs at a third of its
forward speed; the flipped, transposed weight gradient of the widening convolution is the same sum
of the same products and runs 2-3.5x faster there.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..levers import lever_enabled
from .geometry import is_same_padding

__all__ = ["NarrowingConv3d", "swapped_weight_grad_pays", "SWAP_NARROWING_WEIGHT_GRAD"]


#: compute narrowing convolutions' weight gradients as the widening one's (see ``NarrowingConv3d``);
#: measured only on AVX2 (AMD EPYC, Zen 3), where oneDNN's own is 2-3.5x slower; off elsewhere
SWAP_NARROWING_WEIGHT_GRAD = torch.backends.cpu.get_cpu_capability() == "AVX2"


def swapped_weight_grad_pays(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                             groups: int) -> bool:
    """A dense, stride-1 'same' convolution with fewer output than input channels, batch >= 2, on AVX2.

    Measured (oneDNN weight gradient -> swapped, batch 2, channels-last): 64 -> 16 at 64^3
    802 -> 221 ms, 96 -> 16 945 -> 374 ms, 32 -> 16 292 -> 153 ms, 64 -> 16 at 32^3 64 -> 31 ms,
    64 -> 32 at 16^3 15 -> 12 ms; at batch 1 the swapped call was 2-4x slower on 32^3 maps,
    and for widening convolutions (32 -> 64: 506 -> 702 ms) it loses, so neither takes it.
    """
    return (SWAP_NARROWING_WEIGHT_GRAD
            and lever_enabled("narrowing_weight_grad")
            and groups == 1
            and x.shape[0] >= 2
            and weight.shape[0] < weight.shape[1]
            and is_same_padding(weight, stride, padding, dilation))


class NarrowingConv3d(torch.autograd.Function):
    """oneDNN's convolution; the weight gradient computed as a widening convolution's.

    For a stride-1 'same' convolution y = conv(x, w), w of shape (O, I, k), the weight gradient
    ``sum_v grad_y[v, o] * x[v + t, i]`` (t = tap offset) is, with v' = v + t, the weight gradient of
    the convolution that maps grad_y (O channels) to a map of I channels, taken with x as that
    map's output gradient, at tap -t: the same products, summed over the same voxels (zero padding
    drops the same pairs on both sides). So grad_w = that (I, O, k) gradient, transposed and
    flipped. The input gradient is oneDNN's own.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), dilation, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        padding, dilation = list(ctx.padding), list(ctx.dilation)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1, 1], padding, dilation, False, [0, 0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            fmt = torch.channels_last_3d if weight.is_contiguous(memory_format=torch.channels_last_3d) \
                else torch.contiguous_format
            # the widening convolution's weight is never read, only its shape
            widening = torch.empty((weight.shape[1], weight.shape[0], *weight.shape[2:]), dtype=weight.dtype,
                                   device=weight.device, memory_format=torch.channels_last_3d)
            grad = torch.ops.aten.convolution_backward(
                x, grad_out, widening, None, [1, 1, 1], padding, dilation, False, [0, 0, 0], 1,
                [False, True, False])[1]
            grad_w = grad.transpose(0, 1).flip((2, 3, 4)).contiguous(memory_format=fmt)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None, None
