"""1x1x1 convolutions of channels-last maps as matrix products over their (voxels, channels) rows.

Lever ``pointwise_gemm`` (docs/speed.md): oneDNN's 1x1x1 convolution pays a fixed cost per call, and
LoGoNet's LKA blocks make five per block, hundreds per training step, on small maps. The rows of a
channels-last map are a view, so forward and backward are plain matrix products, no copy.
``python -m nnunet_logonet.benchmark.pointwise_gemm`` times both routes on the machine it runs on.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..levers import lever_enabled
from .geometry import from_rows, to_rows

__all__ = ["PointwiseConv3d", "pointwise_gemm_pays", "pointwise_forward", "pointwise_forward_route",
           "POINTWISE_GEMM_MAX_ROWS"]


#: rows (batch x voxels) up to which a 1x1x1 convolution's forward runs as a matrix product; above, oneDNN's
#: convolution (its forward was 1.0-1.4x faster from 12^3 x 2 rows up; the backward is a product everywhere)
POINTWISE_GEMM_MAX_ROWS = 1024


def pointwise_gemm_pays(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """A dense, stride-1, unpadded 1x1x1 convolution of a channels-last input (``pointwise_gemm``).

    In channels-last memory such a convolution is one matrix product: the input is a (rows, C_in)
    matrix (a view), the output (rows, C_out) is ``x @ W^T + b``, the input gradient ``g @ W`` and the
    weight gradient ``g^T @ x``. oneDNN's 1x1x1 convolution pays a fixed cost per call that LoGoNet's
    LKA blocks (five 1x1x1 convolutions each, on maps of 2^3 to 16^3) meet hundreds of times per step:
    on the 2-core Xeon Cascade Lake (``python -m nnunet_logonet.benchmark.pointwise_gemm``, batch 2;
    ``convolution_backward`` vs three products) the backward took, in ms, [2, 1024, 4^3] -> 128: 1.02
    -> 0.33; [2, 2048, 2^3] -> 512: 4.33 -> 0.51; [2, 128, 8^3] -> 1024: 5.24 -> 2.84, and within 5 %
    either way on the widest 16^3 maps ([2, 64, 16^3] -> 512: 7.99 vs 8.43), so it always takes the
    products; the forward was 1.1-3x faster up to 2 x 8^3 rows and 0.7-0.9x on 16^3 maps
    (``POINTWISE_GEMM_MAX_ROWS``). Measured on AVX-512 only.
    """
    return (
        groups == 1
        and weight.shape[2:] == (1, 1, 1)
        and tuple(stride) == (1, 1, 1)
        and tuple(padding) == (0, 0, 0)
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and lever_enabled("pointwise_gemm")
    )


def pointwise_forward_route(x: torch.Tensor) -> str:
    """'gemm' or 'onednn': how the forward of a 1x1x1 convolution taking the ``pointwise_gemm`` path
    runs for input ``x`` (its backward is always the products)."""
    return "gemm" if x.shape[0] * x.shape[2:].numel() <= POINTWISE_GEMM_MAX_ROWS else "onednn"


def pointwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Forward of a 1x1x1 convolution on the ``pointwise_gemm`` path: one matrix product over the
    channels-last rows, or oneDNN's convolution above ``POINTWISE_GEMM_MAX_ROWS`` rows."""
    if pointwise_forward_route(x) == "onednn":
        return torch.mkldnn_convolution(x, weight, bias, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1)
    w = weight.reshape(weight.shape[0], weight.shape[1])
    rows = to_rows(x)
    out = torch.mm(rows, w.t()) if bias is None else torch.addmm(bias, rows, w.t())
    return from_rows(out, x)


class PointwiseConv3d(torch.autograd.Function):
    """A 1x1x1 convolution whose gradients are matrix products (``pointwise_gemm_pays``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return pointwise_forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_rows = to_rows(grad_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = from_rows(grad_rows @ weight.reshape(weight.shape[0], weight.shape[1]), x)
        if ctx.needs_input_grad[1]:
            fmt = torch.channels_last_3d if weight.is_contiguous(memory_format=torch.channels_last_3d) \
                else torch.contiguous_format
            grad_w = (grad_rows.t() @ to_rows(x)).view(weight.shape).contiguous(memory_format=fmt)
        if ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b
