"""What this machine computes fast, and the ``auto`` defaults decided from it.

Machines differ: one CPU multiplies bf16 natively (AVX512-BF16, AMX) and another emulates it many
times slower (docs/portability.md has the factors measured per CPU class); on one CPU oneDNN's fp32
matmul beats torch's default BLAS (MKL) and on another it loses.  So no default is a constant
measured on one machine.  Each ``auto`` key of the model config resolves here, on the machine that
runs it:

* ``llm_precision`` and ``autocast_dtype``: bf16 on a CPU only where its matmuls are native
  (:func:`cpu_has_native_bf16`: the CPU's flags, oneDNN's instruction-set cap, and a bf16 product
  that oneDNN really runs); on CUDA bf16 where the GPU supports it, else fp16.
* ``cpu_fp32_linear``: the faster of oneDNN and torch's ``F.linear`` at the model's shapes,
  measured once, briefly, and kept per machine (:func:`fastest_cpu_fp32_linear`).
* the decoding loop's packed weights: where oneDNN runs bf16 (:func:`onednn_runs`).

The emulated machines CI checks set ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA`` and
``MKL_ENABLE_INSTRUCTIONS``; every decision here reads them, so an emulated AVX2 CPU decides as a
real one does (docs/portability.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time

import torch

logger = logging.getLogger(__name__)

#: CPU instruction-set classes, slowest first; a machine's class is the lowest that any of its
#: limits (the CPU itself, ATen's dispatch, oneDNN's cap, MKL's cap) allows.
ISA_CLASSES = ("default", "avx2", "avx512", "avx512_bf16", "amx")
#: Classes that multiply bf16 natively.
NATIVE_BF16_CLASSES = ("avx512_bf16", "amx")
#: The environment variables that cap the kernels torch's CPU libraries use.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
#: How much faster oneDNN's fp32 linear must be before ``cpu_fp32_linear: auto`` leaves torch's own.
ONEDNN_MARGIN = 1.1


def _level(name: str) -> int:
    return ISA_CLASSES.index(name)


def _cpu_flag_class() -> str:
    """What the processor itself offers (torch's cpuinfo, which no environment variable changes)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    if getattr(cpu, "_is_avx512_supported", lambda: False)():
        return "avx512"
    if getattr(cpu, "_is_avx2_supported", lambda: False)():
        return "avx2"
    return "default"


def _aten_class() -> str:
    """ATen's vectorised kernels (``ATEN_CPU_CAPABILITY`` lowers them)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if capability.startswith("avx512"):
        return "amx"  # no cap on oneDNN's or MKL's choice beyond AVX-512
    return "avx2" if capability.startswith("avx2") else "default"


def _onednn_class() -> str:
    """oneDNN's instruction-set cap (``ONEDNN_MAX_CPU_ISA``, or its older name ``DNNL_MAX_CPU_ISA``)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if not cap or cap in ("ALL", "DEFAULT") or "AMX" in cap:
        return "amx"
    if "BF16" in cap or "FP16" in cap or cap.startswith("AVX10"):
        return "avx512_bf16"
    if cap.startswith("AVX512"):
        return "avx512"
    return "avx2" if cap.startswith("AVX2") else "default"


def _mkl_class() -> str:
    """MKL's instruction-set cap (``MKL_ENABLE_INSTRUCTIONS``): torch's fp32 matmuls on x86."""
    cap = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
    if not cap or cap.startswith("AVX512"):
        return "amx"
    return "avx2" if cap.startswith("AVX2") else "default"


def cpu_isa_class() -> str:
    """This CPU's class for speed (``ISA_CLASSES``, or ``aarch64`` / the machine's name off x86)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return machine
    limits = (_cpu_flag_class(), _aten_class(), _onednn_class(), _mkl_class())
    return ISA_CLASSES[min(map(_level, limits))]


@functools.cache
def onednn_runs(dtype: torch.dtype) -> bool:
    """oneDNN's linear runs in ``dtype`` on this CPU (tried once: a CPU without the instructions fails
    with "could not create a primitive descriptor", which the flags alone do not predict under a cap)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(2, 8, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 8, dtype=dtype), None, "none", [], "")
    except RuntimeError as err:
        logger.info("oneDNN cannot run a %s linear on this CPU (%s)", dtype, str(err).splitlines()[0])
        return False
    return True


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX, not capped off for oneDNN, and oneDNN
    really runs it); without that, bf16 matmuls are emulated and far slower than fp32."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return False  # not measured on an aarch64 CPU yet (some have bf16 instructions): fp32 until it is
    native = min(_level(_cpu_flag_class()), _level(_onednn_class())) >= _level("avx512_bf16")
    return native and onednn_runs(torch.bfloat16)


def target_device() -> torch.device:
    """Where a model built now will run unless told: CUDA when there is one (LAVIS's runner moves it there)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_half_dtype(device) -> torch.dtype | None:
    """The 16-bit dtype that is faster than fp32 on ``device``, or None (a CPU without native bf16).
    ``meta`` (a shape-only build, what the memory planner plans for) stands for a GPU with bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return torch.bfloat16 if device.type == "meta" else None


def resolve_llm_precision(setting: str, device) -> str:
    """``fp32`` / ``fp16`` / ``bf16`` for ``model.llm_precision: setting`` on ``device``: ``auto`` is
    :func:`fast_half_dtype`'s, else fp32; an explicit bf16 that this CPU only emulates is warned about."""
    if setting == "auto":
        half = fast_half_dtype(device)
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(half, "fp32")
    if setting == "bf16":
        warn_if_slow_bf16("model.llm_precision: bf16", device)
    return setting


# --- the fp32 linear kernel on a CPU -----------------------------------------------------------------

