"""Precision, memory and evaluation-throughput switches of Blip2InternLM: each one gives the
same losses, gradients or answers as the plain path, within the tolerance stated per test.

The per-sample ``text_tokens`` / ``prompt_embeds`` the batched versions replaced are kept
below, verbatim, as the reference specification."""

import json
from types import SimpleNamespace

import pytest
import torch
from spec_helpers import build_tiny_blip2 as build
from spec_helpers import run_python

pytestmark = pytest.mark.kernel_sensitive

PROMPTS = ["", "Question: what colour is it? Answer:", "问题：图中是什么形状？ 简短回答：", "x", " "]
TEXTS = ["左边有一个红色的圆形", "red", "a red circle on the left " * 12, "正方形", "1"]


def images(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model(lavis_ready):
    return build().eval()


# --- the per-sample construction before vectorisation: the reference --------------------------


def ids(self, text):
    return self.llm_tokenizer(text, add_special_tokens=False).input_ids if text else []


def reference_text_tokens(self, prompts, texts):
    tokenizer = self.llm_tokenizer
    rows, labels = [], []
    for prompt, text in zip(prompts, texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"empty or non-string text_input {text!r}: every sample needs a caption/answer")
        head = [tokenizer.bos_token_id] + ids(self, prompt)
        room = self.max_txt_len - len(head)
        if room < 2:
            raise ValueError(
                f"prompt {prompt!r} takes {len(head)} of max_txt_len={self.max_txt_len} tokens; "
                "raise model.max_txt_len or shorten the prompt"
            )
        body = ids(self, text) + [tokenizer.eos_token_id]
        body = body[:room]
        rows.append(head + body)
        labels.append([-100] * len(head) + body)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        targets[i, : len(label)] = torch.tensor(label)
    return input_ids, attention_mask, targets


def reference_prompt_embeds(self, queries, prompts):
    tokenizer = self.llm_tokenizer
    heads = [[tokenizer.bos_token_id] + ids(self, p) for p in prompts]
    width = max(map(len, heads))
    batch, n_query = queries.shape[:2]
    embed = self.llm_model.get_input_embeddings()
    pad = embed(torch.tensor([tokenizer.pad_token_id], device=queries.device))[0]
    rows, masks = [], []
    for b, head in enumerate(heads):
        n_pad = width - len(head)
        head_embeds = embed(torch.tensor(head, device=queries.device))
        rows.append(torch.cat([pad.expand(n_pad, -1), queries[b], head_embeds.to(queries.dtype)]))
        masks.append(torch.tensor([0] * n_pad + [1] * (n_query + len(head)), device=queries.device))
    return torch.stack(rows), torch.stack(masks)


def error_of(func, *args):
    try:
        func(*args)
    except ValueError as err:
        return str(err)
    return None


# --- vectorised LLM inputs --------------------------------------------------------------------


def test_batched_text_tokens_equal_the_per_sample_construction(model):
    for max_txt_len in (32, 12):  # 12: the long prompts leave little room, texts get cut
        model.max_txt_len = max_txt_len
        try:
            for order in (slice(None), slice(None, None, -1)):
                prompts, texts = PROMPTS[order], TEXTS[order]
                if max_txt_len == 12:
                    prompts = [p for p in prompts if len(ids(model, p)) < 9]
                    texts = texts[: len(prompts)]
                got, want = model.text_tokens(prompts, texts), reference_text_tokens(model, prompts, texts)
                for g, w in zip(got, want):
                    assert g.dtype == w.dtype and torch.equal(g, w)
        finally:
            model.max_txt_len = 32
    _, mask, labels = model.text_tokens(PROMPTS, TEXTS)
    assert mask[2].all() and model.llm_tokenizer.eos_token_id not in labels[2].tolist()  # the cut text


def test_batched_text_tokens_raise_the_same_errors_in_the_same_order(model):
    long_prompt = "long prompt " * 40
    cases = [
        (["", ""], ["a", ""]),  # empty text
        (["", ""], ["a", "   "]),  # blank text
        (["", ""], ["a", None]),  # not a string
        (["", long_prompt], ["a", "b"]),  # prompt leaves no room
        ([long_prompt, ""], ["a", ""]),  # the first offending sample decides
        (["", long_prompt], ["", "b"]),
    ]
    for prompts, texts in cases:
        want = error_of(reference_text_tokens, model, prompts, texts)
        assert want is not None and error_of(model.text_tokens, prompts, texts) == want


def test_batched_prompt_embeds_equal_the_per_sample_construction(model):
    queries = torch.randn(len(PROMPTS), 8, model.llm_model.config.hidden_size)
    got_embeds, got_mask = model.prompt_embeds(queries, PROMPTS)
    want_embeds, want_mask = reference_prompt_embeds(model, queries, PROMPTS)
    assert torch.equal(got_embeds, want_embeds) and torch.equal(got_mask, want_mask)
    assert got_mask.dtype == want_mask.dtype
    same_length = ["a b", "a b"]
    assert torch.equal(
        model.prompt_embeds(queries[:2], same_length)[0], reference_prompt_embeds(model, queries[:2], same_length)[0]
    )


def test_generate_and_predict_answers_are_unchanged_greedy_and_beam_3(model, monkeypatch):
    questions = ["图中形状是什么颜色？", "形状？", "What colour is the shape in the middle of the picture?", "几个"]
    batch = {"image": images(4, seed=3), "text_input": questions}
    got = {
        beams: (
            model.predict_answers(batch, num_beams=beams, max_len=6, prompt="问题：{} 简短回答："),
            model.generate({"image": batch["image"], "prompt": questions}, num_beams=beams, max_length=6),
        )
        for beams in (1, 3)
    }
    monkeypatch.setattr(type(model), "prompt_embeds", reference_prompt_embeds)
    for beams in (1, 3):
        want = (
            model.predict_answers(batch, num_beams=beams, max_len=6, prompt="问题：{} 简短回答："),
            model.generate({"image": batch["image"], "prompt": questions}, num_beams=beams, max_length=6),
        )
        assert got[beams] == want


# --- precision and memory -----------------------------------------------------------------------


def training_batch():
    return {
        "image": images(3, seed=1),
        "text_input": ["左边有一个红色的圆形", "a red circle", "中间"],
        "prompt": ["", "Caption:", "问题：什么？ 回答："],
    }


def qformer_grads(model):
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None and n.startswith("Qformer")
    }


