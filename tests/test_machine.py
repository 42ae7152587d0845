"""The CPU a record names: the benchmark's and the demo's results say which machine they ran on."""
import platform

import torch

from nnunet_logonet.machine import cpu_description

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512vl amx_tile
power management:

processor\t: 1
model name\t: Another CPU
"""


def test_cpu_description_reads_the_first_cpu_of_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    described = cpu_description(cpuinfo)
    assert described["cpu_model"] == "AMD EPYC"
    assert (described["cpu_family"], described["cpu_model_number"]) == ("25", "17")
    assert described["cpu_isa_extensions"] == ["amx_tile", "avx512_bf16", "avx512f", "avx512vl"]
    assert described["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_cpu_description_without_cpuinfo_falls_back_to_platform(tmp_path):
    described = cpu_description(tmp_path / "missing")
    assert described["cpu_model"] == (platform.processor() or platform.machine())
    assert described["cpu_family"] is None and described["cpu_isa_extensions"] == []
