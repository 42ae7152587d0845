"""``python -m nnunet_logonet.benchmark.ratio_chart``: logonet_benchmark records side by side, as a table and a chart."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_logonet.benchmark import ratio_chart

RECORDS = Path(__file__).parents[1] / "docs" / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTED = {key for key, _ in ratio_chart.FIGURES.values()}


def _benchmark_records() -> list[Path]:
    return sorted(p for p in RECORDS.rglob("*.json") if json.loads(p.read_text()).get("benchmark") == "logonet_benchmark")


def _table_rows(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]


def test_every_committed_record_loads_with_its_stored_ratios_and_a_label_naming_the_run():
    records = _benchmark_records()
    assert len(records) >= 20  # the runs docs/speed.md and README quote
    for path in records:
        report = json.loads(path.read_text())
        run = ratio_chart.load_run(path)
        assert "nnunet" not in run.ratios
        for name, entry in report["models"].items():
            if name == "nnunet":
                continue
            for key, value in entry["ratios"].items():
                if key in CHARTED and value is not None:
                    assert run.ratios[name][key] == pytest.approx(value)
        patch = report["patch_size"]
        assert (f"{patch[0]}^3" if len(set(patch)) == 1 else "x".join(map(str, patch))) in run.label
        assert report["date"][:10] in run.label
        rounds = report["settings"].get("interleave_rounds")
        assert (f"interleaved x{rounds}" if rounds else "alone") in run.label
        assert ("reference kernels" in run.label) == bool(report["settings"].get("reference_kernels"))
        assert ("GLIBC_TUNABLES" in run.label) == ("GLIBC_TUNABLES" in report["device_info"].get("allocator", {}))
        revision = report["device_info"].get("nnunet_logonet_revision")
        assert ("code " in run.label) == bool(revision) and (not revision or f"code {revision}" in run.label)
    labels = {p.name: ratio_chart.load_run(p).label for p in records}
    assert labels["cpu_64_epyc_zen4_faults.json"].startswith("AMD EPYC Zen 4, 64^3, alone")
    assert labels["cpu_64_xeon_cascadelake.json"].startswith("Xeon Cascade Lake, 64^3")  # family 6 model 85 + VNNI
    assert labels["cpu_64.json"].startswith("Intel Xeon, 64^3")  # recorded before the family was kept
    assert labels["cuda_96_h100.json"].startswith("H100 80GB HBM3, 96^3, alone, AMP")


def test_interleaved_records_carry_the_range_over_rounds_into_table_and_chart(tmp_path, capsys):
    record = RECORDS / "cpu_96_epyc_zen4_interleaved.json"
    stored = json.loads(record.read_text())["models"]["logonet_s"]
    chart = tmp_path / "charts" / "zen4.png"
    assert ratio_chart.main([str(record), "--models", "logonet_s", "logonet_tiny", "-o", str(chart)]) == 0
    out = capsys.readouterr().out
    rows = _table_rows(out)
    assert [row[1] for row in rows] == ["logonet_s"]
    low, high = stored["ratio_ranges"]["sliding_window_s"]
    assert rows[0][4] == f"{stored['ratios']['sliding_window_s']:.2f}x ({low:.2f}x-{high:.2f}x)"
    assert "note: logonet_tiny was timed in none of these runs" in out
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in chart.parent.iterdir()] == ["zen4.png"]  # no temporary file left


def test_figures_and_models_choose_columns_and_rows(capsys):
    records = [str(RECORDS / "cpu_64_epyc_zen4_faults.json"), str(RECORDS / "cpu_96_epyc_zen4.json")]
    assert ratio_chart.main([*records, "--figures", "train", "memory"]) == 0
    out = capsys.readouterr().out
    assert "| run | model | training step | peak memory |" in out
    rows = _table_rows(out)
    assert [(row[0].split(",")[1].strip(), row[1]) for row in rows] == [
        ("64^3", "logonet_s"), ("64^3", "logonet_tiny"), ("96^3", "logonet_s")]
    assert all(cell.endswith("x") for row in rows for cell in row[2:])


def test_a_failed_drawing_keeps_the_previous_chart(tmp_path, monkeypatch):
    import matplotlib.figure

    chart = tmp_path / "ratios.png"
    chart.write_bytes(b"the previous chart")

    def broken_savefig(self, fname, **kwargs):
        Path(fname).write_bytes(PNG_MAGIC)  # half a file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    run = ratio_chart.load_run(RECORDS / "cpu_64_epyc_zen4_faults.json")
    with pytest.raises(OSError, match="disk full"):
        ratio_chart.plot_ratios([run], ["logonet_s"], chart)
    assert chart.read_bytes() == b"the previous chart"
    assert [p.name for p in tmp_path.iterdir()] == ["ratios.png"]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON (line 1"),
    (json.dumps({"lever": "pointwise_gemm", "rounds": []}), "not a logonet_benchmark record"),
    (json.dumps({"benchmark": "logonet_benchmark", "models": {"logonet_s": {"figures": {"forward_s": 1.0}}},
                 "settings": {"reference_model": "nnunet"}}), "no timings of its reference model 'nnunet'"),
])
def test_bad_records_are_refused_naming_the_file_and_the_fix(tmp_path, capsys, content, message):
    path = tmp_path / "record.json"
    if content is not None:
        path.write_text(content)
    assert ratio_chart.main([str(RECORDS / "cpu_64.json"), str(path), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    assert not (tmp_path / "out.png").exists()  # nothing drawn from a partial set


def test_models_no_run_timed_are_refused_listing_those_it_did(capsys):
    assert ratio_chart.main([str(RECORDS / "cpu_96_epyc_zen4.json"), "--models", "logonet_l"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 runs timed logonet_l" in err and "logonet_s" in err


def test_the_chart_command_in_the_benchmarks_readme_names_records_that_exist(capsys):
    text = (RECORDS / "README.md").read_text()
    block = text.split("## All runs at a glance", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    args = block.replace("\\\n", " ").split()
    assert args[:3] == ["python", "-m", "nnunet_logonet.benchmark.ratio_chart"]
    records = [a for a in args if a.endswith(".json")]
    assert len(records) >= 10 and all((RECORDS / r).is_file() for r in records)
    assert ratio_chart.main([str(RECORDS / r) for r in records]) == 0  # the table, without redrawing ratios.png
    assert len(_table_rows(capsys.readouterr().out)) >= len(records)


def test_a_record_without_stored_ratios_gets_them_as_the_models_time_over_the_references():
    """Older records keep only the seconds; a ratio computed the wrong way round turns 'slower than nnU-Net'
    into 'faster'."""
    record = json.loads(_benchmark_records()[0].read_text())
    keys = sorted(CHARTED)
    record["models"] = {"nnunet": {"figures": {key: 2.0 for key in keys}},
                        "logonet_s": {"figures": {key: 3.0 for key in keys}}}
    run = ratio_chart.run_ratios(record, Path("old.json"))
    assert run.ratios == {"logonet_s": {key: pytest.approx(1.5) for key in keys}}
