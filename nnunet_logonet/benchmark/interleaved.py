"""``logonet_benchmark --interleave ROUNDS``: the models timed in alternation in one process.

On a shared machine the speed drifts by 10-30 % between runs, and even between the minutes of one
run (docs/speed.md, "CPU, 2-core AMD EPYC": LoGoNet-S's training ratio read 0.87x-1.37x over runs of
the same code). The default benchmark measures one model after the other, so the drift lands in the
ratios. Here every model is built in one process and each figure is timed in rounds: in round r
every model runs once, the order rotated by r (nnunet, logonet_s / logonet_s, nnunet / ...), so the
models of a round see the same machine. A model's ratio is the median over rounds of its time
divided by ``nnunet``'s time in the same round; the table's notes give the range of those per-round
ratios. No memory peak is measured (one process holds every model); the default mode does that.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from statistics import median
from typing import Any, Callable, ContextManager, Sequence

import torch

from nnunet_logonet.counting import count_macs, count_parameters
from nnunet_logonet.workfolders import write_json_whole

from .measure import (BenchmarkSettings, autocast, available_memory_mb, estimate_memory_mb, kernels_for,
                      make_sliding_window, make_train_step, sync, trainer_optimizer_kwargs)
from .models import REFERENCE_MODEL, ModelSpec
from .records import add_ratios, device_info

__all__ = ["TIMED_FIGURES", "interleaved_rounds", "paired_ratios", "run_interleaved"]

#: the figures timed in rounds, in the order they are measured (training last: it holds the most memory)
TIMED_FIGURES = ("forward_s", "sliding_window_s", "train_step_s")


def interleaved_rounds(calls: dict[str, Callable[[], Any]], rounds: int, device: torch.device, *,
                       warmup: int = 1, contexts: dict[str, Callable[[], ContextManager]] | None = None
                       ) -> dict[str, list[float]]:
    """Seconds of each call in ``rounds`` rounds; in round r the calls run in their order rotated by r.

    Every call first runs ``warmup`` times untimed (oneDNN's primitive caches, the allocator).
    ``contexts[name]()`` is entered around each of that call's runs (its fast paths on or off).
    """
    names = list(calls)
    contexts = contexts or {}

    def run(name: str) -> float:
        with contexts.get(name, contextlib.nullcontext)():
            sync(device)
            start = time.perf_counter()
            calls[name]()
            sync(device)
            return time.perf_counter() - start

    for name in names:
        for _ in range(warmup):
            run(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(run(name))
    return samples


def paired_ratios(samples: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-round ratios: the model's time over the reference's time in the same round."""
    return [s / r for s, r in zip(samples, reference)]


class _Model:
    """One built model with the calls each figure times."""

    def __init__(self, spec: ModelSpec, settings: BenchmarkSettings, device: torch.device) -> None:
        self.spec = spec
        channels_last = settings.channels_last and spec.prefers_channels_last
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.kernels, kernels_label = kernels_for(spec, settings)
        with self.kernels():
            self.module = spec.build().to(device).to(memory_format=self.memory_format)
        self.net = torch.compile(self.module) if getattr(settings, "compile", False) else self.module
        self.x1 = torch.randn(1, spec.input_channels, *spec.patch_size, device=device).contiguous(
            memory_format=self.memory_format)
        self.details: dict[str, Any] = {
            "layout": "channels_last_3d" if channels_last else "contiguous", "kernels": kernels_label,
            "amp": bool(settings.amp and device.type == "cuda"), "compiled": bool(getattr(settings, "compile", False)),
            "trainer": spec.trainer, "optimizer_kwargs": trainer_optimizer_kwargs(spec, device),
            "threads": torch.get_num_threads(), "notes": list(spec.notes)}
        self.figures: dict[str, Any] = {"parameters": count_parameters(self.module)}

    def count_macs(self) -> None:
        with self.kernels():
            self.figures["macs"], self.details["fvcore_uncounted_ops"] = count_macs(self.module, self.x1)

    def call(self, figure: str, settings: BenchmarkSettings, device: torch.device) -> Callable[[], Any]:
        net = self.net
        if figure == "forward_s":
            def forward() -> None:
                net.eval()
                with torch.no_grad(), autocast(device, settings.amp):
                    net(self.x1)
            return forward
        if figure == "sliding_window_s":
            sliding_window, self.details["sliding_window_tiles"] = make_sliding_window(net, self.spec, settings, device)
            return lambda: (net.eval(), sliding_window())
        step = make_train_step(net, self.spec, settings, device, self.memory_format)
        return lambda: (net.train(), step())


def run_interleaved(specs: Sequence[ModelSpec], settings: BenchmarkSettings, rounds: int, *,
                    memory_check: bool = True, json_path: Any = None, meta: dict[str, Any] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Measure every model in alternation (module docstring) and return the report, also written to
    ``json_path`` after each figure. Same layout as ``run_benchmark``'s, without memory peaks."""
    from tqdm import tqdm

    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report: dict[str, Any] = {
        **(meta or {}),
        "device_info": device_info(device),
        "settings": {**vars(settings), "reference_model": REFERENCE_MODEL, "interleave_rounds": rounds,
                     "memory_isolation": "in-process, interleaved: no memory peak measured",
                     "flop_counter": "fvcore FlopCountAnalysis at batch 1; fvcore counts one flop per "
                                     "multiply-accumulate, so 'macs' are multiply-accumulates (MACs)",
                     "timing": f"{rounds} rounds after one warm-up run each; in round r every model runs once, "
                               "the order rotated by r; times are medians over rounds, ratios the medians of "
                               f"the per-round ratios to {REFERENCE_MODEL}; seconds"},
        "models": {},
    }
    available = available_memory_mb(device) if memory_check else None
    need = {"inference": 0.0, "train": 0.0}
    models: dict[str, _Model] = {}
    for spec in specs:
        estimate = estimate_memory_mb(spec, settings.batch_size, settings.device)
        need["inference"] = max(need["inference"], estimate["inference_mb"])
        need["train"] = max(need["train"], estimate["train_mb"])
        models[spec.name] = _Model(spec, settings, device)
        report["models"][spec.name] = {"spec": spec.to_json(), "estimate": estimate, "status": "ok",
                                       "figures": models[spec.name].figures, "samples": {},
                                       "details": models[spec.name].details}
    figures = list(TIMED_FIGURES)
    if available is not None and need["train"] > available:
        figures.remove("train_step_s")
        for entry in report["models"].values():
            entry["details"]["notes"].append(f"training not run: the largest model needs ~{need['train'] / 1024:.1f} "
                                             f"GB at batch {settings.batch_size}, {available / 1024:.1f} GB available")

    bar = tqdm(total=len(models) + len(figures) * len(models) * (rounds + 1), desc="interleaved", unit="run",
               disable=not progress, file=sys.stderr)
    for model in models.values():
        model.count_macs()
        bar.update()
    for figure in figures:
        bar.set_postfix_str(figure)
        calls = {name: model.call(figure, settings, device) for name, model in models.items()}
        counted = {name: (lambda call=call: (call(), bar.update())) for name, call in calls.items()}
        samples = interleaved_rounds(counted, rounds, device, warmup=1,
                                     contexts={name: model.kernels for name, model in models.items()})
        del calls, counted
        for name, values in samples.items():
            report["models"][name]["samples"][figure] = values
            models[name].figures[figure] = median(values)
        _add_paired_ratios(report["models"])
        if json_path is not None:
            write_json_whole(json_path, report)
    bar.close()
    report["device_info"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if json_path is not None:
        write_json_whole(json_path, report)
    return report


def _add_paired_ratios(entries: dict[str, dict[str, Any]]) -> None:
    """``add_ratios`` for the counts; for timed figures the median of the per-round ratios, and their range."""
    add_ratios(entries)
    reference = entries.get(REFERENCE_MODEL, {}).get("samples", {})
    for entry in entries.values():
        ranges = entry.setdefault("ratio_ranges", {})
        for figure, values in entry.get("samples", {}).items():
            if figure in reference:
                per_round = paired_ratios(values, reference[figure])
                entry["ratios"][figure] = median(per_round)
                ranges[figure] = [min(per_round), max(per_round)]
