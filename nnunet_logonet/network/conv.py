"""3D convolution kernels for LoGoNet's hot path: oneDNN on CPU, faster depthwise backward, BN folding.

Why these exist (profiled with ``torch.profiler`` on the 2-core Xeon this project is built on;
docs/speed.md has the figures):

* PyTorch sends a dense 3D convolution at batch 1 to its slow reference kernel
  (``slow_conv3d``) whenever batch x channels x depth x height <= 20480, i.e. for every local
  sub-crop and every deep layer during sliding-window inference: 10x slower than oneDNN for the
  same call, and it returns channels-first output, flipping the layout of everything after it.
  ``conv3d`` calls oneDNN directly for CPU float32 tensors.
* oneDNN's 3D depthwise backward is 10-50x slower than its forward. The input gradient of a
  stride-1 'same' depthwise convolution is the forward convolution of the output gradient with
  the flipped kernel, so ``conv3d`` computes it that way. The weight gradient is read off the
  weight gradient of a grouped convolution with 16 channels per group (2-4x faster), 512
  channels per call (on the wide, small volumes of the grouped local paths one call over all
  channels is 2-5x slower than the chunks).
* oneDNN's dilated 3D depthwise kernel is 10-30x slower than its undilated one; LKA's 7^3
  dilation-3 convolution runs undilated on the d^3 phases of its input instead (exact), and so does
  its weight gradient where the phases are wide enough. Which weight-gradient route wins depends on
  the CPU; ``python -m nnunet_logonet.benchmark.depthwise_grad`` times them all on this one.
* On AVX2 CPUs oneDNN's weight gradient of a narrowing convolution (fewer output than input
  channels, e.g. the 64 -> 16 final units at full resolution) runs at 20-25 GMAC/s, a third of its
  forward. It equals the flipped, transposed weight gradient of the widening convolution that
  maps the output gradient back to the input's channels (the same products), which oneDNN
  computes 2-3.5x faster there; ``conv3d`` takes that route for training on AVX2.
* In eval mode a BatchNorm after a convolution is an affine map that ``fold_batchnorm`` moves
  into the convolution's weight and bias (one pass over the activation less).
* Without autograd (inference) the GELU or LeakyReLU after a convolution runs inside oneDNN's
  convolution as a post-op (``Activation``), and the parts of a concatenation are summed by a
  post-op as well: PyTorch's own GELU alone took 3 % of LoGoNet-S's forward.
* nnU-Net's loss and sliding window read the logits channels-first, 2-3x slower from channels-last
  ones; the 1x1x1 classifiers (``Classifier3d``) write them channels-first at no extra cost.

Every path gives the reference result up to float32 rounding (tests/test_fast_paths.py checks
outputs and gradients against ``F.conv3d`` + unfused BatchNorm). ``reference_kernels()``
switches all of them off, e.g. to compare or to debug; ``reference_kernels(name, ...)`` only the
named ones (``LEVERS``), for the before/after of one lever.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module_globals

__all__ = [
    "Activation",
    "Classifier3d",
    "Conv3d",
    "conv3d",
    "conv3d_concat",
    "cat_per_group",
    "LEVERS",
    "fast_paths_enabled",
    "lever_enabled",
    "reference_kernels",
    "conv_norm",
    "conv_norm_act",
    "conv_act",
    "fold_batchnorm",
    "foldable_batchnorm",
    "derived_tensors",
    "depthwise_weight_grad_route",
]

_state = threading.local()
T = TypeVar("T")


#: The fast paths by name (docs/speed.md's lever table), each of which ``reference_kernels(name)``
#: switches off on its own. "onednn" is the base of the convolution levers: without it every
#: convolution is ``F.conv3d``, so the depthwise, dilated, narrowing and post-op levers are off too.
LEVERS: dict[str, str] = {
    "onednn": "every CPU float32 convolution sent to oneDNN directly (no slow_conv3d, layout kept)",
    "depthwise_input_grad": "depthwise input gradient as the forward convolution with the flipped kernel",
    "depthwise_weight_grad": "depthwise weight gradient from 16-channel grouped blocks, 512 channels per call",
    "depthwise_weight_slices": "undilated depthwise weight gradients (a part of depthwise_weight_grad) from "
                               "oneDNN's 2D depthwise kernel over depth slices",
    "dilated_phases": "dilated depthwise convolutions run undilated on the d^3 phases of their input",
    "narrowing_weight_grad": "a narrowing convolution's weight gradient as the widening one's (AVX2 CPUs)",
    "pointwise_gemm": "1x1x1 convolutions as matrix products over channels-last rows: the backward always, "
                      "the forward on small maps",
    "small_map_gemm": "the backward of dense convolutions on maps of at most 64 voxels as matrix products "
                      "over im2col rows",
    "concat_sum": "convolutions over channel concatenations as sums of one convolution per part",
    "post_ops": "activations and concatenation sums inside oneDNN's convolution (inference)",
    "batchnorm_folding": "BatchNorm folded into the preceding convolution in eval mode",
    "grouped_local_paths": "the 8 local ULKANets run as one grouped network where that is faster",
    "stitch_in_place": "the grouped local features added into the global ones in place in inference, no stitched copy",
    "channels_first_logits": "the 1x1x1 classifiers write channels-first logits, the layout nnU-Net's loss and "
                             "sliding window read fastest",
}


def fast_paths_enabled() -> bool:
    """Whether LoGoNet's fast kernels are on (they are, unless inside ``reference_kernels()``)."""
    return getattr(_state, "enabled", True)


