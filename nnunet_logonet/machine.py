"""Which CPU a measurement ran on, for the records the benchmark and the demo write.

``platform.processor()`` is empty on most Linux machines, and "Intel(R) Xeon(R) Processor" or "AMD EPYC"
names several generations whose speeds differ by 2x here, so the records take the model name, family,
model number and wide vector extensions from ``/proc/cpuinfo``, the instruction set PyTorch's
kernels dispatch to, and any cap put on the instruction sets by oneDNN's, MKL's or ATen's own environment
variables (``ISA_CAP_VARIABLES``): with ``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ATEN_CPU_CAPABILITY=avx2`` an AVX-512 CPU runs the AVX2 kernels, which is how the AVX2 routes are measured
on a machine without an AVX2-only CPU, and the record must say so.
"""
from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any, Mapping

import torch

CPUINFO = Path("/proc/cpuinfo")

#: environment variables of oneDNN, MKL and ATen that cap the instruction set their kernels use
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def isa_caps(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The instruction-set caps (``ISA_CAP_VARIABLES``) set in ``environ`` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return {name: environ[name] for name in ISA_CAP_VARIABLES if environ.get(name)}


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
        "isa_caps": isa_caps(),
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
#: the generations above that have AVX-512; a virtual machine may hide it (an AMD EPYC Zen 4 without
#: ``avx512f`` in /proc/cpuinfo ran PyTorch's and oneDNN's AVX2 kernels, 2026-12-06), and its record says so
AVX512_GENERATIONS = frozenset({"Xeon Skylake-SP", "Xeon Cascade Lake", "Xeon Cooper Lake", "Xeon Ice Lake",
                                "Xeon Sapphire Rapids",
                                "Xeon Emerald Rapids", "AMD EPYC Zen 4"})


def cpu_kind(record: Mapping[str, Any]) -> str:
    """A short name for the CPU of a ``cpu_description`` record: its generation where the family and
    model number are known ("AMD EPYC Zen 4", "Xeon Cascade Lake"), else its model name, with the vector
    width PyTorch dispatched to where recorded. Records written before the family was kept give the name.
    A run under instruction-set caps says so ("AMD EPYC Zen 4 capped to AVX2"), and so does a CPU of an
    AVX-512 generation whose AVX-512 is hidden ("AMD EPYC Zen 4 without AVX-512")."""
    kind = _cpu_name(record)
    caps = record.get("isa_caps") or {}
    if caps:
        levels = sorted({str(v).upper() for v in caps.values()})
        kind += f" capped to {'/'.join(levels)}"
    return kind


def this_cpu() -> str:
    """``cpu_kind`` of the CPU this process runs on, for the headers the benchmark commands print."""
    return cpu_kind(cpu_description())


def cpu_line() -> str:
    """The study commands' first line: CPU: <this_cpu()> (<PyTorch's instruction set>), <N> threads; the
    instruction set only where ``this_cpu`` does not already end with it (a CPU not in the table)."""
    kind, capability = this_cpu(), torch.backends.cpu.get_cpu_capability()
    shown = capability.replace("AVX512", "AVX-512")
    isa = "" if kind.endswith(f", {shown}") else f" ({capability})"
    return f"CPU: {kind}{isa}, {torch.get_num_threads()} threads"


def _cpu_name(record: Mapping[str, Any]) -> str:
    name = " ".join(str(record.get("cpu_model") or "unknown CPU").replace("(R)", "").replace("(TM)", "")
                    .split("@")[0].replace(" Processor", "").split())
    family, number = record.get("cpu_family"), record.get("cpu_model_number")
    for (word, fam, num), generation in CPU_GENERATIONS.items():
        if word in name and (str(family), str(number)) == (fam, num):
            extensions = record.get("cpu_isa_extensions")
            if generation == "Xeon Skylake-SP" and "avx512_bf16" in (extensions or ()):
                generation = "Xeon Cooper Lake"  # Cascade Lake's successor on the same model number
            elif generation == "Xeon Skylake-SP" and "avx512_vnni" in (extensions or ()):
                generation = "Xeon Cascade Lake"
            if generation in AVX512_GENERATIONS and extensions is not None and "avx512f" not in extensions:
                generation += " without AVX-512"  # hidden by the hypervisor: the AVX2 kernels run
            return generation
    if family is not None and number is not None:
        name += f" (family {family} model {number})"
    capability = record.get("torch_cpu_capability")
    return f"{name}, {capability.replace('AVX512', 'AVX-512')}" if capability else name
