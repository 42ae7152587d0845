"""Full-resolution conv units in CPU training with their large tensors in kept memory (lever ``training_buffers``).

Why: a LoGoNet-S training step at 64^3 allocated ~2 GB in blocks of 32 MiB and more, most of them
by the full-resolution conv units (conv 3^3 -> BatchNorm -> LeakyReLU, and the head's -> GELU): the
convolution's, the BatchNorm's (and the GELU's) outputs in the forward; the activation's, the
BatchNorm's and the convolution's input gradients in the backward. glibc serves every block of
32 MiB or more as fresh ``mmap`` pages that the kernel faults in and zeroes 4 KiB at a time on
first write (docs/speed.md, "The allocator"), so each step paid for ~1.5 GB of page faults. The
inference pool (``buffers``) does not help there: under autograd PyTorch allocates these tensors
itself. Here the whole unit is one autograd Function that writes all of them into blocks its
network keeps from one step to the next (:class:`buffers.OutputPool`, a pool of its own for
training, freed by ``eval()``):

* forward: the convolution into a zeroed kept block (oneDNN's sum post-op: ``0 + conv``, the same
  floats; over the parts of a concatenation, each part's convolution added by the same post-op),
  the BatchNorm (batch statistics, running statistics updated as ``nn.BatchNorm3d`` does) by its
  ``out=`` kernel into a second block, the LeakyReLU in place (a GELU, whose gradient needs its
  input, by its ``out=`` kernel into a third block);
* backward: the activation's gradient by its ``out=`` kernel into a kept block; the BatchNorm's
  weight and bias gradients by PyTorch's kernel, its input gradient from them in place (per channel
  ``a * g + b * y + c``: two passes; PyTorch's own kernel would allocate its result); the
  convolution's weight gradient by oneDNN (a bias's, if any, as a sum), its input gradient as the
  forward convolution of that gradient with the transposed, flipped kernel into a zeroed kept block
  (stride 1, 'same' padding: the products of the transposed convolution that oneDNN's
  backward-data kernel computes). The activation's gradient goes into the block of the tensor it is
  computed from (the LeakyReLU's output, the GELU's input), the input gradient into the block of the
  convolution's output once the BatchNorm's gradient has read it, wherever nothing but this Function
  still refers to them (:func:`_only_saved_here`): the forward's blocks are still held when the
  backward starts, so fresh ones would hold a second copy of the unit's tensors (LoGoNet-S at 96^3:
  4.4 GB of blocks where at most 3.2 GB were in use at once). Writing there bumps the saved tensors'
  version counters, so a second backward through the same graph (``retain_graph=True``) stops with
  autograd's in-place error instead of reading overwritten values.

The decoder's last trilinear upsampling (its output is the last unit's input) writes into a kept
block the same way (:class:`PooledUpsample3d`; its backward's result is 8x smaller).

Outputs equal the modules' float for float; gradients differ by float32 rounding (the BatchNorm
input gradient sums its terms in another order). Taken for CPU float32 channels-last units with
outputs of at least :data:`MIN_BYTES` while a LoGoNet or ULKANet trains (``buffers.pooled_outputs``);
tests/test_fast_paths.py compares whole training steps with the reference.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .buffers import OutputPool, _storage_use_count, active_training_pool
from .conv import _CONV_ADD_INPLACE, Activation, _use_onednn
from .kernels.narrowing import swapped_weight_grad_pays
from .levers import lever_enabled

__all__ = ["MIN_BYTES", "PooledConvNormAct", "PooledUpsample3d", "pooled_conv_norm_act", "pooled_unit_pays",
           "pooled_upsample_pays"]

#: Smallest unit output (bytes) that runs in kept memory: glibc mmaps every block of 32 MiB or more
#: (its largest dynamic threshold); smaller ones come mostly from memory its heap already holds.
MIN_BYTES = 32 * 2 ** 20

_CL = torch.channels_last_3d
_ONES = [1, 1, 1]
_ZEROS = [0, 0, 0]


def pooled_unit_pays(conv: nn.Conv3d, norm: nn.Module, act: nn.Module, parts: Sequence[torch.Tensor]
                     ) -> OutputPool | None:
    """The pool a conv unit's training step should run in (:class:`PooledConvNormAct`), else None."""
    x = parts[0]
    if (not torch.is_grad_enabled() or not lever_enabled("training_buffers") or _CONV_ADD_INPLACE is None
            or type(norm) is not nn.BatchNorm3d or not norm.training or not norm.affine
            or type(act) not in (nn.LeakyReLU, nn.GELU) or Activation.of(act) is None
            or getattr(act, "negative_slope", 1.0) <= 0 or conv.groups != 1  # (in place: the output gives the sign)
            or conv.padding_mode != "zeros" or tuple(conv.kernel_size) != (3, 3, 3)
            or tuple(conv.stride) != (1, 1, 1) or tuple(conv.padding) != (1, 1, 1)
            or tuple(conv.dilation) != (1, 1, 1) or not _use_onednn(x, conv.weight)):
        return None
    out_shape = (x.shape[0], conv.out_channels, *x.shape[2:])
    pool = active_training_pool()
    if pool is None or 4 * math.prod(out_shape) < MIN_BYTES:
        return None
    if len(parts) > 1 and not lever_enabled("concat_sum"):
        return None  # the reference builds the concatenation
    if sum(p.shape[1] for p in parts) != conv.in_channels or any(
            p.dtype != torch.float32 or p.shape[0] != x.shape[0] or p.shape[2:] != x.shape[2:]
            or not p.is_contiguous(memory_format=_CL) for p in parts):
        return None
    start = 0
    for part in parts:  # where the narrowing lever computes a weight gradient faster (AVX2), the modules run
        width = part.shape[1]
        if swapped_weight_grad_pays(part, conv.weight[:, start:start + width], (1, 1, 1), (1, 1, 1), (1, 1, 1), 1):
            return None
        start += width
    return pool


