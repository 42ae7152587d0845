"""``python -m nnunet_logonet.benchmark.winograd``: LoGoNet's 3^3 convolutions by Winograd's F(m^3, 3^3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_logonet.benchmark import winograd
from nnunet_logonet.network.conv import Conv3d, reference_kernels

CL = torch.channels_last_3d


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("batch, c_in, c_out, groups, size", [(1, 6, 4, 1, (5, 7, 6)), (2, 8, 12, 4, (3, 1, 9)),
                                                              (1, 3, 5, 1, (4, 4, 4))])
def test_winograd_equals_the_convolution(m, batch, c_in, c_out, groups, size):
    """Exact in float64 (odd sizes, a map one voxel thick, groups, a batch); float32 within its rounding."""
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, *size, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, 3, 3, 3, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    expected = F.conv3d(x, weight, bias, padding=1, groups=groups)
    got = winograd.winograd_conv3d(x, winograd.winograd_weight(weight, m, groups), bias, groups, m)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=CL)
    assert float((got - expected).abs().max()) < 1e-12 * float(expected.abs().max())
    x32, w32 = x.float().contiguous(memory_format=CL), weight.float()
    got32 = winograd.winograd_conv3d(x32, winograd.winograd_weight(w32, m, groups), bias.float(), groups, m)
    assert float((got32.double() - expected).abs().max()) < (1e-5 if m == 2 else 1e-3) * float(expected.abs().max())


def test_the_recorder_sees_exactly_the_dense_same_3x3x3_convolutions():
    torch.manual_seed(0)
    net = nn.Sequential(Conv3d(2, 8, 3, padding=1), Conv3d(8, 8, 3, padding=1), Conv3d(8, 8, 3, padding=1),
                        Conv3d(8, 8, 3, padding=1, groups=8),  # depthwise: not dense
                        Conv3d(8, 16, 3, padding=1, groups=2),
                        Conv3d(16, 16, 1),  # pointwise
                        Conv3d(16, 16, 3, stride=2, padding=1))  # strided
    calls = winograd.record_convolutions(net.eval(), torch.randn(1, 2, 4, 6, 6).contiguous(memory_format=CL))
    assert calls == {((1, 2, 4, 6, 6), (8, 2, 3, 3, 3), 1): 1, ((1, 8, 4, 6, 6), (8, 8, 3, 3, 3), 1): 2,
                     ((1, 8, 4, 6, 6), (16, 4, 3, 3, 3), 2): 1}
    with reference_kernels():  # the same convolutions through F.conv3d (aten.convolution) instead of oneDNN's ops
        assert winograd.record_convolutions(net, torch.randn(1, 2, 4, 6, 6)) == calls


def test_prints_each_convolution_and_the_totals(capsys):
    assert winograd.main(["--shape", "1", "8", "8", "4", "4", "4", "1", "--shape", "1", "8", "8", "3", "5", "4", "2",
                          "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("[")]
    assert [r.split()[:3] for r in rows] == [["[1,", "8,", "4,"], ["[1,", "8,", "3,"]]
    for row in rows:
        errors = [float(v) for v in row.split()[-3:]]
        assert errors[0] < 1e-5 and errors[1] < 1e-5 and errors[2] < 1e-3
    total = out[-1].split()
    assert out[-1].startswith("total") and total[4] == "2" and "fastest in total:" in out[-1]


def test_bad_input_is_refused_with_the_values(capsys):
    assert winograd.main(["--shape", "1", "8", "6", "4", "4", "4", "4"]) == 2  # 6 output channels, 4 groups
    assert "1 8 6 4 4 4 4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="m=3 has no transform"):
        winograd.winograd_weight(torch.randn(4, 4, 3, 3, 3), 3)
    with pytest.raises(ValueError, match=r"weight \(4, 4, 5, 5, 5\)"):
        winograd.winograd_weight(torch.randn(4, 4, 5, 5, 5))
    with pytest.raises(ValueError, match="does not fit input"):
        winograd.winograd_conv3d(torch.randn(1, 8, 4, 4, 4), winograd.winograd_weight(torch.randn(4, 4, 3, 3, 3)))
