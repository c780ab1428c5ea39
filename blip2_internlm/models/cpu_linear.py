"""fp32 linear layers on a CPU through oneDNN: ``model.cpu_fp32_linear``.

``F.linear`` on fp32 CPU tensors calls torch's default BLAS (MKL in the PyPI wheels).  oneDNN's fp32
matmul, shipped in the same wheel, is much faster than MKL on some CPUs and slower on others
(``make bench`` prints both as ``peak_matmul_flops_by_kernel``; docs/portability.md has the figures per CPU
class).  Every model of this package is mostly linear layers, so where oneDNN is faster, inside the
model's compute region (``compute_region``) an fp32 ``F.linear`` on the CPU goes to
``mkldnn._linear_pointwise``, with a backward of the same kernel (the input's gradient through the
transposed weight, the weight's as a product of the transposed gradient and input), so training and
generation both gain.

Settings: ``auto`` (the faster of the two on this CPU, measured once per machine by
``blip2_internlm.hardware.fastest_cpu_fp32_linear``), ``onednn``, ``torch`` (``F.linear`` as it is).
Nothing changes under autocast or for bf16/fp16 tensors: torch already hands those to oneDNN.  The
two kernels sum in different orders, so results differ by fp32 rounding (relative ~1e-6;
``tests/models/test_cpu_linear.py`` states the bounds and that generated tokens agree).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from blip2_internlm.hardware import fastest_cpu_fp32_linear, onednn_runs
from blip2_internlm.models.config import CPU_FP32_LINEARS

_active = threading.local()
# a subclass (a DTensor, a fake or functional tensor) keeps F.linear: its own dispatch must see the call
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def resolve_cpu_fp32_linear(setting: str, device: torch.device) -> str:
    """``onednn`` or ``torch``: the kernel ``model.cpu_fp32_linear: setting`` gives fp32 linears on ``device``."""
    if setting not in CPU_FP32_LINEARS:
        raise ValueError(f"model.cpu_fp32_linear = {setting!r}; expected one of {list(CPU_FP32_LINEARS)}")
    if torch.device(device).type != "cpu" or setting == "torch":
        return "torch"
    if not torch.backends.mkldnn.is_available():
        if setting == "onednn":
            raise ValueError("model.cpu_fp32_linear: onednn, but this torch build has no oneDNN (mkldnn)")
        return "torch"
    if setting == "onednn":
        if not onednn_runs(torch.float32):
            raise ValueError("model.cpu_fp32_linear: onednn, but oneDNN runs no fp32 linear on this CPU")
        return "onednn"
    return fastest_cpu_fp32_linear()


def cpu_fp32_linear_context(setting: str, device: torch.device, autocast_dtype: torch.dtype | None = None):
    """The region where fp32 ``F.linear`` calls on ``device`` use the kernel ``setting`` resolves to.

    ``autocast_dtype``: the dtype of the autocast region entered with it; under autocast the linears
    are not fp32, and the region is not entered (it would only cost a Python call per torch call).
    """
    if autocast_dtype is not None or resolve_cpu_fp32_linear(setting, device) == "torch" or onednn_linears_active():
        return contextlib.nullcontext()
    return OneDNNLinears()


def onednn_linears_active() -> bool:
    """Whether this thread is inside a :class:`OneDNNLinears` region."""
    return getattr(_active, "depth", 0) > 0


class OneDNNLinears(TorchFunctionMode):
    """Routes ``F.linear`` on fp32 CPU tensors outside autocast to :func:`onednn_linear`."""

    def __enter__(self):
        _active.depth = getattr(_active, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        _active.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            if _routable(x, weight, bias):
                return onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


def same_linear_kernel_on_recompute():
    """``torch.utils.checkpoint``'s ``context_fn``: the recomputation in the backward pass (outside the
    model's compute region) uses the fp32 linear kernel the forward used."""
    recompute = OneDNNLinears() if onednn_linears_active() else contextlib.nullcontext()
    return contextlib.nullcontext(), recompute


def _linear_arguments(input, weight, bias=None):
    return input, weight, bias


def _routable(x, weight, bias) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(type(t) in _PLAIN_TENSORS and t.layout == torch.strided for t in tensors)
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and weight.dim() == 2
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        # traced by torch.compile (model.decode_compile) the call stays F.linear: Inductor picks its kernels
        and not torch.compiler.is_compiling()
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN's fp32 matmul, differentiable in all three."""
    return _OneDNNLinear.apply(x, weight, bias)


def _matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` by oneDNN; ``b`` (2-D) may be a strided view, e.g. a transposed weight."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        # the input is kept only when the weight trains: a frozen layer's backward needs the weight alone
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.input_shape = x.shape
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul_t(grad_2d, weight.t()).reshape(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _matmul_t(grad_2d.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias
