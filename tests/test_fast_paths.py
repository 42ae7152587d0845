"""LoGoNet's speed-ups give the reference results, and are on by default.

The levers live in network/conv.py, network/kernels/, folding.py, classifier.py, grouped.py (docs/speed.md).

Reference = plain PyTorch (``F.conv3d``, unfused BatchNorm), selected with ``reference_kernels()``.
Outputs must agree within 1e-4 relative (float32); gradients within float32 rounding of a deep
network (the reference itself differs that much from a float64 computation; see docs/speed.md).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_logonet.network import LoGoNet, ULKANet
from nnunet_logonet.network import buffers as buffers_module
from nnunet_logonet.network import conv as conv_module
from nnunet_logonet.network import folding as folding_module
from nnunet_logonet.network import grouped as grouped_module
from nnunet_logonet.network import logonet as logonet_module
from nnunet_logonet.network import training_buffers as training_buffers_module
from nnunet_logonet.network.kernels import depthwise as depthwise_module
from nnunet_logonet.network.kernels import narrowing as narrowing_module
from nnunet_logonet.network.kernels import pointwise as pointwise_module
from nnunet_logonet.network.kernels import small_map as small_map_module
from nnunet_logonet.network.classifier import Classifier3d
from nnunet_logonet.network.conv import Activation, Conv3d, conv3d, conv3d_add
from nnunet_logonet.network.folding import fold_batchnorm, foldable_lka_block
from nnunet_logonet.network.levers import LEVERS, fast_paths_enabled, lever_enabled, reference_kernels
from nnunet_logonet.network.embedding import PatchEmbed3d
from nnunet_logonet.network.layers import ConvUnit, Upsample3d
from nnunet_logonet.network.lka import LKABlock
from nnunet_logonet.network.logonet import LoGoHead
from nnunet_logonet.network.partition import add_subcrops, stitch_subcrops

CL = torch.channels_last_3d


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _randomise_batchnorm(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


@pytest.mark.parametrize(
    "shape, out_channels, kernel, stride, padding, dilation, groups, bias",
    [
        ((1, 8, 8, 16, 16), 8, 3, 1, 1, 1, 1, False),  # batch 1, small: PyTorch would take slow_conv3d
        ((2, 6, 8, 8, 8), 4, 3, 2, 1, 1, 1, True),  # strided patch embedding
        ((1, 4, 12, 12, 12), 4, 7, 4, 3, 1, 1, True),  # stage-1 embedding, kernel 7 stride 4
        ((1, 16, 6, 8, 8), 32, 1, 1, 0, 1, 1, True),  # 1x1x1
        ((2, 12, 8, 8, 8), 12, 5, 1, 2, 1, 12, True),  # depthwise 5^3
        ((1, 8, 8, 10, 12), 8, 7, 1, 9, 3, 8, True),  # depthwise 7^3 dilation 3
        ((2, 6, 5, 7, 16), 6, 7, 1, 9, 3, 6, True),  # dilated, sizes not multiples of 3 (phases padded)
        ((1, 4, 2, 3, 4), 4, 3, 1, 3, 3, 4, False),  # dilated, map smaller than the dilation
        ((2, 5, 9, 8, 7), 5, 5, 1, 4, 2, 5, True),  # dilation 2
        ((2, 16, 4, 4, 4), 16, 3, 1, 1, 1, 16, False),  # MLP depthwise, no bias
        ((2, 8, 6, 6, 6), 16, 3, 1, 1, 1, 2, True),  # grouped, not depthwise
        ((2, 1100, 4, 4, 4), 1100, 3, 1, 1, 1, 1100, True),  # wide depthwise: weight gradient in 512-channel chunks
    ],
)
@pytest.mark.parametrize("channels_last", [True, False])
def test_conv3d_equals_torch_conv3d_with_gradients(shape, out_channels, kernel, stride, padding, dilation, groups,
                                                   bias, channels_last):
    torch.manual_seed(0)
    fmt = CL if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(out_channels, shape[1] // groups, kernel, kernel, kernel).contiguous(memory_format=fmt)
    w.requires_grad_()
    b = torch.randn(out_channels, requires_grad=True) if bias else None
    ours = conv3d(x, w, b, stride, padding, dilation, groups)
    ref = F.conv3d(x, w, b, stride, padding, dilation, groups)
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < 1e-5
    with torch.no_grad():  # inference takes the same kernels without autograd
        assert _rel(conv3d(x, w, b, stride, padding, dilation, groups), ref) < 1e-5
        # activations fused into the convolution (oneDNN post-ops) where nothing needs gradients
        for activation, act_ref in ((Activation("gelu"), F.gelu(ref)), (Activation("leaky_relu", 0.01),
                                                                          F.leaky_relu(ref, 0.01))):
            assert _rel(conv3d(x, w, b, stride, padding, dilation, groups, activation), act_ref) < 1e-5
    grad = torch.randn_like(ref)
    inputs = [x, w] + ([b] if bias else [])
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert _rel(g_ours, g_ref) < 1e-5
    # with autograd the activation follows the convolution; same gradients
    ours = conv3d(x, w, b, stride, padding, dilation, groups, Activation("gelu"))
    ref = F.gelu(F.conv3d(x, w, b, stride, padding, dilation, groups))
    assert _rel(ours, ref) < 1e-5
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert _rel(g_ours, g_ref) < 1e-5


@pytest.mark.parametrize("shape, out_channels, kernel, padding, dilation, bias", [
    ((2, 16, 6, 7, 8), 8, 3, 1, 1, True),  # the full-resolution final units' kind: 64 -> 16
    ((3, 12, 5, 6, 7), 4, 5, 4, 2, False),  # dilated, batch 3
    ((2, 16, 6, 8, 8), 14, 1, 0, 1, True),  # the 1x1 head
])
@pytest.mark.parametrize("channels_last", [True, False])
def test_narrowing_convolution_weight_gradient_through_the_widening_one(shape, out_channels, kernel, padding,
                                                                        dilation, bias, channels_last, monkeypatch):
    """The swapped weight gradient (on by default on AVX2) equals F.conv3d's; all gradients checked.
    (A channels-last 1x1x1 convolution takes ``pointwise_gemm`` first; switched off here to reach it.)"""
    monkeypatch.setattr(narrowing_module, "SWAP_NARROWING_WEIGHT_GRAD", True)
    monkeypatch.setattr(conv_module, "pointwise_gemm_pays", lambda *a: False)
    torch.manual_seed(0)
    fmt = CL if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(out_channels, shape[1], kernel, kernel, kernel).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(out_channels, requires_grad=True) if bias else None
    ours = conv3d(x, w, b, 1, padding, dilation)
    assert type(ours.grad_fn).__name__ == "NarrowingConv3dBackward"
    ref = F.conv3d(x, w, b, 1, padding, dilation)
    assert _rel(ours, ref) < 1e-5
    grad = torch.randn_like(ref)
    inputs = [x, w] + ([b] if bias else [])
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert g_ours.shape == g_ref.shape
        assert _rel(g_ours, g_ref) < 1e-5
    # frozen weight (e.g. a fine-tuning schedule) or frozen input: only what is asked for
    w.requires_grad_(False)
    (gx,) = torch.autograd.grad(conv3d(x, w, None, 1, padding, dilation), [x], grad)
    assert _rel(gx, torch.autograd.grad(F.conv3d(x, w, None, 1, padding, dilation), [x], grad)[0]) < 1e-5
    w.requires_grad_(True)
    x_frozen = x.detach()
    (gw,) = torch.autograd.grad(conv3d(x_frozen, w, None, 1, padding, dilation), [w], grad)
    assert _rel(gw, torch.autograd.grad(F.conv3d(x_frozen, w, None, 1, padding, dilation), [w], grad)[0]) < 1e-5


@pytest.mark.parametrize("shape, out_channels", [
    ((2, 64, 8, 8, 8), 32),  # 1024 rows: forward by the product
    ((2, 16, 8, 8, 9), 24),  # 1152 rows: forward by oneDNN, backward by the products
    ((1, 12, 1, 1, 1), 5),  # one voxel
    ((3, 8, 2, 5, 3), 8),  # odd sizes, batch 3
])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_convolution_as_matrix_products_equals_torch_conv3d(shape, out_channels, bias):
    """``pointwise_gemm``: forward, all gradients (also with the input or the weight frozen, and for a
    channels-first output gradient), with and without autograd, against F.conv3d."""
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(out_channels, shape[1], 1, 1, 1).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(out_channels, requires_grad=True) if bias else None
    ours, ref = conv3d(x, w, b), F.conv3d(x, w, b)
    assert type(ours.grad_fn).__name__ == "PointwiseConv3dBackward"
    assert ours.is_contiguous(memory_format=CL) and _rel(ours, ref) < 1e-5
    with torch.no_grad():
        assert _rel(conv3d(x, w, b), ref) < 1e-5
        assert _rel(conv3d(x, w, b, activation=Activation("gelu")), F.gelu(ref)) < 1e-5
    inputs = [x, w] + ([b] if bias else [])
    for grad in (torch.randn_like(ref), torch.randn(ref.shape)):  # channels-last and channels-first
        ours_grads = torch.autograd.grad(conv3d(x, w, b), inputs, grad)
        for g_ours, g_ref, source in zip(ours_grads, torch.autograd.grad(ref, inputs, grad, retain_graph=True), inputs):
            assert g_ours.shape == source.shape and _rel(g_ours, g_ref) < 1e-5
        assert ours_grads[0].is_contiguous(memory_format=CL)  # the layers before keep channels-last
    grad = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(conv3d(x, w.detach(), None), [x], grad)
    assert _rel(gx, torch.autograd.grad(F.conv3d(x, w.detach()), [x], grad)[0]) < 1e-5
    (gw,) = torch.autograd.grad(conv3d(x.detach(), w, None), [w], grad)
    assert _rel(gw, torch.autograd.grad(F.conv3d(x.detach(), w), [w], grad)[0]) < 1e-5


@pytest.mark.parametrize("shape, weight_shape, stride, padding, groups, fmt, taken", [
    ((2, 8, 4, 4, 4), (16, 8, 1, 1, 1), 1, 0, 1, CL, True),
    ((2, 8, 4, 4, 4), (16, 8, 1, 1, 1), 1, 0, 1, torch.contiguous_format, False),  # rows are not a view
    ((2, 8, 4, 4, 4), (16, 4, 1, 1, 1), 1, 0, 2, CL, False),  # grouped
    ((2, 8, 4, 4, 4), (16, 8, 1, 1, 1), 2, 0, 1, CL, False),  # strided
    ((2, 8, 4, 4, 4), (16, 8, 3, 3, 3), 1, 1, 1, CL, False),  # not 1x1x1
])
def test_pointwise_products_only_for_dense_unstrided_channels_last_1x1x1(shape, weight_shape, stride, padding, groups,
                                                                          fmt, taken):
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(weight_shape).contiguous(memory_format=fmt).requires_grad_()
    y = conv3d(x, w, None, stride, padding, 1, groups)
    assert (type(y.grad_fn).__name__ == "PointwiseConv3dBackward") is taken
    assert _rel(y, F.conv3d(x, w, None, stride, padding, 1, groups)) < 1e-5
    with reference_kernels("pointwise_gemm"):
        assert type(conv3d(x, w, None, stride, padding, 1, groups).grad_fn).__name__ != "PointwiseConv3dBackward"


def test_pointwise_forward_by_products_only_on_small_maps(monkeypatch):
    """The measured rule: the forward is a product up to ``POINTWISE_GEMM_MAX_ROWS`` rows, oneDNN above."""
    limit, route = pointwise_module.POINTWISE_GEMM_MAX_ROWS, pointwise_module.pointwise_forward_route
    assert route(torch.empty(2, 4, 8, 8, 8)) == ("gemm" if 1024 <= limit else "onednn")
    assert route(torch.empty(1, 4, limit, 1, 1)) == "gemm"
    assert route(torch.empty(1, 4, limit + 1, 1, 1)) == "onednn"
    calls = []
    real = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(a[0].shape) or real(*a))
    w = torch.randn(6, 4, 1, 1, 1).contiguous(memory_format=CL)
    with torch.no_grad():
        conv3d(torch.randn(1, 4, limit, 1, 1).contiguous(memory_format=CL), w)
        assert not calls
        conv3d(torch.randn(1, 4, limit + 1, 1, 1).contiguous(memory_format=CL), w)
        assert len(calls) == 1


@pytest.mark.parametrize("shape, out_channels, kernel, bias, weight_channels_last", [
    ((2, 200, 2, 2, 2), 192, (3, 3, 3), False, True),  # the bottleneck's kind: 2^3, wide
    ((1, 256, 3, 2, 4), 160, (3, 3, 3), True, True),  # batch 1, anisotropic map
    ((2, 130, 4, 4, 4), 520, (3, 3, 3), True, False),  # 64 voxels, widening, channels-first weight
    ((2, 192, 1, 3, 2), 192, (1, 3, 3), False, True),  # anisotropic kernel on a map thinner than it
    ((2, 192, 2, 3, 2), 192, (5, 5, 5), True, True),  # every row mostly padding
])
def test_small_map_convolution_backward_by_products_equals_torch_conv3d(shape, out_channels, kernel, bias,
                                                                      weight_channels_last):
    """``small_map_gemm``: the backward as products over im2col rows gives F.conv3d's gradients (also
    with the input or the weight frozen, and for a channels-first output gradient), in the layouts
    the layers before and the optimizer expect."""
    torch.manual_seed(0)
    padding = [k // 2 for k in kernel]
    x = torch.randn(shape).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(out_channels, shape[1], *kernel) / (shape[1] * math.prod(kernel)) ** 0.5
    w = w.contiguous(memory_format=CL if weight_channels_last else torch.contiguous_format).requires_grad_()
    b = torch.randn(out_channels, requires_grad=True) if bias else None
    ours, ref = conv3d(x, w, b, 1, padding), F.conv3d(x, w, b, 1, padding)
    assert type(ours.grad_fn).__name__ == "SmallMapConv3dBackward"
    assert ours.is_contiguous(memory_format=CL) and _rel(ours, ref) < 1e-5
    inputs = [x, w] + ([b] if bias else [])
    for grad in (torch.randn_like(ref), torch.randn(ref.shape)):  # channels-last and channels-first
        ours_grads = torch.autograd.grad(conv3d(x, w, b, 1, padding), inputs, grad)
        ref_grads = torch.autograd.grad(ref, inputs, grad, retain_graph=True)
        for g_ours, g_ref, source in zip(ours_grads, ref_grads, inputs):
            assert g_ours.shape == source.shape and _rel(g_ours, g_ref) < 1e-5
        assert ours_grads[0].is_contiguous(memory_format=CL)
        assert ours_grads[1].stride() == w.stride()  # the weight's own layout: no reorder for the optimizer
    grad = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(conv3d(x, w.detach(), None, 1, padding), [x], grad)
    assert _rel(gx, torch.autograd.grad(F.conv3d(x, w.detach(), None, 1, padding), [x], grad)[0]) < 1e-5
    (gw,) = torch.autograd.grad(conv3d(x.detach(), w, None, 1, padding), [w], grad)
    assert _rel(gw, torch.autograd.grad(F.conv3d(x.detach(), w, None, 1, padding), [w], grad)[0]) < 1e-5


@pytest.mark.parametrize("shape, weight_shape, stride, padding, dilation, groups, fmt, taken", [
    ((2, 192, 3, 3, 3), (192, 192, 3, 3, 3), 1, 1, 1, 1, CL, True),  # 27 voxels
    ((2, 16, 2, 3, 2), (8, 16, 3, 3, 3), 1, 1, 1, 1, CL, True),  # 12 voxels, narrow
    ((2, 64, 4, 4, 4), (128, 64, 3, 3, 3), 1, 1, 1, 1, CL, True),  # 64 voxels, 64 x 128
    ((2, 64, 4, 4, 4), (64, 64, 3, 3, 3), 1, 1, 1, 1, CL, False),  # 64 voxels, 64 x 64: measured slower
    ((2, 256, 5, 5, 5), (256, 256, 3, 3, 3), 1, 1, 1, 1, CL, False),  # 125 voxels: oneDNN's own (0-30 % either way)
    ((2, 256, 3, 3, 3), (256, 256, 3, 3, 3), 1, 1, 1, 1, torch.contiguous_format, False),  # rows not a view
    ((2, 256, 3, 3, 3), (256, 128, 3, 3, 3), 1, 1, 1, 2, CL, False),  # grouped
    ((2, 256, 4, 4, 4), (256, 256, 3, 3, 3), 2, 1, 1, 1, CL, False),  # strided
    ((2, 256, 3, 3, 3), (256, 256, 3, 3, 3), 1, 2, 2, 1, CL, False),  # dilated
    ((2, 256, 3, 3, 3), (256, 256, 3, 3, 3), 1, 0, 1, 1, CL, False),  # not 'same'
])
def test_small_map_products_only_where_they_pay(shape, weight_shape, stride, padding, dilation, groups, fmt, taken):
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(weight_shape).contiguous(memory_format=fmt).requires_grad_()
    y = conv3d(x, w, None, stride, padding, dilation, groups)
    assert (type(y.grad_fn).__name__ == "SmallMapConv3dBackward") is taken
    with reference_kernels("small_map_gemm"):
        y = conv3d(x, w, None, stride, padding, dilation, groups)
        assert type(y.grad_fn).__name__ != "SmallMapConv3dBackward"


@pytest.mark.parametrize("shape, out_channels, stride, groups, why", [
    ((1, 16, 6, 6, 6), 8, 1, 1, "batch 1: measured slower"),
    ((2, 8, 6, 6, 6), 16, 1, 1, "widening: measured slower"),
    ((2, 16, 6, 6, 6), 8, 2, 1, "strided: the identity needs stride 1"),
    ((2, 16, 6, 6, 6), 4, 1, 2, "grouped (narrowing within each group)"),
])
def test_weight_gradient_swap_only_where_it_holds_and_pays(shape, out_channels, stride, groups, why, monkeypatch):
    monkeypatch.setattr(narrowing_module, "SWAP_NARROWING_WEIGHT_GRAD", True)
    x = torch.randn(shape).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(out_channels, shape[1] // groups, 3, 3, 3).contiguous(memory_format=CL).requires_grad_()
    assert type(conv3d(x, w, None, stride, 1, 1, groups).grad_fn).__name__ != "NarrowingConv3dBackward", why
    monkeypatch.setattr(narrowing_module, "SWAP_NARROWING_WEIGHT_GRAD", False)  # other CPUs: oneDNN's own
    narrowing = torch.randn(2, 16, 6, 6, 6).contiguous(memory_format=CL).requires_grad_()
    w16 = torch.randn(8, 16, 3, 3, 3).contiguous(memory_format=CL).requires_grad_()
    assert type(conv3d(narrowing, w16, None, 1, 1).grad_fn).__name__ != "NarrowingConv3dBackward"


@pytest.mark.parametrize("channels, dilation", [(48, 1), (512, 1), (513, 1), (1300, 1), (600, 2)])
def test_depthwise_weight_gradient_equals_one_onednn_depthwise_call(channels, dilation):
    """16-channel grouped blocks (48, 512, 1300 = 4 x 325) and 512-channel chunks change only the
    speed: oneDNN's own depthwise weight gradient over every channel, up to rounding."""
    from nnunet_logonet.network.kernels.depthwise import depthwise_weight_grad

    torch.manual_seed(0)
    x = torch.randn(2, channels, 4, 5, 6).contiguous(memory_format=CL)
    g = torch.randn(2, channels, 4, 5, 6).contiguous(memory_format=CL)
    w = torch.randn(channels, 1, 5, 5, 5).contiguous(memory_format=CL)
    pad = 2 * dilation
    one_call = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1, 1], [pad] * 3, [dilation] * 3, False,
                                                   [0, 0, 0], channels, [False, True, False])[1]
    chunked = depthwise_weight_grad(g, x, w, (pad,) * 3, (dilation,) * 3)
    assert chunked.shape == w.shape
    assert _rel(chunked, one_call) < 1e-6


