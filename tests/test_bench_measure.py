"""The measuring that ``python -m blip2_internlm.tools.bench`` and ``python -m blip2_internlm.tools.plan --measure``
share (``blip2_internlm.tools.measure``), and the dtype names and config directories the tools share
(``blip2_internlm.dtypes``, ``blip2_internlm.paths``).

No test here checks a timing: only that the readings are what they claim to read.
"""

import pytest
import torch

from blip2_internlm.dtypes import DTYPES, dtype_name, to_dtype
from blip2_internlm.tools import measure

# the peak measurement runs every dtype's matmul kernel the CPU has (oneDNN bf16 only where native)
pytestmark = pytest.mark.kernel_sensitive

MiB = 2**20


def test_flops_of_a_matmul_are_two_per_multiply_add():
    a, b = torch.randn(8, 16), torch.randn(16, 32)
    assert measure.count_flops(lambda: a @ b) == 2 * 8 * 16 * 32


def test_flops_of_a_training_step_count_the_backward_pass_twice_the_forward():
    layer = torch.nn.Linear(16, 32, bias=False)
    x = torch.randn(8, 16, requires_grad=True)
    forward = 2 * 8 * 16 * 32
    assert measure.count_flops(lambda: layer(x)) == forward
    # backward: the gradient of the input and of the weight, one matmul each
    assert measure.count_flops(lambda: layer(x).sum().backward()) == 3 * forward


def test_measure_steps_times_each_repeat_after_the_warmup_and_counts_one_call():
    calls = []
    a, b = torch.randn(8, 16), torch.randn(16, 32)

    def fn():
        calls.append(1)
        return a @ b

    row = measure.measure_steps(fn, "cpu", repeats=3, warmup=2)
    assert len(calls) == 2 + 3 + 1  # warm-up, timed, the FLOP count
    assert len(row["times_s"]) == 3 and row["median_s"] > 0
    assert row["flops"] == 2 * 8 * 16 * 32
    assert set(row) == {"times_s", "median_s", "flops", "peak_memory_growth_bytes"}


def test_cpu_peak_memory_growth_sees_a_buffer_that_was_freed_before_the_reading():
    base = measure.reset_peak_memory("cpu")
    if base is None:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    # fresh pages from the kernel, written, so resident (a torch buffer may reuse pages the
    # allocator already holds from earlier specs, and then the peak does not move)
    import mmap

    buffer = mmap.mmap(-1, 64 * MiB)
    buffer.write(b"\x01" * (64 * MiB))
    buffer.close()
    assert measure.peak_memory_growth("cpu", base) >= 60 * MiB


def test_live_tensor_bytes_count_each_storage_once_until_it_is_freed():
    resident = torch.zeros(MiB // 4)
    tracker = measure.LiveTensorBytes()
    tracker.add([resident])
    with tracker:
        first = torch.ones(MiB // 4)
        view = first[: MiB // 8]  # shares first's storage: no new bytes
        second = first * 2
        del first, view
        # first's storage is gone: 1 MiB resident + 1 MiB second
        current = tracker.current
        del second
    assert current == 2 * MiB
    assert tracker.peak == 3 * MiB
    assert tracker.current == MiB


def test_peak_matmul_flops_reports_every_dtype_of_the_table():
    peaks = measure.peak_matmul_flops("cpu", sizes=(64,))
    assert set(peaks) == {"fp32", "bf16", "fp16"} and all(v > 0 for v in peaks.values())


def test_bench_reads_its_measurements_from_the_shared_module():
    from blip2_internlm.tools import bench

    assert bench.peak_matmul_flops is measure.peak_matmul_flops
    assert bench.measure_steps is measure.measure_steps
    for copy in ("_sync", "_reset_peak_memory", "_peak_memory_growth", "count_flops", "measure"):
        assert not hasattr(bench, copy), copy


# --- dtype names ---------------------------------------------------------------------------------


def test_dtype_names_round_trip_and_other_dtypes_keep_torch_spelling():
    assert {name: dtype_name(dtype) for name, dtype in DTYPES.items()} == {n: n for n in ("fp32", "fp16", "bf16")}
    assert dtype_name(torch.float64) == "torch.float64"
    assert to_dtype("bf16") is torch.bfloat16


def test_an_unknown_dtype_name_is_an_error_naming_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"model\.llm_precision = 'fp8'.*\['bf16', 'fp16', 'fp32'\]"):
        to_dtype("fp8", key="model.llm_precision")


# --- config directories ----------------------------------------------------------------------------


def test_the_named_config_directories_hold_the_package_and_repository_configs():
    from blip2_internlm import paths

    assert {p.stem for p in paths.BENCH_CONFIG_DIR.glob("*.yaml")} >= {"tiny", "small", "real"}
    assert (paths.MODEL_CONFIG_DIR / "blip2_internlm_tiny.yaml").is_file()
    assert (paths.SHAPES_DATASET_CONFIG_DIR / "defaults_caption.yaml").is_file()
    assert (paths.DATASET_CONFIG_DIR / "coco_cn_caption" / "defaults.yaml").is_file()
    assert (paths.TINY_RUN_CONFIG_DIR / "pretrain_stage2.yaml").is_file()
    assert paths.SHAPES_DATASET_CONFIG_DIR.parent == paths.DATASET_CONFIG_DIR
    assert paths.DATASET_CONFIG_DIR.parent == paths.MODEL_CONFIG_DIR.parent == paths.CONFIG_DIR


def test_sdpa_on_the_cpu_counts_as_the_matmuls_it_replaces_forward_and_backward():
    q, k, v = (torch.randn(2, 4, 7, 16, requires_grad=True) for _ in range(3))

    def by_hand():
        return torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v

    sdpa = torch.nn.functional.scaled_dot_product_attention
    forward = 2 * (2 * 2 * 4 * 7 * 7 * 16)  # q @ k^T and p @ v, two FLOPs per multiply-add
    assert measure.count_flops(lambda: sdpa(q, k, v)) == measure.count_flops(by_hand) == forward
    assert measure.count_flops(lambda: sdpa(q, k, v).sum().backward()) > 2 * forward


def test_interleaved_medians_time_each_function_in_turn_after_the_warmup():
    calls = []
    medians = measure.interleaved_medians(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", repeats=3, warmup=1
    )
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, a and b alternating
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())
