"""The measuring of ``logonet_benchmark``: settings, timing, the resident-set peak, and one model's figures.

Shared by the benchmark's one-process-per-model runs (:mod:`~nnunet_logonet.benchmark.efficiency`),
its interleaved rounds (:mod:`~nnunet_logonet.benchmark.interleaved`) and the studies of single levers.
"""
from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from pathlib import Path
from statistics import median
from types import SimpleNamespace
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from nnunet_logonet.benchmark.models import ModelSpec, feature_map_elements
from nnunet_logonet.counting import count_macs, count_parameters
from nnunet_logonet.network.levers import reference_kernels

__all__ = ["DEFAULTS", "BenchmarkSettings", "default_settings", "sync", "autocast", "process_costs", "time_runs",
           "ResidentSetPeak", "trainer_optimizer_kwargs", "make_train_step", "make_sliding_window", "kernels_for",
           "measure_model", "available_memory_mb", "estimate_memory_mb"]


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


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously), so a time covers the whole call."""
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
    sync(device)
    times = []
    faults_before, system_before = process_costs()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
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


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA when ``enabled`` (nnU-Net's mixed precision); a no-op on the CPU, which runs fp32."""
    return torch.autocast(device.type, dtype=torch.float16) if enabled and device.type == "cuda" else contextlib.nullcontext()


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
        with autocast(device, use_amp):
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


def kernels_for(spec: ModelSpec, settings: BenchmarkSettings) -> tuple[Callable[[], ContextManager], str]:
    """The context (a factory: enter a fresh one per use) that sets ``spec``'s fast paths, and its label."""
    levers = tuple(spec.without_levers)
    if getattr(settings, "reference_kernels", False):
        return reference_kernels, "reference"
    if levers:
        return (lambda: reference_kernels(*levers)), f"fast without {', '.join(levers)}"
    return contextlib.nullcontext, "fast"


def measure_model(spec: ModelSpec, settings: BenchmarkSettings, *, skip_training: str | None = None) -> dict[str, Any]:
    """Every figure of one model, measured in this process (see the module docstring for each).

    ``skip_training``: a reason not to run the training iteration (e.g. it would not fit in memory).
    """
    kernels, label = kernels_for(spec, settings)
    with kernels():
        result = _measure_model(spec, settings, skip_training=skip_training)
    result["details"]["kernels"] = label
    return result


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
        with torch.no_grad(), autocast(device, settings.amp):
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


def available_memory_mb(device: torch.device) -> float | None:
    """Free memory of ``device`` in MB (CUDA's free memory, or Linux's ``MemAvailable``); None where unknown."""
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
