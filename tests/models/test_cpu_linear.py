"""fp32 linears on a CPU through oneDNN (``model.cpu_fp32_linear``, models/cpu_linear.py): the products
and all three gradients of ``F.linear`` within fp32 rounding, only where the setting and the tensors
call for it, and a model whose losses, gradients and generated tokens agree with torch's kernel."""

import pytest
import torch
from spec_helpers import build_tiny_blip2 as build
from torch.nn import functional as F

from blip2_internlm.models.cpu_linear import (
    OneDNNLinears,
    cpu_fp32_linear_context,
    onednn_linear,
    onednn_linears_active,
    resolve_cpu_fp32_linear,
)

pytestmark = [
    pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"),
    pytest.mark.kernel_sensitive,
]

EPS32 = torch.finfo(torch.float32).eps


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def summation_bound(terms: int, magnitude: torch.Tensor) -> torch.Tensor:
    """gamma(n) * magnitude, gamma(n) = n*u / (1 - n*u), u = eps/2: how far an fp32 sum of rounded products
    can be from the exact one when each term goes through at most ``terms`` roundings and ``magnitude``
    is the sum of the terms' absolute values (Higham, Accuracy and Stability of Numerical Algorithms,
    3.1).  It holds for every summation order, blocking and vector width, i.e. for every kernel on every
    CPU that sums in fp32; a kernel that summed in less (bf16, tf32) or summed the wrong terms breaks it."""
    unit = EPS32 / 2
    return terms * unit / (1 - terms * unit) * magnitude


@pytest.mark.parametrize(
    "x",
    [randn(48), randn(6, 48), randn(2, 5, 48), randn(48, 6).t(), randn(2, 10, 48)[:, ::3]],
    ids=["1-d", "2-d", "3-d", "transposed", "strided"],
)
def test_onednn_linear_gives_f_linear_and_its_three_gradients(x):
    """The product and the gradients of x, weight and bias are each within fp32 summation rounding of the
    float64 ones, as torch's own kernel is (both checked, so the bound is known to be met)."""
    weight, bias = randn(40, 48, seed=1), randn(40, seed=2)
    upstream = randn(*F.linear(x, weight, bias).shape, seed=3)
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    # every term of y, dL/dx, dL/dW, dL/db goes through a product and at most in + 1, out, rows additions
    terms = max(x.shape[-1] + 1, weight.shape[0], rows) + 1

    def value_and_grads(linear, *arguments, grad):
        arguments = [a.detach().clone().requires_grad_() for a in arguments]
        out = linear(*arguments)
        return [out.detach(), *torch.autograd.grad(out, arguments, grad)]

    exact = value_and_grads(F.linear, x.double(), weight.double(), bias.double(), grad=upstream.double())
    # the same sums over the terms' absolute values: |x| |W|^T + |b|, |g| |W|, |g|^T |x|, sum |g|
    magnitude = value_and_grads(
        F.linear, x.double().abs(), weight.double().abs(), bias.double().abs(), grad=upstream.double().abs()
    )
    for kernel in (onednn_linear, F.linear):
        for name, got, want, size in zip(
            ("y", "dx", "dW", "db"), value_and_grads(kernel, x, weight, bias, grad=upstream), exact, magnitude
        ):
            error = (got.double() - want).abs()
            assert got.dtype == torch.float32 and got.shape == want.shape, name
            assert (error <= summation_bound(terms, size)).all(), f"{kernel.__name__} {name}: {error.max():.3g}"


