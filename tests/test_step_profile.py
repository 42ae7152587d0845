"""``python -m nnunet_logonet.benchmark.step_profile``: each network's time by kind of operation."""
from __future__ import annotations

import pytest

from nnunet_logonet.benchmark import step_profile


@pytest.mark.parametrize("operator, expected", [
    ("aten::convolution_backward", "convolution backward"),
    ("autograd::engine::evaluate_function: MkldnnConvolutionBackward0", "convolution backward"),
    ("SameDepthwiseConv3dBackward", "convolution backward"),
    ("aten::mkldnn_convolution", "convolution forward"),
    ("mkldnn::_convolution_pointwise_", "convolution forward"),
    ("aten::slow_conv3d_forward", "convolution forward"),
    ("aten::mm", "matrix products"),
    ("aten::baddbmm", "matrix products"),
    ("aten::native_batch_norm_backward", "normalization"),
    ("autograd::engine::evaluate_function: NativeBatchNormBackward0", "normalization"),
    ("aten::leaky_relu_backward", "activations"),
    ("aten::gelu", "activations"),
    ("aten::_log_softmax_backward_data", "loss"),
    ("aten::upsample_trilinear3d_backward", "upsampling"),
    ("aten::copy_", "copies and layout"),
    ("aten::cat", "copies and layout"),
    ("aten::_fused_sgd_", "optimizer and clipping"),
    ("aten::linalg_vector_norm", "optimizer and clipping"),  # gradient clipping, not a normalization layer
    ("aten::add_", "elementwise and reductions"),
    ("aten::empty", step_profile.OTHER),
    ("aten::as_strided", step_profile.OTHER),
])
def test_operators_fall_into_the_category_a_reader_expects(operator, expected):
    assert step_profile.category(operator) == expected


@pytest.mark.parametrize("figure", ["train", "forward", "sliding_window"])
def test_table_puts_both_networks_side_by_side_with_ratios(figure, capsys):
    assert step_profile.main(["--patch-size", "16", "32", "32", "--models", "nnunet", "logonet_tiny",
                              "--figure", figure, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert set(step_profile.ROWS) | {"total (profiled)", "unprofiled median, s", "operator calls",
                                     "minor page faults per call", "system CPU s per call"} <= set(rows)
    for row in ("convolution forward", "total (profiled)", "operator calls"):
        cells = [c.strip() for c in rows[row].strip("| ").split(" | ")]
        assert len(cells) == 4  # category, nnunet, logonet_tiny, logonet_tiny / nnunet
        assert cells[3].endswith("x")
    nnunet_conv, tiny_conv = (float(c.split()[0]) for c in rows["convolution forward"].split(" | ")[1:3])
    assert nnunet_conv > 0 and tiny_conv > 0  # every network convolves
    if figure == "train":  # a training step has a backward and an optimizer; a forward neither
        assert float(rows["convolution backward"].split(" | ")[1].split()[0]) > 0
        assert float(rows["optimizer and clipping"].split(" | ")[2].split()[0]) > 0


def test_shares_add_up_to_the_profiled_total():
    result = step_profile.profile_model("logonet_tiny", (16, 32, 32), "forward", repeats=1)
    assert result["total_s"] == pytest.approx(sum(result["seconds"].values()))
    assert result["calls"] > 100 and result["unprofiled_s"] > 0
    assert result["page_faults"] >= 0 and result["system_s"] >= 0


def test_sliding_window_profiles_every_tile_of_nnunets_predictor():
    """One case of 1.5x the patch per axis is 8 tiles at nnU-Net's step 0.5: at least 8 forwards' operators."""
    forward = step_profile.profile_model("logonet_tiny", (16, 32, 32), "forward", repeats=1)
    case = step_profile.profile_model("logonet_tiny", (16, 32, 32), "sliding_window", repeats=1)
    assert case["calls"] >= 8 * forward["calls"]
    assert case["seconds"]["convolution forward"] > 0 and case["seconds"]["convolution backward"] == 0
    with pytest.raises(ValueError, match="sliding_window"):
        step_profile.profile_model("logonet_tiny", (16, 32, 32), "inference")


def test_page_faults_of_the_timed_calls_reach_the_table(monkeypatch):
    """The faults and system time come from the unprofiled calls (``time_runs``' costs) and are shown per model."""
    def fake_time_runs(run, warmup, repeats, device, costs=None):
        costs.update(minor_page_faults=1234.0, system_s=0.25)
        return [0.5] * repeats

    monkeypatch.setattr(step_profile, "time_runs", fake_time_runs)
    result = step_profile.profile_model("logonet_tiny", (16, 32, 32), "forward", repeats=1)
    assert (result["page_faults"], result["system_s"]) == (1234.0, 0.25)
    reference = dict(result, page_faults=617.0, system_s=0.5)
    table = step_profile.format_table({"nnunet": reference, "logonet_tiny": result}, "forward", (16, 32, 32))
    assert "| minor page faults per call | 617 | 1,234 | 2.00x |" in table
    assert "| system CPU s per call | 0.500 | 0.250 | 0.50x |" in table


@pytest.mark.parametrize("argv, named", [
    (["--models", "nnunet", "logonet_xl"], "logonet_xl"),
    (["--models", "logonet_tiny", "--patch-size", "16", "30", "32"], "16 30 32"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_input_is_refused_before_anything_runs(argv, named, capsys):
    assert step_profile.main(argv) == 2
    assert named in capsys.readouterr().err


def test_chart_draws_every_model(tmp_path, capsys):
    chart = tmp_path / "charts" / "profile.png"
    assert step_profile.main(["--patch-size", "16", "32", "32", "--models", "nnunet", "logonet_tiny",
                              "--figure", "forward", "--repeats", "1", "--chart", str(chart)]) == 0
    assert f"wrote {chart}" in capsys.readouterr().out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in chart.parent.iterdir()] == ["profile.png"]  # no temporary file left