@pytest.mark.parametrize("kernel, size, layout", [
    (3, (8, 8, 8), CL), (3, (5, 9, 7), CL), (3, (2, 4, 3), CL), (3, (1, 6, 6), CL),  # fewer slices than taps
    (5, (6, 8, 10), CL), (5, (3, 9, 8), CL), (3, (6, 8, 10), torch.contiguous_format), ((3, 5, 5), (4, 8, 9), CL),
])
def test_depthwise_weight_gradient_by_depth_slices_equals_the_3d_one(kernel, size, layout):
    """The 2D kernel over depth slices: oneDNN's 3D depthwise weight gradient, up to rounding, for
    maps thinner than the kernel, odd sizes, anisotropic kernels and a channels-first input."""
    from nnunet_logonet.network.kernels.depthwise import depth_slices_pay, depthwise_weight_grad_by_slices

    torch.manual_seed(0)
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    pad = [v // 2 for v in k]
    x = torch.randn(2, 40, *size).contiguous(memory_format=layout)
    g = torch.randn(2, 40, *size).contiguous(memory_format=layout)
    w = torch.randn(40, 1, *k).contiguous(memory_format=CL)
    one_call = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1, 1], pad, [1, 1, 1], False, [0, 0, 0], 40,
                                                   [False, True, False])[1]
    by_slices = depthwise_weight_grad_by_slices(g, x, w, pad)
    assert by_slices.shape == w.shape
    assert _rel(by_slices, one_call) < 1e-5
    assert not depth_slices_pay(g, x, w, (2, 2, 2))  # dilated: the 3D kernel (or the phases) instead


@pytest.mark.parametrize("size", [(2, 2, 2), (3, 2, 4)])
def test_depthwise_weight_gradient_by_slices_on_narrow_planes_takes_the_channels_in_chunks(size, monkeypatch):
    """oneDNN's 2D depthwise weight gradient falls off a cliff on planes 2 voxels wide beyond ~3000
    channels (the grouped local paths' bottleneck, 8 x 1024 channels on 2^3: 172 ms in one call,
    9.6 ms in 2048-channel calls), so there the channels go in chunks, a ragged last one included,
    with the same result as one 3D call."""
    from nnunet_logonet.network.kernels.depthwise import depthwise_weight_grad

    torch.manual_seed(0)
    step = depthwise_module.DEPTHWISE_SLICES_NARROW_CHUNK
    channels = 2 * step + 104
    x = torch.randn(2, channels, *size).contiguous(memory_format=CL)
    g = torch.randn(2, channels, *size).contiguous(memory_format=CL)
    w = torch.randn(channels, 1, 3, 3, 3).contiguous(memory_format=CL)
    one_call = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False,
                                                   [0, 0, 0], channels, [False, True, False])[1]
    widths = []
    real = depthwise_module.depthwise_weight_grad_by_slices
    monkeypatch.setattr(depthwise_module, "depthwise_weight_grad_by_slices",
                        lambda g_, x_, w_, pad: widths.append(w_.shape[0]) or real(g_, x_, w_, pad))
    grad = depthwise_weight_grad(g, x, w, (1, 1, 1), (1, 1, 1))
    assert widths == [channels, step, step, 104]
    assert grad.shape == w.shape and grad.is_contiguous(memory_format=CL)
    assert _rel(grad, one_call) < 1e-5
    wide_planes = torch.randn(2, channels, 2, 4, 4).contiguous(memory_format=CL)
    widths.clear()
    depthwise_weight_grad(wide_planes, wide_planes, w, (1, 1, 1), (1, 1, 1))
    assert widths == [channels]  # 4 x 4 planes: one call is fast


def test_depthwise_weight_gradient_by_slices_only_where_it_pays():
    from nnunet_logonet.network.kernels.depthwise import depth_slices_pay

    small = torch.empty(2, 512, 4, 4, 4)
    assert depth_slices_pay(small, small, torch.empty(512, 1, 3, 3, 3), (1, 1, 1))
    assert not depth_slices_pay(small, small, torch.empty(512, 1, 5, 5, 5), (1, 1, 1))  # 5 x 5 on 4 x 4 planes
    tiny = torch.empty(2, 128, 4, 4, 4)  # the calls would cost more than the 3D kernel
    assert not depth_slices_pay(tiny, tiny, torch.empty(128, 1, 3, 3, 3), (1, 1, 1))
    big = torch.empty(2, 64, 4, 16, 16)
    assert not depth_slices_pay(big, big, torch.empty(64, 1, 7, 7, 7), (3, 3, 3))


