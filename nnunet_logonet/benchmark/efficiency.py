"""``logonet_benchmark``: what LoGoNet costs next to nnU-Net's own networks, measured in one run.

For every model (see :mod:`nnunet_logonet.benchmark.models`) it measures, on one device:

* parameters;
* multiply-accumulates of one forward pass at batch 1, counted by fvcore's ``FlopCountAnalysis``
  (fvcore counts one "flop" per multiply-accumulate, the unit the paper's GFLOPs most likely are);
* forward latency per patch (batch 1, eval mode, no grad);
* one training iteration as ``nnUNetTrainer.train_step`` does it (batch ``--batch-size``, train mode,
  nnU-Net's Dice+CE loss on the full-resolution output, backward, gradient clipping at 12, SGD
  with Nesterov momentum), autocast fp16 on CUDA with ``--amp``. The SGD is the one the model's
  trainer builds: PyTorch's default for nnU-Net's networks (``nnUNetTrainer``), the fused CPU kernel
  for ours (``LoGoNetTrainer``, ``training.recipes.optimizer_implementation``), so the figure is
  what a user of each trainer waits for;
* peak memory of that training loop: on CPU the peak resident set (Linux ``VmHWM``, reset just
  before the loop) minus the resident set before the model was built; on CUDA
  ``torch.cuda.max_memory_allocated`` after a reset;
* the time to predict one whole case with nnU-Net's own ``nnUNetPredictor`` sliding window
  (Gaussian weighting, ``--tile-step-size`` 0.5, mirroring off unless ``--mirroring``) on a random
  case of ``--case-size`` (default 1.5x the patch per axis, i.e. 8 tiles).

Each time is the median of ``--repeats`` runs after ``--warmup`` runs, and every figure is also
given as a ratio to nnU-Net's default network (``nnunet``) measured in the same run. The default
patch is the paper's 96^3 on CUDA and 64^3 on CPU (the six-model 96^3 run takes ~15 min on 2 cores).
Each model runs in a fresh Python process (``--no-isolate`` to run in-process), so its memory peak is
its own. ``--interleave ROUNDS`` instead times all models in one process in alternating rounds and
gives paired ratios, which a shared machine's drift does not move (``benchmark.interleaved``).

``--reference-kernels`` runs LoGoNet/ULKANet with every fast path off (the "before" of docs/speed.md);
``--without LEVER ...`` adds a row per LoGoNet/ULKANet model with only those levers off, measured in
the same run, for the before/after of single levers (``network.levers.LEVERS``).

    logonet_benchmark --device cpu --patch-size 32 64 64 --json docs/benchmarks/cpu_32x64x64.json
    logonet_benchmark --models nnunet logonet_s --without narrowing_weight_grad
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from nnunet_logonet.benchmark.measure import (DEFAULTS, BenchmarkSettings, available_memory_mb, default_settings,
                                              estimate_memory_mb, measure_model)
from nnunet_logonet.benchmark.models import (
    MODELS,
    REFERENCE_MODEL,
    DatasetPlans,
    ModelSpec,
    PlansNotFoundError,
    load_dataset_plans,
    resolve_model,
)
from nnunet_logonet.benchmark.records import (FIGURES, add_ratios, describe_allocator, device_info,
                                              partial_json_path, publish_json)
from nnunet_logonet.figures import figure_path
from nnunet_logonet.machine import cpu_kind
from nnunet_logonet.network.levers import LEVERS
from nnunet_logonet.workfolders import output_file_argument, write_json_whole

__all__ = ["run_benchmark", "format_table", "build_parser", "main"]

EXIT_USAGE = 2


# --------------------------------------------------------------------------- orchestration
def _spec_from_json(data: dict[str, Any]) -> ModelSpec:
    data = dict(data)
    data["patch_size"] = tuple(data["patch_size"])
    data["kw_requires_import"] = tuple(data["kw_requires_import"])
    data["without_levers"] = tuple(data.get("without_levers", ()))
    return ModelSpec(**data)


def _spec_to_worker_json(spec: ModelSpec) -> dict[str, Any]:
    return {k: getattr(spec, k) for k in ModelSpec.__dataclass_fields__}


def _worker(request_file: str, response_file: str) -> None:
    """Entry of the per-model process: read the request, measure, write the result atomically."""
    request = json.loads(Path(request_file).read_text())
    result = measure_model(_spec_from_json(request["spec"]), BenchmarkSettings(**request["settings"]),
                           skip_training=request.get("skip_training"))
    write_json_whole(response_file, result)


def _run_isolated(spec: ModelSpec, settings: BenchmarkSettings, skip_training: str | None) -> dict[str, Any]:
    """``measure_model`` in a fresh Python process, so the memory peak and caches are this model's own."""
    with tempfile.TemporaryDirectory(prefix="logonet_benchmark_") as tmp:
        request, response = os.path.join(tmp, "request.json"), os.path.join(tmp, "result.json")
        Path(request).write_text(json.dumps({"spec": _spec_to_worker_json(spec), "settings": vars(settings),
                                             "skip_training": skip_training}))
        proc = subprocess.run([sys.executable, "-m", "nnunet_logonet.benchmark.efficiency", "--worker", request,
                               response], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0 and os.path.isfile(response):
            return json.loads(Path(response).read_text())
        tail = "\n".join(proc.stdout.strip().splitlines()[-3:])
        killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
        return {"status": "failed", "note": f"worker exit code {proc.returncode}{killed}: {tail}"}


def run_benchmark(specs: Sequence[ModelSpec], settings: BenchmarkSettings, *, isolate: bool = True,
                  memory_check: bool = True, json_path: str | os.PathLike | None = None,
                  meta: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every model and return the report, written to ``json_path`` once every model ran.

    Until then the figures so far are kept in ``json_path + '.partial'`` (rewritten after each model), and
    an existing ``json_path`` is left untouched: an interrupted rerun does not cost the last complete record.
    """
    from tqdm import tqdm

    device = torch.device(settings.device)
    report: dict[str, Any] = {
        **(meta or {}),
        "device_info": device_info(device),
        "settings": {**vars(settings), "reference_model": REFERENCE_MODEL,
                     "memory_isolation": "one process per model" if isolate else "in-process",
                     "flop_counter": "fvcore FlopCountAnalysis at batch 1; fvcore counts one flop per "
                                     "multiply-accumulate, so 'macs' are multiply-accumulates (MACs)",
                     "timing": "median of repeats after warmup; seconds"},
        "models": {},
    }
    available = available_memory_mb(device) if memory_check else None
    bar = tqdm(specs, desc="models", unit="model", disable=not progress, file=sys.stderr)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        estimate = estimate_memory_mb(spec, settings.batch_size, settings.device)
        skip_training = None
        entry: dict[str, Any] = {"spec": spec.to_json(), "estimate": estimate}
        if available is not None and estimate["inference_mb"] > available:
            result = {"status": "skipped",
                      "note": f"skipped: needs ~{estimate['inference_mb'] / 1024:.1f} GB even for inference, "
                              f"{available / 1024:.1f} GB available"}
        else:
            if available is not None and estimate["train_mb"] > available:
                skip_training = (f"needs ~{estimate['train_mb'] / 1024:.1f} GB at batch {settings.batch_size}, "
                                 f"{available / 1024:.1f} GB available")
            load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            if isolate:
                result = _run_isolated(spec, settings, skip_training)
            else:
                try:
                    result = measure_model(spec, settings, skip_training=skip_training)
                except RuntimeError as error:  # out of memory and the like: report, go on with the others
                    result = {"status": "failed", "note": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            result.setdefault("details", {}).update(
                load_average_before=load, load_average_after=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
        entry.update(result)
        report["models"][spec.name] = entry
        add_ratios(report["models"])
        report["device_info"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        if json_path is not None:
            write_json_whole(partial_json_path(json_path), report)
    bar.close()
    if json_path is not None:
        publish_json(json_path, report)
    return report


# ------------------------------------------------------------------------------------ output
def _patch_note(report: dict[str, Any]) -> str:
    """Says so when the patch is the CPU default rather than the paper's 96^3."""
    if report.get("patch_size_from") == "cpu default":
        return " (cpu default; the paper's size: --patch-size 96 96 96, ~15 min on 2 cores)"
    return ""


def format_table(report: dict[str, Any]) -> str:
    """One row per model: each figure with its ratio to nnU-Net's default network."""
    header = ["model", "layout", *(title for title, _, _ in FIGURES.values())]
    rows = [header]
    notes = []
    for name, entry in report["models"].items():
        figures, ratios = entry.get("figures", {}), entry.get("ratios", {})
        row = [name, entry.get("details", {}).get("layout", "-")]
        for key, (_, scale, fmt) in FIGURES.items():
            value = figures.get(key)
            if value is None:
                row.append("-")
                continue
            ratio = ratios.get(key)
            row.append(fmt.format(value / scale) + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        rows.append(row)
        for note in ([entry["note"]] if entry.get("note") else []) + entry.get("details", {}).get("notes", []):
            notes.append(f"{name}: {note}")
        step_costs = entry.get("details", {}).get("process_costs_per_call", {}).get("train_step_s")
        if step_costs and report["device_info"]["device"] == "cpu":
            notes.append(f"{name}: {step_costs['minor_page_faults'] / 1e6:.2f} M minor page faults per training "
                         f"step ({step_costs['system_s']:.2f} s system time)")
        ranges = {k: v for k, v in entry.get("ratio_ranges", {}).items() if name != REFERENCE_MODEL}
        if ranges:
            notes.append(f"{name}: per-round ratios " + ", ".join(
                f"{FIGURES[k][0].split()[0]} {lo:.2f}x-{hi:.2f}x" for k, (lo, hi) in ranges.items()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s, info = report["settings"], report["device_info"]
    tiles = next((e["details"].get("sliding_window_tiles") for e in report["models"].values()
                  if e.get("details", {}).get("sliding_window_tiles")), "?")
    where = info.get("gpu") or cpu_kind(info)
    timing = (f"times: median of {s['interleave_rounds']} interleaved rounds (every model once per round, order "
              f"rotating); ratios (x): medians of the per-round ratios to {REFERENCE_MODEL}; no memory peak"
              if s.get("interleave_rounds") else
              f"times: median of {s['repeats']} after {s['warmup']} warm-up (sliding window: {s['sw_repeats']} after "
              f"{s['sw_warmup']}); ratios (x) to {REFERENCE_MODEL}")
    intro = [
        f"device {info['device']} ({where}), {info['torch_threads']} threads, torch {info['torch']}, "
        f"load average {', '.join(f'{v:.1f}' for v in info.get('load_average_start') or [])}",
        f"patch {report['patch_size']}{_patch_note(report)}, training batch {s['batch_size']}, case {s['case_size']} ({tiles} tiles, "
        f"step {s['tile_step_size']}, mirroring {'on' if s['mirroring'] else 'off'}), amp {'on' if s['amp'] else 'off'}",
        f"{timing}; GMACs counted by fvcore (multiply-accumulates)",
        *([describe_allocator(info.get("allocator") or {})] if info["device"] == "cpu" else []),
        "",
    ]
    return "\n".join(intro + lines + ([""] + notes if notes else []))


# --------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logonet_benchmark",
        description="Parameters, MACs, latency, training-iteration time, peak memory and sliding-window time of "
                    "LoGoNet and nnU-Net's networks, side by side, as ratios to nnU-Net's default network.")
    parser.add_argument("-device", "--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--patch-size", nargs=3, type=int, metavar=("D", "H", "W"), default=None,
                       help="patch size (default: 96 96 96 on cuda, the paper's; 64 64 64 on cpu, so that the "
                            "six-model run takes minutes, not a quarter of an hour)")
    where.add_argument("-d", "--dataset", default=None,
                       help="dataset ID or name: patch size, spacing, classes and the nnunet model come from its "
                            "$nnUNet_preprocessed/DatasetXXX/nnUNetPlans.json (3d_fullres)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                        help=f"models to run (default: all): {', '.join(MODELS)}")
    parser.add_argument("--num-classes", type=int, default=None, help="output classes incl. background (default 14)")
    parser.add_argument("--input-channels", type=int, default=None, help="input channels (default 1)")
    parser.add_argument("--batch-size", type=int, default=2, help="training batch size (default 2, nnU-Net's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: cpu 1, cuda 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default: cpu 3, cuda 10)")
    parser.add_argument("--sw-repeats", type=int, default=None,
                        help="timed sliding-window runs (default: cpu 1, one case is already 8 forward passes; "
                             "cuda as --repeats)")
    parser.add_argument("--case-size", nargs=3, type=int, metavar=("D", "H", "W"), default=None,
                        help="case size for the sliding-window time (default 1.5x the patch per axis)")
    parser.add_argument("--tile-step-size", type=float, default=0.5, help="sliding-window step (default 0.5)")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring in the sliding window (8x)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="fp16 autocast on CUDA (default on for cuda; CPU always runs fp32)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last_3d for LoGoNet/ULKANet (default on; nnU-Net's networks stay contiguous)")
    parser.add_argument("--reference-kernels", action="store_true",
                        help="run LoGoNet/ULKANet with plain PyTorch ops, without their CPU speed-ups (the 'before' "
                             "of docs/speed.md); nnU-Net's networks are not affected")
    parser.add_argument("--without", nargs="+", action="append", default=None, metavar="LEVER", choices=list(LEVERS),
                        help="also measure every LoGoNet/ULKANet model with these fast paths off, in the same run "
                             "(a row '<model>-without-<levers>' after each; repeat the flag for one row per "
                             f"group): the before/after of single levers (docs/speed.md). Levers: {', '.join(LEVERS)}")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every network first (nnU-Net compiles on CUDA by default); the warm-up "
                             "runs include the compilation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--interleave", type=int, default=None, metavar="ROUNDS",
                        help="time the models in alternation in one process: ROUNDS rounds per figure, every "
                             "model once per round in a rotating order; ratios are the medians of the per-round "
                             "ratios to nnunet, so a drifting shared machine hits all models alike. No memory "
                             "peak (docs/speed.md)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                        help="one fresh process per model, for honest memory peaks (default on)")
    parser.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                        help="skip what the feature-map estimate says cannot fit in free memory (default on)")
    parser.add_argument("--json", type=output_file_argument, default=None, metavar="FILE",
                        help="write every figure and the device info here when the run completes; until then the "
                             "figures so far are kept in FILE.partial and an existing FILE is left untouched")
    parser.add_argument("--chart", default=None, type=figure_path, metavar="PNG",
                        help="also draw each model's time ratios to nnunet here (the chart of "
                             "`python -m nnunet_logonet.benchmark.ratio_chart`, which puts several runs' JSONs side by side)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_device(name: str) -> torch.device:
    """``--device`` as a torch device: cpu or an available CUDA device, else ValueError with the fix."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    return device


def _usage_error(message: str) -> int:
    print(f"logonet_benchmark: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 2 with a message for bad flags, models, patch sizes or datasets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # the per-model process started by _run_isolated
        _worker(*argv[1:3])
        return 0
    args = build_parser().parse_args(argv)

    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        return _usage_error(f"unknown model(s) {', '.join(unknown)} in --models; valid models: {', '.join(MODELS)}")
    try:
        device = parse_device(args.device)
    except ValueError as error:
        return _usage_error(str(error))
    for flag in ("batch_size", "repeats", "sw_repeats", "threads", "num_classes", "input_channels", "interleave"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            return _usage_error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.num_classes == 1:
        return _usage_error("--num-classes counts the background too: 1 leaves nothing to segment; use 2 or more")
    if args.interleave is not None and (args.repeats or args.sw_repeats or args.warmup is not None):
        return _usage_error("--interleave ROUNDS times every figure ROUNDS times after one warm-up run; "
                            "drop --repeats, --sw-repeats and --warmup")
    if args.warmup is not None and args.warmup < 0:
        return _usage_error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 < args.tile_step_size <= 1:
        return _usage_error(f"--tile-step-size must be in (0, 1], got {args.tile_step_size}")

    plans: DatasetPlans | None = None
    if args.dataset is not None:
        try:
            plans = load_dataset_plans(args.dataset)
        except PlansNotFoundError as error:
            return _usage_error(str(error))
        if args.num_classes is not None or args.input_channels is not None:
            return _usage_error("-d takes --num-classes and --input-channels from the dataset; drop those flags")
    defaults = DEFAULTS[device.type]
    patch = list(plans.patch_size if plans else (args.patch_size or defaults["patch_size"]))
    if min(patch) < 1:
        return _usage_error(f"--patch-size entries must be >= 1, got {patch}")
    spacing = list(plans.spacing) if plans else [1.0, 1.0, 1.0]
    input_channels = plans.input_channels if plans else (args.input_channels or 1)
    num_classes = plans.num_classes if plans else (args.num_classes or 14)

    models = list(dict.fromkeys(args.models))
    specs = []
    for name in models:
        try:
            spec = resolve_model(name, patch_size=patch, spacing=spacing, input_channels=input_channels,
                                 num_classes=num_classes, plans=plans)
        except ValueError as error:
            hint = "" if plans else " Choose another --patch-size or leave this model out of --models."
            return _usage_error(f"{name}: {error}{hint}")
        specs.append(spec)
        for group in args.without or []:
            if spec.network_class_name.startswith("nnunet_logonet."):  # the levers are ours
                levers = tuple(dict.fromkeys(group))
                specs.append(dataclasses.replace(spec, name=f"{spec.name}-without-{'+'.join(levers)}",
                                                 without_levers=levers))
    if args.without and args.reference_kernels:
        return _usage_error("--without switches single fast paths off, --reference-kernels all of them; "
                            "use one of the two")
    if args.without and len(specs) == len(models):  # nothing was added
        return _usage_error(f"--without applies to LoGoNet/ULKANet models; --models has none ({', '.join(models)})")

    if args.chart and REFERENCE_MODEL not in models:
        return _usage_error(f"--chart draws each model's time as a ratio to {REFERENCE_MODEL}'s in the same run; "
                            f"add {REFERENCE_MODEL} to --models")
    if args.amp and device.type != "cuda":
        print("logonet_benchmark: --amp applies to CUDA only; the CPU runs fp32 as nnU-Net does", file=sys.stderr)
    if args.case_size and any(c < 1 for c in args.case_size):
        return _usage_error(f"--case-size entries must be >= 1, got {args.case_size}")
    settings = default_settings(
        device, patch, batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats,
        sw_repeats=args.sw_repeats, amp=args.amp, channels_last=args.channels_last, mirroring=args.mirroring,
        tile_step_size=args.tile_step_size, case_size=args.case_size, threads=args.threads, seed=args.seed,
        reference_kernels=args.reference_kernels, compile=args.compile)
    meta = {
        "benchmark": "logonet_benchmark",
        "command": shlex.join(["logonet_benchmark", *argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "patch_size": patch,
        "patch_size_from": ("-d" if plans else "--patch-size" if args.patch_size else f"{device.type} default"),
        "spacing": spacing,
        "input_channels": input_channels,
        "num_classes": num_classes,
        "dataset": {"name": plans.name, "plans_file": plans.plans_file} if plans else None,
    }
    if args.interleave is not None:
        from .interleaved import run_interleaved

        report = run_interleaved(specs, settings, args.interleave, memory_check=args.memory_check,
                                 json_path=partial_json_path(args.json) if args.json else None, meta=meta,
                                 progress=not args.no_progress)
        if args.json:
            publish_json(args.json, report)
    else:
        report = run_benchmark(specs, settings, isolate=args.isolate, memory_check=args.memory_check,
                               json_path=args.json, meta=meta, progress=not args.no_progress)
    print(format_table(report))
    if args.json:
        print(f"\nwrote {args.json}")
    if args.chart:
        _draw_chart(report, args.json, args.chart)
    return 0


def _draw_chart(report: dict[str, Any], json_path: str | None, chart: str) -> None:
    from .ratio_chart import BenchmarkRecordError, plot_ratios, run_ratios

    try:
        run = run_ratios(report, Path(json_path or chart))
    except BenchmarkRecordError as error:  # e.g. the reference model could not run here
        print(f"no chart: {error}", file=sys.stderr)
        return
    if not run.ratios:
        print(f"no chart: nothing to compare with {REFERENCE_MODEL} in this run", file=sys.stderr)
        return
    plot_ratios([run], list(run.ratios), chart)
    print(f"wrote {chart}")


if __name__ == "__main__":
    sys.exit(main())