def test_bf16_autocast_loss_is_within_2_percent_of_fp32_on_cpu(model):
    batch = training_batch()
    model.autocast_dtype = "off"
    fp32 = model(batch)["loss"]
    model.autocast_dtype = "bf16"
    try:
        with torch.autocast("cpu", enabled=False):
            bf16 = model(batch)["loss"]
        assert torch.isfinite(bf16)
        # bf16 keeps 8 bits (0.4% per rounding) whether the CPU multiplies it natively or emulates it
        torch.testing.assert_close(bf16.float(), fp32, rtol=2e-2, atol=0)
    finally:
        model.autocast_dtype = "fp16"  # the default: no autocast on the CPU


def test_autocast_settings_resolve_per_device(monkeypatch):
    from blip2_internlm import hardware
    from blip2_internlm.models.llm_inputs import resolve_autocast_dtype

    cpu = torch.device("cpu")
    # auto is bf16 on a CPU that multiplies bf16 natively, no autocast on one that would emulate it
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert [resolve_autocast_dtype(s, cpu) for s in ("auto", "fp16", "off", "bf16")] == [
        torch.bfloat16,
        None,
        None,
        torch.bfloat16,
    ]
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert [resolve_autocast_dtype(s, cpu) for s in ("auto", "fp16", "off", "bf16")] == [
        None,
        None,
        None,
        torch.bfloat16,
    ]
    assert resolve_autocast_dtype("fp16", torch.device("cuda")) is torch.float16  # LAVIS's default on a GPU
    with pytest.raises(ValueError, match="autocast_dtype = 'fp32'"):
        resolve_autocast_dtype("fp32", cpu)


