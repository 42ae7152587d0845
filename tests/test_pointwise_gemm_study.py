"""``python -m nnunet_logonet.benchmark.pointwise_gemm``: the table behind kernels/pointwise.py's rule."""
from __future__ import annotations

import torch

from nnunet_logonet.benchmark import pointwise_gemm
from nnunet_logonet.network.kernels import pointwise as pointwise_module


def test_prints_both_routes_marks_the_ones_conv_takes_and_their_error(capsys):
    assert pointwise_gemm.main(["--shape", "2", "16", "32", "4", "--shape", "2", "16", "8", "12",
                                "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(rows) == 2
    small, large = rows
    assert small.startswith("[2, 16, 4^3] -> 32") and large.startswith("[2, 16, 12^3] -> 8")
    # forward: the product on the small map (128 rows), oneDNN on the large one (3456 rows)
    assert pointwise_module.pointwise_forward_route(torch.empty(2, 16, 4, 4, 4)) == "gemm"
    assert pointwise_module.pointwise_forward_route(torch.empty(2, 16, 12, 12, 12)) == "onednn"
    cells = [row.split()[-5:-1] for row in rows]
    assert [c.endswith("*") for c in cells[0]] == [False, True, False, True]
    assert [c.endswith("*") for c in cells[1]] == [True, False, False, True]
    for row in rows:
        assert float(row.split()[-1]) < 1e-5  # the products equal oneDNN's convolution and gradients


def test_bad_shape_is_refused_with_the_values(capsys):
    assert pointwise_gemm.main(["--shape", "2", "0", "8", "4"]) == 2
    assert "2 0 8 4" in capsys.readouterr().err