def lever_enabled(name: str) -> bool:
    """Whether fast path ``name`` (a key of ``LEVERS``) is on in this thread."""
    return fast_paths_enabled() and name not in getattr(_state, "disabled", frozenset())


@contextlib.contextmanager
def reference_kernels(*levers: str) -> Iterator[None]:
    """Run LoGoNet/ULKANet with plain PyTorch ops inside this block (thread-local), for comparison.

    With lever names (keys of ``LEVERS``) only those fast paths are switched off, the others stay on.
    """
    unknown = [name for name in levers if name not in LEVERS]
    if unknown:
        raise ValueError(f"unknown lever(s) {', '.join(map(repr, unknown))}; valid levers: {', '.join(LEVERS)}")
    previous = fast_paths_enabled(), getattr(_state, "disabled", frozenset())
    if levers:
        _state.disabled = previous[1] | frozenset(levers)
    else:
        _state.enabled = False
    try:
        yield
    finally:
        _state.enabled, _state.disabled = previous


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)  # type: ignore[return-value]


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
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and lever_enabled("onednn")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
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


def _is_same_padding(weight: torch.Tensor, stride, padding, dilation) -> bool:
    """Stride 1, odd kernel, 'same' padding: output voxel v sees input voxels v + t, t the tap offset."""
    return all(s == 1 for s in stride) and all(
        k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in zip(weight.shape[2:], padding, dilation))


