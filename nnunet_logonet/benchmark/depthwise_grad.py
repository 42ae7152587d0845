"""Which route for a depthwise weight gradient: oneDNN's 3D kernel, grouped blocks, depth slices, phases.

``conv3d`` computes the weight gradient of LKA's depthwise convolutions by one of four exact
routes and picks one by rules measured on this project's CPUs (``kernels.depthwise.depthwise_weight_grad_route``:
``depth_slices_pay``, ``dilated_phases_pay``, ``DEPTHWISE_SLICES_WIDE_KERNELS``). The fastest route depends on the CPU
(5^3 kernels by depth slices: 2.5x faster than the blocks on an AVX2 AMD EPYC, 2x slower on an
AVX-512 Xeon Cascade Lake), so this command times every route on the machine it runs on, beside
the route the rules pick, and checks each against oneDNN's own kernel:

    python -m nnunet_logonet.benchmark.depthwise_grad                       # LoGoNet-S's shapes, ~1 min
    python -m nnunet_logonet.benchmark.depthwise_grad --shape 2 64 16 7 3   # batch channels size kernel dilation

Routes: ``3d`` oneDNN's depthwise weight gradient (the reference); ``blocks`` the diagonal of a
16-channel grouped convolution's (undilated); ``slices`` oneDNN's 2D kernel over depth-slice pairs
(undilated); ``phases`` the undilated blocks on the d^3 phases of input and gradient (dilated).
"""
from __future__ import annotations

import argparse
import sys
import time
from statistics import median
from typing import Callable, Sequence

import torch

from nnunet_logonet.machine import cpu_line
from nnunet_logonet.network.kernels import depthwise

__all__ = ["DEFAULT_SHAPES", "routes", "time_ms", "main"]

#: (batch, channels, size, kernel, dilation): LoGoNet-S's depthwise convolutions in a training step
#: at 64^3 and 96^3 (global path and the 8 local paths), the grouped local paths' bottleneck at 32^3
#: (8 x 1024 channels on 2^3), plus the shapes quoted in docs/speed.md
DEFAULT_SHAPES = [
    (2, 512, 16, 3, 1), (2, 512, 8, 3, 1), (2, 1024, 4, 3, 1), (2, 8192, 2, 3, 1), (2, 64, 64, 3, 1), (2, 128, 32, 3, 1),
    (2, 64, 16, 5, 1), (2, 64, 32, 5, 1), (2, 512, 8, 5, 1), (2, 64, 8, 5, 1),
    (2, 64, 16, 7, 3), (2, 64, 24, 7, 3), (2, 64, 12, 7, 3), (2, 64, 12, 5, 3), (2, 64, 8, 5, 3), (2, 128, 4, 3, 3),
]


def routes(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int
           ) -> dict[str, Callable[[], torch.Tensor]]:
    """The exact routes that apply to this convolution (stride 1, 'same' padding), by name."""
    k = weight.shape[2]
    padding = [dilation * (k // 2)] * 3
    dil = [dilation] * 3
    found: dict[str, Callable[[], torch.Tensor]] = {
        "3d": lambda: torch.ops.aten.convolution_backward(grad_out, x, weight, None, [1, 1, 1], padding, dil, False,
                                                          [0, 0, 0], x.shape[1], [False, True, False])[1]}
    if dilation == 1:
        found["blocks"] = lambda: depthwise.depthwise_weight_grad(grad_out, x, weight, padding, dil, slices=False)
        found["slices"] = lambda: depthwise.depthwise_weight_grad_by_slices(grad_out, x, weight, padding)
    else:
        found["phases"] = lambda: depthwise.depthwise_weight_grad(
            depthwise.to_phases(grad_out, dil), depthwise.to_phases(x, dil), weight, [k // 2] * 3, [1, 1, 1],
            slices=False)
    return found


def time_ms(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after two untimed ones (oneDNN's primitive cache)."""
    call()
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return 1e3 * median(samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nnunet_logonet.benchmark.depthwise_grad",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=5, type=int, action="append", metavar=("N", "C", "SIZE", "K", "DIL"),
                        help="batch, channels, cubic map size, kernel size, dilation (repeat for several; "
                             "default: LoGoNet-S's shapes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per route (default 5)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shapes = [tuple(s) for s in args.shape] if args.shape else DEFAULT_SHAPES
    for n, c, size, k, d in shapes:
        if min(n, c, size, args.repeats) < 1 or k < 1 or k % 2 == 0 or d < 1:
            print(f"error: shape {n} {c} {size} {k} {d}: batch, channels, size, repeats >= 1, an odd kernel "
                  f"and dilation >= 1 are needed", file=sys.stderr)
            return 2
    cl = torch.channels_last_3d
    print(f"{cpu_line()}; ms per weight "
          f"gradient, median of {args.repeats}; * = the route conv3d takes")
    print(f"{'shape':26s} {'3d':>9s} {'blocks':>9s} {'slices':>9s} {'phases':>9s}  max rel. error")
    torch.manual_seed(0)
    for n, c, size, k, d in shapes:
        x = torch.randn(n, c, size, size, size).contiguous(memory_format=cl)
        g = torch.randn(n, c, size, size, size).contiguous(memory_format=cl)
        w = torch.randn(c, 1, k, k, k).contiguous(memory_format=cl)
        found = routes(g, x, w, d)
        reference = found["3d"]()
        error = max(float((call() - reference).abs().max() / reference.abs().max()) for call in found.values())
        pick = depthwise.depthwise_weight_grad_route(g, x, w, [d] * 3)
        cells = []
        for name in ("3d", "blocks", "slices", "phases"):
            cells.append(f"{time_ms(found[name], args.repeats):8.2f}{'*' if name == pick else ' '}"
                         if name in found else f"{'-':>9s}")
        label = f"[{n}, {c}, {size}^3] {k}^3" + (f" d{d}" if d > 1 else "")
        print(f"{label:26s} {' '.join(cells)}  {error:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
