"""LoGoNet's dense 3^3 convolutions by Winograd's minimal filtering, F(m^3, 3^3), against oneDNN's direct kernel.

Winograd's algorithm computes an m^3 block of a 3^3 convolution's output from an (m + 2)^3 tile of its
input with (m + 2)^3 products per input/output channel pair instead of 27 m^3: every tile and every kernel
are taken into a transformed domain (``B^T d B`` and ``G g G^T`` along each axis), multiplied there
position by position (one matrix product over the channels for each of the (m + 2)^3 positions,
``torch.bmm``), and taken back (``A^T y A``). It is exact in exact arithmetic, the classic rewrite of a
convolution with fewer products: F(2^3, 3^3) 3.4x fewer, F(4^3, 3^3) 8x fewer. In float32, F(2^3, 3^3)
rounds like oneDNN's direct kernel and F(4^3, 3^3) about 20x worse (relative errors ~3e-7 and ~3e-5 per
convolution). The transforms are passes over a tile tensor (m + 2)^3 / m^3 times the input's size (8x for
m = 2), done here with PyTorch's matrix products along the tile axes, in slabs of depth that stay in cache.

This command runs a network's inference forward once, records every dense 3^3 stride-1 'same'
convolution it sends to oneDNN (after the concatenation sums and the BatchNorm folding, as they run), and
times each distinct call by oneDNN and by F(2^3, 3^3) and F(4^3, 3^3) with the kernels transformed
beforehand (as a cached inference lever would), so its totals say what such a lever could save in that
forward (docs/speed.md, "Winograd's minimal filtering": on a Zen 4 without AVX-512, 5-6 % of the
convolutions' time, at 20x the rounding):

    python -m nnunet_logonet.benchmark.winograd                            # LoGoNet-S at 32x64x64, ~30 s
    python -m nnunet_logonet.benchmark.winograd --patch-size 64 64 64 --model logonet_tiny
    python -m nnunet_logonet.benchmark.winograd --shape 1 256 128 8 16 16 1  # batch C_in C_out D H W groups
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_logonet.benchmark.depthwise_grad import time_ms
from nnunet_logonet.machine import cpu_line
from nnunet_logonet.network.conv import conv3d

__all__ = ["TRANSFORMS", "winograd_weight", "winograd_conv3d", "network_convolutions", "record_convolutions", "main"]

CL = torch.channels_last_3d


def _matrices(bt, g, at) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(m, dtype=torch.float64) for m in (bt, g, at))  # type: ignore[return-value]


#: (B^T, G, A^T) of F(m, 3) by output block size m: interpolation points 0, +-1 (m = 2) and 0, +-1, +-2
#: (m = 4), each with the point at infinity (Lavin & Gray, "Fast Algorithms for Convolutional Neural
#: Networks", 2016)
TRANSFORMS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {
    2: _matrices([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
                 [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
                 [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: _matrices([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
                 [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                 [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}

#: the tile tensor of one slab of depth is kept under this many elements (a few MB: in cache)
MAX_SLAB_ELEMENTS = 1 << 21


def winograd_weight(weight: torch.Tensor, m: int = 2, groups: int = 1) -> torch.Tensor:
    """The transformed kernel ``G g G^T`` (computed in float64): [(m + 2)^3 * groups, C_in/g, C_out/g]."""
    if m not in TRANSFORMS:
        raise ValueError(f"output block size m={m} has no transform; choose one of {sorted(TRANSFORMS)}")
    c_out, c_in = weight.shape[:2]
    if weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3) or c_out % groups:
        raise ValueError(f"weight {tuple(weight.shape)} must be (C_out, C_in/groups, 3, 3, 3) with C_out divisible "
                         f"by groups={groups}")
    g = TRANSFORMS[m][1]
    w = weight.detach().to(torch.float64).reshape(groups, c_out // groups, c_in, 3, 3, 3)
    u = torch.einsum("ri,sj,tk,xoqijk->rstxqo", g, g, g, w)
    return u.reshape((m + 2) ** 3 * groups, c_in, c_out // groups).to(weight.dtype).contiguous()


def _along(matrix: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``matrix`` applied along the leading dimension ``dim`` of ``x``: one matrix product, no transposition."""
    shape = x.shape
    before = 1
    for size in shape[:dim]:
        before *= size
    return torch.matmul(matrix, x.reshape(before, shape[dim], -1)).reshape(*shape[:dim], matrix.shape[0],
                                                                          *shape[dim + 1:])