#: (rows, in, out) of the products timed: a training step's linears and a decoding step's (at smaller
#: products than these, BLAS libraries take single-threaded paths that say little about a model's).
LINEAR_PROBE_SHAPES = ((512, 1024, 1024), (40, 1024, 1024))


def cpu_model_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; what ``platform`` knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_fingerprint() -> str:
    """Names this machine's speed: the CPU model and flags' class, the kernel caps, torch's version (and the
    probe's shapes)."""
    parts = [cpu_model_name(), _cpu_flag_class(), torch.__version__, *(f"{k}={os.environ.get(k, '')}" for k in ISA_ENV)]
    parts.append(repr(LINEAR_PROBE_SHAPES))  # another probe is another measurement
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _time_linears(kernel) -> float:
    """Seconds of one pass over ``LINEAR_PROBE_SHAPES`` by ``kernel(x, weight)``, best of five."""
    generator = torch.Generator().manual_seed(0)
    operands = [
        (torch.randn(rows, k, generator=generator), torch.randn(n, k, generator=generator))
        for rows, k, n in LINEAR_PROBE_SHAPES
    ]
    for x, weight in operands:
        kernel(x, weight)  # warm-up: oneDNN creates its primitive on the first call
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for x, weight in operands:
            kernel(x, weight)
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_fp32_linears() -> dict:
    """Seconds per pass of each fp32 linear kernel at the probe shapes, at this process's thread count
    (the kernels differ most in how they use threads), the least of three rounds timed in turn: another
    process only ever slows a round down."""
    from torch.nn import functional as F

    kernels = {"torch": F.linear}
    if onednn_runs(torch.float32):
        kernels["onednn"] = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    times = {name: [] for name in kernels}
    for _ in range(3):
        for name, kernel in kernels.items():
            times[name].append(_time_linears(kernel))
    return {name: min(values) for name, values in times.items()}


def _decision_file():
    from blip2_internlm.assets import cache_dir

    return cache_dir() / "hardware" / f"cpu-fp32-linear-{machine_fingerprint()}.json"


@functools.cache
def fastest_cpu_fp32_linear() -> str:
    """``onednn`` or ``torch``: the faster fp32 linear on this CPU (oneDNN only when at least
    ``ONEDNN_MARGIN`` times faster).  Measured once per machine and kept under the asset cache, so every
    run, and every rank of one run, uses one kernel (the first to write the file decides for all)."""
    if not onednn_runs(torch.float32):
        return "torch"
    path = _decision_file()
    try:
        return json.loads(path.read_text())["kernel"]
    except (OSError, ValueError, KeyError):
        pass
    seconds = measure_cpu_fp32_linears()
    kernel = "onednn" if seconds["torch"] >= ONEDNN_MARGIN * seconds["onednn"] else "torch"
    record = dict(
        kernel=kernel, seconds=seconds, isa_class=cpu_isa_class(), env={k: os.environ.get(k) for k in ISA_ENV}
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(record, indent=1))
        try:
            os.link(partial, path)  # fails if another process decided first: its decision stands
        except FileExistsError:
            kernel = json.loads(path.read_text())["kernel"]
        finally:
            partial.unlink(missing_ok=True)
    except OSError as err:
        logger.info("cannot keep the fp32 linear decision in %s (%s); measured again next time", path, err)
    logger.info(
        "cpu_fp32_linear auto -> %s on this CPU (%s; one pass of the probe: %s)",
        kernel,
        cpu_isa_class(),
        ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in seconds.items()),
    )
    return kernel


# --- slow explicit choices -----------------------------------------------------------------------------

_warned: set = set()


def emulated_bf16_slowdown(size: int = 256) -> float:
    """How many times slower a bf16 matmul is than an fp32 one here: one thread (a ratio of kernels, which
    another busy process cannot skew by stalling a thread), best of three each, milliseconds in all."""
    a = torch.randn(size, size)
    best = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = a.to(dtype)
            torch.matmul(x, x)
            best[dtype] = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                torch.matmul(x, x)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def warn_if_slow_bf16(key: str, device) -> None:
    """One warning per key and process: ``key`` asks for bf16 on a CPU that only emulates it."""
    if torch.device(device).type != "cpu" or cpu_has_native_bf16() or key in _warned:
        return
    _warned.add(key)
    logger.warning(
        "%s: bf16 on a CPU without native bf16 (%s): bf16 matmuls here measured %.0fx slower than fp32; "
        "auto would choose fp32",
        key,
        cpu_isa_class(),
        emulated_bf16_slowdown(),
    )


_logged: set = set()


def log_resolved_defaults(resolved: dict) -> None:
    """One INFO line per distinct resolution and process: what each ``auto`` key became, and why."""
    line = ", ".join(
        f"{key}={'auto' if value['setting'] is None else value['setting']}->{value['resolved']}"
        for key, value in resolved.items()
        if isinstance(value, dict) and "setting" in value
    )
    machine = resolved.get("machine")
    where = machine.get("isa_class") if isinstance(machine, dict) else machine
    line = f"model defaults on {resolved.get('device')} ({where}): {line}"
    if line not in _logged:
        _logged.add(line)
        logger.info(line)


def describe_machine() -> dict:
    """The facts the defaults are decided from, for a benchmark's JSON or a checkpoint."""
    return dict(
        isa_class=cpu_isa_class(),
        cpu_flags_class=_cpu_flag_class(),
        aten_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=cpu_has_native_bf16(),
        onednn_fp32=onednn_runs(torch.float32),
        onednn_bf16=onednn_runs(torch.bfloat16),
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        env={k: os.environ[k] for k in ISA_ENV if k in os.environ},
    )
