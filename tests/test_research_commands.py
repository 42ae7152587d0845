"""The research commands docs/planning.md and docs/ssl.md quote, on inputs small enough for CI: each still
runs and prints the figures the docs show (their figures come from larger runs)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("planner", ["LoGoNetPlanner", "LoGoNetLPlanner", "LoGoNetTinyPlanner", "ULKANetPlanner"])
def test_memory_calibration_prints_the_bytes_per_element_the_planner_uses(capsys, planner):
    """Each planner's constant is its network's calibration (docs/planning.md): a single 5.4, calibrated on
    the first presets, had stayed in place after S's and L's full-resolution widths changed (S 5.73, L 6.60:
    their patches were planned for up to 22 % less memory than they take)."""
    from nnunet_logonet.planning.memory import main
    from nnunet_logonet.planning.planners import PLANNERS

    cls = PLANNERS[planner]
    main(["--patch-size", "64", "64", "64", "--preset", cls.preset, "--model", cls.network_class.__name__])
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for key in ("unet_saved_bytes_per_element", "logonet_saved_bytes_per_element", "logonet_gpu_bytes_per_element"):
        assert float(printed[key]) > 0, key
    assert cls.bytes_per_feature_element == pytest.approx(float(printed["logonet_gpu_bytes_per_element"]), rel=0.01)


@pytest.mark.parametrize("argv, phrase", [
    (["--patch-size", "16", "32", "32"], "Nearest valid sizes: [32, 32, 32]"),
    (["--preset", "XL"], "unknown preset 'XL'"),
])
def test_memory_calibration_refuses_what_the_network_cannot_take(capsys, argv, phrase):
    from nnunet_logonet.planning.memory import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and phrase in capsys.readouterr().err


def test_memory_calibration_counts_a_tensor_saved_through_two_views_once():
    """Autograd often saves several views of one tensor (channel splits, reshapes); they take its memory
    once, so the calibration the planner's memory estimate rests on counts the storage once, not per view."""
    import torch
    from torch import nn

    from nnunet_logonet.planning.memory import saved_activation_bytes

    class TwoViews(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            y = x + self.w  # add saves nothing; each sin saves its input, a view of y
            return torch.sin(y[:, :1]) + torch.sin(y[:, 1:])

    assert saved_activation_bytes(TwoViews(), (4, 4, 4), input_channels=2) == 2 * 4 ** 3 * 4  # y, float32


def test_clustering_benchmark_prints_one_record_per_backend_and_pooling(capsys):
    from nnunet_logonet.benchmark.clustering import main

    main(["--n-slices", "60", "--size", "16", "--num-clusterers", "2", "--k-range", "3", "5", "--max-iter", "20",
          "--label-slices", "16", "--backends", "sklearn", "torch", "--pools", "1", "2"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted((r["backend"], r["pool"]) for r in records) == [("sklearn", 1), ("sklearn", 2), ("torch", 1),
                                                                 ("torch", 2)]
    assert all(r["num_clusterers"] == 2 and 2 * 3 <= r["sum_k"] <= 2 * 5 and r["inertia"] > 0 for r in records)
    assert [r["features"] for r in records if r["backend"] == "sklearn"] == [16 * 16, 8 * 8]


def test_nnunets_spellings_of_shared_flags_are_understood():
    """nnU-Net's users type -device, -d and -pretrained_weights: '-device cuda' parsed as '-d evice', and
    '-pretrained_weights W' as '-p retrained_weights'."""
    from nnunet_logonet.benchmark import efficiency, finetune_start, lever_ab

    assert efficiency.build_parser().parse_args(["-device", "cuda"]).device == "cuda"
    assert lever_ab.build_parser().parse_args(["--lever", "stitch_add", "-device", "cpu"]).device == "cpu"
    args = finetune_start.build_parser().parse_args(["-d", "9", "-p", "LoGoNetPlans", "-pretrained_weights", "w.pth"])
    assert (args.plans, args.pretrained) == ("LoGoNetPlans", "w.pth")
    from nnunet_logonet.demo.cli import build_parser as demo_parser

    args = demo_parser().parse_args(["-d", "950", "-device", "cpu"])
    assert (args.dataset_id, args.device) == (950, "cpu")


def test_ssl_benefit_refuses_a_folder_as_its_report_before_training(tmp_path, capsys):
    """It trained for minutes, then stopped at writing the JSON into the folder, and lost its table too."""
    from nnunet_logonet.benchmark import ssl_benefit

    with pytest.raises(SystemExit) as stop:
        ssl_benefit.main(["--base", str(tmp_path / "base"), "--json", str(tmp_path), "-d", "940"])
    assert stop.value.code == 2 and "is a folder; give a file name such as" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()


def test_ssl_benefit_draws_each_fine_tuning_per_organ(tmp_path):
    """Its result was a text table only; the chart goes beside the JSON report."""
    from nnunet_logonet.benchmark.ssl_benefit import plot_arms

    run = lambda dice: {"test_dice": dice, "per_organ_dice": {"liver": 3 * dice, "spleen": 0.0, "aorta": 0.0}}  # noqa: E731
    report = {"settings": {"test": 4, "quick": True}, "arms": {"scratch": [run(0.2), run(0.1)], "ssl": [run(0.0), run(0.3)]}}
    plot_arms(report, tmp_path / "ssl_benefit.png")
    assert (tmp_path / "ssl_benefit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
