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

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

# fp32 sums of a few hundred products, in two orders: the differences stay at the last bits
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "x",
    [randn(48), randn(6, 48), randn(2, 5, 48), randn(48, 6).t(), randn(2, 10, 48)[:, ::3]],
    ids=["1-d", "2-d", "3-d", "transposed", "strided"],
)
def test_onednn_linear_gives_f_linear_and_its_three_gradients(x):
    weight, bias = randn(40, 48, seed=1).requires_grad_(), randn(40, seed=2).requires_grad_()
    x = x.clone().requires_grad_()
    ours, reference = onednn_linear(x, weight, bias), F.linear(x, weight, bias)
    torch.testing.assert_close(ours, reference, **TOLERANCE)
    upstream = randn(*reference.shape, seed=3)
    for mine, theirs in zip(
        torch.autograd.grad(ours, (x, weight, bias), upstream),
        torch.autograd.grad(reference, (x, weight, bias), upstream),
    ):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)


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
    with OneDNNLinears():
        torch.testing.assert_close(compiled(x), F.linear(x, weight).relu(), **TOLERANCE)


def test_the_setting_resolves_per_device_and_the_region_is_entered_once():
    assert resolve_cpu_fp32_linear("auto", torch.device("cpu")) == "onednn"
    assert resolve_cpu_fp32_linear("auto", torch.device("meta")) == "torch"
    assert resolve_cpu_fp32_linear("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match=r"model\.cpu_fp32_linear = 'mkl'"):
        resolve_cpu_fp32_linear("mkl", torch.device("cpu"))
    cpu = torch.device("cpu")
    # under autocast the region would only add a Python call per torch call
    assert not isinstance(cpu_fp32_linear_context("auto", cpu, torch.bfloat16), OneDNNLinears)
    with cpu_fp32_linear_context("auto", cpu):
        assert onednn_linears_active()
        assert not isinstance(cpu_fp32_linear_context("auto", cpu), OneDNNLinears)  # no second layer
    assert not onednn_linears_active()


def test_onednn_asked_of_a_torch_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert resolve_cpu_fp32_linear("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="no oneDNN"):
        resolve_cpu_fp32_linear("onednn", torch.device("cpu"))


def test_the_flop_counter_counts_the_onednn_linear_as_f_linear():
    from blip2_internlm.measure import count_flops

    x, weight = randn(2, 7, 16), randn(12, 16)
    assert count_flops(lambda: onednn_linear(x, weight)) == count_flops(lambda: F.linear(x, weight)) == 2 * 14 * 16 * 12


# --- the model -------------------------------------------------------------------------------------


SAMPLES = {
    "image": randn(3, 3, 64, 64),
    "text_input": ["a red circle", "左边有一个蓝色的正方形", "two green triangles"],
}


def loss_and_grads(model):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the Q-Former's dropout draws the same masks
    loss = model(SAMPLES)["loss"]
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


def test_a_training_step_under_onednn_gives_torchs_loss_and_gradients(lavis_ready):
    onednn, plain = build(cpu_fp32_linear="onednn"), build(cpu_fp32_linear="torch")
    (loss, grads), (plain_loss, plain_grads) = loss_and_grads(onednn), loss_and_grads(plain)
    torch.testing.assert_close(loss, plain_loss, **TOLERANCE)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointed_llm_layers_recompute_with_the_forwards_kernel(lavis_ready):
    """The recomputation runs in the backward pass, outside the model's region: it must still use oneDNN,
    so checkpointing changes no bit of the gradients."""
    (_, grads), (_, checkpointed) = (
        loss_and_grads(build(cpu_fp32_linear="onednn")),
        loss_and_grads(build(cpu_fp32_linear="onednn", llm_grad_checkpoint=True)),
    )
    assert all(torch.equal(grads[name], checkpointed[name]) for name in grads)


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
    assert texts["onednn"] == texts["torch"]