def _is_same_depthwise(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Depthwise (multiplier 1), stride 1, odd kernel, 'same' padding: the flipped-kernel backward holds."""
    return (
        groups == x.shape[1] == weight.shape[0]
        and weight.shape[1] == 1
        and _is_same_padding(weight, stride, padding, dilation)
    )


#: channels per oneDNN call for a depthwise weight gradient (see ``_depthwise_weight_grad``)
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


def _depth_slices_pay(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      dilation: Sequence[int]) -> bool:
    """Undilated 'same' depthwise convolutions of at least DEPTHWISE_SLICES_MIN_ELEMENTS per sample:
    3^3 always, wider kernels on planes of 8 x 8 or more where DEPTHWISE_SLICES_WIDE_KERNELS. Dilated
    ones lose (7^3, dilation 3, [2, 64, 16^3]: 42 -> 136 ms) and go elsewhere."""
    if any(d != 1 for d in dilation) or grad_out.shape != x.shape or x[0].numel() < DEPTHWISE_SLICES_MIN_ELEMENTS:
        return False
    if max(weight.shape[3:]) <= 3:
        return True
    return DEPTHWISE_SLICES_WIDE_KERNELS and min(x.shape[3:]) >= DEPTHWISE_SLICES_MIN_PLANE


def _dilated_phases_pay(x: torch.Tensor, weight: torch.Tensor, dilation: Sequence[int]) -> bool:
    """A dilated depthwise weight gradient is computed on the input's phases (``_to_phases``) where
    each phase is at least ``k // 2 + 2`` voxels wide in every dimension, k the kernel size there.

    On the phases it is an undilated weight gradient (16-channel grouped blocks) over a batch of
    d^3 x N small volumes, against oneDNN's dilated 3D depthwise kernel on the original map. Xeon
    Cascade Lake, batch 2, dilation 3 (3D -> phases, ms): 7^3 on [64, 16^3] 82 -> 31, [64, 24^3]
    213 -> 60, [32, 32^3] 312 -> 130, [512, 16^3] 794 -> 337, [64, 13^3] (phases 5 wide) 56 -> 24;
    5^3 on [64, 12^3] (4 wide) 18 -> 6; 3^3 on [512, 8^3] (3 wide) 30 -> 10. Where the phases are
    narrower the padding dominates and it loses: 7^3 on [64, 12^3] (4 wide) 37 -> 150, 5^3 on
    [64, 8^3] (3 wide) 7.7 -> 38, 3^3 on [128, 6^3] (2 wide) 2.3 -> 6.9 (ad-hoc script). AMD EPYC:
    [64, 24^3] 83 -> 37, [64, 16^3] 22.5 -> 20.4, [128, 8^3] (5^3, 3 wide) 3.2 -> 20 ms.
    """
    if all(d == 1 for d in dilation):
        return False
    return all(-(-size // d) >= k // 2 + 2 for size, d, k in zip(x.shape[2:], dilation, weight.shape[2:]))


def _depthwise_weight_grad_by_slices(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                     padding: Sequence[int]) -> torch.Tensor:
    """An undilated 'same' depthwise weight gradient from oneDNN's 2D depthwise kernel.

    Depth tap ``a`` of the kernel pairs output slice z with input slice z + a - padding, so its
    (kh, kw) weight gradient is the 2D depthwise weight gradient over every such pair of slices,
    taken as a batch: the same products and sums, only grouped per depth tap. A channels-last
    sample ``[C, D, H, W]`` seen as ``[D, C, H, W]`` is a channels-last batch of slices (a view),
    so nothing is copied. oneDNN's 2D depthwise kernel is far faster than its 3D one (AMD EPYC,
    3^3, [2, 512, 8^3]: 15.7 ms 3D, 14.4 ms grouped blocks, 1.9 ms by slices; [2, 512, 16^3]: 83 ->
    20 ms; [2, 16, 32^3]: 36 -> 2.5 ms; ad-hoc script).
    """
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
    """The route ``_depthwise_weight_grad`` takes: "phases" (dilated, ``_dilated_phases_pay``), "slices"
    (undilated, ``_depth_slices_pay``), else "blocks" (undilated) or "3d" (oneDNN's dilated kernel).
    ``python -m nnunet_logonet.benchmark.depthwise_grad`` times each route beside this choice."""
    if phases and grad_out.shape == x.shape and _dilated_phases_pay(x, weight, dilation):
        return "phases"
    if slices and _depth_slices_pay(grad_out, x, weight, dilation):
        return "slices"
    return "blocks" if all(d == 1 for d in dilation) else "3d"


def _depthwise_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           padding: Sequence[int], dilation: Sequence[int], slices: bool = True,
                           phases: bool = True) -> torch.Tensor:
    """The weight gradient of a depthwise convolution from oneDNN's faster kernels.

    oneDNN's 3D depthwise weight gradient runs at 1-5 GMAC/s here. With ``phases`` (the lever
    "dilated_phases") a dilated one where that pays (``_dilated_phases_pay``) is the undilated
    weight gradient over the d^3 phases of its input and output gradient: a dilation-d convolution
    pairs only voxels of the same phase, d apart, so the products and sums are the same (the zero
    padding of the phases pairs with zero gradients). With ``slices`` (the lever
    "depthwise_weight_slices") undilated ones where that pays (``_depth_slices_pay``) come from its
    2D kernel over depth slices (``_depthwise_weight_grad_by_slices``); the others take two exact detours:

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
        return _depthwise_weight_grad(_to_phases(grad_out, dilation), _to_phases(x, dilation), weight, undilated,
                                      [1, 1, 1], slices=False)
    if route == "slices":
        return _depthwise_weight_grad_by_slices(grad_out, x, weight, padding)
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


#: compute narrowing convolutions' weight gradients as the widening one's (see ``_NarrowingConv3d``);
#: measured only on AVX2 (AMD EPYC, Zen 3), where oneDNN's own is 2-3.5x slower; off elsewhere
SWAP_NARROWING_WEIGHT_GRAD = torch.backends.cpu.get_cpu_capability() == "AVX2"


def _swapped_weight_grad_pays(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
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
            and _is_same_padding(weight, stride, padding, dilation))


class _NarrowingConv3d(torch.autograd.Function):
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