def test_wide_depthwise_kernels_take_the_slices_only_where_measured_faster(monkeypatch):
    """5^3 by slices: 2.5x faster than the grouped blocks on AVX2 (AMD EPYC), 2x slower on AVX-512
    (Xeon Cascade Lake); 3^3 is faster by slices on both."""
    from nnunet_logonet.network.kernels.depthwise import depth_slices_pay

    assert depthwise_module.DEPTHWISE_SLICES_WIDE_KERNELS == (torch.backends.cpu.get_cpu_capability() == "AVX2")
    big = torch.empty(2, 64, 4, 16, 16)
    for wide_kernels in (True, False):
        monkeypatch.setattr(depthwise_module, "DEPTHWISE_SLICES_WIDE_KERNELS", wide_kernels)
        assert depth_slices_pay(big, big, torch.empty(64, 1, 5, 5, 5), (1, 1, 1)) == wide_kernels
        assert depth_slices_pay(big, big, torch.empty(64, 1, 3, 3, 3), (1, 1, 1))


@pytest.mark.parametrize("kernel, dilation, size", [
    (7, (3, 3, 3), (16, 13, 14)),  # LKA's 7^3 on the global path's stage-1 map; sizes not multiples of 3
    (5, (3, 3, 3), (12, 10, 11)),  # live taps cropped to 5^3 on a smaller map
    (3, (3, 3, 3), (8, 9, 7)),
    (5, (2, 2, 2), (10, 9, 8)),
    (5, (1, 3, 2), (6, 12, 9)),  # anisotropic dilation, undilated in depth
])
def test_dilated_depthwise_weight_gradient_on_phases_equals_the_dilated_one(kernel, dilation, size, monkeypatch):
    """Where the phases are wide enough the dilated weight gradient is taken on them (undilated):
    oneDNN's dilated 3D depthwise weight gradient, up to rounding, through conv3d's backward too
    (on an AVX2 CPU as well, where the rule keeps oneDNN's kernel: the route is forced here)."""
    from nnunet_logonet.network.kernels.depthwise import depthwise_weight_grad, dilated_phases_pay

    monkeypatch.setattr(depthwise_module, "DILATED_PHASES_WEIGHT_GRAD", True)
    torch.manual_seed(0)
    k = (kernel,) * 3
    pad = [d * (kernel // 2) for d in dilation]
    x = torch.randn(2, 24, *size).contiguous(memory_format=CL)
    g = torch.randn(2, 24, *size).contiguous(memory_format=CL)
    w = torch.randn(24, 1, *k).contiguous(memory_format=CL)
    assert dilated_phases_pay(x, w, dilation)
    one_call = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1, 1], pad, list(dilation), False, [0, 0, 0],
                                                   24, [False, True, False])[1]
    on_phases = depthwise_weight_grad(g, x, w, pad, dilation)
    assert on_phases.shape == w.shape
    assert _rel(on_phases, one_call) < 1e-5
    assert _rel(depthwise_weight_grad(g, x, w, pad, dilation, phases=False), one_call) < 1e-6

    phase_calls = []
    real = depthwise_module.to_phases
    monkeypatch.setattr(depthwise_module, "to_phases", lambda t, d: phase_calls.append(tuple(t.shape)) or real(t, d))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    conv3d(xg, wg, None, 1, pad, dilation, 24).backward(g)
    assert len(phase_calls) == 4  # the forward (x), the input gradient (g), the weight gradient (g and x)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv3d(xr, wr, None, 1, pad, dilation, 24).backward(g)
    assert _rel(wg.grad, wr.grad) < 1e-5 and _rel(xg.grad, xr.grad) < 1e-5


def test_dilated_weight_gradient_on_phases_only_where_it_pays(monkeypatch):
    """Phases at least k // 2 + 2 wide (measured on the Xeon and the AMD EPYC: narrower phases make
    oneDNN's grouped kernel spend its time on padding, 2-5x slower than the dilated 3D one), and never
    on AVX2, where oneDNN's dilated kernel was 3-5x faster on every shape (the Zen 4 without AVX-512)."""
    from nnunet_logonet.network.kernels.depthwise import dilated_phases_pay

    assert depthwise_module.DILATED_PHASES_WEIGHT_GRAD == (torch.backends.cpu.get_cpu_capability() != "AVX2")
    monkeypatch.setattr(depthwise_module, "DILATED_PHASES_WEIGHT_GRAD", False)
    for size, kernel in (((16, 16, 16), 7), ((24, 24, 24), 7), ((12, 12, 12), 5), ((8, 8, 8), 3)):
        assert not dilated_phases_pay(torch.empty(2, 64, *size), torch.empty(64, 1, *(kernel,) * 3), (3, 3, 3))
    monkeypatch.setattr(depthwise_module, "DILATED_PHASES_WEIGHT_GRAD", True)

    def pays(size, kernel, dilation=3):
        return dilated_phases_pay(torch.empty(2, 64, *size), torch.empty(64, 1, *(kernel,) * 3), (dilation,) * 3)

    assert pays((16, 16, 16), 7) and pays((13, 13, 13), 7) and pays((24, 24, 24), 7)
    assert not pays((12, 12, 12), 7) and not pays((16, 16, 12), 7)  # 4-wide phases for a 7^3 kernel
    assert pays((12, 12, 12), 5) and not pays((8, 8, 8), 5)
    assert pays((8, 8, 8), 3) and not pays((6, 6, 6), 3)
    assert not pays((16, 16, 16), 7, dilation=1)  # undilated: nothing to split


@pytest.mark.parametrize("groups, widths, stride, size", [
    (1, [3, 5], 1, (6, 8, 8)), (4, [2, 3], 1, (6, 8, 8)), (2, [1, 2, 3], 2, (6, 8, 8)),
    (1, [3, 5], 1, (2, 2, 2)),  # fewer activation elements than weights: the concatenation is built
])
def test_conv3d_concat_equals_conv_of_the_concatenation(groups, widths, stride, size):
    """The decoder's skip concatenations are convolved part by part; same outputs and gradients."""
    from nnunet_logonet.network.conv import cat_per_group, conv3d_concat

    torch.manual_seed(0)
    parts = [torch.randn(2, groups * c, *size).contiguous(memory_format=CL).requires_grad_() for c in widths]
    w = torch.randn(groups * 4, sum(widths), 3, 3, 3).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(groups * 4, requires_grad=True)
    ours = conv3d_concat(parts, w, b, stride, 1, 1, groups)
    whole = cat_per_group(parts, groups)
    ref = F.conv3d(whole, w, b, stride, 1, 1, groups)
    assert _rel(ours, ref) < 1e-5
    # group g of the concatenation holds group g of every part, in order
    g_first = whole[:, : sum(widths)]
    assert torch.equal(g_first, torch.cat([p[:, :c] for p, c in zip(parts, widths)], 1))
    grad = torch.randn_like(ref)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, [*parts, w, b], grad),
                             torch.autograd.grad(ref, [*parts, w, b], grad)):
        assert _rel(g_ours, g_ref) < 1e-5
    with torch.no_grad():  # inference: later parts add into the sum inside oneDNN, activation fused
        assert _rel(conv3d_concat(parts, w, b, stride, 1, 1, groups), ref) < 1e-5
        leaky = conv3d_concat(parts, w, b, stride, 1, 1, groups, Activation("leaky_relu", 0.01))
        assert _rel(leaky, F.leaky_relu(ref, 0.01)) < 1e-5
    with pytest.raises(ValueError, match="channels per group"):
        conv3d_concat(parts[:1] + parts[:1], w, b, stride, 1, 1, groups)


@pytest.mark.parametrize("train", [True, False])
def test_conv_unit_on_parts_equals_conv_unit_on_the_concatenation(train):
    torch.manual_seed(0)
    unit = ConvUnit(7, 4).train(train)
    _randomise_batchnorm(unit)
    a = torch.randn(2, 3, 8, 8, 8).contiguous(memory_format=CL)
    b = torch.randn(2, 4, 8, 8, 8).contiguous(memory_format=CL)
    on_parts = copy.deepcopy(unit)((a, b))
    with reference_kernels():
        on_cat = copy.deepcopy(unit)(torch.cat([a, b], 1))
    assert _rel(on_parts, on_cat) < 1e-5


@pytest.mark.parametrize("grad", [True, False])
def test_dilated_depthwise_never_reaches_onednns_dilated_kernel(monkeypatch, grad):
    """LKA's 7^3 dilation-3 convolution runs undilated on phases in forward and input gradient
    (oneDNN's dilated depthwise kernel is 10-30x slower); the output is the dilated one's."""
    calls = []
    real = torch.mkldnn_convolution

    def recording(x, weight, bias, padding, stride, dilation, groups):
        calls.append((tuple(weight.shape), tuple(dilation), tuple(x.shape)))
        return real(x, weight, bias, padding, stride, dilation, groups)

    monkeypatch.setattr(torch, "mkldnn_convolution", recording)
    x = torch.randn(2, 8, 7, 9, 12).contiguous(memory_format=CL).requires_grad_(grad)
    w = torch.randn(8, 1, 7, 7, 7).contiguous(memory_format=CL).requires_grad_(grad)
    y = conv3d(x, w, None, 1, 9, 3, 8)
    if grad:
        y.backward(torch.ones_like(y))
    assert calls and all(dilation == (1, 1, 1) for _, dilation, _ in calls)
    assert calls[0][2] == (2 * 27, 8, 3, 3, 4)  # the 27 phases of each sample in the batch
    assert _rel(y, F.conv3d(x, w, None, 1, 9, 3, 8)) < 1e-5


def test_depthwise_backward_with_frozen_input_or_weight():
    x = torch.randn(1, 6, 8, 8, 8).contiguous(memory_format=CL)
    w = torch.randn(6, 1, 5, 5, 5).contiguous(memory_format=CL).requires_grad_()
    (gw,) = torch.autograd.grad(conv3d(x, w, None, 1, 2, 1, 6).sum(), [w])
    (gw_ref,) = torch.autograd.grad(F.conv3d(x, w, None, 1, 2, 1, 6).sum(), [w])
    assert _rel(gw, gw_ref) < 1e-5
    x.requires_grad_()
    w.requires_grad_(False)
    (gx,) = torch.autograd.grad(conv3d(x, w, None, 1, 2, 1, 6).sum(), [x])
    (gx_ref,) = torch.autograd.grad(F.conv3d(x, w, None, 1, 2, 1, 6).sum(), [x])
    assert _rel(gx, gx_ref) < 1e-5


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-weights"])
@pytest.mark.parametrize("channels, out_channels, size, kernel, layout", [
    # depthwise (out_channels None): the deep LKA blocks
    (8, None, (4, 4, 4), 5, CL), (32, None, (2, 2, 2), 3, CL), (64, None, (6, 6, 6), 7, CL),
    (8, None, (4, 4, 4), 5, torch.contiguous_format), (16, None, (3, 3, 3), 5, CL),
    # dense: the deepest decoder units of a small patch (CI's NaN: 4 -> 4 on 2^3)
    (4, 4, (2, 2, 2), 3, CL), (32, 32, (2, 4, 4), 3, CL), (8, 16, (2, 2, 2), 3, torch.contiguous_format),
])
def test_cpu_bfloat16_conv_on_maps_smaller_than_the_kernel(channels, out_channels, size, kernel, layout, autocast):
    """PyTorch 2.14's CPU bfloat16 weight gradient is wrong (NaN, 1e30 or just wrong, from
    uninitialised memory) where the kernel is larger than the map, depthwise and dense: the deep
    LKA blocks and decoder units of a small patch under CPU autocast. CI saw NaN gradients there
    twice. conv3d must give float32's answer to bfloat16 precision, whatever the freed memory holds."""
    g = torch.Generator().manual_seed(channels + sum(size))
    groups = channels if out_channels is None else 1
    out_channels = out_channels or channels
    x = torch.randn(2, channels, *size, generator=g).contiguous(memory_format=layout)
    w = torch.randn(out_channels, channels // groups, kernel, kernel, kernel, generator=g)
    w = w.contiguous(memory_format=layout)
    grad_out = torch.randn(2, out_channels, *size, generator=g)
    pad = kernel // 2
    w64 = w.double().requires_grad_()
    x64 = x.double().requires_grad_()
    F.conv3d(x64, w64, None, 1, pad, 1, groups).backward(grad_out.double())
    for _ in range(3):
        torch.full((1 << 21,), float("nan"))  # freed memory full of NaN, as a busy process has
        torch.full((4096,), 1e30)
        xb = x.clone().requires_grad_() if autocast else x.bfloat16().requires_grad_()
        wb = w.clone().requires_grad_() if autocast else w.bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = conv3d(xb, wb, None, 1, pad, 1, groups)
        assert y.dtype == torch.bfloat16
        y.backward(grad_out.bfloat16())
        assert _rel(y.double(), F.conv3d(x.double(), w.double(), None, 1, pad, 1, groups)) < 0.02
        assert _rel(wb.grad.double(), w64.grad) < 0.05
        assert _rel(xb.grad.double(), x64.grad) < 0.05


def test_conv3d_subclass_keeps_nn_conv3d_parameters_and_keys():
    ours, ref = Conv3d(4, 8, 3, padding=1), nn.Conv3d(4, 8, 3, padding=1)
    assert isinstance(ours, nn.Conv3d)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4, 6, 6, 6)
    assert _rel(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvUnit(6, 8),
        lambda: PatchEmbed3d(4, 8, stride=(1, 2, 2)),
        lambda: LoGoHead([8, 12], num_classes=3, deep_supervision=False),
    ],
)
def test_batchnorm_folding_equals_unfused_eval(make):
    torch.manual_seed(0)
    module = make()
    _randomise_batchnorm(module)
    module.eval()
    channels = 8 if isinstance(module, LoGoHead) else module.conv.in_channels if isinstance(module, ConvUnit) else 4
    x = torch.randn(2, channels, 8, 8, 8)
    args = (x, [x, torch.randn(2, 12, 4, 4, 4)]) if isinstance(module, LoGoHead) else (x,)
    with torch.no_grad():
        fused = module(*args)
        with reference_kernels():
            unfused = module(*args)
    assert _rel(fused, unfused) < 1e-5


def test_fold_batchnorm_formula():
    conv, norm = nn.Conv3d(3, 5, 3, padding=1, bias=True), nn.BatchNorm3d(5)
    _randomise_batchnorm(norm)
    norm.eval()
    weight, bias = fold_batchnorm(conv, norm)
    x = torch.randn(1, 3, 5, 5, 5)
    with torch.no_grad():
        assert _rel(F.conv3d(x, weight, bias, padding=1), norm(conv(x))) < 1e-5


@pytest.mark.parametrize("variance", [0.0, 1e-6])
def test_fold_batchnorm_keeps_eps_for_channels_that_stopped_varying(variance):
    """After training some channels' running variance is ~0; there the fold must divide by sqrt(var + eps)
    as BatchNorm does (without eps: infinite or 300x too large outputs, which random statistics in
    [0.5, 2] cannot show)."""
    conv, norm = nn.Conv3d(3, 5, 3, padding=1, bias=True), nn.BatchNorm3d(5)
    _randomise_batchnorm(norm)
    norm.running_var[:2] = variance
    norm.eval()
    weight, bias = fold_batchnorm(conv, norm)
    x = torch.randn(1, 3, 5, 5, 5)
    with torch.no_grad():
        folded, reference = F.conv3d(x, weight, bias, padding=1), norm(conv(x))
    assert torch.isfinite(folded).all() and _rel(folded, reference) < 1e-5


def test_grouped_drop_path_draws_one_rescaled_mask_per_sample_and_path():
    """The batched local paths' stochastic depth equals each path's own DropPath: per sample and path
    everything kept times 1/keep or everything dropped, so the expected output is the input."""
    from nnunet_logonet.network.layers import DropPath

    torch.manual_seed(0)
    paths, channels, keep = 8, 3, 0.75
    drops = [DropPath(1 - keep).train() for _ in range(paths)]
    x = torch.ones(4000, paths * channels, 1, 1, 1)
    out = grouped_module._drop_path(x, drops).reshape(4000, paths, channels)
    assert torch.equal(out.unique(), torch.tensor([0.0, 1 / keep]))
    assert (out == out[:, :, :1]).all()  # one draw per sample and path, shared by its channels
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    assert (out[:, :, 0] == 0).float().mean().item() == pytest.approx(1 - keep, abs=0.02)
    assert grouped_module._drop_path(x, [d.eval() for d in drops]) is x  # inference: no drop


def test_instance_norm_is_not_folded_and_still_matches():
    unit = ConvUnit(4, 4, norm="instance").eval()
    x = torch.randn(1, 4, 6, 6, 6)
    with torch.no_grad():
        fast = unit(x)
        with reference_kernels():
            ref = unit(x)
    assert _rel(fast, ref) < 1e-5


def _lka_block(dim: int = 8, seed: int = 0, **kw) -> LKABlock:
    """An LKA block with non-trivial statistics, layer scales of order 1 (not the 1e-2 init, which would
    hide a wrong branch) and non-zero biases, in eval mode."""
    torch.manual_seed(seed)
    block = LKABlock(dim, mlp_ratio=2.0, **kw)
    _randomise_batchnorm(block, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv3d):
                m.bias.copy_(torch.randn(m.out_channels, generator=g) * 0.3)
        for scale in (block.ls1, block.ls2):
            scale.gamma.copy_(torch.rand(dim, generator=g) * 2 - 1)
    return block.eval()


@pytest.mark.parametrize("size", [(6, 6, 6), (3, 8, 5)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_lka_block_folding_equals_the_block_in_eval(size, layout):
    """Lever ``lka_folding``: norms before and layer scales after the 1x1x1 convolutions folded into them,
    the inner shortcut into one multiply-add; in no_grad and inference_mode, both layouts, maps smaller
    than LKA's kernels (live taps) included."""
    block = _lka_block().to(memory_format=layout)
    assert foldable_lka_block(block)
    x = torch.randn(2, 8, *size).contiguous(memory_format=layout)
    given = x.clone()
    with torch.no_grad(), reference_kernels("lka_folding"):
        expected = block(x)
    with torch.no_grad():
        folded = block(x)
    with torch.inference_mode():
        again = block(x)
    assert _rel(folded, expected) < 1e-5
    assert torch.equal(folded, again)
    assert torch.equal(x, given)  # the block writes into its own tensors, never into its input


def test_lka_block_folding_keeps_gradients_of_the_unfolded_parameters():
    """Eval mode with autograd (e.g. a saliency map): gradients reach the block's own parameters."""
    block = _lka_block()
    x = torch.randn(1, 8, 5, 5, 5, requires_grad=True)
    with torch.no_grad():
        block(x)  # fills the inference cache, which a grad-enabled call must not use
    params = [block.norm1.weight, block.norm2.bias, block.ls1.gamma, block.ls2.gamma, block.attn.proj_1.weight,
              block.attn.proj_2.bias, block.mlp.fc1.weight, block.mlp.fc2.weight, block.attn.lka.conv0.weight]
    grads = torch.autograd.grad(block(x).square().sum(), [x, *params])
    with reference_kernels("lka_folding"):
        ref = torch.autograd.grad(block(x).square().sum(), [x, *params])
    for g, r in zip(grads, ref):
        assert _rel(g, r) < 1e-4


def test_lka_block_folding_follows_load_state_dict():
    block, other = _lka_block(seed=0), _lka_block(seed=5)
    x = torch.randn(1, 8, 6, 6, 6)
    with torch.inference_mode():
        first = block(x)
        block.load_state_dict(other.state_dict())
        second = block(x)
        with reference_kernels("lka_folding"):
            expected = block(x)
    assert _rel(second, expected) < 1e-5
    assert _rel(first, second) > 1e-2


@pytest.mark.parametrize("hooked", ["norm2", "attn.lka.conv_spatial", "attn.proj_1"])
def test_lka_block_is_folded_only_in_eval_with_running_statistics_and_no_hooks(hooked):
    block = _lka_block()
    assert foldable_lka_block(block)
    assert not foldable_lka_block(block.train())
    assert not foldable_lka_block(_lka_block(norm="instance"))
    block.eval()
    block.norm2.train()  # a BatchNorm switched back to batch statistics on its own
    assert not foldable_lka_block(block)
    block.eval()
    with reference_kernels("lka_folding"):
        assert not foldable_lka_block(block)
    seen = []
    handle = block.get_submodule(hooked).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not foldable_lka_block(block)  # a hook must see its module run
    x = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        with_hook = block(x)
    handle.remove()
    assert seen == [x.shape] and foldable_lka_block(block)
    with torch.no_grad():
        assert _rel(block(x), with_hook) < 1e-5
    instance = _lka_block(norm="instance")
    with torch.no_grad():
        fast = instance(x)
        with reference_kernels():
            ref = instance(x)
    assert _rel(fast, ref) < 1e-5


def test_training_lka_block_with_frozen_batchnorms_keeps_its_stochastic_depth():
    """Fine-tuning with frozen BatchNorms: a block in training whose norms are in eval is not folded
    (the fold has no stochastic depth) and draws the reference's drop-path masks."""
    block = _lka_block(drop_path=0.5).train()
    for norm in (block.norm1, block.norm2):
        norm.eval()
    assert not foldable_lka_block(block)
    x = torch.randn(8, 8, 4, 4, 4)
    outputs = []
    for context in (torch.enable_grad(), reference_kernels()):
        torch.manual_seed(3)
        with context:
            outputs.append(block(x))
    assert _rel(*outputs) < 1e-5


def test_networks_run_no_batchnorm_in_inference(monkeypatch):
    """Every BatchNorm of LoGoNet and ULKANet (conv units, patch embeddings, LKA blocks, global and grouped
    local paths) is folded away in eval mode: nnUNetv2_predict runs none of them."""
    calls = []
    real = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    for cls in (LoGoNet, ULKANet):
        net = _tiny(cls, (32, 32, 32)).eval()
        with torch.inference_mode():
            net(torch.randn(1, 1, 32, 32, 32))
        assert not calls, (cls.__name__, len(calls))
        with torch.inference_mode(), reference_kernels("lka_folding"):
            net(torch.randn(1, 1, 32, 32, 32))
        assert calls  # the spy sees the LKA blocks' BatchNorms when they are not folded
        calls.clear()


@pytest.mark.parametrize("shape, weight_shape, groups", [
    ((2, 8, 12, 12, 12), (8, 8, 1, 1, 1), 1),  # oneDNN with its sum post-op
    ((1, 8, 4, 4, 4), (8, 8, 1, 1, 1), 1),  # small map: the matrix-product route, then an addition
    ((2, 16, 6, 6, 6), (16, 4, 1, 1, 1), 4),  # grouped (the local paths)
    ((1, 8, 6, 6, 6), (8, 1, 3, 3, 3), 8),  # depthwise: its own route, then an addition
])
def test_conv3d_add_equals_the_sum_and_writes_into_out_only_without_autograd(shape, weight_shape, groups):
    torch.manual_seed(0)
    x = torch.randn(*shape).contiguous(memory_format=CL)
    weight, bias = torch.randn(*weight_shape), torch.randn(weight_shape[0])
    padding = weight_shape[-1] // 2
    out = torch.randn(shape[0], weight_shape[0], *shape[2:]).contiguous(memory_format=CL)
    expected = out + F.conv3d(x, weight, bias, padding=padding, groups=groups)
    before = out.clone()
    with torch.enable_grad():
        summed = conv3d_add(out, x, weight.requires_grad_(), bias, padding=padding, groups=groups)
    assert torch.equal(out, before) and summed.requires_grad and _rel(summed, expected) < 1e-5
    with torch.no_grad():
        summed = conv3d_add(out, x, weight, bias, padding=padding, groups=groups)
    assert summed.data_ptr() == out.data_ptr() and _rel(summed, expected) < 1e-5


ANISOTROPIC = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def _tiny(cls, patch, **kw):
    torch.manual_seed(0)
    if patch[0] < patch[1]:
        kw["strides"] = ANISOTROPIC
    net = cls.from_preset("tiny", 1, 4, patch, **kw)
    _randomise_batchnorm(net)
    return net


PATCHES = [(32, 32, 32), (16, 64, 64), (32, 64, 32)]


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("cls", [LoGoNet, ULKANet])
@pytest.mark.parametrize("batch", [1, 2])
def test_network_outputs_equal_reference_in_eval(cls, patch, batch):
    net = _tiny(cls, patch).eval()
    x = torch.randn(batch, 1, *patch)
    with torch.no_grad():
        fast = net(x)
        with reference_kernels():
            ref = net(x)
    assert _rel(fast, ref) < 1e-4


def _outputs_and_grads(net: nn.Module, x: torch.Tensor, reference: bool, without: tuple[str, ...] = (),
                       compiled: bool = False):
    """A training step's outputs and gradients: reference kernels, or the fast ones less ``without``
    (``compiled``: the network under ``torch.compile``)."""
    net = copy.deepcopy(net)  # BatchNorm running statistics must not leak between the two runs
    x = x.clone().requires_grad_()
    forward = torch.compile(net) if compiled else net
    with reference_kernels() if reference else reference_kernels(*without) if without else torch.enable_grad():
        outs = forward(x)
        loss = sum((o.float() * torch.linspace(-1, 1, o.shape[1]).view(1, -1, 1, 1, 1)).square().mean() for o in outs)
        loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], x.grad, grads, net.state_dict()


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("cls, grouping", [(LoGoNet, True), (LoGoNet, False), (LoGoNet, "concurrent"), (ULKANet, True)])
def test_training_outputs_and_gradients_equal_reference(cls, grouping, patch, intra_op_threads, monkeypatch):
    """Fast kernels with the local paths grouped (small paths, CUDA), as a loop (larger paths on CPU) and
    as the loop on two workers, forward and backward (``concurrent_training``, CPU on 2 threads);
    narrowing convolutions' weight gradients swapped (AVX2's default) on every CPU, and the small-map
    products taken on every small map (the rule leaves tiny's narrow 4^3 maps to oneDNN)."""
    monkeypatch.setattr(narrowing_module, "SWAP_NARROWING_WEIGHT_GRAD", True)
    monkeypatch.setattr(small_map_module, "SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT", (0, 0))  # tiny's 4^3 maps too
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)  # every conv unit of tiny's training
    if not grouping:
        monkeypatch.setattr(grouped_module, "CPU_GROUPING_LIMIT", 0)
    intra_op_threads(2)  # where concurrent_training runs (the other cases switch it off)
    net = _tiny(cls, patch, deep_supervision=True).train()
    _assert_training_equals_reference(net, torch.randn(2, 1, *patch),
                                      without=() if grouping == "concurrent" else ("concurrent_training",))


