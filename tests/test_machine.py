"""The CPU a record names: the benchmark's and the demo's results say which machine they ran on."""
import platform

import pytest
import torch

from nnunet_logonet.machine import ISA_CAP_VARIABLES, cpu_description, cpu_kind, cpu_line, isa_caps

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


def test_cpu_description_reads_the_first_cpu_of_proc_cpuinfo(tmp_path, monkeypatch):
    for name in ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    described = cpu_description(cpuinfo)
    assert described["cpu_model"] == "AMD EPYC"
    assert (described["cpu_family"], described["cpu_model_number"]) == ("25", "17")
    assert described["cpu_isa_extensions"] == ["amx_tile", "avx512_bf16", "avx512f", "avx512vl"]
    assert described["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert described["isa_caps"] == {}


def test_a_run_under_instruction_set_caps_says_so(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 etc. make an AVX-512 CPU run the AVX2 kernels; the record and its name say it."""
    for name in ISA_CAP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "")  # empty: not a cap
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    record = cpu_description(cpuinfo)
    assert record["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert cpu_kind(record) == "AMD EPYC Zen 4 capped to AVX2"
    assert cpu_kind({**record, "isa_caps": {"ONEDNN_MAX_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "default"}}) == \
        "AMD EPYC Zen 4 capped to AVX2/DEFAULT"
    assert isa_caps({"DNNL_MAX_CPU_ISA": "AVX512_CORE", "PATH": "/bin"}) == {"DNNL_MAX_CPU_ISA": "AVX512_CORE"}
    # the line the study commands print first names the caps of this process too
    assert cpu_line().startswith("CPU: ") and cpu_line().endswith(f"{torch.get_num_threads()} threads")
    assert " capped to AVX2 (" in cpu_line()


def test_cpu_description_without_cpuinfo_falls_back_to_platform(tmp_path):
    described = cpu_description(tmp_path / "missing")
    assert described["cpu_model"] == (platform.processor() or platform.machine())
    assert described["cpu_family"] is None and described["cpu_isa_extensions"] == []


@pytest.mark.parametrize("record, kind", [
    ({"cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_number": "17"}, "AMD EPYC Zen 4"),
    ({"cpu_model": "AMD EPYC 7B13", "cpu_family": "25", "cpu_model_number": "1"}, "AMD EPYC Zen 3"),
    # a Zen 4 whose hypervisor hides AVX-512 runs the AVX2 kernels: its rows must not mix with the Zen 4's
    ({"cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_number": "17", "cpu_isa_extensions": [],
      "torch_cpu_capability": "AVX2"}, "AMD EPYC Zen 4 without AVX-512"),
    ({"cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_number": "17",
      "cpu_isa_extensions": ["avx512_bf16", "avx512f"]}, "AMD EPYC Zen 4"),
    ({"cpu_model": "AMD EPYC 7B13", "cpu_family": "25", "cpu_model_number": "1", "cpu_isa_extensions": []},
     "AMD EPYC Zen 3"),  # no AVX-512 to hide
    ({"cpu_model": "Intel(R) Xeon(R) Processor @ 2.50GHz", "cpu_family": "6", "cpu_model_number": "85",
      "cpu_isa_extensions": ["avx512_vnni", "avx512f"]}, "Xeon Cascade Lake"),
    ({"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_family": "6", "cpu_model_number": "85",
      "cpu_isa_extensions": ["avx512f"]}, "Xeon Skylake-SP"),
    ({"cpu_model": "Intel(R) Xeon(R) Platinum 8380HL CPU @ 2.90GHz", "cpu_family": "6", "cpu_model_number": "85",
      "cpu_isa_extensions": ["avx512_bf16", "avx512_vnni", "avx512f"]}, "Xeon Cooper Lake"),
    ({"cpu_model": "Intel(R) Core(TM) i7-1185G7 @ 3.00GHz", "cpu_family": "6", "cpu_model_number": "140",
      "torch_cpu_capability": "AVX512"}, "Intel Core i7-1185G7 (family 6 model 140), AVX-512"),
    ({"cpu_model": "Intel(R) Xeon(R) Processor"}, "Intel Xeon"),  # a record from before the family was kept
    ({}, "unknown CPU"),
])
def test_cpu_kind_names_the_generation_where_the_record_allows(record, kind):
    assert cpu_kind(record) == kind


def test_cpu_line_names_the_instruction_set_once(monkeypatch):
    from nnunet_logonet import machine

    monkeypatch.setattr(machine, "cpu_description", lambda: {
        "cpu_model": "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "cpu_family": "6", "cpu_model_number": "158",
        "torch_cpu_capability": "AVX2"})
    monkeypatch.setattr(machine.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert machine.cpu_line().startswith("CPU: Intel Core i7-8700 CPU (family 6 model 158), AVX2, ")
    monkeypatch.setattr(machine, "cpu_description", lambda: {"cpu_model": "AMD EPYC", "cpu_family": "25",
                                                             "cpu_model_number": "1"})
    assert machine.cpu_line().startswith("CPU: AMD EPYC Zen 3 (AVX2), ")
