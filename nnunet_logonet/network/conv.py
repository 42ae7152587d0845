"""3D convolution for LoGoNet's hot path: ``conv3d`` sends each call to the fastest exact route.

Why the routes exist (profiled with ``torch.profiler``; docs/speed.md has the figures and the
lever names of ``levers.LEVERS``):

* PyTorch sends a dense 3D convolution at batch 1 to its slow reference kernel
  (``slow_conv3d``) whenever batch x channels x depth x height <= 20480, i.e. for every local
  sub-crop and every deep layer during sliding-window inference: 10x slower than oneDNN for the
  same call, and it returns channels-first output, flipping the layout of everything after it.
  ``conv3d`` calls oneDNN directly for CPU float32 tensors.
* Where oneDNN itself is slow for LoGoNet's shapes, an exact rewrite in ``kernels`` takes over:
  depthwise and dilated depthwise convolutions (``kernels.depthwise``), 1x1x1 convolutions as
  matrix products (``kernels.pointwise``), the backward on maps of at most 64 voxels
  (``kernels.small_map``), the weight gradient of narrowing convolutions on AVX2
  (``kernels.narrowing``).
* Without autograd (inference) the GELU or LeakyReLU after a convolution runs inside oneDNN's
  convolution as a post-op (``Activation``), and the parts of a concatenation are summed by a
  post-op as well (``conv3d_concat``, which never builds the concatenation): PyTorch's own GELU
  alone took 3 % of LoGoNet-S's forward.

BatchNorm folding lives in ``folding``, the channels-first classifier in ``classifier``. Every
route gives the reference result up to float32 rounding (tests/test_fast_paths.py checks outputs
and gradients against ``F.conv3d``). ``reference_kernels()`` switches all of them off, e.g. to
compare or to debug; ``reference_kernels(name, ...)`` only the named ones.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .buffers import active_pool
from .kernels.depthwise import SameDepthwiseConv3d, same_depthwise_forward
from .kernels.geometry import is_same_depthwise, triple
from .kernels.narrowing import NarrowingConv3d, swapped_weight_grad_pays
from .kernels.pointwise import PointwiseConv3d, pointwise_forward, pointwise_forward_route, pointwise_gemm_pays
from .kernels.small_map import SmallMapConv3d, small_map_gemm_pays
# the lever switches, importable from here as before they had a module of their own
from .levers import LEVERS, fast_paths_enabled, lever_enabled, reference_kernels

__all__ = [
    "Activation",
    "Conv3d",
    "conv3d",
    "conv3d_add",
    "conv3d_concat",
    "cat_per_group",
    "summed_part_convolutions",
    "LEVERS",
    "fast_paths_enabled",
    "lever_enabled",
    "reference_kernels",
]


class Activation:
    """An activation that may follow a convolution: exact GELU or LeakyReLU.

    ``conv3d(..., activation=...)`` applies it; without autograd on the oneDNN path it runs as a
    post-op of the convolution (same oneDNN eltwise kernels, no extra pass over the output).
    """

    def __init__(self, name: str, negative_slope: float = 0.01) -> None:
        if name not in ("gelu", "leaky_relu"):
            raise ValueError(f"activation must be 'gelu' or 'leaky_relu', got {name!r}")
        self.name = name
        self.negative_slope = float(negative_slope)

    @classmethod
    def of(cls, module: nn.Module) -> Activation | None:
        """The activation a module computes (``nn.GELU()`` exact, ``nn.LeakyReLU``), else ``None``."""
        if isinstance(module, nn.GELU) and module.approximate == "none":
            return cls("gelu")
        if isinstance(module, nn.LeakyReLU):
            return cls("leaky_relu", module.negative_slope)
        return None

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """Applied to a fresh convolution output (LeakyReLU in place, as nnU-Net's conv units do)."""
        if self.name == "gelu":
            return F.gelu(y)
        return F.leaky_relu(y, self.negative_slope, inplace=True)

    def onednn(self) -> tuple[str, list[float], str]:
        """(attr, scalars, algorithm) for ``torch.ops.mkldnn._convolution_pointwise``."""
        if self.name == "gelu":
            return "gelu", [], "none"
        return "leaky_relu", [self.negative_slope], ""

    def __repr__(self) -> str:
        return f"Activation({self.name!r})" if self.name == "gelu" else f"Activation({self.name!r}, {self.negative_slope})"


def _pointwise_ops() -> tuple[Callable | None, Callable | None]:
    """oneDNN's fused convolution ops (the ones inductor emits on CPU); None where the build lacks them."""
    try:
        return torch.ops.mkldnn._convolution_pointwise.default, torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without oneDNN
        return None, None


_CONV_POINTWISE, _CONV_ADD_INPLACE = _pointwise_ops()


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()  # first: dynamo cannot trace mkldnn.is_available()
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and lever_enabled("onednn")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def _bf16_on_map_smaller_than_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A CPU bfloat16 convolution whose kernel is larger than the map on some axis.

    PyTorch 2.14's CPU bfloat16 3D weight gradient is wrong there, depthwise (5^3 kernel on a 4^3
    map, 3^3 on 2^3) and dense alike (3^3 on [2, 4, 2^3] or [2, 32, 2 x 4 x 4], either layout:
    NaN, 1e30 or values off by more than 5 % in 30-40 of 40 draws; none on 3^3 maps or larger;
    ad-hoc script, 2026-11-28), from uninitialised memory; float32 and float16 are right. The
    deepest LKA blocks and decoder units of small patches meet exactly this under CPU autocast
    (CI saw NaN gradients there twice, first in depthwise, then in a dense 4 -> 4 decoder unit on
    2^3), so :func:`conv3d` runs such calls in float32 (tiny maps: the cost is nothing). Shown by
    tests/test_fast_paths.py::test_cpu_bfloat16_conv_on_maps_smaller_than_the_kernel.
    """
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return bf16 and x.device.type == "cpu" and any(k > size for k, size in zip(weight.shape[2:], x.shape[2:]))


def _conv_into_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple,
                    padding: tuple, dilation: tuple, groups: int) -> torch.Tensor | None:
    """The convolution written into a reused buffer of the running network (``buffers``), else None.

    oneDNN adds the convolution into a given tensor (its sum post-op); into a zeroed buffer that is
    the convolution itself, float for float, without the page faults of fresh memory.
    """
    if _CONV_ADD_INPLACE is None:
        return None
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    shape = (x.shape[0], weight.shape[0], *spatial)
    pool = active_pool(x, shape)
    if pool is None:
        return None
    out = pool.take(shape).zero_()
    _CONV_ADD_INPLACE(out, x, weight, bias, padding, stride, dilation, groups, "add", None, None, [], None)
    return out


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    activation: Activation | None = None,
) -> torch.Tensor:
    """``F.conv3d`` with integer padding, sent to oneDNN for CPU float32 (else to ``F.conv3d``),
    followed by ``activation`` if given (fused into the convolution where nothing needs gradients)."""
    if not _use_onednn(x, weight):
        if _bf16_on_map_smaller_than_kernel(x, weight):
            with torch.autocast("cpu", enabled=False):
                y = conv3d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding,
                           dilation, groups).to(torch.bfloat16)
        else:
            y = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
        return y if activation is None else activation(y)
    stride, padding, dilation = triple(stride), triple(padding), triple(dilation)
    needs_grad = _needs_grad(x, weight, bias)
    same_depthwise = is_same_depthwise(x, weight, stride, padding, dilation, groups)
    dilated_depthwise = same_depthwise and any(d != 1 for d in dilation)  # runs on phases, no post-op there
    pointwise = pointwise_gemm_pays(x, weight, stride, padding, groups)
    if pointwise and needs_grad:
        y = PointwiseConv3d.apply(x, weight, bias)
        return y if activation is None else activation(y)
    if (activation is not None and not needs_grad and _CONV_POINTWISE is not None and lever_enabled("post_ops")
            and not (dilated_depthwise and lever_enabled("dilated_phases"))):
        # LeakyReLU may run as its own pass over a reused buffer (oneDNN fuses none after its sum post-op);
        # GELU stays fused: its separate pass would cost more than the page faults it saves
        if activation.name == "leaky_relu" and not same_depthwise:
            y = _conv_into_pool(x, weight, bias, stride, padding, dilation, groups)
            if y is not None:
                return activation(y)
        return _CONV_POINTWISE(x, weight, bias, padding, stride, dilation, groups, *activation.onednn())
    if pointwise and pointwise_forward_route(x) == "gemm":
        y = pointwise_forward(x, weight, bias)
        return y if activation is None else activation(y)
    if same_depthwise and needs_grad:
        y = SameDepthwiseConv3d.apply(x, weight, bias, padding, dilation)
    elif same_depthwise:
        y = same_depthwise_forward(x, weight, bias, padding, dilation, lever_enabled("dilated_phases"))
    elif needs_grad and small_map_gemm_pays(x, weight, stride, padding, dilation, groups):
        y = SmallMapConv3d.apply(x, weight, bias, padding)
    elif needs_grad and swapped_weight_grad_pays(x, weight, stride, padding, dilation, groups):
        y = NarrowingConv3d.apply(x, weight, bias, padding, dilation)
    else:
        y = None if needs_grad else _conv_into_pool(x, weight, bias, stride, padding, dilation, groups)
        if y is None:
            y = torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return y if activation is None else activation(y)


def conv3d_add(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``out + conv3d(x, weight, ...)``: a residual sum after a convolution.

    Without autograd the sum is written into ``out``, which must be the caller's own tensor (an
    LKA block's residual stream): on the oneDNN path by the convolution's sum post-op, so the
    convolution's output never exists apart, elsewhere by one in-place addition.
    """
    if torch.is_grad_enabled() and (out.requires_grad or _needs_grad(x, weight, bias)):
        return out + conv3d(x, weight, bias, stride, padding, dilation, groups)
    stride, padding, dilation = triple(stride), triple(padding), triple(dilation)
    if (_CONV_ADD_INPLACE is not None and _use_onednn(x, weight) and lever_enabled("post_ops")
            and out.dtype == torch.float32 and not is_same_depthwise(x, weight, stride, padding, dilation, groups)
            and not (pointwise_gemm_pays(x, weight, stride, padding, groups) and pointwise_forward_route(x) == "gemm")
            and x.is_contiguous(memory_format=torch.channels_last_3d)
            and out.is_contiguous(memory_format=torch.channels_last_3d)):
        return _CONV_ADD_INPLACE(out, x, weight, bias, padding, stride, dilation, groups, "add", None, None, [], None)
    return out.add_(conv3d(x, weight, bias, stride, padding, dilation, groups))


