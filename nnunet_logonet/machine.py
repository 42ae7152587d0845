"""Which CPU a measurement ran on, for the records the benchmark and the demo write.

``platform.processor()`` is empty on most Linux machines, and "Intel(R) Xeon(R) Processor" or "AMD EPYC"
names several generations whose speeds differ by 2x here, so the records take the model name, family,
model number and wide vector extensions from ``/proc/cpuinfo``, and the instruction set PyTorch's
kernels dispatch to.
"""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_description(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """Model name, family, model number and AVX-512/AMX extensions of the first CPU in ``cpuinfo``
    (``platform.processor()`` or the architecture where the file cannot be read, e.g. not Linux)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # end of the first processor's block
            fields.setdefault(key.strip(), value.strip())
    return {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_family": fields.get("cpu family"),
        "cpu_model_number": fields.get("model"),
        "cpu_isa_extensions": sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx512", "amx"))),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
