"""The backward of dense convolutions on maps of at most 64 voxels as matrix products over im2col rows.

Lever ``small_map_gemm`` (docs/speed.md): on LoGoNet-S's bottleneck and deepest decoder maps most
taps of a 3^3 kernel meet only zero padding, and oneDNN's backward ran at 2-6 GMAC/s there; two
large matrix products over the im2col rows do the same products far faster.
``python -m nnunet_logonet.benchmark.small_map_gemm`` times both routes on the machine it runs on.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..levers import lever_enabled
from .geometry import is_same_padding, to_rows

__all__ = ["SmallMapConv3d", "small_map_backward", "small_map_gemm_pays", "im2col", "col2im",
           "SMALL_MAP_GEMM_MAX_VOXELS", "SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT"]


#: voxels per sample up to which a dense 3D convolution's backward runs as matrix products
#: (``small_map_gemm``); on 8^3 maps oneDNN's backward was 2x faster, on 5^3-6^3 within 0-30 %
SMALL_MAP_GEMM_MAX_VOXELS = 64
#: smallest C_in x C_out for those products on maps of up to 27 voxels, and on larger ones (<= 64)
SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT = (1, 64 * 128)


def small_map_gemm_pays(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """A dense, stride-1 'same' convolution of a channels-last map of at most 64 voxels per sample
    (``small_map_gemm``).

    On such maps most of a 3^3 kernel's taps fall on the zero padding (8 of 27 at 2^3 reach a voxel),
    and oneDNN's backward ran at 2-6 GMAC/s. Xeon Cascade Lake, ``convolution_backward`` ->
    ``small_map_backward`` (ms; ``python -m nnunet_logonet.benchmark.small_map_gemm``): [2, 512 -> 256,
    2^3] 42.1 -> 3.8; [2, 256 -> 256, 2^3] 21.1 -> 1.7; [2, 512 -> 256, 3^3] 16.1 -> 8.5; [2, 448 -> 192,
    4^3] 14.1 -> 10.4; [2, 128 -> 128, 2^3] 3.2 -> 0.6; [2, 32 -> 32, 2^3] 0.42 -> 0.20; [2, 64 -> 128,
    4^3] 1.62 -> 1.24; but [2, 64 -> 64, 4^3] 0.64 vs 0.68, [2, 32 -> 32, 4^3] 0.35 vs 0.42, and on 8^3
    maps ([2, 256 -> 128, 8^3] 16.6 vs 32.1) oneDNN's is faster: hence products on every map of up to
    27 voxels, and on up to 64 where C_in x C_out >= 64 x 128 (``SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT``).
    The forward stays oneDNN's (1-2x either way, a few ms per step). Measured on AVX-512 only.
    """
    if groups != 1 or x.dim() != 5 or not lever_enabled("small_map_gemm"):
        return False
    voxels = x.shape[2:].numel()
    small, large = SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT
    return (
        voxels <= SMALL_MAP_GEMM_MAX_VOXELS
        and weight.shape[0] * weight.shape[1] >= (small if voxels <= 27 else large)
        and tuple(stride) == (1, 1, 1)
        and is_same_padding(weight, stride, padding, dilation)
        and all(d == 1 for d in dilation)
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    )


def im2col(x: torch.Tensor, kernel: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """(N, C, D, H, W) -> (N*D*H*W, kd*kh*kw*C): row v holds the zero-padded input under every tap of a
    stride-1 kernel centred on voxel v, tap-major and channel-minor, the order of a channels-last
    weight's (C_out, kd, kh, kw, C_in) memory."""
    n, c, d, h, w = x.shape
    kd, kh, kw = kernel
    p0, p1, p2 = padding
    padded = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, p2, p2, p1, p1, p0, p0)).contiguous()
    sn, sd, sh, sw, sc = padded.stride()
    windows = padded.as_strided((n, d, h, w, kd, kh, kw, c), (sn, sd, sh, sw, sd, sh, sw, sc))
    return windows.reshape(n * d * h * w, kd * kh * kw * c)


