"""Chart and table of LoGoNet's time ratios to nnU-Net's default network over ``logonet_benchmark`` runs.

Every JSON that ``logonet_benchmark --json`` wrote holds, per model, its forward, training-step and
sliding-window time as ratios to nnU-Net's default network timed in the same run (issue 7's targets:
at most 1.0x, aim 0.7x), and for ``--interleave`` runs the range of those ratios over the rounds. This
command puts many runs side by side, one row per run and model, so that machines, patch sizes and
timing modes can be compared at a glance:

    python -m nnunet_logonet.benchmark.ratio_chart docs/benchmarks/cpu_*.json -o ratios.png
    python -m nnunet_logonet.benchmark.ratio_chart my_run.json --models logonet_s --figures train sw

The table is printed in any case; ``-o`` also draws it (log-scaled axes, the 1.0x and 0.7x lines).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from nnunet_logonet.benchmark.models import REFERENCE_MODEL
from nnunet_logonet.figures import figure_path, save_figure
from nnunet_logonet.machine import cpu_kind

__all__ = ["FIGURES", "BenchmarkRecordError", "RunRatios", "load_run", "run_ratios", "run_label", "format_table",
           "plot_ratios", "main"]

#: the figures a chart can show: command-line name -> (key in the record, title)
FIGURES = {
    "forward": ("forward_s", "inference forward, batch 1"),
    "train": ("train_step_s", "training step"),
    "sw": ("sliding_window_s", "sliding window, per case"),
    "memory": ("peak_memory_mb", "peak memory"),
}
DEFAULT_FIGURES = ("forward", "train", "sw")
DEFAULT_MODELS = ("logonet_s", "logonet_tiny")
TARGET, AIM = 1.0, 0.7  # issue 7


class BenchmarkRecordError(ValueError):
    """A file that is not a readable ``logonet_benchmark`` record, or one without what was asked for."""


@dataclass(frozen=True)
class RunRatios:
    """One run's ratios to its reference model: ``ratios[model][figure]`` and, for interleaved runs,
    ``ranges[model][figure] = (lowest, highest)`` over the rounds."""

    path: Path
    label: str
    ratios: dict[str, dict[str, float]]
    ranges: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)


def run_label(report: Mapping[str, Any]) -> str:
    """Machine, patch, timing mode and date of a run, plus whatever made it unlike a default run and the
    commit of the code where the record has it (runs of one day on one machine told apart)."""
    info = report.get("device_info") or {}
    settings = report.get("settings") or {}
    if (info.get("device") or settings.get("device")) == "cuda":
        machine = str(info.get("gpu") or "CUDA GPU").replace("NVIDIA ", "")
    else:
        machine = cpu_kind(info)
    patch = [int(s) for s in report.get("patch_size") or ()]
    size = f"{patch[0]}^3" if patch and len(set(patch)) == 1 else "x".join(map(str, patch)) or "patch ?"
    rounds = settings.get("interleave_rounds")
    parts = [machine, size, f"interleaved x{rounds}" if rounds else "alone"]
    if settings.get("mirroring"):
        parts.append("mirroring")
    if settings.get("reference_kernels"):
        parts.append("reference kernels")
    if settings.get("amp"):
        parts.append("AMP")
    if settings.get("compile"):
        parts.append("compiled")
    allocator = info.get("allocator") or {}
    if allocator:
        parts.append(" ".join(f"{k}={v}" for k, v in allocator.items()))
    if info.get("nnunet_logonet_revision"):
        parts.append(f"code {info['nnunet_logonet_revision']}")
    date = str(report.get("date") or "")[:10]
    return ", ".join(parts + ([date] if date else []))


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BenchmarkRecordError(f"{path}: no such file; give JSON files written by "
                                   "`logonet_benchmark --json FILE`") from None
    except OSError as error:
        raise BenchmarkRecordError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as error:
        raise BenchmarkRecordError(f"{path}: not JSON (line {error.lineno}: {error.msg}); give JSON files "
                                   "written by `logonet_benchmark --json FILE`") from None
    if not isinstance(report, dict) or report.get("benchmark") != "logonet_benchmark" \
            or not isinstance(report.get("models"), dict):
        what = report.get("benchmark") if isinstance(report, dict) else type(report).__name__
        raise BenchmarkRecordError(
            f"{path}: not a logonet_benchmark record (its 'benchmark' field is {what!r}); `logonet_lever_ab` "
            "and the study commands write other records, which this chart does not read")
    return report


def load_run(path: str | os.PathLike) -> RunRatios:
    """The ratios of every model in one ``logonet_benchmark`` JSON to the run's reference model."""
    path = Path(path)
    return run_ratios(_read(path), path)


def run_ratios(report: Mapping[str, Any], path: Path) -> RunRatios:
    """The ratios of every model in a ``logonet_benchmark`` report (read from ``path``) to its reference model."""
    reference = (report.get("settings") or {}).get("reference_model") or REFERENCE_MODEL
    entries = report["models"]
    ref_figures = (entries.get(reference) or {}).get("figures") or {}
    if not any(isinstance(ref_figures.get(key), (int, float)) for key, _ in FIGURES.values()):
        raise BenchmarkRecordError(
            f"{path}: the run has no timings of its reference model {reference!r} (models: {', '.join(entries)}), "
            f"so no ratios; rerun logonet_benchmark with {reference} among --models")
    ratios: dict[str, dict[str, float]] = {}
    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    for name, entry in entries.items():
        if name == reference or not isinstance(entry, dict):
            continue
        stored, figures = entry.get("ratios") or {}, entry.get("figures") or {}
        values = {}
        for key, _ in FIGURES.values():
            value = stored.get(key)
            if value is None and isinstance(figures.get(key), (int, float)) and ref_figures.get(key):
                value = figures[key] / ref_figures[key]
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                values[key] = float(value)
        if values:
            ratios[name] = values
            spans = {k: (float(v[0]), float(v[1])) for k, v in (entry.get("ratio_ranges") or {}).items()
                     if k in values and isinstance(v, (list, tuple)) and len(v) == 2}
            if spans:
                ranges[name] = spans
    return RunRatios(path=path, label=run_label(report), ratios=ratios, ranges=ranges)