def winograd_conv3d(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 1,
                    m: int = 2) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=1, groups=groups)`` by F(m^3, 3^3), with ``u = winograd_weight(weight,
    m, groups)``; returns a channels-last tensor."""
    a = m + 2
    if u.dim() != 3 or u.shape[0] != a ** 3 * groups or x.dim() != 5 or x.shape[1] != u.shape[1] * groups:
        per_group = x.shape[1] // groups if x.dim() == 5 else "?"
        raise ValueError(f"transformed kernel {tuple(u.shape)} does not fit input {tuple(x.shape)} with "
                         f"groups={groups}, m={m}: expected ({a ** 3 * groups}, {per_group}, C_out/g)")
    bt, _, at = (t.to(x.dtype) for t in TRANSFORMS[m])
    n, c_in, d, h, w = x.shape
    c_in //= groups
    c_out = u.shape[2] * groups
    tiles = [-(-size // m) for size in (d, h, w)]
    pad = []
    for size, t in zip((w, h, d), reversed(tiles)):
        pad += [1, m * t + 1 - size]
    padded = F.pad(x.permute(0, 2, 3, 4, 1), [0, 0, *pad])  # [n, D', H', W', C]
    out = torch.empty(n, tiles[0] * m, tiles[1] * m, tiles[2] * m, c_out, dtype=x.dtype)
    plane = n * tiles[1] * tiles[2]
    slab = max(1, min(tiles[0], MAX_SLAB_ELEMENTS // (a ** 3 * plane * c_in * groups)))
    for t0 in range(0, tiles[0], slab):
        nd = min(slab, tiles[0] - t0)
        view = padded[:, t0 * m:(t0 + nd) * m + 2].unfold(1, a, m).unfold(2, a, m).unfold(3, a, m)
        # [n, nd, th, tw, C, a, a, a] -> the tile tensor [a, a, a, groups, n, nd, th, tw, C/g]
        tile = view.reshape(n, nd, tiles[1], tiles[2], groups, c_in, a, a, a).permute(6, 7, 8, 4, 0, 1, 2, 3, 5)
        v = _along(bt, _along(bt, _along(bt, tile.contiguous(), 0), 1), 2)
        y = torch.bmm(v.view(a ** 3 * groups, nd * plane, c_in), u)
        y = _along(at, _along(at, _along(at, y.view(a, a, a, -1), 0), 1), 2)
        y = y.view(m, m, m, groups, n, nd, tiles[1], tiles[2], c_out // groups).permute(4, 5, 0, 6, 1, 7, 2, 3, 8)
        out[:, t0 * m:(t0 + nd) * m].view(n, nd, m, tiles[1], m, tiles[2], m, groups, c_out // groups).copy_(y)
    result = out[:, :d, :h, :w].permute(0, 4, 1, 2, 3)
    if (tiles[0] * m, tiles[1] * m, tiles[2] * m) != (d, h, w):
        result = result.contiguous(memory_format=CL)
    return result if bias is None else result.add_(bias.view(1, -1, 1, 1, 1))


#: the convolution ops LoGoNet's forward dispatches, by name, with the position of their input among the
#: arguments; the input, weight, bias, padding, stride, dilation and groups follow in that order
_CONVOLUTION_OPS = {"aten.mkldnn_convolution.default": 0, "mkldnn._convolution_pointwise.default": 0,
                    "mkldnn._convolution_pointwise.binary": 1, "mkldnn._convolution_pointwise_.binary": 1}


class _ConvolutionRecorder(TorchDispatchMode):
    """Records (input shape, weight shape, groups) of every dense 3^3 stride-1 'same' convolution dispatched
    (dense: more than one input channel per group, so neither depthwise nor on a one-channel image)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == "aten.convolution.default":  # F.conv3d: (x, w, b, stride, padding, dilation, transposed, _, groups)
            x, w, _, stride, padding, dilation, transposed, _, groups = args[:9]
            self._record(x, w, stride, padding, dilation, groups, transposed)
        elif name in _CONVOLUTION_OPS:
            x, w, _, padding, stride, dilation, groups = args[_CONVOLUTION_OPS[name]:_CONVOLUTION_OPS[name] + 7]
            self._record(x, w, stride, padding, dilation, groups, False)
        return func(*args, **(kwargs or {}))

    def _record(self, x, w, stride, padding, dilation, groups, transposed) -> None:
        dense_same = (not transposed and tuple(w.shape[2:]) == (3, 3, 3) and w.shape[1] > 1
                      and list(stride) == [1, 1, 1] and list(padding) == [1, 1, 1] and list(dilation) == [1, 1, 1])
        if dense_same:
            key = (tuple(x.shape), tuple(w.shape), int(groups))
            self.calls[key] = self.calls.get(key, 0) + 1


