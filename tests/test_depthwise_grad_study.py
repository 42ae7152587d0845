"""``python -m nnunet_logonet.benchmark.depthwise_grad``: the route table behind kernels/depthwise.py's rules."""
from __future__ import annotations

import pytest
import torch

from nnunet_logonet.benchmark import depthwise_grad
from nnunet_logonet.network.kernels import depthwise as depthwise_module

CL = torch.channels_last_3d


def test_prints_every_applicable_route_with_the_one_conv_takes_and_its_error(capsys):
    assert depthwise_grad.main(["--shape", "2", "16", "8", "3", "1", "--shape", "2", "16", "12", "5", "3",
                                "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("[")]
    assert len(rows) == 2
    undilated, dilated = rows
    assert undilated.startswith("[2, 16, 8^3] 3^3") and undilated.count("*") == 1
    assert dilated.startswith("[2, 16, 12^3] 5^3 d3") and dilated.count("*") == 1
    assert dilated.split()[-3] == "-"  # no depth slices for a dilated convolution
    for row in rows:
        assert float(row.split()[-1]) < 1e-5  # every route equals oneDNN's own weight gradient


@pytest.mark.parametrize("channels, size, kernel, dilation", [
    (16, 8, 3, 1), (16, 4, 5, 1), (16, 12, 5, 3), (16, 8, 5, 3), (128, 4, 3, 1), (8, 16, 7, 3)])
def test_the_route_named_is_the_route_taken(channels, size, kernel, dilation, monkeypatch):
    """The route named (the table's star) is the route the weight gradient really takes."""
    taken = []
    real_phases, real_slices = depthwise_module.to_phases, depthwise_module.depthwise_weight_grad_by_slices
    monkeypatch.setattr(depthwise_module, "to_phases", lambda *a: taken.append("phases") or real_phases(*a))
    monkeypatch.setattr(depthwise_module, "depthwise_weight_grad_by_slices",
                        lambda *a: taken.append("slices") or real_slices(*a))
    x = torch.randn(2, channels, size, size, size).contiguous(memory_format=CL)
    g = torch.randn_like(x)
    w = torch.randn(channels, 1, kernel, kernel, kernel).contiguous(memory_format=CL)
    pad = [dilation * (kernel // 2)] * 3
    depthwise_module.depthwise_weight_grad(g, x, w, pad, [dilation] * 3)
    expected = taken[0] if taken else ("blocks" if dilation == 1 else "3d")
    assert depthwise_module.depthwise_weight_grad_route(g, x, w, [dilation] * 3) == expected


def test_bad_shape_is_refused_with_the_values(capsys):
    assert depthwise_grad.main(["--shape", "2", "16", "8", "4", "1"]) == 2
    assert "2 16 8 4 1" in capsys.readouterr().err