def test_a_frozen_weights_backward_keeps_only_the_weight():
    """A frozen layer (the ViT's, the LLM's) needs no input for its backward: activations are not held for it."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        onednn_linear(randn(4, 8).requires_grad_(), randn(3, 8, seed=1))
    assert [tuple(t.shape) for t in saved] == [(3, 8)]


def test_the_region_routes_fp32_cpu_linears_only():
    weight = randn(5, 8).requires_grad_()
    x = randn(3, 8)
    with OneDNNLinears():
        assert type(F.linear(x, weight).grad_fn).__name__ == "_OneDNNLinearBackward"
        assert type(torch.nn.Linear(8, 2)(x).grad_fn).__name__ == "_OneDNNLinearBackward"
        # bf16 (torch sends it to oneDNN itself), under autocast, and empty inputs keep F.linear
        assert type(F.linear(x.bfloat16(), weight.bfloat16()).grad_fn).__name__ != "_OneDNNLinearBackward"
        with torch.autocast("cpu", torch.bfloat16):
            assert F.linear(x, weight).dtype == torch.bfloat16
        assert F.linear(randn(0, 8), weight).shape == (0, 5)
    assert type(F.linear(x, weight).grad_fn).__name__ != "_OneDNNLinearBackward"


def test_a_compiled_function_in_the_region_keeps_f_linear_for_inductor():
    """``model.decode_compile`` compiles the decoding step inside the region: Inductor cannot lower
    oneDNN's plain-weight linear, and chooses its own kernels for ``F.linear``."""
    weight, x = randn(6, 16), randn(4, 16, seed=1)
    compiled = torch.compile(lambda x: F.linear(x, weight).relu(), fullgraph=True)
    exact = F.linear(x.double(), weight.double()).relu()  # relu moves no value further from the exact one
    bound = summation_bound(weight.shape[1] + 1, F.linear(x.double().abs(), weight.double().abs()))
    with OneDNNLinears():
        for got in (compiled(x), F.linear(x, weight).relu()):  # Inductor's kernel, oneDNN's
            assert ((got.double() - exact).abs() <= bound).all()


