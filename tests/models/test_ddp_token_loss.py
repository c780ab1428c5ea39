"""Stage-2 training on 2 ranks takes the same step as on 1: the loss is weighted by label
tokens across ranks, so DDP's gradient average is the gradient of the global token mean."""

import pytest
import torch
from conftest import torchrun
from spec_helpers import REPO

# 2 + 2 samples against 4 in one batch: other GEMM shapes and summation orders (gradient_mismatches)
pytestmark = pytest.mark.kernel_sensitive

# rank 0 gets the two short captions, rank 1 the two long ones: 6 vs 32 label tokens
CAPTIONS = [
    "红",
    "一只猫",
    "a red circle on the left of a big blue square next to a green triangle",
    "中间有一个绿色的三角形，右边有一个蓝色的正方形，左边有一个红色的圆形",
]
RTOL, ATOL = 1e-5, 1e-6
LOSS_PATHS = pytest.mark.parametrize("labels_only", [True, False], ids=["lm_head_on_labels_only", "labels_path"])


def step(model, samples):
    """Loss, label-token count and gradients of the trainable parameters for one backward."""
    model.zero_grad(set_to_none=True)
    output = model(samples)
    output["loss"].backward()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    return {"loss": output["loss"].detach(), "loss_tokens": output["loss_tokens"], "grads": grads}


@pytest.fixture(scope="module")
def runs(lavis_ready, tmp_path_factory):
    """(single process on the 4-sample batch, {rank: result} of 2 gloo ranks with 2 samples each)."""
    from lavis.models import load_model_and_preprocess

    torch.manual_seed(0)
    model = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]  # eval: no dropout
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    single = {}
    for labels_only in (True, False):
        model.lm_head_on_labels_only = labels_only
        single[labels_only] = step(model, {"image": images, "text_input": CAPTIONS})
        with torch.no_grad():
            single[labels_only]["halves"] = [
                model({"image": images[i : i + 2], "text_input": CAPTIONS[i : i + 2]}) for i in (0, 2)
            ]
    work = tmp_path_factory.mktemp("ddp_token_loss")
    torch.save({"state_dict": model.state_dict(), "images": images, "captions": CAPTIONS}, work / "batch.pt")
    torchrun(str(REPO / "tests" / "ddp_token_loss_worker.py"), str(work / "batch.pt"), str(work), nproc=2)
    ranks = {rank: torch.load(work / f"rank{rank}.pt") for rank in (0, 1)}
    return single, ranks


def gradient_mismatches(grads, reference):
    """Parameters whose gradients differ beyond float32 noise.  The absolute tolerance grows with
    each tensor's largest entry: summing per-sample gradients as 2 + 2 instead of 4 rounds
    differently, and where they cancel (small entries of query_tokens) that is all that is left."""
    return [
        name
        for name, ref in reference.items()
        if not torch.allclose(grads[name], ref, rtol=RTOL, atol=ATOL + RTOL * ref.abs().max())
    ]


def mean_over_ranks(ranks, labels_only, mode):
    return (ranks[0][labels_only, mode]["loss"] + ranks[1][labels_only, mode]["loss"]) / 2


def test_the_ranks_hold_clearly_different_numbers_of_label_tokens(runs):
    single, ranks = runs
    counts = [int(ranks[rank][True, "token_weighted"]["loss_tokens"]) for rank in (0, 1)]
    assert counts == [6, 32]  # each caption's tokens and its </s>
    assert sum(counts) == int(single[True]["loss_tokens"])


@LOSS_PATHS
def test_the_mean_over_ranks_of_the_ddp_loss_is_the_single_process_loss(runs, labels_only):
    single, ranks = runs
    ddp_mean = mean_over_ranks(ranks, labels_only, "token_weighted")
    assert torch.allclose(ddp_mean, single[labels_only]["loss"], rtol=RTOL, atol=ATOL)


@LOSS_PATHS
def test_ddp_gradients_equal_the_single_process_gradients(runs, labels_only):
    single, ranks = runs
    reference = single[labels_only]["grads"]
    assert len(reference) > 10 and all(g.abs().sum() > 0 for g in reference.values())
    for rank in (0, 1):
        assert gradient_mismatches(ranks[rank][labels_only, "token_weighted"]["grads"], reference) == []


@LOSS_PATHS
def test_a_per_rank_token_mean_would_not_give_the_single_process_step(runs, labels_only):
    """What DDP did before the loss was weighted across ranks: the batch above tells them apart."""
    single, ranks = runs
    assert not torch.allclose(
        mean_over_ranks(ranks, labels_only, "per_rank_mean"), single[labels_only]["loss"], rtol=RTOL, atol=ATOL
    )
    reference = single[labels_only]["grads"]
    assert len(gradient_mismatches(ranks[0][labels_only, "per_rank_mean"]["grads"], reference)) > len(reference) // 2


@LOSS_PATHS
def test_without_gradients_each_rank_returns_the_mean_over_its_own_tokens(runs, labels_only):
    """Evaluation is unchanged, and loss_tokens weights the ranks' losses into the global mean."""
    single, ranks = runs
    halves = single[labels_only]["halves"]
    for rank in (0, 1):
        assert torch.allclose(ranks[rank][labels_only, "no_grad"]["loss"], halves[rank]["loss"], rtol=RTOL, atol=ATOL)
    weighted = sum(half["loss"] * half["loss_tokens"] for half in halves) / sum(half["loss_tokens"] for half in halves)
    assert torch.allclose(weighted, single[labels_only]["loss"], rtol=RTOL, atol=ATOL)