def pooled_conv_norm_act(pool: OutputPool, conv: nn.Conv3d, norm: nn.BatchNorm3d, act: nn.Module,
                         parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``act(norm(conv(cat(parts))))`` in training, its large tensors in ``pool``'s blocks."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)  # as nn.BatchNorm3d.forward does
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    running = (norm.running_mean, norm.running_var) if norm.track_running_stats else (None, None)
    return PooledConvNormAct.apply(pool, running, momentum, norm.eps, Activation.of(act),
                                   conv.weight, conv.bias, norm.weight, norm.bias, *parts)


def _only_saved_here(t: torch.Tensor, is_output: bool) -> bool:
    """Whether nothing but the pool's block and this Function's saved copy refers to the storage of
    ``t`` (a tensor just unpacked from ``ctx.saved_tensors``), so its memory may take a gradient.

    Users of the storage then: the pool's block, ``t`` and the temporary storage object; a saved
    output adds the alias autograd keeps of it. Anything else (the caller keeping the unit's
    output, a hook) adds one more, and the memory is left alone. A PyTorch that counts differently
    only costs fresh blocks (tests/test_fast_paths.py checks that the reuse happens).
    """
    return _storage_use_count(t.untyped_storage()._cdata) == (4 if is_output else 3)


def _channels_last_on(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A channels-last tensor of ``shape`` on the start of ``t``'s memory, as a view of ``t`` (so writing
    it bumps ``t``'s version counter)."""
    n, c, d, h, w = (int(v) for v in shape)
    return t.as_strided((n, c, d, h, w), (c * d * h * w, 1, h * w * c, w * c, c), t.storage_offset())


def _conv_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out += conv3d(x, weight, bias)`` (3^3, stride 1, padding 1) by oneDNN's sum post-op."""
    _CONV_ADD_INPLACE(out, x, weight, bias, _ONES, _ONES, _ONES, 1, "add", None, None, [], None)


class PooledConvNormAct(torch.autograd.Function):
    """conv 3^3 -> BatchNorm (batch statistics) -> LeakyReLU or GELU, every full-size tensor in ``pool``."""

    @staticmethod
    def forward(ctx, pool: OutputPool, running: tuple, momentum: float, eps: float,  # type: ignore[override]
                activation: Activation, weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor,
                beta: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        x = parts[0]
        channels = weight.shape[0]
        shape = (x.shape[0], channels, *x.shape[2:])
        y = pool.take(shape).zero_()
        start = 0
        for i, part in enumerate(parts):
            _conv_into(y, part, weight[:, start:start + part.shape[1]], bias if i == 0 else None)
            start += part.shape[1]
        z = pool.take(shape)
        mean, invstd = y.new_empty(channels), y.new_empty(channels)
        torch.ops.aten.native_batch_norm.out(y, gamma, beta, running[0], running[1], True, momentum, eps,
                                             out=z, save_mean=mean, save_invstd=invstd)
        if activation.name == "gelu":
            out = pool.take(shape)
            torch.ops.aten.gelu.out(z, approximate="none", out=out)
        else:
            out = torch.ops.aten.leaky_relu_(z, activation.negative_slope)
        ctx.save_for_backward(weight, gamma, y, z, mean, invstd, *parts)
        ctx.pool, ctx.eps, ctx.activation = pool, eps, activation
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        weight, gamma, y, z, mean, invstd, *parts = ctx.saved_tensors
        pool, activation = ctx.pool, ctx.activation
        # z is the Function's output for LeakyReLU (in place): autograd saves it as a separate alias
        grad = z if _only_saved_here(z, is_output=activation.name != "gelu") else pool.take(z.shape)
        if activation.name == "gelu":  # z: the GELU's input
            torch.ops.aten.gelu_backward.grad_input(grad_out, z, approximate="none", grad_input=grad)
        else:  # z: the LeakyReLU's output (same signs as its input)
            torch.ops.aten.leaky_relu_backward.grad_input(grad_out, z, activation.negative_slope, True,
                                                          grad_input=grad)
        # sum(g * (y - mean) * invstd) and sum(g) per channel: the affine parameters' gradients
        _, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad, y, gamma, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        # input gradient: gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)) = a * g + b * y + c
        count = z.numel() // z.shape[1]
        a = gamma * invstd
        b = a * invstd * grad_gamma / -count
        c = a * grad_beta / -count - b * mean
        per_channel = (1, -1, 1, 1, 1)
        torch.addcmul(c.view(per_channel), grad, a.view(per_channel), out=grad)
        grad.addcmul_(y, b.view(per_channel))
        spare = y if _only_saved_here(y, is_output=False) else None  # y is read no more
        grad_weights, grad_parts = [], []
        start = 0
        for i, part in enumerate(parts):
            w = weight[:, start:start + part.shape[1]]
            start += part.shape[1]
            if ctx.needs_input_grad[5]:  # weight
                grad_weights.append(torch.ops.aten.convolution_backward(
                    grad, part, w, None, _ONES, _ONES, _ONES, False, _ZEROS, 1, [False, True, False])[1])
            grad_part = None
            if ctx.needs_input_grad[9 + i]:
                if spare is not None and spare.numel() >= part.numel():
                    grad_part, spare = _channels_last_on(spare, part.shape), None
                else:
                    grad_part = pool.take(part.shape)
                _conv_into(grad_part.zero_(), grad, w.transpose(0, 1).flip((2, 3, 4)).contiguous(memory_format=_CL))
            grad_parts.append(grad_part)
        grad_weight = None
        if grad_weights:
            grad_weight = grad_weights[0] if len(grad_weights) == 1 else torch.cat(grad_weights, dim=1)
        grad_bias = grad.sum((0, 2, 3, 4)) if ctx.needs_input_grad[6] else None
        return (None, None, None, None, None, grad_weight, grad_bias, grad_gamma if ctx.needs_input_grad[7] else None,
                grad_beta if ctx.needs_input_grad[8] else None, *grad_parts)


def pooled_upsample_pays(x: torch.Tensor, out_shape: Sequence[int]) -> OutputPool | None:
    """The pool a training upsampling to ``out_shape`` should write into (:class:`PooledUpsample3d`), else None."""
    if (not torch.is_grad_enabled() or not lever_enabled("training_buffers") or x.device.type != "cpu"
            or x.dtype != torch.float32 or not x.is_contiguous(memory_format=_CL)):
        return None
    pool = active_training_pool()
    return pool if pool is not None and 4 * math.prod(out_shape) >= MIN_BYTES else None


class PooledUpsample3d(torch.autograd.Function):
    """Trilinear upsampling (align_corners=False) by integer ``scales``, its output in a block of ``pool``."""

    @staticmethod
    def forward(ctx, pool: OutputPool, x: torch.Tensor,  # type: ignore[override]
                scales: Sequence[float]) -> torch.Tensor:
        size = [int(n * s) for n, s in zip(x.shape[2:], scales)]
        ctx.sizes, ctx.scales = (size, list(x.shape)), list(scales)
        return torch._C._nn.upsample_trilinear3d(x, size, False, *scales,
                                                 out=pool.take((*x.shape[:2], *size)))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        size, input_size = ctx.sizes
        return None, torch.ops.aten.upsample_trilinear3d_backward(grad, size, input_size, False, *ctx.scales), None