#: rows (batch x voxels) up to which a 1x1x1 convolution's forward runs as a matrix product; above, oneDNN's
#: convolution (its forward was 1.0-1.4x faster from 12^3 x 2 rows up; the backward is a product everywhere)
POINTWISE_GEMM_MAX_ROWS = 1024


def _pointwise_gemm_pays(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B*D*H*W, C): a view for a channels-last tensor."""
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B*D*H*W, C) -> (B, C, D, H, W) with ``like``'s batch and spatial size, channels-last (a view)."""
    b, _, d, h, w = like.shape
    return rows.view(b, d, h, w, rows.shape[1]).permute(0, 4, 1, 2, 3)


def pointwise_forward_route(x: torch.Tensor) -> str:
    """'gemm' or 'onednn': how the forward of a 1x1x1 convolution taking the ``pointwise_gemm`` path
    runs for input ``x`` (its backward is always the products)."""
    return "gemm" if x.shape[0] * x.shape[2:].numel() <= POINTWISE_GEMM_MAX_ROWS else "onednn"


def _pointwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if pointwise_forward_route(x) == "onednn":
        return torch.mkldnn_convolution(x, weight, bias, (0, 0, 0), (1, 1, 1), (1, 1, 1), 1)
    w = weight.reshape(weight.shape[0], weight.shape[1])
    rows = _rows(x)
    out = torch.mm(rows, w.t()) if bias is None else torch.addmm(bias, rows, w.t())
    return _from_rows(out, x)


class _PointwiseConv3d(torch.autograd.Function):
    """A 1x1x1 convolution whose gradients are matrix products (``_pointwise_gemm_pays``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return _pointwise_forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_rows = _rows(grad_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _from_rows(grad_rows @ weight.reshape(weight.shape[0], weight.shape[1]), x)
        if ctx.needs_input_grad[1]:
            fmt = torch.channels_last_3d if weight.is_contiguous(memory_format=torch.channels_last_3d) \
                else torch.contiguous_format
            grad_w = (grad_rows.t() @ _rows(x)).view(weight.shape).contiguous(memory_format=fmt)
        if ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b


#: voxels per sample up to which a dense 3D convolution's backward runs as matrix products
#: (``small_map_gemm``); on 8^3 maps oneDNN's backward was 2x faster, on 5^3-6^3 within 0-30 %
SMALL_MAP_GEMM_MAX_VOXELS = 64
#: smallest C_in x C_out for those products on maps of up to 27 voxels, and on larger ones (<= 64)
SMALL_MAP_GEMM_MIN_CHANNEL_PRODUCT = (1, 64 * 128)


def _small_map_gemm_pays(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
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
        and _is_same_padding(weight, stride, padding, dilation)
        and all(d == 1 for d in dilation)
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _im2col(x: torch.Tensor, kernel: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
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
    """For every (sample, voxel, tap) row of ``_im2col``'s output, in its order, the flat index of the
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