def _figure_keys(figures: Sequence[str]) -> list[tuple[str, str]]:
    return [FIGURES[name] for name in figures]


def _rows(runs: Sequence[RunRatios], models: Sequence[str]) -> list[tuple[RunRatios, str]]:
    return [(run, model) for run in runs for model in models if model in run.ratios]


def format_table(runs: Sequence[RunRatios], models: Sequence[str], figures: Sequence[str] = DEFAULT_FIGURES) -> str:
    """A markdown table: one row per run and model, each figure's ratio (and range over rounds)."""
    keys = _figure_keys(figures)
    lines = ["| run | model | " + " | ".join(title for _, title in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for run, model in _rows(runs, models):
        cells = []
        for key, _ in keys:
            value = run.ratios[model].get(key)
            span = run.ranges.get(model, {}).get(key)
            cell = "-" if value is None else f"{value:.2f}x"
            if value is not None and span:
                cell += f" ({span[0]:.2f}x-{span[1]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {run.label} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ticks(low: float, high: float) -> list[float]:
    """Round ratios to label on the log axis; over a wide range only those a decade's labels leave room for."""
    candidates = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0]
    if high / low > 8:
        candidates = [t for t in candidates if t not in (0.3, 1.5)]
    return [t for t in candidates if low <= t <= high]


def plot_ratios(runs: Sequence[RunRatios], models: Sequence[str], path: str | os.PathLike,
                figures: Sequence[str] = DEFAULT_FIGURES) -> None:
    """Draw one panel per figure, a row per run and a marker per model (bars: range over rounds),
    on a log axis with the target (1.0x) and the aim (0.7x); written to a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    keys = _figure_keys(figures)
    present = [m for m in models if any(m in run.ratios for run in runs)]
    shown = [key for key, _ in keys]
    values = [x for run in runs for m in present for key in shown
              for x in (run.ratios.get(m, {}).get(key), *run.ranges.get(m, {}).get(key, ())) if x is not None]
    low, high = min(values + [AIM]) / 1.25, max(values + [TARGET]) * 1.25
    colours = plt.get_cmap("tab10")
    height = 0.8 / max(1, len(present))
    fig_height = 0.42 * len(runs) * max(1, len(present)) ** 0.5 + 1.8
    fig, axes = plt.subplots(1, len(keys), sharey=True, squeeze=False, figsize=(3.3 * len(keys) + 4.5, fig_height))
    labelled: set[str] = set()  # each model once in the legend
    for ax, (key, title) in zip(axes[0], keys):
        for j, model in enumerate(present):
            for i, run in enumerate(runs):
                value = run.ratios.get(model, {}).get(key)
                if value is None:
                    continue
                y = len(runs) - 1 - i + (len(present) - 1) / 2 * height - j * height
                span = run.ranges.get(model, {}).get(key)
                xerr = [[value - span[0]], [span[1] - value]] if span else None
                ax.errorbar(value, y, xerr=xerr, fmt="o", color=colours(j), markersize=5, capsize=2,
                            label=None if model in labelled else model)
                labelled.add(model)
                ax.annotate(f"{value:.2f}", (value, y), xytext=(0, 4), textcoords="offset points", ha="center",
                            va="bottom", fontsize=6.5, color=colours(j))
        ax.axvline(TARGET, color="black", linewidth=1)
        ax.axvline(AIM, color="grey", linewidth=1, linestyle="--")
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ticks = _ticks(low, high)
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks], fontsize=8)
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(runs)), [run.label for run in runs][::-1], fontsize=8)
    axes[0][0].set_ylim(-0.6, len(runs) - 0.4)
    handles, labels = [], []
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.append(handle)
            labels.append(label)
    handles += [plt.Line2D([], [], color="black", linewidth=1), plt.Line2D([], [], color="grey", linestyle="--")]
    labels += ["nnU-Net's default network (1.0x)", f"aim ({AIM}x)"]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Time relative to nnU-Net's default network timed in the same run (lower is faster)", fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / fig_height, 1, 1))  # room for the legend: a third of an inch
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_logonet.benchmark.ratio_chart",
        description="Table (and with -o a chart) of each model's time ratios to nnU-Net's default network "
                    "over logonet_benchmark JSON records.")
    parser.add_argument("records", nargs="+", help="JSON files written by `logonet_benchmark --json`; one row each")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="models to show (default: %(default)s)")
    parser.add_argument("--figures", nargs="+", choices=list(FIGURES), default=list(DEFAULT_FIGURES),
                        help="figures to show (default: %(default)s)")
    parser.add_argument("-o", "--output", type=figure_path, help="also draw the chart to this PNG file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [load_run(path) for path in args.records]
    except BenchmarkRecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not _rows(runs, args.models):
        found = sorted({m for run in runs for m in run.ratios})
        print(f"error: none of the {len(runs)} runs timed {', '.join(args.models)}; they have: "
              f"{', '.join(found) or 'no model besides the reference'} (choose with --models)", file=sys.stderr)
        return 2
    print(format_table(runs, args.models, args.figures))
    for model in args.models:
        if not any(model in run.ratios for run in runs):
            print(f"note: {model} was timed in none of these runs")
    if args.output:
        plot_ratios([run for run in runs if any(m in run.ratios for m in args.models)], args.models, args.output,
                    args.figures)
        print(f"chart: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