def test_grouped_running_statistics_equal_the_loop_over_steps_and_after_loading(monkeypatch):
    """The grouped paths keep their concatenated BatchNorm statistics from one step to the next: every
    path's own buffers must still equal what the loop of paths gives, step after step, and a
    ``load_state_dict`` between steps (nnU-Net resuming, a fold switch) must be taken up."""
    monkeypatch.setattr(grouped_module, "CPU_GROUPING_LIMIT", 1 << 40)  # grouped for this patch too
    patch = PATCHES[0]
    net = _tiny(LoGoNet, patch).train()
    loop = copy.deepcopy(net)

    def statistics(m):
        return {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}

    cached = [m for m in net.modules() if "_grouped_running_stats" in m.__dict__]
    for step in range(4):
        x = torch.randn(2, 1, *patch)
        with reference_kernels("concurrent_training"):  # on 2 threads it would run the paths as the loop
            net(x)
        with reference_kernels("grouped_local_paths"):
            loop(x)
        if step == 0:
            cached = [m for m in net.modules() if "_grouped_running_stats" in m.__dict__]
            assert cached  # the concatenation is kept for the next step
        if step == 1:
            state = {k: v + 0.5 if "running_mean" in k else v for k, v in loop.state_dict().items()}
            net.load_state_dict(state)
            loop.load_state_dict(state)
        fast, ref = statistics(net), statistics(loop)
        assert fast.keys() == ref.keys()
        for key, value in ref.items():
            assert torch.allclose(fast[key].float(), value.float(), rtol=1e-4, atol=1e-5), (step, key)
    # a network made under torch.inference_mode has statistics without version counters: no cache
    with torch.inference_mode():
        made_there = _tiny(LoGoNet, patch).train()
        before = statistics(made_there)
        made_there(torch.randn(2, 1, *patch))
        made_there(torch.randn(2, 1, *patch))
    assert any(not torch.equal(before[k], v) for k, v in statistics(made_there).items())


_REFERENCE_STEPS: dict[str, tuple] = {}


def _is_setting(value) -> bool:
    """A plain value (or a tuple of them) that a module was built with."""
    if isinstance(value, tuple):
        return all(_is_setting(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None)))


def _reference_steps(net: nn.Module, x: torch.Tensor) -> tuple:
    """The float32 and float64 reference training steps of ``net`` on ``x``. Every lever's test and
    both groupings of one network and input share them, and they take most of each test's time,
    so each is computed once per test session, keyed by the architecture (the module tree's repr
    and every module's public settings, e.g. the decoder's deep supervision, not the caches a
    forward pass leaves behind), the mode, every state-dict tensor and the input, bit for bit."""
    flags = [(name, k, v) for name, module in net.named_modules() for k, v in vars(module).items()
             if not k.startswith("_") and _is_setting(v)]
    digest = hashlib.sha256(f"{net!r} {flags}".encode())
    for name, tensor in [*net.state_dict().items(), ("input", x)]:
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    key = digest.hexdigest()
    if key not in _REFERENCE_STEPS:
        ref = _outputs_and_grads(net, x, reference=True)
        exact_out, exact_gx, exact_grads, _ = _outputs_and_grads(copy.deepcopy(net).double(), x.double(), reference=True)
        _REFERENCE_STEPS[key] = (ref, exact_out, exact_gx, exact_grads)
    return _REFERENCE_STEPS[key]


#: How far a float32 training step may sit from the exact one through LeakyReLU kink flips alone.
#: Any change of summation order moves pre-activations by ~1e-6 and sends the few that lie that close
#: to zero to the other side of the kink (slope 1 <-> 0.01); such a voxel's gradient, and every
#: gradient upstream of it, changes by about its share of the tensor's norm, 1/sqrt(elements). Measured
#: on an AMD EPYC Zen 4 (2026-12-04): LoGoNet-tiny at 32^3, one voxel of a 16^3 decoder map at
#: -6.1e-7 (fast) vs +7.7e-7 (reference) moved that map's gradient by 5.8e-3 and the full-resolution
#: skip's weight gradient by 3.1e-3 (the reference's own error: 1.0e-4); another CPU's rounding flips
#: other voxels. The fast kernels themselves are held to 1e-5 one by one
#: (``test_conv3d_equals_torch_conv3d_with_gradients`` and the lever tests); this whole-network check is
#: for the wiring (a wrong slice, a missing term, statistics not written back), whose errors are of
#: order one.
KINK_FLIP_TOLERANCE = 1e-2


def _assert_training_equals_reference(net: nn.Module, x: torch.Tensor, without: tuple[str, ...] = (),
                                     compiled: bool = False) -> None:
    (ref_out, ref_gx, ref_grads, ref_state), exact_out, exact_gx, exact_grads = _reference_steps(net, x)
    fast_out, fast_gx, fast_grads, fast_state = _outputs_and_grads(net, x, reference=False, without=without,
                                                                   compiled=compiled)
    # BatchNorm running statistics (the grouped local paths write them back to every path); the
    # bottleneck's BatchNorm over 2 values (1^3 maps, batch 2) magnifies float32 rounding to ~3e-5
    assert fast_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        if "running" in key or "num_batches" in key:
            assert torch.allclose(fast_state[key].float(), value.float(), rtol=1e-4, atol=1e-4), key
    # Outputs within 1e-4 of the reference's; where the bottleneck's BatchNorm over 2 values magnifies
    # rounding to that size (ULKANet-tiny at 32^3: the reference 5.7e-5 from the exact outputs, the
    # fast path 2.4e-5 on the other side, 1.0e-4 apart), at least as close to the exact ones
    for a, b, exact in zip(fast_out, ref_out, exact_out):
        assert _rel(a, b) < 1e-4 or _rel(a.double(), exact) <= _rel(b.double(), exact), (_rel(a, b), _rel(b.double(), exact))
    assert fast_grads.keys() == ref_grads.keys()
    # Gradients are judged against a float64 computation: BatchNorm in training mode turns float32
    # rounding into ~1e-4 (of the largest gradient) noise in both float32 paths, the small
    # early-layer gradients carry ~1e-3 relative noise, and kink flips up to KINK_FLIP_TOLERANCE.
    # The fast path must be about as close to the exact gradients as the float32 reference is.
    exact_grads = {k: v.float() for k, v in exact_grads.items()}
    scale = max(g.abs().max() for g in exact_grads.values())

    def worst(grads):
        return max(((grads[k] - exact_grads[k]).abs().max() / scale).item() for k in exact_grads)

    assert worst(fast_grads) <= 2 * worst(ref_grads) + 0.3 * KINK_FLIP_TOLERANCE, (worst(fast_grads), worst(ref_grads))
    for k, exact in exact_grads.items():
        if exact.norm() > 1e-3 * scale:  # (the bottleneck's BatchNorm on 2 values: ~2e-2 in both paths)
            fast_err = ((fast_grads[k] - exact).norm() / exact.norm()).item()
            ref_err = ((ref_grads[k] - exact).norm() / exact.norm()).item()
            assert fast_err <= 3 * max(ref_err, KINK_FLIP_TOLERANCE), (k, fast_err, ref_err)
    assert _rel(fast_gx, exact_gx.float()) <= 2 * _rel(ref_gx, exact_gx.float()) + 0.1 * KINK_FLIP_TOLERANCE
    assert _rel(fast_gx, ref_gx) < KINK_FLIP_TOLERANCE


def test_whole_network_check_catches_a_gradient_off_by_five_percent(monkeypatch):
    """The whole-network tolerance (``KINK_FLIP_TOLERANCE``) still fails a fast path whose 1x1x1
    weight gradients are 5 % off, an error far smaller than a wrong slice or a missing term."""
    monkeypatch.setattr(small_map_module, "SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT", (0, 0))
    patch = (32, 32, 32)
    net = _tiny(ULKANet, patch, deep_supervision=True).train()
    x = torch.randn(2, 1, *patch)
    backward = pointwise_module.PointwiseConv3d.backward

    def off_by_five_percent(ctx, grad_out):
        grad_x, grad_w, grad_b = backward(ctx, grad_out)
        return grad_x, None if grad_w is None else 1.05 * grad_w, grad_b

    monkeypatch.setattr(pointwise_module.PointwiseConv3d, "backward", staticmethod(off_by_five_percent))
    with pytest.raises(AssertionError):  # (outputs and statistics are untouched: the gradients fail)
        _assert_training_equals_reference(net, x)


@pytest.mark.parametrize("preset, patch, grouped", [("tiny", (32, 64, 64), True), ("tiny", (96, 96, 96), False),
                                                    ("S", (64, 64, 64), False), ("S", (32, 32, 32), True)])
def test_local_paths_are_grouped_on_cpu_only_where_that_is_faster(preset, patch, grouped, monkeypatch):
    """The measured rule (docs/speed.md): inference always grouped; CPU training grouped while
    sub-crop voxels x dims[0] <= 2^18. (On 2 threads ``concurrent_paths`` and ``concurrent_training`` run
    the paths as the loop on two workers instead: tests/test_concurrent_paths.py.)"""
    with torch.device("meta"):
        net = LoGoNet.from_preset(preset, 1, 4, patch)
    calls = []
    monkeypatch.setattr("nnunet_logonet.network.logonet.grouped_local_features",
                        lambda *a: calls.append(1) or grouped_module.grouped_local_features(*a))
    x = torch.zeros(2, 1, *patch)
    assert grouped_module.grouping_pays(net.local_paths, x) is grouped  # training (gradients on)
    with torch.no_grad():  # inference, as nnUNetPredictor runs it: always grouped
        assert grouped_module.grouping_pays(net.local_paths, x)
    if preset == "tiny":
        with reference_kernels("concurrent_training"):
            net.to_empty(device="cpu").train()(x)
        assert bool(calls) is grouped


