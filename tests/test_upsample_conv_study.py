"""``python -m nnunet_logonet.benchmark.upsample_conv``: the decoder's upsampling + convolution, coarse map first."""
from __future__ import annotations

import pytest
import torch

from nnunet_logonet.benchmark import upsample_conv

CL = torch.channels_last_3d


@pytest.mark.parametrize("batch, c_in, c_out, size", [(1, 8, 4, (4, 6, 5)), (2, 5, 3, (1, 3, 2)), (1, 16, 16, (3, 3, 3))])
def test_coarse_first_equals_upsampling_then_convolution(batch, c_in, c_out, size):
    """Exact, borders included (odd sizes, a map of one voxel in depth), in float64 to rounding."""
    torch.manual_seed(0)
    coarse = torch.randn(batch, c_in, *size, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, 3, dtype=torch.float64)
    expected = upsample_conv.upsample_conv(coarse, weight)
    got = upsample_conv.coarse_first_conv(coarse, weight)
    assert got.shape == expected.shape == (batch, c_out, *(2 * s for s in size))
    assert float((got - expected).abs().max()) < 1e-12 * float(expected.abs().max())
    # float32 channels-last, as the network runs it
    got32 = upsample_conv.coarse_first_conv(coarse.float().contiguous(memory_format=CL), weight.float())
    assert float((got32.double() - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_a_weight_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"must be \(C_out, 8, 3, 3, 3\)"):
        upsample_conv.coarse_first_conv(torch.randn(1, 8, 2, 2, 2), torch.randn(4, 8, 5, 5, 5))


def test_prints_both_routes_their_multiply_accumulates_and_errors(capsys):
    assert upsample_conv.main(["--shape", "1", "8", "4", "4", "4", "4", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(rows) == 1 and rows[0].startswith("[1, 8 -> 4, 4x4x4 -> x2]")
    cells = rows[0].split("]")[-1].split()
    assert float(cells[1]) == pytest.approx(8 * float(cells[3]), rel=1e-2)  # 1/8 of the products
    assert float(cells[-2]) < 1e-5 and float(cells[-1]) < 1e-5


def test_bad_shape_is_refused_with_the_values(capsys):
    assert upsample_conv.main(["--shape", "1", "0", "4", "4", "4", "4"]) == 2
    assert "1 0 4 4 4 4" in capsys.readouterr().err