def _col2im(cols: torch.Tensor, like: torch.Tensor, kernel: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """The adjoint of ``_im2col``: each row's per-tap entries added back onto the voxels they came from
    (one ``index_add_``; those on the padding dropped), channels-last, shaped like ``like``."""
    n, c, d, h, w = like.shape
    p0, p1, p2 = padding
    index = _padded_voxel_index(n, (d, h, w), tuple(kernel), tuple(padding)).to(cols.device)
    padded = torch.zeros((n * (d + 2 * p0) * (h + 2 * p1) * (w + 2 * p2), c), dtype=cols.dtype, device=cols.device)
    padded.index_add_(0, index, cols.reshape(-1, c))
    inner = padded.view(n, d + 2 * p0, h + 2 * p1, w + 2 * p2, c)[:, p0:p0 + d, p1:p1 + h, p2:p2 + w]
    return inner.permute(0, 4, 1, 2, 3).contiguous(memory_format=torch.channels_last_3d)


class _SmallMapConv3d(torch.autograd.Function):
    """oneDNN's convolution forward; the backward as matrix products over the input's im2col rows
    (``_small_map_gemm_pays``): grad_W = G^T @ cols, grad_cols = G @ W, folded back by ``_col2im``.
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
    grad_rows = _rows(grad_out.contiguous(memory_format=torch.channels_last_3d))
    grad_x = grad_w = grad_b = None
    if needs[0]:
        # (C_out, kd, kh, kw, C_in): a view for a channels-last weight
        weight_rows = weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
        grad_x = _col2im(grad_rows @ weight_rows, x, kernel, padding)
    if needs[1]:
        grad_w = (grad_rows.t() @ _im2col(x, kernel, padding)).view(
            weight.shape[0], *kernel, weight.shape[1]).permute(0, 4, 1, 2, 3)
        if not weight.is_contiguous(memory_format=torch.channels_last_3d):
            grad_w = grad_w.contiguous()
    if needs[2]:
        grad_b = grad_rows.sum(0)
    return grad_x, grad_w, grad_b


def _to_phases(x: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
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


def _from_phases(y: torch.Tensor, dilation: Sequence[int], size: Sequence[int],
                 memory_format: torch.memory_format) -> torch.Tensor:
    """Inverse of ``_to_phases`` (cropped back to ``size``), in ``memory_format``."""
    nd, c, m0, m1, m2 = y.shape
    d0, d1, d2 = dilation
    n = nd // (d0 * d1 * d2)
    t = y.permute(0, 2, 3, 4, 1).reshape(n, d0, d1, d2, m0, m1, m2, c).permute(0, 4, 1, 5, 2, 6, 3, 7)
    t = t.reshape(n, m0 * d0, m1 * d1, m2 * d2, c)[:, : size[0], : size[1], : size[2]].permute(0, 4, 1, 2, 3)
    return t.contiguous(memory_format=memory_format)


def _same_depthwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
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
    phases = _to_phases(x, dilation).contiguous(memory_format=torch.channels_last_3d)
    radius = [p // d for p, d in zip(padding, dilation)]
    y = torch.mkldnn_convolution(phases, weight.contiguous(memory_format=torch.channels_last_3d), bias, radius,
                                 (1, 1, 1), (1, 1, 1), channels)
    return _from_phases(y, dilation, x.shape[2:], fmt)


class _SameDepthwiseConv3d(torch.autograd.Function):
    """Forward by ``_same_depthwise_forward``; input gradient as the same forward with the flipped
    kernel (exact); weight gradient oneDNN's on the original layout (see ``_depthwise_weight_grad``).
    Each of the three follows its lever (read at the forward), else oneDNN's own call."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        ctx.phases = lever_enabled("dilated_phases")
        ctx.flipped_input_grad = lever_enabled("depthwise_input_grad")
        ctx.blocked_weight_grad = lever_enabled("depthwise_weight_grad")
        ctx.weight_grad_slices = lever_enabled("depthwise_weight_slices")
        return _same_depthwise_forward(x, weight, bias, padding, dilation, ctx.phases)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        plain = [False, False, False]
        if ctx.needs_input_grad[0] and ctx.flipped_input_grad:
            flipped = weight.flip((2, 3, 4)).contiguous(memory_format=torch.channels_last_3d)
            grad_x = _same_depthwise_forward(grad_out, flipped, None, ctx.padding, ctx.dilation, ctx.phases)
        else:
            plain[0] = ctx.needs_input_grad[0]
        if ctx.needs_input_grad[1] and ctx.blocked_weight_grad:
            grad_w = _depthwise_weight_grad(grad_out, x, weight, ctx.padding, ctx.dilation, ctx.weight_grad_slices,
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
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
    needs_grad = _needs_grad(x, weight, bias)
    same_depthwise = _is_same_depthwise(x, weight, stride, padding, dilation, groups)
    dilated_depthwise = same_depthwise and any(d != 1 for d in dilation)  # runs on phases, no post-op there
    pointwise = _pointwise_gemm_pays(x, weight, stride, padding, groups)
    if pointwise and needs_grad:
        y = _PointwiseConv3d.apply(x, weight, bias)
        return y if activation is None else activation(y)
    if (activation is not None and not needs_grad and _CONV_POINTWISE is not None and lever_enabled("post_ops")
            and not (dilated_depthwise and lever_enabled("dilated_phases"))):
        return _CONV_POINTWISE(x, weight, bias, padding, stride, dilation, groups, *activation.onednn())
    if pointwise and pointwise_forward_route(x) == "gemm":
        y = _pointwise_forward(x, weight, bias)
        return y if activation is None else activation(y)
    if same_depthwise and needs_grad:
        y = _SameDepthwiseConv3d.apply(x, weight, bias, padding, dilation)
    elif same_depthwise:
        y = _same_depthwise_forward(x, weight, bias, padding, dilation, lever_enabled("dilated_phases"))
    elif needs_grad and _small_map_gemm_pays(x, weight, stride, padding, dilation, groups):
        y = _SmallMapConv3d.apply(x, weight, bias, padding)
    elif needs_grad and _swapped_weight_grad_pays(x, weight, stride, padding, dilation, groups):
        y = _NarrowingConv3d.apply(x, weight, bias, padding, dilation)
    else:
        y = torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return y if activation is None else activation(y)


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
    stride, padding, dilation = _triple(stride), _triple(padding), _triple(dilation)
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
    return out if activation is None else activation(out)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and state-dict keys) that runs through :func:`conv3d`."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


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
            grad_rows = torch.matmul(grad.transpose(1, 2), weight)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad, rows).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        return grad_rows, grad_weight, grad_bias


