"""Measuring a step: wall time, peak memory, FLOPs, and the machine's limits to read them against (its
matmul peak per dtype, its copy bandwidth, and the roofline floor they give a computation).

Used by the benchmark (``python -m blip2_internlm.tools.bench``) and by the memory planner's check
against a real training step (``python -m blip2_internlm.tools.plan --measure``).

Peak memory has two readings:

* :func:`reset_peak_memory` / :func:`peak_memory_growth`: on CUDA the caching allocator's
  ``max_memory_allocated``; on the CPU the process's resident-set high-water mark (``VmHWM``,
  reset through ``/proc/self/clear_refs``), which includes what the allocator keeps and what is
  not a tensor.  What the benchmark reports.
* :class:`LiveTensorBytes`: on the CPU, the peak of live tensor storages counted at the
  dispatcher, the CPU counterpart of ``max_memory_allocated``.  What the planner is checked
  against.
"""

from __future__ import annotations

import functools
import gc
import logging
import statistics
import time
import weakref
from collections.abc import Callable

import torch

from blip2_internlm.dtypes import DTYPES

logger = logging.getLogger(__name__)


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    """Wait for the device's queued work: a wall time on CUDA measures nothing without it."""
    if is_cuda(device):
        torch.cuda.synchronize()


# --- peak memory ---------------------------------------------------------------------------------


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_memory(device) -> int | None:
    """Start a peak-memory window; returns the baseline to pass to :func:`peak_memory_growth`
    (CUDA: bytes allocated; CPU: resident set), or ``None`` where the CPU peak cannot be reset."""
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    gc.collect()
    try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status("VmRSS")


def peak_memory(device) -> int | None:
    """Peak since :func:`reset_peak_memory`: CUDA, bytes allocated; CPU, the resident set."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated()
    return _proc_status("VmHWM")


def peak_memory_growth(device, base: int | None) -> int | None:
    """Peak since :func:`reset_peak_memory` returned ``base``, less ``base``."""
    if base is None:
        return None
    peak = peak_memory(device)
    return None if peak is None else peak - base


class LiveTensorBytes:
    """Peak bytes of live tensor storages on the CPU, counted at the dispatcher.

    A ``TorchDispatchMode`` sees every tensor an op returns (forward, backward and optimizer);
    each new storage is counted until Python frees it (a finalizer).  Views share their base's
    storage and are counted once.  This is what the CUDA caching allocator's
    ``max_memory_allocated`` reports on a GPU, without the allocator's rounding.
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self._live = set()

    def _count(self, tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(storage)
        if key in self._live or storage.device.type == "meta":
            return
        nbytes = storage.nbytes()
        self._live.add(key)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key, nbytes) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current -= nbytes

    def add(self, *tensor_iterables) -> None:
        """Count tensors that exist before the window opens (parameters, optimizer state)."""
        for tensors in tensor_iterables:
            for tensor in tensors:
                self._count(tensor)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for item in tree_flatten(out)[0]:
                    if isinstance(item, torch.Tensor):
                        tracker._count(item)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


# --- FLOPs and time ------------------------------------------------------------------------------


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one ``fn()`` by ``torch.utils.flop_counter``'s per-op formulas (matmuls, convolutions,
    attention; forward and backward).

    ``FlopCounterMode`` itself also tracks modules with hooks that assert on outputs without a
    gradient function, which ``generate`` (``no_grad``, trainable Q-Former) produces; the same
    formulas are applied here by a plain dispatch mode.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    formulas = {**flop_registry, **_cpu_attention_formulas(), **_onednn_linear_formulas()}

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = formulas.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    counter = Counter()
    with counter:
        fn()
    return int(counter.total)


def _cpu_attention_formulas() -> dict:
    """FLOPs of ``scaled_dot_product_attention``'s CPU kernel, which ``flop_registry`` lacks (it has the
    CUDA kernels only, so SDPA on a CPU counted as zero): the formulas of the CUDA flash kernel."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


def _onednn_linear_formulas() -> dict:
    """FLOPs of oneDNN's linear (``mkldnn._linear_pointwise``: ``model.cpu_fp32_linear``, the decoding
    loop's packed weights), which ``flop_registry`` lacks: 2 x input elements x output features."""

    def linear(x, weight, *args, out_val=None, **kwargs):
        return 2 * x.numel() * out_val.shape[-1]

    return {torch.ops.mkldnn._linear_pointwise: linear}