def network_convolutions(model: str, patch_size: Sequence[int]) -> dict[tuple, int]:
    """{(input shape, weight shape, groups): calls} of the dense 3^3 convolutions in one inference forward
    of ``model`` (a ``logonet_benchmark`` model name) at ``patch_size``, every lever on."""
    from nnunet_logonet.benchmark.models import resolve_model

    net = resolve_model(model, patch_size=patch_size).build().eval()
    return record_convolutions(net, torch.randn(1, 1, *patch_size).contiguous(memory_format=CL))


def record_convolutions(net: torch.nn.Module, x: torch.Tensor) -> dict[tuple, int]:
    """{(input shape, weight shape, groups): calls} of the dense 3^3 stride-1 'same' convolutions that
    ``net(x)`` dispatches without autograd (the second forward, after the first built any cached weights)."""
    recorder = _ConvolutionRecorder()
    with torch.no_grad():
        net(x)
        with recorder:
            net(x)
    return recorder.calls


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.winograd",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="logonet_s", help="network whose convolutions to time (default logonet_s)")
    parser.add_argument("--patch-size", nargs=3, type=int, default=[32, 64, 64], metavar=("D", "H", "W"),
                        help="patch of the recorded forward (default 32 64 64, the phantom's)")
    parser.add_argument("--shape", nargs=7, type=int, action="append",
                        metavar=("N", "C_IN", "C_OUT", "D", "H", "W", "GROUPS"),
                        help="time this convolution instead of a network's (repeat for several)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per route (default 3)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.shape:
        bad = [s for s in args.shape if min(s) < 1 or s[1] % s[6] or s[2] % s[6]]
        if bad or args.repeats < 1:
            shown = " ".join(map(str, bad[0])) if bad else f"--repeats {args.repeats}"
            print(f"error: {shown}: every value must be >= 1 and both channel counts divisible by the groups",
                  file=sys.stderr)
            return 2
        calls = {((n, ci, d, h, w), (co, ci // g, 3, 3, 3), g): 1 for n, ci, co, d, h, w, g in args.shape}
        source = "the shapes given"
    else:
        if min(args.patch_size) < 1 or args.repeats < 1:
            print(f"error: --patch-size {' '.join(map(str, args.patch_size))} --repeats {args.repeats}: "
                  "every value must be >= 1", file=sys.stderr)
            return 2
        calls = network_convolutions(args.model, args.patch_size)
        source = f"{args.model}'s inference forward at {'x'.join(map(str, args.patch_size))}"
    print(f"{cpu_line()}; dense 3^3 convolutions of {source}; ms per call (median of {args.repeats}); "
          "error: max relative to float64 F.conv3d")
    print(f"{'input':24s} {'weight':20s} {'g':>4s} {'calls':>5s} {'oneDNN':>8s} {'F(2^3)':>8s} {'F(4^3)':>8s}  "
          f"{'err oneDNN':>10s} {'err F2':>8s} {'err F4':>8s}")
    totals = [0.0, 0.0, 0.0]
    fastest_each = 0.0  # what a rule picking the faster route per call could reach
    torch.manual_seed(0)
    with torch.no_grad():
        for (x_shape, w_shape, groups), count in calls.items():
            x = torch.randn(*x_shape).contiguous(memory_format=CL)
            weight = (torch.randn(*w_shape) / (w_shape[1] * 27) ** 0.5).contiguous(memory_format=CL)
            bias = torch.randn(w_shape[0])
            exact = F.conv3d(x.double(), weight.double(), bias.double(), padding=1, groups=groups)
            scale = float(exact.abs().max())
            routes = [lambda: conv3d(x, weight, bias, padding=1, groups=groups)]  # oneDNN, as in the network
            for m in (2, 4):
                u = winograd_weight(weight, m, groups)
                routes.append(lambda u=u, m=m: winograd_conv3d(x, u, bias, groups, m))
            errors = [float((route().double() - exact).abs().max()) / scale for route in routes]
            del exact
            times = [time_ms(route, args.repeats) for route in routes]
            totals = [t + count * ms for t, ms in zip(totals, times)]
            fastest_each += count * min(times)
            print(f"{str(list(x_shape)):24s} {str(list(w_shape)):20s} {groups:4d} {count:5d} "
                  + " ".join(f"{ms:8.2f}" for ms in times) + "  "
                  + " ".join(f"{e:{10 if i == 0 else 8}.1e}" for i, e in enumerate(errors)), flush=True)
    best = "oneDNN" if totals[0] <= min(totals[1:]) else ("F(2^3)" if totals[1] <= totals[2] else "F(4^3)")
    print(f"{'total (calls x ms)':24s} {'':20s} {'':4s} {sum(calls.values()):5d} "
          + " ".join(f"{t:8.1f}" for t in totals) + f"  fastest in total: {best}; the fastest route per call: "
          f"{fastest_each:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
