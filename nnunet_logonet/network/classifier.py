"""The 1x1x1 segmentation classifier that writes its logits channels-first (lever ``channels_first_logits``)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .conv import Conv3d
from .levers import lever_enabled

__all__ = ["Classifier3d"]


class Classifier3d(Conv3d):
    """A 1x1x1 convolution that returns its logits channels-first on CPU (same parameters as ``nn.Conv3d``).

    Everything before it runs channels-last, but nnU-Net reads the logits channels-first: its loss
    (softmax, one-hot Dice, cross-entropy) and ``predict_sliding_window_return_logits`` (which adds
    each tile into a channels-first accumulator) were 2-3x slower on channels-last logits
    (LoGoNet-S's output at 64^3, batch 2: loss forward and backward 166-223 ms vs 58-105 ms;
    nnU-Net's sliding window alone over a 240^3 case with 96^3 tiles: 10.1-10.3 s vs 7.7-9.1 s).
    As one batched matrix product ``W @ X^T`` over the channels-last rows the classifier writes
    channels-first directly, as fast as oneDNN's 1x1x1 convolution (16 -> 14 at 96^3, batch 2:
    63 vs 71 ms; converting oneDNN's output instead: 179 ms). Figures from ad-hoc scripts; the
    in-network effect: ``logonet_lever_ab --lever channels_first_logits`` (docs/speed.md).
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not (lever_enabled("channels_first_logits") and input.device.type == "cpu" and input.dim() == 5
                and input.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()
                and input.is_contiguous(memory_format=torch.channels_last_3d) and self.groups == 1
                and not isinstance(self.padding, str) and all(p == 0 for p in self.padding)
                and all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)):
            return super()._conv_forward(input, weight, bias)
        n, c, d, h, w = input.shape
        rows = input.permute(0, 2, 3, 4, 1).reshape(n, d * h * w, c)  # a view: channels-last is (N, DHW, C)
        out = _ChannelsFirstLinear.apply(rows, weight.reshape(weight.shape[0], c), bias)
        return out.view(n, -1, d, h, w)


class _ChannelsFirstLinear(torch.autograd.Function):
    """(N, V, C) rows -> (N, O, V) = W @ rows^T + b; the rows' gradient comes back (N, V, C) contiguous,
    i.e. channels-last for the network before the classifier (autograd's own ``bmm`` backward would
    hand it channels-first, and every layer before would pay for the layout change)."""

    @staticmethod
    def forward(ctx, rows, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        n, o = rows.shape[0], weight.shape[0]
        kernel = weight.expand(n, *weight.shape)
        if bias is None:
            return torch.bmm(kernel, rows.transpose(1, 2))
        return torch.baddbmm(bias.view(1, o, 1).expand(n, o, rows.shape[1]), kernel, rows.transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        rows, weight = ctx.saved_tensors
        grad_rows = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # per sample (V, O) @ (O, C) with the (V, O) operand read transposed in place: ``matmul``
            # folded the batch into the rows, which needed a (N, V, O) copy of the gradient first
            grad_rows = torch.bmm(grad.transpose(1, 2), weight.expand(grad.shape[0], *weight.shape))
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad, rows).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        return grad_rows, grad_weight, grad_bias
