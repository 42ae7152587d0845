"""Dense convolutions on small maps: oneDNN's backward or matrix products over im2col rows, on this CPU.

On maps of a few voxels most of a 3^3 kernel's taps meet only the zero padding, and oneDNN's backward of
a dense convolution there ran up to 18x slower than the same products as two matrix multiplications
over the input's im2col rows (``small_map.small_map_backward``). ``conv3d`` takes the products for the shapes
``small_map.small_map_gemm_pays`` accepts; this command times both on the machine it runs on, marks the
route taken, and checks the products against oneDNN:

    python -m nnunet_logonet.benchmark.small_map_gemm                       # LoGoNet-S's shapes, ~20 s
    python -m nnunet_logonet.benchmark.small_map_gemm --shape 2 512 256 2   # batch C_in C_out size
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from nnunet_logonet.benchmark.depthwise_grad import time_ms
from nnunet_logonet.benchmark.pointwise_gemm import checked_shapes, layer_shape_parser
from nnunet_logonet.machine import cpu_line
from nnunet_logonet.network.kernels import small_map

__all__ = ["DEFAULT_SHAPES", "main"]

#: (batch, C_in, C_out, size), 3^3 kernels: LoGoNet-S's dense convolutions on its deepest maps in a
#: training step at 64^3 (2^3 and 4^3) and at 96^3 (3^3 and 6^3), and narrower ones for the rule's edge
DEFAULT_SHAPES = [
    (2, 512, 256, 2), (2, 256, 256, 2), (2, 256, 512, 2), (2, 448, 192, 4), (2, 192, 192, 4), (2, 256, 256, 4),
    (2, 512, 256, 3), (2, 256, 256, 3), (2, 192, 192, 3), (2, 128, 128, 4), (2, 64, 64, 4), (2, 32, 32, 8),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = layer_shape_parser("python -m nnunet_logonet.benchmark.small_map_gemm", __doc__.split("\n\n")[0], 7,
                              ", 3^3 kernel").parse_args(argv)
    shapes = checked_shapes(args, DEFAULT_SHAPES)
    if shapes is None:
        return 2
    cl, one = torch.channels_last_3d, [1, 1, 1]
    print(f"{cpu_line()}; backward (input and "
          f"weight gradients), ms per call, median of {args.repeats}; * = the route conv3d takes")
    print(f"{'shape':30s} {'onednn':>9s} {'products':>9s}  max rel. error")
    torch.manual_seed(0)
    for n, c_in, c_out, size in shapes:
        x = torch.randn(n, c_in, size, size, size).contiguous(memory_format=cl)
        weight = torch.randn(c_out, c_in, 3, 3, 3).contiguous(memory_format=cl)
        grad_out = torch.randn(n, c_out, size, size, size).contiguous(memory_format=cl)
        reference = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            grad_out, x, weight, None, one, one, one, False, [0, 0, 0], 1, [True, True, False])[:2]
        products = lambda: small_map.small_map_backward(grad_out, x, weight, one, (True, True, False))[:2]  # noqa: E731
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(products(), reference()))
        takes = small_map.small_map_gemm_pays(x, weight, one, one, one, 1)
        cells = [f"{time_ms(reference, args.repeats):8.2f}{' ' if takes else '*'}",
                 f"{time_ms(products, args.repeats):8.2f}{'*' if takes else ' '}"]
        label = f"[{n}, {c_in} -> {c_out}, {size}^3]"
        print(f"{label:30s} {' '.join(cells)}  {error:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
