"""The research commands docs/planning.md and docs/ssl.md quote, on inputs small enough for CI: each still
runs and prints the figures the docs show (their figures come from larger runs)."""

from __future__ import annotations

import json

import pytest


def test_memory_calibration_prints_the_bytes_per_element_the_planner_uses(capsys):
    from nnunet_logonet.planning.memory import main

    main(["--patch-size", "64", "64", "64", "--preset", "tiny"])
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for key in ("unet_saved_bytes_per_element", "logonet_saved_bytes_per_element", "logonet_gpu_bytes_per_element"):
        assert float(printed[key]) > 0, key


@pytest.mark.parametrize("argv, phrase", [
    (["--patch-size", "16", "32", "32"], "Nearest valid sizes: [32, 32, 32]"),
    (["--preset", "XL"], "unknown preset 'XL'"),
])
def test_memory_calibration_refuses_what_the_network_cannot_take(capsys, argv, phrase):
    from nnunet_logonet.planning.memory import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and phrase in capsys.readouterr().err


def test_clustering_benchmark_prints_one_record_per_backend_and_pooling(capsys):
    from nnunet_logonet.benchmark.clustering import main

    main(["--n-slices", "60", "--size", "16", "--num-clusterers", "2", "--k-range", "3", "5", "--max-iter", "20",
          "--label-slices", "16", "--backends", "sklearn", "torch", "--pools", "1", "2"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted((r["backend"], r["pool"]) for r in records) == [("sklearn", 1), ("sklearn", 2), ("torch", 1),
                                                                 ("torch", 2)]
    assert all(r["num_clusterers"] == 2 and 2 * 3 <= r["sum_k"] <= 2 * 5 and r["inertia"] > 0 for r in records)
    assert [r["features"] for r in records if r["backend"] == "sklearn"] == [16 * 16, 8 * 8]