def foldable_batchnorm(module: nn.Module, norm: nn.Module) -> bool:
    """True in eval mode for a BatchNorm with running statistics and the "batchnorm_folding" lever on."""
    return (
        not module.training
        and isinstance(norm, nn.BatchNorm3d)
        and norm.track_running_stats
        and norm.running_mean is not None
        and lever_enabled("batchnorm_folding")
    )


def conv_norm(module: nn.Module, conv: nn.Conv3d, norm: nn.Module,
              x: torch.Tensor | Sequence[torch.Tensor], activation: Activation | None = None) -> torch.Tensor:
    """``activation(norm(conv(x)))``; one convolution with the BatchNorm folded in (and the activation
    fused, without autograd) when ``module`` is in eval mode.

    ``x`` may be a sequence of tensors: the parts of a channel concatenation, convolved without
    building it (:func:`conv3d_concat`).
    """
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    if foldable_batchnorm(module, norm):
        weight, bias = fold_batchnorm(conv, norm)
        return conv3d_concat(parts, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation)
    if len(parts) == 1 or not lever_enabled("concat_sum") or isinstance(conv.padding, str):
        y = norm(conv(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)))
    else:
        y = norm(conv3d_concat(parts, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
    return y if activation is None else activation(y)


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook watches any of ``modules`` (then they are called as modules: e.g. the
    SSL feature tap on ``head.act``)."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def conv_norm_act(module: nn.Module, conv: nn.Conv3d, norm: nn.Module, act: nn.Module,
                  x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``act(norm(conv(x)))``: in eval mode one oneDNN convolution with the BatchNorm folded in and
    the activation (GELU or LeakyReLU) as its post-op; otherwise the modules as they are."""
    activation = Activation.of(act) if foldable_batchnorm(module, norm) and not _hooked(act) else None
    if activation is None:
        return act(conv_norm(module, conv, norm, x))
    return conv_norm(module, conv, norm, x, activation)


def conv_act(conv: nn.Conv3d, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))``, with the activation fused into the convolution where nothing needs gradients
    (LKA's ``proj_1`` -> GELU and the MLP's depthwise conv -> GELU)."""
    activation = Activation.of(act)
    if (activation is None or not lever_enabled("post_ops") or not isinstance(conv, Conv3d)
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or _hooked(conv, act)):
        return act(conv(x))
    return conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation)


def fold_batchnorm(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv`` followed by ``norm`` (eval statistics) as one convolution.

    Cached for inference (see :func:`derived_tensors`).
    """
    sources = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    return derived_tensors(conv, "_folded_batchnorm", sources, lambda: _fold(conv, norm))


def version_key(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """Each tensor's storage, in-place version counter, device and dtype: a key that changes when any
    of them is replaced or edited in place. None where that cannot be followed: under torch.compile
    (the compiler should see plain ops) or for inference tensors (no version counter)."""
    if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)


def derived_tensors(owner: object, name: str, sources: Sequence[torch.Tensor | None], make: Callable[[], T]) -> T:
    """``make()``, cached on ``owner`` under ``name`` while no autograd is recording.

    The cache is keyed on every source tensor's storage and in-place version counter, so it is
    rebuilt after ``load_state_dict`` (nnUNetv2_predict switching folds), an optimizer step or
    ``.to(device)``. With autograd on (training) or under ``torch.compile`` it is not used, so
    gradients reach the original parameters and the compiler sees plain ops.
    """
    key = None if torch.is_grad_enabled() else version_key([t for t in sources if t is not None])
    if key is None:
        return make()
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, make())
        owner.__dict__[name] = cached
    return cached[1]


def _fold(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = norm.running_var.add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    if conv.weight.is_contiguous(memory_format=torch.channels_last_3d):
        weight = weight.contiguous(memory_format=torch.channels_last_3d)
    return weight, shift