@functools.lru_cache(maxsize=64)
def _padded_voxel_index(n: int, size: tuple[int, ...], kernel: tuple[int, ...], padding: tuple[int, ...]
                        ) -> torch.Tensor:
    """For every (sample, voxel, tap) row of ``im2col``'s output, in its order, the flat index of the
    padded input voxel that entry was read from."""
    padded = [m + 2 * p for m, p in zip(size, padding)]
    index = torch.arange(n).view(n, 1, 1, 1, 1, 1, 1)
    for axis in range(3):  # index * padded size + voxel + tap, axis by axis
        voxel = [1] * 7
        voxel[1 + axis] = size[axis]
        tap = [1] * 7
        tap[4 + axis] = kernel[axis]
        index = index * padded[axis] + torch.arange(size[axis]).view(voxel) + torch.arange(kernel[axis]).view(tap)
    return index.reshape(-1)


def col2im(cols: torch.Tensor, like: torch.Tensor, kernel: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """The adjoint of ``im2col``: each row's per-tap entries added back onto the voxels they came from
    (one ``index_add_``; those on the padding dropped), channels-last, shaped like ``like``."""
    n, c, d, h, w = like.shape
    p0, p1, p2 = padding
    index = _padded_voxel_index(n, (d, h, w), tuple(kernel), tuple(padding)).to(cols.device)
    padded = torch.zeros((n * (d + 2 * p0) * (h + 2 * p1) * (w + 2 * p2), c), dtype=cols.dtype, device=cols.device)
    padded.index_add_(0, index, cols.reshape(-1, c))
    inner = padded.view(n, d + 2 * p0, h + 2 * p1, w + 2 * p2, c)[:, p0:p0 + d, p1:p1 + h, p2:p2 + w]
    return inner.permute(0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d)


class SmallMapConv3d(torch.autograd.Function):
    """oneDNN's convolution forward; the backward as matrix products over the input's im2col rows
    (``small_map_gemm_pays``): grad_W = G^T @ cols, grad_cols = G @ W, folded back by ``col2im``.
    The same products as oneDNN's backward (the padding's zeros included), as two large matrix
    products instead of its per-tap kernels, which ran at 2-6 GMAC/s on such maps; the weight gradient
    comes out in the weight's channels-last layout, no reorder."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return torch.mkldnn_convolution(x, weight, bias, padding, (1, 1, 1), (1, 1, 1), 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        return (*small_map_backward(grad_out, x, weight, ctx.padding, ctx.needs_input_grad[:3]), None)


def small_map_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: Sequence[int],
                       needs: Sequence[bool] = (True, True, True)
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Input, weight and bias gradients of a stride-1 dense convolution as matrix products over
    im2col rows (those ``needs`` asks for; the others None): grad_W = G^T @ cols(x), grad_x =
    col2im(G @ W), grad_b = the sum of G's rows, G the output gradient's channels-last rows."""
    kernel = weight.shape[2:]
    grad_rows = to_rows(grad_out.contiguous(memory_format=torch.channels_last_3d))
    grad_x = grad_w = grad_b = None
    if needs[0]:
        # (C_out, kd, kh, kw, C_in): a view for a channels-last weight
        weight_rows = weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
        grad_x = col2im(grad_rows @ weight_rows, x, kernel, padding)
    if needs[1]:
        grad_w = (grad_rows.t() @ im2col(x, kernel, padding)).view(
            weight.shape[0], *kernel, weight.shape[1]).permute(0, 4, 1, 2, 3)
        if not weight.is_contiguous(memory_format=torch.channels_last_3d):
            grad_w = grad_w.contiguous()
    if needs[2]:
        grad_b = grad_rows.sum(0)
    return grad_x, grad_w, grad_b
