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
import contextlib
import dataclasses
import io
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median
from types import SimpleNamespace
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from nnunet_logonet.figures import figure_path
from nnunet_logonet.machine import cpu_description, cpu_kind
from nnunet_logonet.network.levers import LEVERS, reference_kernels

from nnunet_logonet.benchmark.models import (
    MODELS,
    REFERENCE_MODEL,
    DatasetPlans,
    ModelSpec,
    PlansNotFoundError,
    count_parameters,
    feature_map_elements,
    load_dataset_plans,
    resolve_model,
)

__all__ = ["FIGURES", "BenchmarkSettings", "measure_model", "run_benchmark", "format_table", "build_parser", "main"]

#: figure key -> (column title, unit scale, format); the table divides by the scale
FIGURES: dict[str, tuple[str, float, str]] = {
    "parameters": ("params M", 1e6, "{:.2f}"),
    "macs": ("GMACs", 1e9, "{:.1f}"),
    "forward_s": ("fwd s/patch", 1.0, "{:.3f}"),
    "train_step_s": ("train s/iter", 1.0, "{:.3f}"),
    "peak_memory_mb": ("peak MB", 1.0, "{:.0f}"),
    "sliding_window_s": ("sw s/case", 1.0, "{:.2f}"),
}
TRAIN_FIGURES = ("train_step_s", "peak_memory_mb")
#: Training bytes per element counted by ``compute_conv_feature_map_size``, only to skip what cannot
#: fit. CPU fp32, measured with this benchmark at 96^3, batch 2 (docs/benchmarks/cpu_96.json):
#: nnunet 11.0, resenc_m 10.0 (17 and 11 at 32x64x64), so 18 for nnU-Net's networks; ulkanet_s 6.0,
#: logonet_tiny 6.5, logonet_s 5.7, logonet_l 5.4 (at most 7.7 at 32x64x64), so 8 for ours
#: (``cpu_channels_last``). CUDA: nnU-Net's own reference, 8 GB for 2 x 560e6 elements under
#: mixed precision.
TRAIN_BYTES_PER_FEATURE_ELEMENT = {"cpu": 18.0, "cpu_channels_last": 8.0, "cuda": 8 * 1024 ** 3 / (2 * 560e6)}
#: Per-device defaults. The CPU patch is 64^3, not the paper's 96^3: on a 2-core CPU one nnU-Net training
#: step at 96^3 takes ~17 s and LoGoNet-L's ~56 s, so the six-model run takes ~15 min there (docs/benchmarks);
#: at 64^3 the same run takes a few minutes. ``--patch-size 96 96 96`` measures the paper's size anywhere.
DEFAULTS = {"cpu": {"warmup": 1, "repeats": 3, "sw_repeats": 1, "patch_size": (64, 64, 64)},
            "cuda": {"warmup": 3, "repeats": 10, "sw_repeats": None, "patch_size": (96, 96, 96)}}
EXIT_USAGE = 2
#: Environment variables that change how CPU tensors are allocated, and so every CPU time measured here.
#: With glibc's defaults each block over 32 MB (at first over 128 KB) is mmapped and unmapped when freed,
#: so every large tensor is page-faulted anew on first touch: measured here (docs/speed.md, "The
#: allocator"), that was 15-29 % of nnU-Net's U-Net's CPU times at 64^3 and up to 14 % of LoGoNet-S's.
#: The run records them so that runs in different environments are not compared.
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MALLOC_ARENA_MAX", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


class BenchmarkSettings(SimpleNamespace):
    """Everything a worker needs besides the model: plain JSON-able values."""

    device: str
    batch_size: int
    warmup: int
    repeats: int
    sw_warmup: int
    sw_repeats: int
    amp: bool
    channels_last: bool
    mirroring: bool
    tile_step_size: float
    case_size: list[int]
    threads: int
    seed: int
    #: run LoGoNet/ULKANet with plain PyTorch ops (``network.levers.reference_kernels``): the "before"
    reference_kernels: bool = False
    #: wrap every network in ``torch.compile`` (nnU-Net's default for training on CUDA)
    compile: bool = False


