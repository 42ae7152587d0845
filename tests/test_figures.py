"""figures.save_figure: a complete PNG or the previous one, never half of one; the figure is closed."""
from __future__ import annotations

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from nnunet_logonet.figures import figure_path, save_figure  # noqa: E402


def test_writes_the_png_into_a_new_folder_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    target = tmp_path / "new" / "progress.png"
    save_figure(fig, target, dpi=50)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["progress.png"]
    assert fig.number not in plt.get_fignums()


def test_a_failed_save_leaves_the_previous_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "progress.png"
    target.write_bytes(b"previous")
    fig, _ = plt.subplots()
    with pytest.raises(ValueError):
        save_figure(fig, target, format="no-such-format")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["progress.png"]
    assert fig.number not in plt.get_fignums()


def test_a_name_without_suffix_is_drawn_as_png(tmp_path):
    """matplotlib read the format from the temporary name ('.tmp1234') and stopped after the run."""
    fig, _ = plt.subplots()
    save_figure(fig, tmp_path / "ratios")
    assert (tmp_path / "ratios").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_paths_are_checked_when_the_command_starts(tmp_path):
    import argparse

    assert figure_path(str(tmp_path / "chart.svg")).name == "chart.svg"
    with pytest.raises(argparse.ArgumentTypeError, match=r"is a folder; give a file name such as .*chart.png"):
        figure_path(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot write .xyz figures; use one of .*\.png"):
        figure_path(str(tmp_path / "chart.xyz"))
    from nnunet_logonet.benchmark.efficiency import build_parser

    with pytest.raises(SystemExit):  # refused before any model is timed
        build_parser().parse_args(["--chart", str(tmp_path / "chart.xyz")])


@pytest.mark.parametrize("module", ["benchmark.efficiency", "benchmark.lever_ab", "benchmark.lever_memory",
                                    "benchmark.finetune_start", "benchmark.ssl_benefit", "benchmark.clustering",
                                    "benchmark.full_res_width", "demo.rank"])
def test_json_outputs_are_checked_when_the_command_starts(tmp_path, capsys, module):
    """`logonet_benchmark --json FOLDER` ran the whole benchmark, then failed with a traceback and left a .partial
    file beside the folder; every command's --json is refused first: a folder, a path below a file, no name."""
    import importlib

    main = importlib.import_module(f"nnunet_logonet.{module}").main
    (tmp_path / "a_file").write_text("x")
    for bad, message in ((str(tmp_path), "is a folder; give a file name such as"),
                         (str(tmp_path / "a_file" / "out.json"), "a_file is a file, so nothing can be written below it"),
                         ("", "is not a file name")):
        with pytest.raises(SystemExit) as stop:
            main(["--json", bad])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