@pytest.mark.parametrize("grid, size", [((2, 2, 2), (8, 12, 6)), ((1, 2, 2), (5, 8, 8)), ((2, 1, 4), (6, 3, 8))])
@pytest.mark.parametrize("batch", [1, 2])
def test_adding_ungrouped_subcrops_in_place_equals_adding_the_stitched_copy(grid, size, batch):
    """``stitch_in_place``: the same additions as ``global + ungroup_subcrops(local)``, bit for bit."""
    n = grid[0] * grid[1] * grid[2]
    out = torch.randn(batch, 3, *size).contiguous(memory_format=CL)
    grouped = torch.randn(batch, n * 3, *(s // g for s, g in zip(size, grid))).contiguous(memory_format=CL)
    expected = out + grouped_module.ungroup_subcrops(grouped, grid)
    storage = out.data_ptr()
    result = grouped_module.add_ungrouped_subcrops_(out, grouped, grid)
    assert result is out and out.data_ptr() == storage
    assert torch.equal(result, expected)


@pytest.mark.parametrize("grid, size", [((2, 2, 2), (8, 12, 6)), ((1, 2, 2), (5, 8, 8)), ((2, 1, 4), (6, 3, 8))])
@pytest.mark.parametrize("batch", [1, 2])
def test_adding_subcrops_in_one_pass_equals_the_stitched_sum_with_gradients(grid, size, batch):
    """``stitch_add``: the loop's tiles and the grouped local features added into the global ones
    without the stacked, stitched or ungrouped copies: the same sums bit for bit, and the same
    gradients (each tile gets its region of the incoming gradient, the grouped tensor all of it regrouped)."""
    torch.manual_seed(0)
    n = grid[0] * grid[1] * grid[2]
    tile_size = [s // g for s, g in zip(size, grid)]
    base = torch.randn(batch, 3, *size).contiguous(memory_format=CL).requires_grad_()
    tiles = [torch.randn(batch, 3, *tile_size).contiguous(memory_format=CL).requires_grad_() for _ in range(n)]
    grouped = torch.randn(batch, n * 3, *tile_size).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(batch, 3, *size).contiguous(memory_format=CL)
    cases = [
        (lambda b: add_subcrops(b, tiles, grid), lambda b: b + stitch_subcrops(torch.stack(tiles), grid), tiles),
        (lambda b: grouped_module.add_ungrouped_subcrops(b, grouped, grid),
         lambda b: b + grouped_module.ungroup_subcrops(grouped, grid), [grouped]),
    ]
    for fast, plain, inputs in cases:
        leaves = [base, *inputs]
        out = fast(base)
        assert out.is_contiguous(memory_format=CL)
        fast_grads = torch.autograd.grad(out, leaves, grad)
        expected = plain(base)
        plain_grads = torch.autograd.grad(expected, leaves, grad)
        assert torch.equal(out, expected)
        assert all(torch.equal(a, b) for a, b in zip(fast_grads, plain_grads))


@pytest.mark.parametrize("grouped", [True, False])
def test_local_features_are_added_without_the_stitched_copy_in_training(grouped, monkeypatch):
    """Under autograd (training) the loop's tiles or the grouped local features go into the sum
    without the stitched copy (``stitch_add``); with the lever off the plain sum gives the same step."""
    net = _tiny(LoGoNet, (32, 32, 32), deep_supervision=True).train()
    x = torch.randn(2, 1, 32, 32, 32).contiguous(memory_format=CL)
    monkeypatch.setattr(grouped_module, "CPU_GROUPING_LIMIT", 2 ** 40 if grouped else 0)
    name = "add_ungrouped_subcrops" if grouped else "add_subcrops"
    calls = []
    real = getattr(logonet_module, name)
    monkeypatch.setattr(logonet_module, name, lambda *a: calls.append(1) or real(*a))
    results = []
    # grouped: not with the paths side by side on 2 threads (concurrent_training runs the loop)
    concurrent = ("concurrent_training",) if grouped else ()
    for levers_off in [concurrent, ("stitch_add", *concurrent)]:
        net.zero_grad(set_to_none=True)
        with reference_kernels(*levers_off) if levers_off else torch.enable_grad():
            out = net(x)
            sum(o.square().mean() for o in out).backward()
        results.append(([o.detach() for o in out], [p.grad.clone() for p in net.parameters()]))
    assert len(calls) == 1
    (fast_out, fast_grads), (plain_out, plain_grads) = results
    assert all(torch.equal(a, b) for a, b in zip(fast_out, plain_out))
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, plain_grads))


def _pool_shapes(net: nn.Module) -> dict:
    return {key: [t.data_ptr() for t in kept] for key, kept in buffers_module.pool_of(net)._buffers.items()}


@pytest.fixture
def intra_op_threads():
    """``torch.set_num_threads`` for one test (``concurrent_paths`` runs on exactly 2), restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("cls", [LoGoNet, ULKANet])
def test_inference_into_reused_buffers_equals_fresh_outputs(cls, intra_op_threads, monkeypatch):
    """``output_buffers``: forwards that write into the buffers of the forward before give the outputs
    of fresh memory bit for bit, one input after another (a stale buffer would show), under
    ``torch.no_grad`` and ``torch.inference_mode`` (nnUNetv2_predict's) in turn, deep supervision
    included, a strided tile as nnU-Net's sliding window cuts it too; the buffers are the same ones
    each time. One stream (one thread): with ``concurrent_paths`` how many blocks two workers hold at
    once depends on their timing (tests/test_concurrent_paths.py checks that case)."""
    intra_op_threads(1)
    monkeypatch.setattr(buffers_module, "MIN_BYTES", 0)  # every convolution and upsampling it may take
    net = _tiny(cls, (32, 64, 32), deep_supervision=True).eval()
    xs = [torch.randn(1, 1, 32, 64, 32).contiguous(memory_format=CL) for _ in range(2)]
    xs.append(torch.randn(1, 1, 40, 70, 36)[:, :, 3:35, 5:69, 2:34])  # a sliding-window tile: a strided view
    kept = None
    for round, mode in enumerate([torch.no_grad, torch.inference_mode, torch.no_grad, torch.inference_mode]):
        with mode():
            fast = [net(x) for x in xs]
            with reference_kernels("output_buffers"):
                plain = [net(x) for x in xs]
        for a, b in zip(fast, plain):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
        if round == 1:
            kept = _pool_shapes(net)
    assert _pool_shapes(net) == kept and len(kept) >= 4  # no buffer added after the first two rounds
    assert {inference for _, inference in kept} == {False, True}


def test_outputs_someone_keeps_are_never_overwritten(monkeypatch):
    """A forward hook that keeps a pooled output (or a view of one) across forwards still holds what
    it kept: the pool hands a buffer out again only when nothing else refers to it."""
    monkeypatch.setattr(buffers_module, "MIN_BYTES", 0)
    net = _tiny(LoGoNet, (32, 32, 32)).eval()
    kept = []
    net.global_path.encoder.stem[1].register_forward_hook(lambda m, i, o: kept.append(o))
    net.global_path.decoder.final[0].register_forward_hook(lambda m, i, o: kept.append(o[:, :2]))
    x1, x2 = (torch.randn(1, 1, 32, 32, 32).contiguous(memory_format=CL) for _ in range(2))
    with torch.no_grad():
        net(x1)
        first = [k.clone() for k in kept]
        out2 = net(x2)
        net(x1)
        with reference_kernels("output_buffers"):
            plain2 = net(x2)
    assert torch.equal(out2, plain2)
    assert all(torch.equal(k, f) for k, f in zip(kept[:2], first))
    assert not any(torch.equal(kept[i], kept[i + 2]) for i in range(2))  # x2 gave other outputs
    assert len({k.data_ptr() for k in kept}) == len(kept)


def test_output_buffers_only_in_inference_and_freed_by_train():
    """Training (autograd) and eval-mode forwards that record gradients never touch the pool; the
    buffers of an inference forward (at the default threshold: LoGoNet-tiny's full-resolution
    outputs of a 2 x 32x64x32 batch) go away with ``train()``, as nnU-Net calls it after validating."""
    net = _tiny(LoGoNet, (32, 64, 32)).eval()
    x = torch.randn(2, 1, 32, 64, 32).contiguous(memory_format=CL)
    net(x).sum().backward()  # eval mode, autograd on
    assert buffers_module.pool_of(net).nbytes == 0
    with torch.no_grad():
        net(x)
    pool = buffers_module.pool_of(net)
    assert pool.nbytes >= 2 * buffers_module.MIN_BYTES
    net.train()
    assert pool.nbytes == 0
    net(x).sum().backward()
    assert pool.nbytes == 0
    assert copy.deepcopy(net.eval()).__dict__.get("_output_pool") is not pool


def _unit_step(unit: ConvUnit, parts: list[torch.Tensor], grad: torch.Tensor, pooled: bool):
    """One training forward and backward of a conv unit, in a training pool (``training_buffers``) or
    as the plain modules; its output, the gradients of parameters and parts, and its BatchNorm's state."""
    unit = copy.deepcopy(unit)
    parts = [p.detach().clone().requires_grad_(p.requires_grad) for p in parts]
    with buffers_module.pooled_outputs(unit, parts[0]):
        with reference_kernels("training_buffers") if not pooled else torch.enable_grad():
            out = unit(parts[0] if len(parts) == 1 else tuple(parts))
    out.backward(grad)
    grads = [unit.conv.weight.grad, unit.conv.bias.grad if unit.conv.bias is not None else None,
             unit.norm.weight.grad, unit.norm.bias.grad] + [p.grad for p in parts]
    return out.detach().clone(), grads, {k: v.clone() for k, v in unit.norm.state_dict().items()}, unit


def _count_pooled_units(monkeypatch) -> list:
    calls = []
    apply = training_buffers_module.PooledConvNormAct.apply
    monkeypatch.setattr(training_buffers_module.PooledConvNormAct, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("widths, momentum, head", [((1,), 0.1, False), ((6,), None, False), ((4, 6), 0.1, False),
                                                    ((6,), 0.1, True), ((4, 6), 0.1, True)])
def test_conv_unit_in_kept_buffers_equals_the_modules(widths, momentum, head, monkeypatch):
    """``training_buffers``: a full-resolution conv unit (conv 3^3 -> BatchNorm -> LeakyReLU) as one
    Function with its tensors in kept memory gives the modules' output and their gradients up to
    float32 rounding (the BatchNorm's input gradient sums its terms in another order): for the
    image's one channel (no input gradient), a wider input, the parts of a concatenation (the
    decoder's last units) and the head's unit (a conv bias, GELU); running statistics and batch
    count as ``nn.BatchNorm3d`` keeps them, cumulative averaging (``momentum=None``) included; over
    an input offset by 50x its spread too."""
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)
    calls = _count_pooled_units(monkeypatch)
    torch.manual_seed(0)
    unit = ConvUnit(sum(widths), 8).to(memory_format=CL)
    unit.norm.momentum = momentum
    if head:  # LoGoHead's conv -> norm -> GELU
        unit.conv = Conv3d(sum(widths), 8, kernel_size=3, padding=1).to(memory_format=CL)
        unit.act = nn.GELU()
    _randomise_batchnorm(unit)
    for offset in (0.0, 50.0):
        parts = [(torch.randn(2, w, 6, 7, 5) + offset).contiguous(memory_format=CL).requires_grad_(w > 1)
                 for w in widths]
        grad = torch.randn(2, 8, 6, 7, 5).contiguous(memory_format=CL)
        fast, fast_grads, fast_state, fast_unit = _unit_step(unit, parts, grad, pooled=True)
        plain, plain_grads, plain_state, _ = _unit_step(unit, parts, grad, pooled=False)
        assert _rel(fast, plain) < 1e-6
        scale = max(g.abs().max() for g in plain_grads if g is not None)
        for i, (a, b) in enumerate(zip(fast_grads, plain_grads)):
            assert (a is None) == (b is None)
            if i == 1 and a is not None:  # a conv bias before a BatchNorm: zero up to rounding in both
                assert a.abs().max() < 1e-5 * scale and b.abs().max() < 1e-5 * scale
            elif a is not None:
                assert a.shape == b.shape and _rel(a, b) < 1e-5, (i, _rel(a, b))
        for key, value in plain_state.items():
            assert torch.allclose(fast_state[key].float(), value.float(), rtol=1e-6, atol=1e-7), key
        assert (fast_grads[4] is None) == (widths == (1,))  # the image needs no gradient
        assert (fast_grads[1] is None) == (not head)
        assert buffers_module.pool_of(fast_unit, training=True).nbytes > 0
    assert len(calls) == 2


@pytest.mark.parametrize("head", [False, True])
def test_conv_unit_backward_writes_into_the_forward_blocks(head, monkeypatch):
    """The backward of a conv unit in the training pool puts its gradients into the blocks of the
    forward's tensors (no new block) once nothing else refers to them, leaves an output the caller
    keeps alone (then one new block for LeakyReLU, whose output it would have reused), gives the
    same gradients as the modules either way, and a second backward through the same graph stops
    with autograd's in-place error instead of reading overwritten values."""
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)
    torch.manual_seed(0)
    unit = ConvUnit(6, 8).to(memory_format=CL)
    if head:  # LoGoHead's conv -> norm -> GELU: the GELU's input is saved, its output is a third block
        unit.conv = Conv3d(6, 8, kernel_size=3, padding=1).to(memory_format=CL)
        unit.act = nn.GELU()
    x = torch.randn(2, 6, 6, 7, 5).contiguous(memory_format=CL)
    grad = torch.randn(2, 8, 6, 7, 5).contiguous(memory_format=CL)
    _, plain_grads, _, _ = _unit_step(unit, [x.requires_grad_()], grad, pooled=False)
    block = 4 * grad.numel()
    for keep in (False, True):
        trained = copy.deepcopy(unit)
        x_in = x.detach().clone().requires_grad_()
        with buffers_module.pooled_outputs(trained, x_in):
            out = trained(x_in)
        assert type(out.grad_fn).__name__ == "PooledConvNormActBackward"
        pool = buffers_module.pool_of(trained, training=True)
        assert pool.nbytes == (3 if head else 2) * block
        kept = out.detach().clone() if keep else None
        loss = (out * grad).sum()
        if not keep:
            del out
        loss.backward(retain_graph=True)
        assert pool.nbytes == (3 if head or keep else 2) * block
        if keep:
            assert torch.equal(out.detach(), kept)
        grads = [trained.conv.weight.grad, trained.norm.weight.grad, trained.norm.bias.grad, x_in.grad]
        for a, b in zip(grads, [plain_grads[0], plain_grads[2], plain_grads[3], plain_grads[4]]):
            assert _rel(a, b) < 1e-5
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_conv_unit_runs_in_kept_buffers_only_where_it_pays(monkeypatch):
    """Outside a network's training forward, below the size threshold, with autograd off, the lever
    off or in eval mode, the unit is the plain modules (no pool block is made)."""
    calls = _count_pooled_units(monkeypatch)
    unit = ConvUnit(4, 8).to(memory_format=CL)
    x = torch.randn(2, 4, 6, 7, 5).contiguous(memory_format=CL)
    unit(x)  # not inside a network's forward: no pool
    with buffers_module.pooled_outputs(unit, x):
        unit(x)  # 2 x 8 x 210 floats, far below MIN_BYTES
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)
    with buffers_module.pooled_outputs(unit, x):
        with reference_kernels("training_buffers"):
            unit(x)
        with torch.no_grad():
            unit(x)
    with buffers_module.pooled_outputs(unit.eval(), x):
        unit(x)
    assert calls == [] and buffers_module.pool_of(unit, training=True).nbytes == 0
    with buffers_module.pooled_outputs(unit.train(), x):
        unit(x).sum().backward()
    assert calls == [1] and buffers_module.pool_of(unit, training=True).nbytes > 0