def test_the_setting_resolves_per_device_and_the_region_is_entered_once():
    from blip2_internlm.hardware import fastest_cpu_fp32_linear

    # auto is whichever kernel this machine measured faster (tests/test_hardware.py), never a constant
    assert resolve_cpu_fp32_linear("auto", torch.device("cpu")) == fastest_cpu_fp32_linear()
    assert resolve_cpu_fp32_linear("onednn", torch.device("cpu")) == "onednn"
    assert resolve_cpu_fp32_linear("auto", torch.device("meta")) == "torch"
    assert resolve_cpu_fp32_linear("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match=r"model\.cpu_fp32_linear = 'mkl'"):
        resolve_cpu_fp32_linear("mkl", torch.device("cpu"))
    cpu = torch.device("cpu")
    # under autocast the region would only add a Python call per torch call
    assert not isinstance(cpu_fp32_linear_context("onednn", cpu, torch.bfloat16), OneDNNLinears)
    assert not isinstance(cpu_fp32_linear_context("torch", cpu), OneDNNLinears)
    with cpu_fp32_linear_context("onednn", cpu):
        assert onednn_linears_active()
        assert not isinstance(cpu_fp32_linear_context("onednn", cpu), OneDNNLinears)  # no second layer
    assert not onednn_linears_active()


def test_onednn_asked_of_a_torch_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert resolve_cpu_fp32_linear("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="no oneDNN"):
        resolve_cpu_fp32_linear("onednn", torch.device("cpu"))


def test_the_flop_counter_counts_the_onednn_linear_as_f_linear():
    from blip2_internlm.tools.measure import count_flops

    x, weight = randn(2, 7, 16), randn(12, 16)
    assert count_flops(lambda: onednn_linear(x, weight)) == count_flops(lambda: F.linear(x, weight)) == 2 * 14 * 16 * 12


# --- the model -------------------------------------------------------------------------------------


SAMPLES = {
    "image": randn(3, 3, 64, 64),
    "text_input": ["a red circle", "左边有一个蓝色的正方形", "two green triangles"],
}


def loss_and_grads(model, dtype=torch.float32):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the Q-Former's dropout draws the same masks
    loss = model({**SAMPLES, "image": SAMPLES["image"].to(dtype)})["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_the_models_compute_region_routes_the_vit_qformer_and_llm_linears(lavis_ready):
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Linears(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += func is F.linear
            return func(*args, **(kwargs or {}))

    class OneDNNCalls(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func._overloadpacket is torch.ops.mkldnn._linear_pointwise
            return func(*args, **(kwargs or {}))

    linears, routed = Linears(), OneDNNCalls()
    with linears:
        build(cpu_fp32_linear="torch")(SAMPLES)
    with routed:
        build(cpu_fp32_linear="onednn")(SAMPLES)
    # all but llm_proj, which runs outside the region (as in LAVIS, it projects outside autocast)
    assert routed.calls == linears.calls - 1 > 20


#: how far an fp32 training step's loss and gradients may be from float64's, relative to the scale of the
#: gradients of the same module: 2^10 eps32 (1.2e-4).  Each gradient ends a chain of a few tens of fp32
#: reductions of up to ~10^3 terms (hidden 64, vocabulary 800, ~100 tokens); rounding errors of
#: independent sign grow as eps * sqrt(terms) per reduction and as the square root of the chain's length,
#: i.e. tens of eps: at most 10 eps measured for both kernels, on AVX-512-BF16 and on emulated AVX2 and
#: plain (ATEN_CPU_CAPABILITY=default) CPUs.  2^10 leaves a margin of 100 for the conditioning of softmax
#: and layer norms, which does not depend on the CPU; a wrong product (a transposed weight, a dropped
#: bias) errs by millions of eps, a kernel summing in bf16 by thousands.
TRAINING_STEP_TOLERANCE = 2**10 * EPS32


def build_with_biases(**overrides):
    """The tiny model with random linear biases (BERT's and the ViT's start at zero, InternLM2 has none),
    the same for every call: a kernel that dropped or misplaced the bias changes the step."""
    model = build(**overrides)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=generator)
    return model


def test_a_training_step_under_onednn_gives_torchs_loss_and_gradients(lavis_ready, monkeypatch):
    """Both kernels' fp32 loss and gradients are within fp32 rounding (TRAINING_STEP_TOLERANCE) of the
    same step in float64, so oneDNN's training step is torch's up to rounding, on any CPU.  A gradient is
    compared at its module's scale (the largest float64 gradient of that module's parameters): the key
    biases' exact gradients are 0 (softmax ignores a shift shared by all keys) and their fp32 values
    rounding noise, small beside the key weights' gradients."""
    from lavis.models.blip2_models.blip2 import LayerNorm

    with monkeypatch.context() as patch:
        # LAVIS's LayerNorm computes in float32 (for fp16 models); the float64 step keeps float64
        patch.setattr(LayerNorm, "forward", torch.nn.LayerNorm.forward)
        exact_loss, exact = loss_and_grads(build_with_biases(cpu_fp32_linear="torch").double(), torch.float64)
    assert {grad.dtype for grad in exact.values()} == {torch.float64}
    scale = {}
    for name, grad in exact.items():
        module = name.rpartition(".")[0]
        scale[module] = max(scale.get(module, 0.0), grad.abs().max().item())
    for kernel in ("onednn", "torch"):
        loss, grads = loss_and_grads(build_with_biases(cpu_fp32_linear=kernel))
        # the model returns its token loss in float32: the float64 step's loss is that sum, rounded once
        loss_error = abs(loss.item() - exact_loss.item()) / abs(exact_loss.item())
        assert loss_error <= TRAINING_STEP_TOLERANCE, f"{kernel} loss: {loss_error / EPS32:.0f} eps32"
        assert grads.keys() == exact.keys() and grads
        for name, grad in grads.items():
            error = (grad.double() - exact[name]).abs().max().item() / scale[name.rpartition(".")[0]]
            assert error <= TRAINING_STEP_TOLERANCE, f"{kernel} {name}: {error / EPS32:.0f} eps32"


def test_checkpointed_llm_layers_recompute_with_the_forwards_kernel(lavis_ready):
    """The recomputation runs in the backward pass, outside the model's region: it must still use oneDNN,
    so checkpointing changes no bit of the gradients."""
    (_, grads), (_, checkpointed) = (
        loss_and_grads(build(cpu_fp32_linear="onednn")),
        loss_and_grads(build(cpu_fp32_linear="onednn", llm_grad_checkpoint=True)),
    )
    assert all(torch.equal(grads[name], checkpointed[name]) for name in grads)  # one kernel, same sums: any CPU


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_under_onednn_gives_torchs_tokens(lavis_ready, num_beams):
    texts = {}
    for kernel in ("onednn", "torch"):
        model = build(cpu_fp32_linear=kernel).eval()
        texts[kernel] = model.generate(
            {"image": SAMPLES["image"], "prompt": ["", "问题：这是什么？", "Question: what? Answer:"]},
            num_beams=num_beams,
            max_length=8,
            min_length=8,
        )
    # the kernels' logits differ by ~5e-6, the smallest gap between a row's leading candidates is ~6e-4
    # (both measured on AVX-512-BF16 and on an emulated AVX2 CPU): 100x apart, the same tokens
    assert texts["onednn"] == texts["torch"]
