"""What a benchmark run records beside its figures, and how the record is written.

The machine and library versions, the code revision, the allocator's environment, each figure's
ratio to nnU-Net's default network, and the JSON record itself: kept in ``FILE.partial`` while the run
goes on and moved to ``FILE`` whole once it completes.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from nnunet_logonet.benchmark.measure import available_memory_mb
from nnunet_logonet.benchmark.models import REFERENCE_MODEL
from nnunet_logonet.machine import cpu_description
from nnunet_logonet.workfolders import write_json_whole

__all__ = ["FIGURES", "add_ratios", "ALLOCATOR_VARIABLES", "allocator_settings", "describe_allocator",
           "code_revision", "device_info", "partial_json_path", "publish_json"]


#: figure key -> (column title, unit scale, format); the table divides by the scale
FIGURES: dict[str, tuple[str, float, str]] = {
    "parameters": ("params M", 1e6, "{:.2f}"),
    "macs": ("GMACs", 1e9, "{:.1f}"),
    "forward_s": ("fwd s/patch", 1.0, "{:.3f}"),
    "train_step_s": ("train s/iter", 1.0, "{:.3f}"),
    "peak_memory_mb": ("peak MB", 1.0, "{:.0f}"),
    "sliding_window_s": ("sw s/case", 1.0, "{:.2f}"),
}


def add_ratios(results: dict[str, dict[str, Any]], reference: str = REFERENCE_MODEL) -> None:
    """``ratios[figure] = figure / reference's figure`` for every model, where both exist."""
    ref = results.get(reference, {}).get("figures", {})
    for result in results.values():
        figures = result.get("figures", {})
        result["ratios"] = {k: (figures[k] / ref[k] if figures.get(k) is not None and ref.get(k) else None)
                            for k in FIGURES}


#: Environment variables that change how CPU tensors are allocated, and so every CPU time measured here.
#: With glibc's defaults each block over 32 MB (at first over 128 KB) is mmapped and unmapped when freed,
#: so every large tensor is page-faulted anew on first touch: measured here (docs/speed.md, "The
#: allocator"), that was 15-29 % of nnU-Net's U-Net's CPU times at 64^3 and up to 14 % of LoGoNet-S's.
#: The run records them so that runs in different environments are not compared.
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MALLOC_ARENA_MAX", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


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
        "platform": platform.platform(), "memory_available_mb": available_memory_mb(torch.device("cpu")),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "allocator": allocator_settings(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_mb=props.total_memory / 1024 ** 2,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def partial_json_path(path: str | os.PathLike) -> Path:
    """Where a run keeps its record until it completes (``FILE.partial``), so that an interrupted rerun
    never replaces a complete record at ``FILE`` with a partial one."""
    return Path(f"{os.fspath(path)}.partial")


def publish_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Replace ``path`` with the complete record, atomically, and drop its ``.partial`` side file."""
    write_json_whole(path, data)
    partial_json_path(path).unlink(missing_ok=True)
