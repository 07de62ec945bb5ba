"""abd_jax/machine.py: the machine a result came from, as recorded next to it."""

from abd_jax.machine import cpu_description, machine_info

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512_fp16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512_fp16 amx_tile
"""


def test_cpu_description_names_the_model_and_the_vector_extensions_it_has():
    d = cpu_description(CPUINFO)
    assert d == {"cpu": "Intel(R) Xeon(R) Processor", "isa": ["avx2", "fma", "avx512f", "avx512_fp16", "amx_tile"]}
    assert cpu_description("")["isa"] == []  # no /proc/cpuinfo (macOS): the model from `platform`


def test_machine_info_records_device_cpu_and_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    info = machine_info()
    assert info["device"] and info["cpu"] and info["xla_flags"] == "--xla_cpu_max_isa=AVX2"
    assert set(info) == {"device", "cpu", "isa", "cores", "xla_flags", "jax"}