def measure_steps(fn: Callable[[], object], device, repeats: int, warmup: int = 1, flops: bool = True) -> dict:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, its FLOPs (one more
    run, uncounted in the time; ``flops=False`` skips it), and the peak memory growth over the timed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    base = reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    memory = peak_memory_growth(device, base)
    return dict(
        times_s=[round(t, 5) for t in times],
        median_s=statistics.median(times),
        flops=count_flops(fn) if flops else None,
        peak_memory_growth_bytes=memory,
    )


def interleaved_medians(fns: dict[str, Callable[[], object]], device, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, timed in turn within each repeat (after ``warmup`` calls each),
    so that a slow spell of a shared machine falls on all of them alike: for differences of timings."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def memory_bandwidth(device, megabytes: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of a large tensor copy (``dst.copy_(src)``, bytes read plus bytes written): the
    rate a step that must read its weights and caches once is bounded by."""
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = _best_rate(functools.partial(dst.copy_, src), 2 * src.nbytes, device, repeats)
    del src, dst
    return best


def roofline_seconds(flops: float, bytes_read: float, peak_flops: float, bandwidth: float) -> dict:
    """The least time a computation can take on this machine: its FLOPs at the matmul peak or its
    bytes at the copy bandwidth, whichever is longer (which one is ``bound``)."""
    compute, memory = flops / peak_flops, bytes_read / bandwidth
    return dict(
        seconds=max(compute, memory),
        compute_s=compute,
        memory_s=memory,
        bound="compute" if compute >= memory else "memory",
    )


def peak_matmul_flops(device, sizes=None, by_kernel: dict | None = None) -> dict:
    """Best square-matmul FLOP/s per dtype on this machine: the limit the achieved FLOP/s is read against.

    On a CPU the best of two kernels: ``torch.matmul`` (the default BLAS for fp32) and oneDNN's
    (``mkldnn._linear_pointwise``, which ``model.cpu_fp32_linear`` uses); ``by_kernel``, when given, gets
    each kernel's figure, e.g. ``{"fp32 torch.matmul": ..., "fp32 oneDNN": ...}``, and ``None`` for a
    kernel that cannot run that dtype on this CPU (oneDNN's bf16 without AVX-512, say).  A dtype that no
    kernel runs has no entry in the result."""
    from blip2_internlm.hardware import onednn_runs

    sizes = sizes or ((2048, 4096, 8192) if is_cuda(device) else (512, 1024, 2048))
    kernels = {"torch.matmul": torch.matmul}
    if not is_cuda(device) and torch.backends.mkldnn.is_available():
        kernels["oneDNN"] = _onednn_matmul_t  # a @ b.T: the same FLOPs as a @ b
    peaks = {}
    for name in ("fp32", "bf16", "fp16"):
        dtype = DTYPES[name]
        runs = {
            kernel: kernel != "oneDNN" or (name != "fp16" and onednn_runs(dtype))  # no fp16 oneDNN on most CPUs
            for kernel in kernels
        }
        # fp16 matmuls on a CPU are emulated and very slow: the smallest size tells as much, quickly
        for n in sizes[:1] if name == "fp16" and not is_cuda(device) else sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            for kernel, matmul in kernels.items():
                if not runs[kernel]:
                    continue
                try:
                    best = _best_rate(functools.partial(matmul, a, b), 2 * n**3, device)
                except RuntimeError as err:  # no kernel for this dtype here: reported, not a crash
                    logger.info("%s %s matmul cannot run here: %s", name, kernel, str(err).splitlines()[0])
                    runs[kernel] = False
                    continue
                peaks[name] = max(peaks.get(name, 0.0), best)
                if by_kernel is not None:
                    key = f"{name} {kernel}"
                    by_kernel[key] = max(by_kernel.get(key) or 0.0, best)
        if by_kernel is not None:
            for kernel, ran in runs.items():
                if not ran and not (kernel == "oneDNN" and name == "fp16"):
                    by_kernel[f"{name} {kernel}"] = None
    return peaks


def _best_rate(fn: Callable[[], object], amount: float, device, runs: int = 5) -> float:
    """``amount`` (FLOPs, bytes) per second of ``fn``'s fastest run after a warm-up call."""
    fn()
    sync(device)
    best = 0.0
    for _ in range(runs):  # best of: other processes only ever slow a run down
        start = time.perf_counter()
        fn()
        sync(device)
        best = max(best, amount / (time.perf_counter() - start))
    return best


def _onednn_matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
