"""The decoder's trilinear x2 upsampling + 3^3 convolution, against mixing the channels on the coarse map first.

A convolution mixes channels voxel by voxel and the upsampling interpolates each channel alone, so they
commute tap by tap: ``conv(up(c), W) = sum_k S_k(up(W_k c))``, with ``W_k`` the 27 taps' C_out x C_in
matrices and ``S_k`` the shift of tap k (zero outside the map). ``coarse_first_conv`` computes the right
side: one 1x1x1 convolution C_in -> 27 C_out on the coarse map (1/8 of the multiply-accumulates), then,
axis by axis, the upsampling of the three taps of that axis and their shifted sum. Exact, borders included
(``align_corners=False`` clamps every channel alike). It is the one rewrite of LoGoNet's decoder
convolutions with fewer multiply-accumulates (the upsampled parts are 4.9 of LoGoNet-S's 35.3 G at
32x64x64), and this command measures whether it pays on the machine it runs on (docs/speed.md, "Where issue
7 stands": on a Zen 4 without AVX-512 it does not, the passes over the 27-fold wider coarse output cost more
than the products they save):

    python -m nnunet_logonet.benchmark.upsample_conv                          # LoGoNet-S's shapes, ~1 min
    python -m nnunet_logonet.benchmark.upsample_conv --shape 1 32 16 16 32 32 # batch C_in C_out coarse D H W
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch
import torch.nn.functional as F

from nnunet_logonet.benchmark.depthwise_grad import time_ms
from nnunet_logonet.benchmark.pointwise_gemm import checked_shapes, layer_shape_parser
from nnunet_logonet.machine import cpu_line
from nnunet_logonet.network.conv import conv3d

__all__ = ["DEFAULT_SHAPES", "upsample_conv", "coarse_first_conv", "main"]

#: (batch, C_in, C_out, coarse D, H, W): the upsampled part of the decoder convolutions of LoGoNet-S in
#: inference (batch 1) at the 32x64x64 patch -- the global path's full-resolution ``final`` unit, its
#: blocks at 1/2 and 1/4, a deep block -- and the full-resolution ``final`` unit at 64^3
DEFAULT_SHAPES = [(1, 32, 16, 16, 32, 32), (1, 32, 32, 8, 16, 16), (1, 64, 32, 4, 8, 8), (1, 192, 64, 2, 4, 4),
                  (1, 32, 16, 32, 32, 32)]

CL = torch.channels_last_3d


def upsample_conv(coarse: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the decoder computes: trilinear x2 upsampling, then the 3^3 'same' convolution (``conv.conv3d``,
    oneDNN for CPU float32, as in the network)."""
    fine = F.interpolate(coarse, scale_factor=2, mode="trilinear", align_corners=False)
    return conv3d(fine, weight, padding=1)


def _upsample_and_sum_taps(y: torch.Tensor, axis: int) -> torch.Tensor:
    """``sum_k S_k(up(y_k))`` along one axis; y's channels are 3 blocks, the axis's taps -1, 0, +1 in order."""
    width = y.shape[1] // 3
    scale = [1.0, 1.0, 1.0]
    scale[axis - 2] = 2.0
    z = F.interpolate(y, scale_factor=scale, mode="trilinear", align_corners=False)
    size = z.shape[axis]
    out = z[:, width:2 * width].clone(memory_format=CL)  # tap 0
    out.narrow(axis, 1, size - 1).add_(z[:, :width].narrow(axis, 0, size - 1))  # tap -1 reads the voxel before
    out.narrow(axis, 0, size - 1).add_(z[:, 2 * width:].narrow(axis, 1, size - 1))  # tap +1 the voxel after
    return out


def coarse_first_conv(coarse: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``upsample_conv(coarse, weight)``, computed as ``sum_k S_k(up(W_k coarse))`` (module docstring).

    ``weight``: (C_out, C_in, 3, 3, 3); ``coarse``: (N, C_in, D, H, W), upsampled by 2 on every axis.
    """
    if tuple(weight.shape[2:]) != (3, 3, 3) or weight.shape[1] != coarse.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (C_out, {coarse.shape[1]}, 3, 3, 3) for input "
                         f"{tuple(coarse.shape)}")
    c_out, c_in = weight.shape[:2]
    # output channel ((kd * 3 + kh) * 3 + kw) * C_out + o: tap kd slowest, so the depth pass sees 3 blocks
    taps = weight.permute(2, 3, 4, 0, 1).reshape(27 * c_out, c_in, 1, 1, 1)
    y = conv3d(coarse.contiguous(memory_format=CL), taps.contiguous(memory_format=CL))
    for axis in (2, 3, 4):  # depth (blocks of 9 C_out), height (3 C_out), width (C_out)
        y = _upsample_and_sum_taps(y, axis)
    return y


def build_parser() -> argparse.ArgumentParser:
    return layer_shape_parser("python -m nnunet_logonet.benchmark.upsample_conv", __doc__.split("\n\n")[0], 5,
                              metavar=("N", "C_IN", "C_OUT", "D", "H", "W"),
                              shape_help="batch, input and output channels, coarse map size")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shapes = checked_shapes(args, DEFAULT_SHAPES)
    if shapes is None:
        return 2
    print(f"{cpu_line()}; forward without autograd, ms per call, median of {args.repeats}; "
          "GMACs: multiply-accumulates of the products; error: max relative to a float64 upsample_conv")
    print(f"{'shape (coarse map)':34s} {'upsample+conv':>14s} {'GMACs':>8s} {'coarse first':>13s} {'GMACs':>8s} "
          f"{'ratio':>6s}  {'error':>7s} {'error':>7s}")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, c_in, c_out, d, h, w in shapes:
            coarse = torch.randn(n, c_in, d, h, w).contiguous(memory_format=CL)
            weight = torch.randn(c_out, c_in, 3, 3, 3).contiguous(memory_format=CL)
            exact = upsample_conv(coarse.double(), weight.double())
            scale = float(exact.abs().max())
            errors = [float((route(coarse, weight).double() - exact).abs().max()) / scale
                      for route in (upsample_conv, coarse_first_conv)]
            times = [time_ms(lambda route=route: route(coarse, weight), args.repeats)
                     for route in (upsample_conv, coarse_first_conv)]
            macs = n * d * h * w * 27 * c_in * c_out / 1e9
            label = f"[{n}, {c_in} -> {c_out}, {d}x{h}x{w} -> x2]"
            print(f"{label:34s} {times[0]:14.2f} {8 * macs:8.4g} {times[1]:13.2f} {macs:8.4g} "
                  f"{times[1] / times[0]:5.2f}x  {errors[0]:7.1e} {errors[1]:7.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