def default_settings(device: torch.device, patch_size: Sequence[int], **given: Any) -> BenchmarkSettings:
    """The settings of one run: ``DEFAULTS[device.type]`` and the CLI's defaults, where ``given`` is None."""
    given = {k: v for k, v in given.items() if v is not None}
    defaults = DEFAULTS[device.type]
    warmup = given.pop("warmup", defaults["warmup"])
    repeats = given.pop("repeats", defaults["repeats"])
    values = {
        "batch_size": 2, "warmup": warmup, "repeats": repeats,
        "sw_warmup": 0 if device.type == "cpu" else min(warmup, 1),
        "sw_repeats": defaults["sw_repeats"] or repeats,
        "channels_last": True, "mirroring": False, "tile_step_size": 0.5,
        "case_size": [int(math.ceil(1.5 * p)) for p in patch_size],
        "threads": torch.get_num_threads(), "seed": 0, "reference_kernels": False, "compile": False,
        **given,
    }
    values["amp"] = bool(values.get("amp", device.type == "cuda")) and device.type == "cuda"  # CPU runs fp32
    values["case_size"] = [int(c) for c in values["case_size"]]
    return BenchmarkSettings(device=str(device), **values)


# --------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_costs() -> tuple[int, float]:
    """Minor page faults and system CPU seconds of this process so far (0, 0.0 where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def time_runs(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device,
              costs: dict[str, float] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls. With ``costs``, also
    the timed calls' minor page faults and system seconds per call: on the CPU, glibc maps every block over
    its threshold anew and the kernel zeroes its pages on first touch, so these say how much of a time is
    the allocator's (docs/speed.md, "The allocator")."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    faults_before, system_before = process_costs()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    if costs is not None and repeats:
        faults, system = process_costs()
        costs.update(minor_page_faults=(faults - faults_before) / repeats, system_s=(system - system_before) / repeats)
    return times


class ResidentSetPeak:
    """Peak resident set of this process around a block of code (Linux ``/proc``, else ``getrusage``).

    Writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` (Linux >= 4.0), so the peak of one loop
    is measured without a sampling thread. Without it, ``ru_maxrss`` is the peak since the process
    started, which is why every model runs in its own process.
    """

    def __init__(self) -> None:
        self.method = "VmHWM reset via /proc/self/clear_refs"

    @staticmethod
    def _status_mb(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def current_mb(self) -> float:
        rss = self._status_mb("VmRSS")
        return rss if rss is not None else self._maxrss_mb()

    @staticmethod
    def _maxrss_mb() -> float:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "ru_maxrss since process start (VmHWM reset unavailable)"

    def peak_mb(self) -> float:
        hwm = self._status_mb("VmHWM") if self.method.startswith("VmHWM") else None
        return hwm if hwm is not None else self._maxrss_mb()

    @staticmethod
    def release_free_memory() -> None:
        """Hand freed heap memory back to the OS (glibc's ``malloc_trim``, where there is one), so that
        what an earlier model of the same process freed is not counted as the next one's baseline."""
        import ctypes
        import ctypes.util
        import gc

        gc.collect()
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            pass


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.float16) if enabled and device.type == "cuda" else contextlib.nullcontext()


def count_macs(net: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one forward pass (fvcore) and the ops fvcore does not count."""
    from fvcore.nn import FlopCountAnalysis

    net.eval()
    # the architecture's MACs: plain ops, which fvcore's tracer knows (it does not count oneDNN's op)
    with torch.no_grad(), warnings.catch_warnings(), reference_kernels():
        warnings.simplefilter("ignore")  # tracer warnings from shape checks
        analysis = FlopCountAnalysis(net, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = int(analysis.total())
        uncounted = {str(k): int(v) for k, v in analysis.unsupported_ops().items()}
    return total, uncounted


def trainer_optimizer_kwargs(spec: ModelSpec, device: torch.device) -> dict[str, Any]:
    """The optimizer keywords ``spec.trainer`` uses on ``device``: ``LoGoNetTrainer`` takes PyTorch's
    fused CPU kernel (one pass over LoGoNet-S's 66.5 M parameters instead of one per operation),
    ``nnUNetTrainer`` PyTorch's default."""
    if spec.trainer == "LoGoNetTrainer":
        from nnunet_logonet.training.recipes import optimizer_implementation

        return optimizer_implementation(device)
    return {}


def make_train_step(net: torch.nn.Module, spec: ModelSpec, settings: BenchmarkSettings, device: torch.device,
                    memory_format: torch.memory_format) -> Callable[[], None]:
    """One ``nnUNetTrainer.train_step`` (without deep supervision) on a fixed random batch."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                             weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5,
                                **trainer_optimizer_kwargs(spec, device))
    use_amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    shape = (settings.batch_size, spec.input_channels, *spec.patch_size)
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, spec.num_classes, (settings.batch_size, 1, *spec.patch_size), device=device).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, use_amp):
            loss = loss_fn(net(x), target)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            optimizer.step()

    step.optimizer = optimizer  # type: ignore[attr-defined]  # for tests and inspection
    return step


def make_sliding_window(net: torch.nn.Module, spec: ModelSpec, settings: BenchmarkSettings, device: torch.device
                        ) -> tuple[Callable[[], Any], int]:
    """nnU-Net's ``predict_sliding_window_return_logits`` on one random case, and its tile count."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    with contextlib.redirect_stdout(io.StringIO()):  # it prints that CPU results stay on the CPU
        predictor = nnUNetPredictor(tile_step_size=settings.tile_step_size, use_gaussian=True,
                                    use_mirroring=settings.mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    # the attributes predict_sliding_window_return_logits reads, as initialize_from_trained_model_folder sets them
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=list(spec.patch_size))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=spec.num_classes)
    predictor.allowed_mirroring_axes = (0, 1, 2)
    case = torch.randn(spec.input_channels, *settings.case_size)
    padded = [max(c, p) for c, p in zip(settings.case_size, spec.patch_size)]
    tiles = int(np.prod([len(s) for s in compute_steps_for_sliding_window(padded, spec.patch_size,
                                                                          settings.tile_step_size)]))
    return (lambda: predictor.predict_sliding_window_return_logits(case)), tiles


def measure_model(spec: ModelSpec, settings: BenchmarkSettings, *, skip_training: str | None = None) -> dict[str, Any]:
    """Every figure of one model, measured in this process (see the module docstring for each).

    ``skip_training``: a reason not to run the training iteration (e.g. it would not fit in memory).
    """
    kernels, label = kernels_for(spec, settings)
    with kernels():
        result = _measure_model(spec, settings, skip_training=skip_training)
    result["details"]["kernels"] = label
    return result


def kernels_for(spec: ModelSpec, settings: BenchmarkSettings) -> tuple[Callable[[], ContextManager], str]:
    """The context (a factory: enter a fresh one per use) that sets ``spec``'s fast paths, and its label."""
    levers = tuple(spec.without_levers)
    if getattr(settings, "reference_kernels", False):
        return reference_kernels, "reference"
    if levers:
        return (lambda: reference_kernels(*levers)), f"fast without {', '.join(levers)}"
    return contextlib.nullcontext, "fast"


def _measure_model(spec: ModelSpec, settings: BenchmarkSettings, *, skip_training: str | None) -> dict[str, Any]:
    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rss = ResidentSetPeak()
    rss.release_free_memory()
    rss_before_model = rss.current_mb()
    started = time.perf_counter()

    channels_last = settings.channels_last and spec.prefers_channels_last
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = spec.build().to(device).to(memory_format=memory_format)
    net = torch.compile(model) if getattr(settings, "compile", False) else model
    layout = "channels_last_3d" if channels_last else "contiguous"
    figures: dict[str, Any] = {"parameters": count_parameters(model)}
    samples: dict[str, list[float]] = {}
    details: dict[str, Any] = {"layout": layout, "amp": bool(settings.amp and device.type == "cuda"),
                               "compiled": bool(getattr(settings, "compile", False)),
                               "trainer": spec.trainer,
                               "optimizer_kwargs": trainer_optimizer_kwargs(spec, device),
                               "threads": torch.get_num_threads(), "notes": list(spec.notes)}

    x1 = torch.randn(1, spec.input_channels, *spec.patch_size, device=device).contiguous(memory_format=memory_format)
    net.eval()

    def forward() -> None:
        with torch.no_grad(), _autocast(device, settings.amp):
            net(x1)

    costs: dict[str, dict[str, float]] = {key: {} for key in ("forward_s", "sliding_window_s", "train_step_s")}
    samples["forward_s"] = time_runs(forward, settings.warmup, settings.repeats, device, costs["forward_s"])
    figures["macs"], details["fvcore_uncounted_ops"] = count_macs(model, x1)
    del x1

    sliding_window, details["sliding_window_tiles"] = make_sliding_window(net, spec, settings, device)
    samples["sliding_window_s"] = time_runs(sliding_window, settings.sw_warmup, settings.sw_repeats, device,
                                            costs["sliding_window_s"])
    del sliding_window

    if skip_training:
        details["notes"].append(f"training not run: {skip_training}")
    else:
        net.train()
        step = make_train_step(net, spec, settings, device, memory_format)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rss.reset()
        samples["train_step_s"] = time_runs(step, settings.warmup, settings.repeats, device, costs["train_step_s"])
        if device.type == "cuda":
            figures["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 1024 ** 2
            details["memory_method"] = "torch.cuda.max_memory_allocated during the training iterations"
        else:
            peak = rss.peak_mb()
            # in-process (--no-isolate) the model may reuse heap memory an earlier one freed, which
            # does not raise the resident set: no figure rather than a wrong one
            figures["peak_memory_mb"] = peak - rss_before_model if peak > rss_before_model else None
            if figures["peak_memory_mb"] is None:
                details["notes"].append("peak memory not measured: the resident set did not grow (memory an "
                                        "earlier model freed in this process was reused; run with --isolate)")
            details.update(peak_rss_mb=peak, rss_before_model_mb=rss_before_model,
                           memory_method=f"peak resident set minus resident set before building ({rss.method})")
    for key, values in samples.items():
        figures[key] = median(values)
    details["process_costs_per_call"] = {key: value for key, value in costs.items() if value}
    details["wall_s"] = time.perf_counter() - started
    return {"status": "ok", "figures": figures, "samples": samples, "details": details}


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
    tmp = response_file + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, response_file)


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


def _available_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 1024 ** 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def estimate_memory_mb(spec: ModelSpec, batch_size: int, device: str) -> dict[str, float]:
    """Rough training and inference memory from nnU-Net's feature-map count, to skip what cannot fit."""
    elements = feature_map_elements(spec)
    with torch.device("meta"):
        params = count_parameters(spec.build(init=False))
    if device.startswith("cuda"):
        per_element = TRAIN_BYTES_PER_FEATURE_ELEMENT["cuda"]
    else:
        per_element = TRAIN_BYTES_PER_FEATURE_ELEMENT["cpu_channels_last" if spec.prefers_channels_last else "cpu"]
    return {
        "feature_map_elements": float(elements),
        "train_mb": (elements * batch_size * per_element + params * 16) / 1024 ** 2,
        # inference frees maps as it goes; all of them at once in fp32 is a safe upper bound
        "inference_mb": (elements * 4 + params * 4) / 1024 ** 2,
    }


def add_ratios(results: dict[str, dict[str, Any]], reference: str = REFERENCE_MODEL) -> None:
    """``ratios[figure] = figure / reference's figure`` for every model, where both exist."""
    ref = results.get(reference, {}).get("figures", {})
    for result in results.values():
        figures = result.get("figures", {})
        result["ratios"] = {k: (figures[k] / ref[k] if figures.get(k) is not None and ref.get(k) else None)
                            for k in FIGURES}


def allocator_settings() -> dict[str, str]:
    """The allocator variables (``ALLOCATOR_VARIABLES``) set in this environment; {} means glibc's defaults.

    The per-model worker processes inherit them, so every model of a run is measured under the same ones.
    """
    return {name: os.environ[name] for name in ALLOCATOR_VARIABLES if os.environ.get(name)}


def describe_allocator(settings: dict[str, str]) -> str:
    """One line for the table's header."""
    if not settings:
        return "allocator: glibc defaults (each new tensor over 32 MB is page-faulted; docs/speed.md)"
    return "allocator: " + " ".join(f"{name}={value}" for name, value in settings.items())


def code_revision(path: str | os.PathLike | None = None) -> str | None:
    """The git commit the file ``path`` (default: this module) was checked out from (short hash,
    ``+changes`` when tracked files differ from it), so that a record says which code gave its figures;
    None where git does not track the file (an installed wheel, even inside a checkout) or git is missing."""
    file = Path(path) if path is not None else Path(__file__).resolve()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(file.parent), *args], capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", file.name).returncode != 0:
            return None
        head, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if changes.returncode == 0 and changes.stdout.strip() else "")


def device_info(device: torch.device) -> dict[str, Any]:
    """The machine and library versions a benchmark ran on, for its JSON record."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "device": str(device), **cpu_description(),
        "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "nnunetv2": _version("nnunetv2"), "fvcore": _version("fvcore"),
        "nnunet_logonet": _version("nnunet-logonet"), "nnunet_logonet_revision": code_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(), "memory_available_mb": _available_memory_mb(torch.device("cpu")),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "allocator": allocator_settings(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_mb=props.total_memory / 1024 ** 2,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def partial_json_path(path: str | os.PathLike) -> Path:
    """Where a run keeps its record until it completes (``FILE.partial``), so that an interrupted rerun
    never replaces a complete record at ``FILE`` with a partial one."""
    return Path(f"{os.fspath(path)}.partial")


def publish_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Replace ``path`` with the complete record, atomically, and drop its ``.partial`` side file."""
    _write_json_atomic(Path(path), data)
    partial_json_path(path).unlink(missing_ok=True)


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
    available = _available_memory_mb(device) if memory_check else None
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
            _write_json_atomic(partial_json_path(json_path), report)
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
    parser.add_argument("--json", default=None, metavar="FILE",
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
