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
from typing import Any, Mapping

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


#: (vendor word, cpu family, model number) -> generation, for the CPUs this project's records came from
#: and their neighbours; /proc/cpuinfo's "model name" alone ("AMD EPYC", "Intel(R) Xeon(R) Processor")
#: does not say which.
CPU_GENERATIONS = {
    ("Xeon", "6", "85"): "Xeon Skylake-SP",  # Cascade Lake shares the model number; it has AVX-512 VNNI
    ("Xeon", "6", "106"): "Xeon Ice Lake",
    ("Xeon", "6", "143"): "Xeon Sapphire Rapids",
    ("Xeon", "6", "207"): "Xeon Emerald Rapids",
    ("EPYC", "23", "49"): "AMD EPYC Zen 2",
    ("EPYC", "25", "1"): "AMD EPYC Zen 3",
    ("EPYC", "25", "17"): "AMD EPYC Zen 4",
}


def cpu_kind(record: Mapping[str, Any]) -> str:
    """A short name for the CPU of a ``cpu_description`` record: its generation where the family and
    model number are known ("AMD EPYC Zen 4", "Xeon Cascade Lake"), else its model name, with the vector
    width PyTorch dispatched to where recorded. Records written before the family was kept give the name."""
    name = " ".join(str(record.get("cpu_model") or "unknown CPU").replace("(R)", "").replace("(TM)", "")
                    .split("@")[0].replace(" Processor", "").split())
    family, number = record.get("cpu_family"), record.get("cpu_model_number")
    for (word, fam, num), generation in CPU_GENERATIONS.items():
        if word in name and (str(family), str(number)) == (fam, num):
            if generation == "Xeon Skylake-SP" and "avx512_vnni" in (record.get("cpu_isa_extensions") or ()):
                generation = "Xeon Cascade Lake"
            return generation
    if family is not None and number is not None:
        name += f" (family {family} model {number})"
    capability = record.get("torch_cpu_capability")
    return f"{name}, {capability.replace('AVX512', 'AVX-512')}" if capability else name
