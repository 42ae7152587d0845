"""1x1x1 convolutions: oneDNN's convolution or matrix products, forward and backward, on this CPU.

In channels-last memory a dense 1x1x1 convolution is one matrix product over the (voxels, channels)
rows of its input, and its two gradients are two more. ``conv3d`` computes the backward of
LoGoNet's 1x1x1 convolutions (the LKA blocks' projections and MLPs) as those products, and the
forward too on small maps (``POINTWISE_GEMM_MAX_ROWS``; ``kernels.pointwise.pointwise_forward_route``),
because oneDNN's fixed cost per call dominated there on the CPU it was measured on. This command times both
on the machine it runs on, marks the route conv3d takes, and checks the products against oneDNN:

    python -m nnunet_logonet.benchmark.pointwise_gemm                        # LoGoNet-S's shapes, ~30 s
    python -m nnunet_logonet.benchmark.pointwise_gemm --shape 2 512 64 8     # batch C_in C_out size
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

from nnunet_logonet.benchmark.depthwise_grad import time_ms
from nnunet_logonet.machine import cpu_line
from nnunet_logonet.network.kernels import pointwise
from nnunet_logonet.network.kernels.geometry import from_rows, to_rows

__all__ = ["DEFAULT_SHAPES", "routes", "layer_shape_parser", "checked_shapes", "main"]

#: (batch, C_in, C_out, size): LoGoNet-S's 1x1x1 convolutions in a training step at 64^3 (batch 2;
#: global path on 16^3 .. 2^3, the local paths on 8^3 and 4^3) and in inference (batch 1)
DEFAULT_SHAPES = [
    (2, 64, 512, 16), (2, 512, 64, 16), (2, 64, 64, 16), (2, 64, 512, 8), (2, 512, 64, 8), (2, 64, 64, 8),
    (2, 128, 1024, 8), (2, 1024, 128, 8), (2, 128, 128, 4), (2, 128, 1024, 4), (2, 1024, 128, 4),
    (2, 256, 256, 4), (2, 512, 2048, 2), (2, 2048, 512, 2), (1, 64, 512, 16), (1, 512, 64, 16),
    (1, 64, 512, 8), (1, 128, 1024, 4), (1, 512, 2048, 2),
]


def routes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad_out: torch.Tensor
           ) -> dict[str, Callable[[], object]]:
    """Forward and backward (input, weight and bias gradients) by oneDNN and by products."""
    one, zero = [1, 1, 1], [0, 0, 0]
    rows, w = to_rows(x), weight.reshape(weight.shape[0], weight.shape[1])
    grad_rows = to_rows(grad_out)
    return {
        "forward onednn": lambda: torch.mkldnn_convolution(x, weight, bias, zero, one, one, 1),
        "forward gemm": lambda: from_rows(torch.addmm(bias, rows, w.t()), x),
        "backward onednn": lambda: torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]], one, zero, one, False, zero, 1, [True, True, True]),
        "backward gemm": lambda: (from_rows(grad_rows @ w, x), grad_rows.t() @ rows, grad_rows.sum(0)),
    }


def _error(found: dict[str, Callable[[], object]]) -> float:
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    worst = rel(found["forward gemm"](), found["forward onednn"]())  # type: ignore[arg-type]
    gx, gw, gb = found["backward gemm"]()  # type: ignore[misc]
    rx, rw, rb = found["backward onednn"]()  # type: ignore[misc]
    return max(worst, rel(gx, rx), rel(gw.reshape(rw.shape), rw), rel(gb, rb))


def layer_shape_parser(prog: str, description: str, repeats: int, kernel: str = "", *,
                       metavar: tuple[str, ...] = ("N", "C_IN", "C_OUT", "SIZE"),
                       shape_help: str = "") -> argparse.ArgumentParser:
    """The ``--shape N C_IN C_OUT SIZE`` (repeatable; other fields with ``metavar`` and ``shape_help``) and
    ``--repeats`` options of the convolution studies."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    shape_help = shape_help or f"batch, input and output channels, cubic map size{kernel}"
    parser.add_argument("--shape", nargs=len(metavar), type=int, action="append", metavar=metavar,
                        help=f"{shape_help} (repeat for several; default: LoGoNet-S's shapes)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed calls per route (default {repeats})")
    return parser


def checked_shapes(args: argparse.Namespace, defaults: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]] | None:
    """The shapes ``args`` asks for (else ``defaults``); None, after saying which one, if any value is < 1."""
    shapes = [tuple(s) for s in args.shape] if args.shape else list(defaults)
    for shape in shapes:
        if min(*shape, args.repeats) < 1:
            print(f"error: shape {' '.join(map(str, shape))}: batch, channels, size and repeats must be >= 1",
                  file=sys.stderr)
            return None
    return shapes


def build_parser() -> argparse.ArgumentParser:
    return layer_shape_parser("python -m nnunet_logonet.benchmark.pointwise_gemm", __doc__.split("\n\n")[0], 10)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shapes = checked_shapes(args, DEFAULT_SHAPES)
    if shapes is None:
        return 2
    cl = torch.channels_last_3d
    print(f"{cpu_line()}; ms per call, "
          f"median of {args.repeats}; * = the route conv3d takes")
    print(f"{'shape':28s} {'fwd onednn':>11s} {'fwd gemm':>10s} {'bwd onednn':>11s} {'bwd gemm':>10s}  "
          f"max rel. error")
    torch.manual_seed(0)
    for n, c_in, c_out, size in shapes:
        x = torch.randn(n, c_in, size, size, size).contiguous(memory_format=cl)
        weight = torch.randn(c_out, c_in, 1, 1, 1).contiguous(memory_format=cl)
        bias = torch.randn(c_out)
        grad_out = torch.randn(n, c_out, size, size, size).contiguous(memory_format=cl)
        found = routes(x, weight, bias, grad_out)
        forward = pointwise.pointwise_forward_route(x)
        cells = []
        for name, width in (("forward onednn", 11), ("forward gemm", 10), ("backward onednn", 11),
                            ("backward gemm", 10)):
            taken = name == f"forward {forward}" or name == "backward gemm"
            cells.append(f"{time_ms(found[name], args.repeats):{width - 1}.2f}{'*' if taken else ' '}")
        label = f"[{n}, {c_in}, {size}^3] -> {c_out}"
        print(f"{label:28s} {' '.join(cells)}  {_error(found):.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