def test_fp16_llm_trains_with_loss_scaling(lavis_ready):
    model = build(llm_precision="fp16")
    assert {p.dtype for p in model.llm_model.parameters()} == {torch.float16}
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}  # the bridge keeps fp32 master weights
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    loss = model(training_batch())["loss"]
    assert torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**12  # no inf/nan gradient: the step was taken, the scale kept
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert all(torch.isfinite(p).all() for p in trainable)


def test_llm_grad_checkpointing_recomputes_layers_with_the_same_loss_and_qformer_gradients(lavis_ready):
    losses, grads, calls = [], [], []
    for checkpointing in (False, True):
        model = build(llm_grad_checkpoint=checkpointing).train()
        count = [0]

        def counted(*_, count=count):
            count[0] += 1

        model.llm_model.model.layers[0].attention.register_forward_hook(counted)
        loss = model(training_batch())["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append(qformer_grads(model))
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointed: the layer runs again in the backward pass
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10  # gradients reach the Q-Former
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_training_without_the_llm_kv_cache_gives_the_identical_loss(model):
    caches = []
    hook = model.llm_model.base_model.register_forward_hook(
        lambda module, args, out: caches.append(out.past_key_values)
    )
    try:
        with_cache = model(training_batch())["loss"]
        model._train_use_cache = False  # what llm_train_kv_cache: False sets
        without = model(training_batch())["loss"]
    finally:
        model._train_use_cache = None
        hook.remove()
    assert caches[0] is not None and caches[1] is None
    assert torch.equal(with_cache, without)
    assert build(llm_train_kv_cache=False)._train_use_cache is False


@pytest.mark.parametrize("llm_model", ["tiny", "tiny-opt"])
def test_lm_head_on_labelled_positions_only_gives_the_loss_and_gradients_of_the_full_head(lavis_ready, llm_model):
    model = build(llm_model=llm_model).train()
    projected = []
    hook = model.llm_model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: projected.append(out.shape[:-1])
    )
    results = []
    try:
        for labels_only in (True, False):
            model.lm_head_on_labels_only = labels_only
            model.zero_grad()
            torch.manual_seed(0)  # the same Q-Former dropout masks
            loss = model(training_batch())["loss"]
            loss.backward()
            results.append((loss.detach(), model.query_tokens.grad.clone(), model.llm_proj.weight.grad.clone()))
    finally:
        hook.remove()
    (loss_kept, *grads_kept), (loss_full, *grads_full) = results
    # the same per-token losses over the labelled tokens (ignored ones add exact zeros): an ulp or two apart
    # (1 ulp measured, AVX-512-BF16 and emulated AVX2); 1e-6 is 8 ulps
    torch.testing.assert_close(loss_kept, loss_full, rtol=1e-6, atol=0)
    for kept, full in zip(grads_kept, grads_full):
        # float32 sums in another order: entries where per-token gradients cancel differ by ~1e-6
        # on some CPUs, so the absolute tolerance follows the gradient's own scale
        torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())
    # the full head projects every position of every row; the switch only the labelled ones
    batch, length = projected[1]
    assert len(projected[0]) == 1 and projected[0][0] < batch * length / 2