@pytest.mark.parametrize("case", ["padding_0", "stride_2", "dilation_2", "groups_2", "concat_sum_off"])
def test_conv_unit_in_kept_buffers_only_for_a_dense_same_3x3x3_convolution(case, monkeypatch):
    """The training pool's Function convolves 3^3, stride 1, padding 1, dense: a unit with any other
    geometry runs as the modules (same output shape and values), and so do the parts of a
    concatenation while ``concat_sum`` is off (the reference builds the concatenation)."""
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)
    calls = _count_pooled_units(monkeypatch)
    torch.manual_seed(0)
    unit = ConvUnit(8, 8)
    geometry = {"padding_0": dict(padding=0), "stride_2": dict(stride=2, padding=1),
                "dilation_2": dict(dilation=2, padding=2), "groups_2": dict(groups=2, padding=1)}
    if case in geometry:
        unit.conv = Conv3d(8, 8, kernel_size=3, bias=False, **geometry[case])
    unit = unit.to(memory_format=CL).train()
    parts = [torch.randn(2, 4, 6, 7, 5).contiguous(memory_format=CL) for _ in range(2)]
    x = torch.cat(parts, 1).contiguous(memory_format=CL)
    reference = copy.deepcopy(unit)
    with buffers_module.pooled_outputs(unit, x):
        with reference_kernels("concat_sum") if case == "concat_sum_off" else contextlib.nullcontext():
            out = unit(tuple(parts) if case == "concat_sum_off" else x)
    assert calls == []
    expected = reference(x)
    assert out.shape == expected.shape and _rel(out, expected) < 1e-5


@pytest.mark.parametrize("hooked", ["conv", "norm", "act"])
def test_hooked_conv_unit_runs_as_the_modules_in_training(hooked, monkeypatch):
    """A forward hook on a full-resolution unit's conv, norm or activation sees its module run in a
    training step too: the unit leaves the training pool's one Function aside."""
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)
    calls = _count_pooled_units(monkeypatch)
    unit = ConvUnit(4, 8).to(memory_format=CL).train()
    seen = []
    unit.get_submodule(hooked).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 4, 6, 7, 5).contiguous(memory_format=CL)
    with buffers_module.pooled_outputs(unit, x):
        unit(x).sum().backward()
    assert seen == [(2, 8, 6, 7, 5)] and calls == []


@pytest.mark.parametrize("scale", [(2, 2, 2), (1, 2, 2)])
def test_upsampling_in_kept_buffers_equals_interpolate(scale, monkeypatch):
    """``training_buffers``: the decoder's trilinear upsampling in training writes its output into a
    kept block, the same floats as ``F.interpolate``, and gives its input the same gradient."""
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)
    up = Upsample3d(scale)
    x = torch.randn(2, 5, 4, 6, 3).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(2, 5, *(n * s for n, s in zip(x.shape[2:], scale)))
    with buffers_module.pooled_outputs(up, x):
        y = up(x)
    assert type(y.grad_fn).__name__ == "PooledUpsample3dBackward"
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.interpolate(x_ref, scale_factor=[float(s) for s in scale], mode="trilinear", align_corners=False)
    y_ref.backward(grad)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    assert buffers_module.pool_of(up, training=True).nbytes == 4 * y.numel()


def _training_pool_blocks(net: nn.Module) -> dict:
    return {key: [t.data_ptr() for t in kept]
            for key, kept in buffers_module.pool_of(net, training=True)._buffers.items()}


@pytest.mark.parametrize("cls", [LoGoNet, ULKANet])
def test_training_steps_in_kept_buffers_equal_reference(cls, monkeypatch):
    """Whole-network training with every conv unit in the training pool equals the reference
    (outputs, every gradient, running statistics); the next steps run in the same blocks, an output
    the caller keeps is never written over, and ``eval()`` (nnU-Net's validation) frees the blocks."""
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)
    calls = _count_pooled_units(monkeypatch)
    net = _tiny(cls, (32, 64, 32), deep_supervision=True).to(memory_format=CL).train()
    x = torch.randn(2, 1, 32, 64, 32).contiguous(memory_format=CL)
    _assert_training_equals_reference(net, x)
    assert calls
    blocks = []
    for step in range(3):
        sum(o.square().mean() for o in net(x + step)).backward()
        blocks.append(_training_pool_blocks(net))
    assert blocks[0] and blocks[1] == blocks[2]
    kept = []  # the last upsampling's pooled output, kept by a hook across steps
    decoder = net.global_path.decoder if cls is LoGoNet else net.decoder
    decoder.upsamples[-1].register_forward_hook(lambda m, i, o: kept.append((o, o.detach().clone())))
    for step in range(3):
        sum(o.square().mean() for o in net(x + step)).backward()
    assert all(type(o.grad_fn).__name__ == "PooledUpsample3dBackward" for o, _ in kept)
    assert len({o.data_ptr() for o, _ in kept}) == 3  # a kept block is not handed out again
    assert all(torch.equal(o.detach(), copy_) for o, copy_ in kept)
    net.eval()
    assert buffers_module.pool_of(net, training=True).nbytes == 0


@pytest.mark.parametrize("training", [False, True])
def test_torch_compile_sees_the_network_as_one_graph(training, monkeypatch):
    """``nnUNet_compile=t`` on CUDA compiles the whole network: dynamo traces LoGoNet's grouped code
    path (the CUDA one) in one graph, in training and in inference, every lever on: the CPU-only fast
    paths (oneDNN's availability check, the output pool and its lock, the folded-weight cache) step
    aside while compiling instead of breaking the graph."""
    import torch._dynamo

    monkeypatch.setattr(grouped_module, "CPU_GROUPING_LIMIT", 2 ** 40)  # the grouped paths, as on CUDA
    net = _tiny(LoGoNet, (32, 32, 32), deep_supervision=True).train(training)
    x = torch.randn(2, 1, 32, 32, 32).contiguous(memory_format=CL)
    torch._dynamo.reset()
    try:
        with torch.set_grad_enabled(training):
            explained = torch._dynamo.explain(net)(x)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow  # ~3 min of inductor's C++ compilation (less once cached): `bash scripts/test.sh -m slow`
def test_inductor_compiled_network_equals_the_reference(monkeypatch):
    """What nnU-Net trains and predicts with on CUDA by default (``nnUNet_compile``): the network under
    ``torch.compile``. No GPU in CI, so inductor's CPU backend stands in for what dynamo and AOT autograd make
    of LoGoNet's CUDA code path (the grouped local paths): a compiled training step's outputs, gradients and
    BatchNorm statistics judged as every fast path's are (against float64), then the compiled eval-mode
    output against the reference kernels'."""
    import torch._dynamo

    monkeypatch.setattr(grouped_module, "CPU_GROUPING_LIMIT", 2 ** 40)  # the grouped paths, as on CUDA
    patch = PATCHES[0]
    net = _tiny(LoGoNet, patch, deep_supervision=True).train()
    x = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    try:
        _assert_training_equals_reference(net, x, compiled=True)
        net.eval()
        with torch.no_grad():
            inferred = torch.compile(net)(x[:1].contiguous(memory_format=CL))
            with reference_kernels():
                expected = net(x[:1])
        assert all(_rel(a, b) < 1e-4 for a, b in zip(inferred, expected))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("concurrent", [False, True])
