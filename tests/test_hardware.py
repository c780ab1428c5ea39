"""The ``auto`` defaults follow what the machine computes fast, never one machine's measurements.

Specs: the CPU class is the lowest any limit allows (the CPU, ATen, oneDNN's and MKL's caps); bf16
is native only where oneDNN really runs it; ``llm_precision`` / ``autocast_dtype`` ``auto`` are fp32 /
off on a CPU without it and bf16 on one with it; an explicit bf16 there warns once with a measured
factor; the fp32 linear kernel is measured once and kept per machine, and the first decision stands
for every process; a kernel that cannot run is reported, not a crash.  The last specs run a
subprocess under the emulated AVX2-only CPU that CI uses.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from spec_helpers import run_python

from blip2_internlm import hardware
from blip2_internlm.tools import measure

AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.fixture
def machine(monkeypatch):
    """A CPU whose flags offer AMX, no caps in the environment, oneDNN runs every dtype."""
    monkeypatch.setattr(hardware, "_cpu_flag_class", lambda: "amx")
    monkeypatch.setattr(hardware, "_aten_class", lambda: "amx")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware, "onednn_runs", lambda dtype: True)
    for key in hardware.ISA_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# --- the CPU's class ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "amx"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "avx512_bf16"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "avx512"),
        ({"DNNL_MAX_CPU_ISA": "AVX2"}, "avx2"),
        ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "avx2"),
        ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, "default"),
    ],
)
def test_the_cpu_class_is_the_lowest_that_any_kernel_cap_allows(machine, env, expected):
    for key, value in env.items():
        machine.setenv(key, value)
    assert hardware.cpu_isa_class() == expected


def test_the_cpu_class_is_capped_by_the_processors_own_flags(machine):
    machine.setattr(hardware, "_cpu_flag_class", lambda: "avx2")
    assert hardware.cpu_isa_class() == "avx2"
    assert not hardware.cpu_has_native_bf16()


def test_bf16_is_native_only_with_the_instructions_uncapped_and_a_product_that_onednn_runs(machine):
    assert hardware.cpu_has_native_bf16()
    machine.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # AVX-512 without BF16: oneDNN would emulate it
    assert not hardware.cpu_has_native_bf16()
    machine.delenv("ONEDNN_MAX_CPU_ISA")
    machine.setattr(hardware, "onednn_runs", lambda dtype: dtype != torch.bfloat16)
    assert not hardware.cpu_has_native_bf16()


def test_onednn_is_probed_with_a_real_product_of_the_dtype():
    # fp32 runs wherever torch has oneDNN; the answer for bf16 is the probe's, whatever the flags say
    assert hardware.onednn_runs(torch.float32) == torch.backends.mkldnn.is_available()
    if hardware.onednn_runs(torch.bfloat16):
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 8, dtype=torch.bfloat16), None, "none", [], "")


# --- precision ---------------------------------------------------------------------------------------


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_natively(machine):
    from blip2_internlm.models.llm_inputs import resolve_autocast_dtype

    cpu = torch.device("cpu")
    assert hardware.resolve_llm_precision("auto", cpu) == "bf16"
    assert resolve_autocast_dtype("auto", cpu) is torch.bfloat16
    machine.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.resolve_llm_precision("auto", cpu) == "fp32"
    assert resolve_autocast_dtype("auto", cpu) is None


def test_a_shape_only_build_plans_for_a_gpu_with_bf16(machine):
    machine.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # whatever CPU plans it
    assert hardware.resolve_llm_precision("auto", "meta") == "bf16"


def test_an_explicit_choice_is_honoured_and_a_slow_bf16_warns_once_with_the_measured_factor(machine, caplog):
    machine.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    machine.setattr(hardware, "_warned", set())
    machine.setattr(hardware, "emulated_bf16_slowdown", lambda: 31.9)
    caplog.set_level(logging.WARNING, logger="blip2_internlm.hardware")
    assert [hardware.resolve_llm_precision("bf16", "cpu") for _ in range(3)] == ["bf16"] * 3
    assert hardware.resolve_llm_precision("fp16", "cpu") == "fp16"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "model.llm_precision: bf16" in warnings[0] and "32x slower" in warnings[0]


def test_the_slowdown_is_timed_on_one_thread_in_both_dtypes_and_the_threads_are_restored(monkeypatch):
    """One thread: a ratio of kernels that another busy process cannot skew by stalling a thread."""
    seen, matmul = [], torch.matmul

    def spy(a, b):
        seen.append((a.dtype, torch.get_num_threads()))
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", spy)
    threads = torch.get_num_threads()
    ratio = hardware.emulated_bf16_slowdown(size=64)
    assert ratio > 0 and torch.get_num_threads() == threads
    assert {dtype for dtype, _ in seen} == {torch.float32, torch.bfloat16}
    assert {count for _, count in seen} == {1}


# --- the fp32 linear kernel -----------------------------------------------------------------------------


@pytest.fixture
def decision(machine, tmp_path):
    """A fresh decision: an empty asset cache and no decision in this process."""
    machine.setenv("BLIP2_INTERNLM_CACHE", str(tmp_path))
    hardware.fastest_cpu_fp32_linear.cache_clear()
    yield machine
    hardware.fastest_cpu_fp32_linear.cache_clear()


@pytest.mark.parametrize(
    "seconds, expected",
    [
        ({"torch": 2.0, "onednn": 1.0}, "onednn"),
        ({"torch": 1.0, "onednn": 2.0}, "torch"),
        ({"torch": 1.05, "onednn": 1.0}, "torch"),  # within the margin: torch's own stays
    ],
)
def test_auto_takes_onednn_only_where_it_measured_faster_by_the_margin(decision, seconds, expected):
    decision.setattr(hardware, "measure_cpu_fp32_linears", lambda: seconds)
    assert hardware.fastest_cpu_fp32_linear() == expected


def test_the_decision_is_measured_once_per_machine_and_read_back_by_later_processes(decision):
    decision.setattr(hardware, "measure_cpu_fp32_linears", lambda: {"torch": 2.0, "onednn": 1.0})
    assert hardware.fastest_cpu_fp32_linear() == "onednn"
    [kept] = (hardware._decision_file().parent).glob("cpu-fp32-linear-*.json")
    assert json.loads(kept.read_text())["kernel"] == "onednn"

    def no_second_measurement():
        raise AssertionError("measured again")

    hardware.fastest_cpu_fp32_linear.cache_clear()  # what a new process sees
    decision.setattr(hardware, "measure_cpu_fp32_linears", no_second_measurement)
    assert hardware.fastest_cpu_fp32_linear() == "onednn"


def test_the_first_process_to_decide_decides_for_all(decision):
    """Two ranks measuring at once may disagree; the file written first holds, so every rank of a run
    uses one kernel."""
    path = hardware._decision_file()

    def measured_while_another_rank_decided():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kernel": "torch"}))
        return {"torch": 2.0, "onednn": 1.0}  # this process alone would pick onednn

    decision.setattr(hardware, "measure_cpu_fp32_linears", measured_while_another_rank_decided)
    assert hardware.fastest_cpu_fp32_linear() == "torch"
    assert not list(path.parent.glob(".*.partial"))


def test_the_kernel_caps_are_part_of_the_machine_the_decision_is_kept_for(decision):
    native = hardware.machine_fingerprint()
    decision.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.machine_fingerprint() != native


def test_the_linear_probe_times_both_kernels_in_milliseconds():
    seconds = hardware.measure_cpu_fp32_linears()
    assert set(seconds) == ({"torch", "onednn"} if hardware.onednn_runs(torch.float32) else {"torch"})
    assert all(0 < s < 1 for s in seconds.values())


# --- a kernel that cannot run is reported -----------------------------------------------------------


def test_the_peak_measurement_reports_a_kernel_this_cpu_cannot_run_as_none(monkeypatch):
    monkeypatch.setattr(hardware, "onednn_runs", lambda dtype: dtype == torch.float32)
    by_kernel = {}
    peaks = measure.peak_matmul_flops("cpu", sizes=(32,), by_kernel=by_kernel)
    assert by_kernel["bf16 oneDNN"] is None and by_kernel["bf16 torch.matmul"] > 0
    assert peaks["bf16"] == by_kernel["bf16 torch.matmul"]


def test_a_matmul_that_fails_for_want_of_a_kernel_is_left_out_of_the_peaks(monkeypatch):
    def no_primitive(a, b):
        raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")

    monkeypatch.setattr(measure, "_onednn_matmul_t", no_primitive)
    by_kernel = {}
    peaks = measure.peak_matmul_flops("cpu", sizes=(32,), by_kernel=by_kernel)
    if torch.backends.mkldnn.is_available():
        assert by_kernel["fp32 oneDNN"] is None
    assert peaks["fp32"] == by_kernel["fp32 torch.matmul"] > 0


# --- under an emulated AVX2-only CPU ---------------------------------------------------------------------


EMULATED_PROBE = """
import json, torch
from blip2_internlm import hardware
from blip2_internlm.tools import measure
from blip2_internlm.models.llm_inputs import resolve_autocast_dtype
by_kernel = {}
measure.peak_matmul_flops("cpu", sizes=(64,), by_kernel=by_kernel)
print(json.dumps(dict(
    isa=hardware.cpu_isa_class(),
    native_bf16=hardware.cpu_has_native_bf16(),
    llm_precision=hardware.resolve_llm_precision("auto", "cpu"),
    autocast=str(resolve_autocast_dtype("auto", torch.device("cpu"))),
    onednn_bf16=by_kernel.get("bf16 oneDNN", "not measured"),
)))
"""


@pytest.mark.kernel_sensitive
def test_on_an_emulated_avx2_cpu_the_defaults_are_fp32_and_the_peak_measurement_does_not_crash(tmp_path):
    """The bench crashed here at its first measurement (oneDNN bf16 without AVX-512)."""
    env = {**os.environ, **AVX2_ONLY, "BLIP2_INTERNLM_CACHE": str(tmp_path)}
    result = run_python("-c", EMULATED_PROBE, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == dict(isa="avx2", native_bf16=False, llm_precision="fp32", autocast="None", onednn_bf16=None)