def test_vit_grad_checkpointing_gives_the_same_vit_gradients(lavis_ready):
    grads = []
    for checkpointing in (False, True):
        model = build(freeze_vit=False, use_grad_checkpoint=checkpointing).train()
        assert model.visual_encoder.use_checkpoint is checkpointing
        model(training_batch())["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.visual_encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


_LOAD_PROBE = r"""
import json, sys, torch
from blip2_internlm.models.builders import load_frozen_llm

def hwm():  # VmHWM: this process's peak resident memory (reset at exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

# a first load of the small tiny LLM imports and initialises what loading needs, so the
# measured growth is the big checkpoint's alone
_, warm = load_frozen_llm(sys.argv[2], "bf16")
with torch.no_grad():
    warm(torch.tensor([[1, 2, 3]]))
del warm
base = hwm()
_, model = load_frozen_llm(sys.argv[1], "bf16")
touched = [int(p.view(torch.int16).max()) for p in model.parameters()]  # reads every weight page, copies none
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
print(json.dumps({"growth": hwm() - base, "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                  "numel": sum(p.numel() for p in model.parameters())}))
"""


def test_llm_loads_in_bf16_without_a_second_fp32_copy(lavis_ready, tmp_path):
    """Peak RSS while loading a ~150 MB bf16 checkpoint, reading every weight and running a
    forward pass grows by less than 1.3x its size (measured: 1.0x, the weights stay memory-
    mapped); an fp32 copy on the way would need at least 2x."""
    import shutil

    from blip2_internlm.assets import resolve_llm
    from blip2_internlm.internlm2 import InternLM2Config
    from blip2_internlm.tools.bench_internlm2 import write_random_checkpoint

    config = InternLM2Config(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=4,
    )
    weights = write_random_checkpoint(tmp_path, config, shard_bytes=64 * 1024**2)
    assert 100e6 < weights < 300e6
    tiny = resolve_llm("tiny")
    for path in tiny.iterdir():
        if "token" in path.name:
            shutil.copy(path, tmp_path / path.name)
    result = run_python("-c", _LOAD_PROBE, str(tmp_path), str(tiny))
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["dtypes"] == ["torch.bfloat16"] and probe["numel"] * 2 == weights
    assert probe["growth"] < 1.3 * weights, probe


# --- length-sorted VQA evaluation ----------------------------------------------------------------


def vqa_eval_set(length_sorted: bool):
    from lavis.common.config import Config
    from lavis.common.registry import registry
    from spec_helpers import REPO

    options = [
        "datasets.shapes_vqa.generator.test=10",
        "datasets.shapes_vqa.generator.max_objects=2",
        f"run.length_sorted_eval={length_sorted}",
    ]
    cfg = Config(SimpleNamespace(cfg_path=str(REPO / "configs/tiny/vqa_zeroshot.yaml"), options=options))
    task = registry.get_task_class("vqa").setup_task(cfg)
    return task, task.build_datasets(cfg)["shapes_vqa"]


def test_length_sorted_vqa_eval_groups_lengths_and_keeps_every_answer(model):
    from torch.utils.data import DataLoader

    answers, batch_spreads = [], []
    for length_sorted in (False, True):
        task, splits = vqa_eval_set(length_sorted)
        dataset = splits["test"]
        lengths = [len(ann["question"]) for ann in dataset.annotation]
        if length_sorted:
            assert lengths == sorted(lengths, reverse=True)
        assert splits["train"].annotation == vqa_eval_set(False)[1]["train"].annotation  # training order untouched
        by_id = {}
        spread = 0
        for batch in DataLoader(dataset, batch_size=16, collate_fn=dataset.collater):
            spread += max(map(len, batch["text_input"])) - min(map(len, batch["text_input"]))
            task.max_len = 4
            for pair in task.valid_step(model, batch):
                by_id[pair["question_id"]] = pair["answer"]
        answers.append(by_id)
        batch_spreads.append(spread)
    assert len(answers[0]) == len(dataset) > 32 and answers[0] == answers[1]
    assert batch_spreads[1] < batch_spreads[0]  # similar question lengths share a batch


def test_an_fp16_vit_without_autocast_is_refused_at_build_time(lavis_ready):
    """LAVIS's fp16 ViT keeps its LayerNorms in fp32: it runs only under autocast."""
    with pytest.raises(ValueError, match="vit_precision: fp32"):
        build(vit_precision="fp16", autocast_dtype="off")
    assert build(vit_precision="fp32", autocast_dtype="off").autocast_dtype == "off"