def test_local_features_are_added_in_place_only_without_autograd(concurrent, intra_op_threads, monkeypatch):
    """In inference the global features take the local ones in place (same outputs, deep supervision
    included): the grouped ones, or with ``concurrent_paths`` (2 threads) the looped ones; under autograd
    they are saved for the backward, so the sum is a new tensor."""
    intra_op_threads(2 if concurrent else 1)
    net = _tiny(LoGoNet, (32, 32, 32), deep_supervision=True).eval()
    x = torch.randn(1, 1, 32, 32, 32).contiguous(memory_format=CL)
    calls = []
    name = "add_subcrops_" if concurrent else "add_ungrouped_subcrops_"
    real = getattr(logonet_module, name)
    monkeypatch.setattr(logonet_module, name, lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = net(x)
        assert len(calls) == 1
        with reference_kernels("stitch_in_place"):
            plain = net(x)
        assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    with torch.enable_grad():
        out = net(x.requires_grad_())
        out[0].float().mean().backward()
    assert len(calls) == 1 and x.grad is not None


def test_fast_paths_are_on_by_default_and_avoid_slow_conv3d():
    """A plain forward (as nnUNetv2_predict runs it) takes oneDNN for every conv, never slow_conv3d."""
    assert fast_paths_enabled()
    net = _tiny(LoGoNet, (32, 32, 32)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x)
    ops = {e.key: e.count for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops
    assert not any("slow_conv" in op for op in ops), sorted(op for op in ops if "conv" in op)
    with reference_kernels(), torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(x)
    ref_ops = {e.key: e.count for e in prof.key_averages()}
    # the BatchNorms after convolutions were folded; those before the LKA branches remain
    assert ops.get("aten::native_batch_norm", 0) < ref_ops["aten::native_batch_norm"] / 2


def test_inference_fuses_activations_into_the_convolutions():
    """nnUNetv2_predict's forward runs no separate GELU or LeakyReLU pass: oneDNN applies them as
    post-ops of the convolutions before them (and sums concatenation parts); outputs unchanged."""
    net = _tiny(LoGoNet, (32, 32, 32)).eval()
    _randomise_batchnorm(net)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ours = net(x)
    ops = {e.key: e.count for e in prof.key_averages()}
    assert ops.get("mkldnn::_convolution_pointwise", 0) > 0
    assert "aten::gelu" not in ops
    with reference_kernels(), torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ref = net(x)
    ref_ops = {e.key: e.count for e in prof.key_averages()}
    assert ref_ops["aten::gelu"] > 0
    # LeakyReLU stays separate only after a concatenation's summed parts (oneDNN allows no
    # LeakyReLU after its sum post-op): the 3 full-resolution / skip units of this network
    assert ops.get("aten::leaky_relu_", 0) == 3 < ref_ops["aten::leaky_relu_"] / 5
    assert _rel(ours, ref) < 1e-4


def test_hooked_activation_is_still_called_in_eval():
    """The SSL feature tap hooks ``head.act``; fusion must not skip a watched module."""
    net = _tiny(LoGoNet, (32, 32, 32)).eval()
    seen = []
    handle = net.head.act.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(x)
    handle.remove()
    assert seen == [torch.Size([1, net.head.conv.out_channels, 32, 32, 32])]
    with torch.no_grad():
        assert _rel(out, net(x)) < 1e-5  # the fused path gives the same output


def test_activation_of_modules():
    assert Activation.of(nn.GELU()).name == "gelu"
    assert Activation.of(nn.GELU(approximate="tanh")) is None  # oneDNN's exact GELU would differ
    leaky = Activation.of(nn.LeakyReLU(0.2))
    assert (leaky.name, leaky.negative_slope) == ("leaky_relu", 0.2)
    assert Activation.of(nn.ReLU()) is None
    with pytest.raises(ValueError, match="gelu"):
        Activation("relu6")


def test_reference_kernels_restores_the_previous_state():
    assert fast_paths_enabled()
    with reference_kernels():
        assert not fast_paths_enabled()
        with reference_kernels():
            assert not fast_paths_enabled()
        assert not fast_paths_enabled()
    assert fast_paths_enabled()


def test_reference_kernels_switches_named_levers_alone_and_restores_them():
    with reference_kernels("post_ops", "concat_sum"):
        assert fast_paths_enabled() and lever_enabled("onednn")
        assert not lever_enabled("post_ops") and not lever_enabled("concat_sum")
        with reference_kernels("onednn"):
            assert not lever_enabled("onednn") and not lever_enabled("post_ops")
        with reference_kernels():
            assert not any(lever_enabled(name) for name in LEVERS)
        assert lever_enabled("onednn") and not lever_enabled("post_ops")
    assert all(lever_enabled(name) for name in LEVERS)
    with pytest.raises(ValueError, match="'narrowing'.*valid levers: .*narrowing_weight_grad"):
        with reference_kernels("narrowing"):
            pass
    assert all(lever_enabled(name) for name in LEVERS)


@pytest.mark.parametrize("lever", list(LEVERS))
def test_each_lever_off_alone_gives_the_reference_results(lever, monkeypatch):
    """``logonet_benchmark --without LEVER`` runs the network with one fast path off; the others then
    meet inputs they never meet with all on (unfolded BatchNorm, unfused activations, the loop)."""
    monkeypatch.setattr(narrowing_module, "SWAP_NARROWING_WEIGHT_GRAD", True)
    monkeypatch.setattr(small_map_module, "SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT", (0, 0))  # tiny's 4^3 maps too
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)  # every conv unit of tiny's training
    patch = (32, 32, 32)
    net = _tiny(LoGoNet, patch, deep_supervision=True)
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        with reference_kernels(lever):
            without = net.eval()(x)
        with reference_kernels():
            ref = net(x)
    for a, b in zip(without, ref):
        assert _rel(a, b) < 1e-4
    _assert_training_equals_reference(net.train(), x, without=(lever,))


#: lever -> (owner, attribute) that the lever calls, and how the calls change with the lever off
LEVER_MARKERS = {
    "onednn": (torch, "mkldnn_convolution", "none"),
    "depthwise_input_grad": (depthwise_module, "same_depthwise_forward", "fewer"),  # the forward still calls it
    "depthwise_weight_grad": (depthwise_module, "depthwise_weight_grad", "none"),
    "depthwise_weight_slices": (depthwise_module, "depthwise_weight_grad_by_slices", "none"),
    "dilated_phases": (depthwise_module, "to_phases", "none"),
    "narrowing_weight_grad": (narrowing_module.NarrowingConv3d, "apply", "none"),
    "pointwise_gemm": (pointwise_module, "pointwise_forward", "none"),
    "small_map_gemm": (small_map_module.SmallMapConv3d, "apply", "none"),
    "concat_sum": (conv_module, "summed_part_convolutions", "none"),  # one convolution per concatenation
    "post_ops": (conv_module, "_CONV_POINTWISE", "none"),
    "batchnorm_folding": (folding_module, "fold_batchnorm", "none"),
    "lka_folding": (folding_module, "fold_lka_block_uncached", "none"),  # global blocks and grouped paths
    "grouped_local_paths": (logonet_module, "grouped_local_features", "none"),
    "stitch_in_place": (logonet_module, "add_subcrops_", "none"),  # inference: the concurrent paths' loop
    "stitch_add": (logonet_module, "add_ungrouped_subcrops", "none"),  # training, grouped (tiny)
    "output_buffers": (buffers_module.OutputPool, "take", "fewer"),  # inference (training_buffers takes too)
    "training_buffers": (training_buffers_module.PooledConvNormAct, "apply", "none"),  # training
    "channels_first_logits": (torch, "baddbmm", "none"),
    "concurrent_paths": (logonet_module, "run_concurrently", "none"),  # inference, on 2 threads
    "concurrent_training": (logonet_module, "run_concurrently_with_autograd", "none"),  # training, on 2 threads
}


#: the four passes the lever markers are counted in: (threads, mode); on 2 threads the concurrent
#: paths run, on 1 the grouped ones they replace
MARKER_PASSES = ((2, "eval"), (2, "train"), (1, "eval"), (1, "train"))


def _marker_calls(net: nn.Module, x: torch.Tensor, monkeypatch, without: tuple[str, ...],
                  passes=MARKER_PASSES) -> dict[tuple[int, str], dict[str, int]]:
    """Calls of every lever's marker in each of ``passes``: an inference forward or a training step,
    on 2 threads (the concurrent paths) or 1 (the grouped paths, which the concurrent ones replace on 2)."""
    counts = {}
    with monkeypatch.context() as patched:
        for lever, (owner, name, _) in LEVER_MARKERS.items():
            real = getattr(owner, name)

            def spy(*args, _real=real, _lever=lever, **kwargs):
                current[_lever] += 1
                return _real(*args, **kwargs)

            patched.setattr(owner, name, spy)
        with reference_kernels(*without) if without else torch.enable_grad():
            for threads, mode in passes:
                current = counts[(threads, mode)] = dict.fromkeys(LEVER_MARKERS, 0)
                torch.set_num_threads(threads)
                if mode == "eval":
                    with torch.no_grad():
                        net.eval()(x)
                else:
                    out = net.train()(x.clone().requires_grad_())
                    sum(o.square().mean() for o in out).backward()
            torch.set_num_threads(2)
    return counts


_MARKERS_ALL_ON: dict[str, dict] = {}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_switching_a_lever_off_changes_what_runs(lever, intra_op_threads, monkeypatch):
    """The switch behind ``logonet_benchmark --without``: each lever's own code path stops running.
    With the lever off, the passes its code ran in with every lever on are run again (the others
    never call it)."""
    assert set(LEVER_MARKERS) == set(LEVERS)
    intra_op_threads(2)  # where concurrent_paths runs (the grouped paths' in-place sum: its own test)
    monkeypatch.setattr(narrowing_module, "SWAP_NARROWING_WEIGHT_GRAD", True)
    monkeypatch.setattr(small_map_module, "SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT", (0, 0))  # tiny's 4^3 maps too
    monkeypatch.setattr(training_buffers_module, "MIN_BYTES", 0)  # every conv unit of tiny's training
    net = _tiny(LoGoNet, (32, 64, 32), deep_supervision=True)
    x = torch.randn(2, 1, 32, 64, 32, generator=torch.Generator().manual_seed(0))
    if "on" not in _MARKERS_ALL_ON:  # the same for every lever: counted once per test session
        _MARKERS_ALL_ON["on"] = _marker_calls(net, x, monkeypatch, ())
    on_by_pass = _MARKERS_ALL_ON["on"]
    # every lever runs somewhere in LoGoNet-tiny
    assert all(any(calls[name] for calls in on_by_pass.values()) for name in LEVER_MARKERS), on_by_pass
    passes = [p for p in MARKER_PASSES if on_by_pass[p][lever]]
    off = sum(calls[lever] for calls in _marker_calls(net, x, monkeypatch, (lever,), passes).values())
    on = sum(on_by_pass[p][lever] for p in passes)
    change = LEVER_MARKERS[lever][2]
    assert {"none": off == 0, "fewer": 0 < off < on}[change], (lever, passes, on, off)


@pytest.mark.parametrize("bias", [True, False])
def test_classifier_writes_channels_first_logits_equal_to_the_convolution(bias):
    torch.manual_seed(0)
    layer = Classifier3d(16, 5, kernel_size=1, bias=bias).to(memory_format=CL)
    reference = copy.deepcopy(layer)
    x = torch.randn(2, 16, 6, 7, 8).contiguous(memory_format=CL).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    features = x * 1.0  # not a leaf: the gradient reaching it is the one the layers before would get
    reaching = []
    features.register_hook(reaching.append)
    y, y_ref = layer(features), F.conv3d(x_ref, reference.weight, reference.bias)
    assert y.is_contiguous() and _rel(y, y_ref) < 1e-5
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    assert _rel(x.grad, x_ref.grad) < 1e-5
    assert reaching[0].is_contiguous(memory_format=CL), reaching[0].stride()  # no layout change upstream
    assert _rel(layer.weight.grad, reference.weight.grad) < 1e-5
    if bias:
        assert _rel(layer.bias.grad, reference.bias.grad) < 1e-5
    with reference_kernels("channels_first_logits"):
        assert layer(x).is_contiguous(memory_format=CL)


@pytest.mark.parametrize("cls", [LoGoNet, ULKANet])
def test_logits_come_out_channels_first_for_nnunet(cls):
    """nnU-Net's loss and sliding window read channels-first logits 2-3x faster (docs/speed.md)."""
    net = _tiny(cls, (32, 32, 32), deep_supervision=True).to(memory_format=CL)
    x = torch.randn(2, 1, 32, 32, 32).contiguous(memory_format=CL)
    with torch.no_grad():
        outs = net.eval()(x)
    assert all(o.is_contiguous() for o in outs)


def test_folded_weights_follow_load_state_dict_as_nnunet_predict_switches_folds():
    """nnUNetPredictor loads each fold's weights into one network: cached folds must not go stale."""
    unit = ConvUnit(2, 3).eval()
    x = torch.randn(1, 2, 5, 5, 5)
    other = copy.deepcopy(unit)
    _randomise_batchnorm(other, seed=1)
    with torch.inference_mode():
        first = unit(x)
        unit.load_state_dict(other.state_dict())
        second = unit(x)
        with reference_kernels():
            expected = unit(x)
    assert _rel(second, expected) < 1e-5
    assert _rel(first, second) > 1e-2


def test_eval_mode_gradients_reach_the_unfolded_parameters():
    unit = ConvUnit(2, 3).eval()
    _randomise_batchnorm(unit)
    x = torch.randn(1, 2, 5, 5, 5)
    with torch.no_grad():
        unit(x)  # fills the inference cache, which a grad-enabled call must not use
    grads = torch.autograd.grad(unit(x).square().sum(), [unit.conv.weight, unit.norm.weight])
    with reference_kernels():
        ref = torch.autograd.grad(unit(x).square().sum(), [unit.conv.weight, unit.norm.weight])
    for g, r in zip(grads, ref):
        assert _rel(g, r) < 1e-4


def test_feature_map_count_for_the_planner_sees_every_module():
    """nnU-Net's planner sizes patches from this count: folding and grouping must not hide modules."""
    from nnunet_logonet.network.memory import COUNTED_MODULES

    net = _tiny(LoGoNet, (32, 32, 32)).eval()
    total = 0

    def count(_module, inputs, output):
        nonlocal total
        if output is not inputs[0]:
            total += output.numel()

    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, COUNTED_MODULES)]
    with torch.no_grad(), reference_kernels():
        net(torch.randn(1, 1, 32, 32, 32))
    for h in handles:
        h.remove()
    assert net.compute_conv_feature_map_size((32, 32, 32)) == total


@pytest.mark.parametrize("cls", [LoGoNet, ULKANet])
def test_inference_mode_as_nnunet_predict_runs_it_with_fold_switching(cls):
    """nnUNetPredictor predicts under torch.inference_mode and loads fold after fold."""
    net = _tiny(cls, (32, 32, 32)).eval()
    other = copy.deepcopy(net)
    _randomise_batchnorm(other, seed=3)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        first = net(x)
        again = net(x)
        net.load_state_dict(other.state_dict())
        second = net(x)
    with torch.no_grad(), reference_kernels():
        expected = net(x)
    assert torch.equal(first, again)
    assert _rel(second, expected) < 1e-4
    assert _rel(first, second) > 1e-2