def cat_per_group(parts: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
    """Channel concatenation of ``parts``, group by group: group g of the result is
    [group g of parts[0], group g of parts[1], ...] (plain ``torch.cat`` for one group)."""
    if groups == 1:
        return torch.cat(list(parts), dim=1)
    b, _, d, h, w = parts[0].shape
    t = torch.cat([p.permute(0, 2, 3, 4, 1).reshape(b, d, h, w, groups, p.shape[1] // groups) for p in parts],
                  dim=-1)
    return t.reshape(b, d, h, w, -1).permute(0, 4, 1, 2, 3)


def conv3d_concat(
    parts: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    activation: Activation | None = None,
) -> torch.Tensor:
    """``conv3d(cat_per_group(parts, groups), weight, ..., activation)`` without building the concatenation.

    A convolution is linear in its input channels, so on the concatenation it is the sum of one
    convolution per part with that part's slice of the weight. On CPU (oneDNN path) that skips
    writing and reading the concatenated tensor: at full resolution the decoder's skip
    concatenation (stem + upsampled features) was a copy of ~200 MB per training step that cost
    more than a third of the convolution after it. The weight slices are copies too (each part's
    convolution needs its slice contiguous, and its gradient is scattered back), so where the
    parts hold fewer elements than the weight (the deep decoder blocks on small maps: [256, 512,
    3^3] on 4^3) the concatenation is built instead, as it is elsewhere (CUDA, reference kernels).
    Without autograd each later part's convolution adds into the running sum inside oneDNN (a sum
    post-op) instead of a separate addition; ``activation`` then runs on its own (oneDNN takes no
    LeakyReLU or GELU after that post-op).
    """
    parts = list(parts)
    if len(parts) == 1:
        return conv3d(parts[0], weight, bias, stride, padding, dilation, groups, activation)
    per_group = [part.shape[1] // groups for part in parts]
    if sum(per_group) != weight.shape[1]:
        raise ValueError(f"parts have {sum(per_group)} channels per group ({per_group}), the weight expects "
                         f"{weight.shape[1]}")
    if (not _use_onednn(parts[0], weight) or not lever_enabled("concat_sum")
            or sum(p.numel() for p in parts) <= weight.numel()):
        return conv3d(cat_per_group(parts, groups), weight, bias, stride, padding, dilation, groups, activation)
    accumulate = (_CONV_ADD_INPLACE is not None and lever_enabled("post_ops")
                  and not any(_needs_grad(p, weight, bias) for p in parts))
    out = summed_part_convolutions(parts, per_group, weight, bias, triple(stride), triple(padding), triple(dilation),
                                   groups, accumulate)
    return out if activation is None else activation(out)


def summed_part_convolutions(parts: Sequence[torch.Tensor], per_group: Sequence[int], weight: torch.Tensor,
                             bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int], groups: int, accumulate: bool) -> torch.Tensor:
    """The sum of one convolution per part (``per_group`` input channels per group each) with its slice of
    ``weight`` (:func:`conv3d_concat`, lever ``concat_sum``); with ``accumulate`` each later part added
    inside oneDNN (sum post-op, no autograd)."""
    out = None
    start = 0
    for part, width in zip(parts, per_group):
        w = weight[:, start:start + width]
        if out is None:
            out = conv3d(part, w, bias, stride, padding, dilation, groups)
        elif accumulate:
            out = _CONV_ADD_INPLACE(out, part, w, None, padding, stride, dilation, groups, "add", None, None, [], None)
        else:
            out = out + conv3d(part, w, None, stride, padding, dilation, groups)
        start += width
    return out


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict keys) that runs through :func:`conv3d`."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
