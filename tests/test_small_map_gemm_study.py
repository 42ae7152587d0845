"""``python -m nnunet_logonet.benchmark.small_map_gemm``: the table behind kernels/small_map.py's rule."""
from __future__ import annotations

from nnunet_logonet.benchmark import small_map_gemm


def test_prints_both_routes_marks_the_one_conv_takes_and_their_error(capsys):
    assert small_map_gemm.main(["--shape", "2", "192", "192", "3", "--shape", "2", "32", "32", "4",
                                "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(rows) == 2
    wide, narrow = rows
    assert wide.startswith("[2, 192 -> 192, 3^3]") and narrow.startswith("[2, 32 -> 32, 4^3]")
    assert [c.endswith("*") for c in wide.split()[-3:-1]] == [False, True]  # products for the wide layer
    assert [c.endswith("*") for c in narrow.split()[-3:-1]] == [True, False]  # oneDNN for the narrow one on 64 voxels
    for row in rows:
        assert float(row.split()[-1]) < 1e-5  # the products equal oneDNN's gradients


def test_bad_shape_is_refused_with_the_values(capsys):
    assert small_map_gemm.main(["--shape", "2", "0", "8", "4"]) == 2
    assert "2 0 8 4" in capsys.readouterr().err
