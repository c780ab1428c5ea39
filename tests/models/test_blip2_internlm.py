"""Blip2InternLM: the loss BLIP-2 defines, generation that stops where the caption stops,
bare VQA answers, and only the bridge trains."""

import json

import pytest
import torch
import torch.nn.functional as F
from spec_helpers import run_python

# the batched loss against a per-sample construction (other GEMM shapes, atol 1e-5 on a loss of a few
# units), and answers after overfitting four samples: both rest on this CPU's fp32 kernels
pytestmark = pytest.mark.kernel_sensitive

CAPTIONS = ["左边有一个红色的圆形", "右边有一个蓝色的正方形", "中间有一个绿色的三角形", "中间有一个黄色的圆形"]


@pytest.fixture(scope="module")
def model(lavis_ready):
    from lavis.models import load_model_and_preprocess

    torch.manual_seed(0)
    model, _, _ = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)
    return model


@pytest.fixture
def fresh_model(lavis_ready):
    from lavis.models import load_model_and_preprocess

    torch.manual_seed(0)
    return load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]


def images(n=4, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_loss_is_cross_entropy_on_text_and_end_marker_only(model):
    tok = model.llm_tokenizer
    samples = {
        "image": images(3),
        "text_input": ["a red circle on the left", "左边", "x y"],
        "prompt": ["", "Question: what is it? Answer:", ""],
    }
    loss = model(samples)["loss"]

    # reference, built here from the tokenizer: [queries] <s> prompt text </s> [pad]
    def ids(text):
        return tok(text, add_special_tokens=False).input_ids if text else []

    queries = model.query_embeds(samples["image"])
    rows, labels = [], []
    for prompt, text in zip(samples["prompt"], samples["text_input"]):
        head, body = [tok.bos_token_id] + ids(prompt), ids(text) + [tok.eos_token_id]
        rows.append(head + body)
        labels.append([-100] * (queries.shape[1] + len(head)) + body)
    width = max(map(len, rows))
    embeds, masks, targets = [], [], []
    for b, (row, label) in enumerate(zip(rows, labels)):
        pad = width - len(row)
        embeds.append(
            torch.cat(
                [queries[b], model.llm_model.get_input_embeddings()(torch.tensor(row + [tok.pad_token_id] * pad))]
            )
        )
        masks.append(torch.tensor([1] * (queries.shape[1] + len(row)) + [0] * pad))
        targets.append(torch.tensor(label + [-100] * pad))
    logits = model.llm_model(inputs_embeds=torch.stack(embeds), attention_mask=torch.stack(masks)).logits
    targets = torch.stack(targets)
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(loss, reference, atol=1e-5)


def test_end_marker_is_learned_even_though_it_is_also_the_pad_token(model):
    tok = model.llm_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # InternLM2's convention: the trap of the original port
    input_ids, attention_mask, labels = model.text_tokens(
        ["", "Question: a? Answer:"], ["左边", "a red circle on the left"]
    )
    short = int(attention_mask[0].sum())
    assert labels[0, short - 1] == tok.eos_token_id  # </s> carries loss ...
    assert (labels[0, short:] == -100).all()  # ... padding does not
    prompt_len = 1 + len(tok("Question: a? Answer:", add_special_tokens=False).input_ids)
    assert (labels[1, :prompt_len] == -100).all() and (labels[1, prompt_len:] != -100).all()


def test_bad_text_and_prompt_inputs_are_clear_errors(model):
    with pytest.raises(ValueError, match="empty or non-string text_input"):
        model({"image": images(2), "text_input": ["a red circle", ""]})
    with pytest.raises(ValueError, match="raise model.max_txt_len or shorten the prompt"):
        model({"image": images(1), "text_input": ["x"], "prompt": "long prompt " * 40})
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        model({"image": images(2), "text_input": ["x"]})


def test_text_longer_than_max_txt_len_is_cut_without_an_end_marker(model):
    tok = model.llm_tokenizer
    _, attention_mask, labels = model.text_tokens([""], ["a red circle on the left " * 20])
    assert attention_mask.shape[1] == model.max_txt_len
    assert tok.eos_token_id not in labels[0].tolist()


def test_generation_stops_on_end_of_text_and_on_the_real_newline(model):
    tok = model.llm_tokenizer
    newline = tok.convert_ids_to_tokens(model.stop_token_ids[1])
    assert model.stop_token_ids[0] == tok.eos_token_id
    assert tok("a\nb", add_special_tokens=False).input_ids[1] == model.stop_token_ids[1] and newline != "▁"


def test_only_qformer_queries_projection_and_ln_vision_train(fresh_model):
    model = fresh_model
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"Qformer", "query_tokens", "llm_proj", "ln_vision"}
    frozen = {
        n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("llm_model", "visual_encoder"))
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model({"image": images(2), "text_input": CAPTIONS[:2]})["loss"].backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert param.grad is None and torch.equal(param, frozen[name]), name
    assert model.llm_model.training is False  # frozen modules stay in eval mode


@pytest.fixture(scope="module")
def overfit(lavis_ready):
    """The tiny model after a short overfit on four captions of four images."""
    from lavis.models import load_model_and_preprocess

    torch.manual_seed(0)
    model = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=False)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)
    model.train()
    for _ in range(300):
        loss = model({"image": images(), "text_input": CAPTIONS})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def test_after_an_overfit_generation_reproduces_the_captions_and_stops(overfit):
    model, loss = overfit
    assert loss < 0.2
    for num_beams in (1, 3):
        assert model.generate({"image": images()}, num_beams=num_beams, max_length=30) == CAPTIONS


def test_several_captions_per_image_come_image_major(overfit):
    model, _ = overfit
    beams = model.generate({"image": images()[:2]}, num_beams=4, num_captions=3, max_length=30)
    assert len(beams) == 6
    assert beams[0] == CAPTIONS[0] and beams[3] == CAPTIONS[1]
    sampled = model.generate({"image": images()[:2]}, use_nucleus_sampling=True, num_captions=2, max_length=30)
    assert len(sampled) == 4 and all(isinstance(s, str) for s in sampled)


def test_the_original_ports_stop_token_would_run_on(overfit):
    # with only "</s>" as the stop token and no newline cut, greedy text can run past the caption;
    # ours must not: every caption is exactly the trained one, with nothing after it
    model, _ = overfit
    out = model.generate({"image": images()}, num_beams=1, max_length=40)
    assert all("\n" not in text and text == caption for text, caption in zip(out, CAPTIONS))


def test_predict_answers_returns_bare_answers_that_vqaeval_scores_correct(lavis_ready, tmp_path):
    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval
    from lavis.models import load_model_and_preprocess

    questions = ["图中形状是什么颜色？", "图中是什么形状？", "图中形状是什么颜色？", "图中有几个形状？"]
    answers = ["红色", "正方形", "绿色", "1"]
    prompt = "问题：{} 简短回答："
    torch.manual_seed(0)
    model = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=False)[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)
    model.train()
    batch = {"image": images(), "text_input": answers, "prompt": [prompt.format(q) for q in questions]}
    for _ in range(300):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predictions = model.eval().predict_answers({"image": images(), "text_input": questions}, prompt=prompt, num_beams=3)
    assert predictions == answers

    ids = list(range(1, 5))
    (tmp_path / "q.json").write_text(
        json.dumps(
            {
                "questions": [{"question_id": i, "image_id": i, "question": q} for i, q in zip(ids, questions)],
                "info": {},
                "task_type": "",
                "data_type": "",
                "license": {},
                "data_subtype": "",
            }
        )
    )
    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "question_id": i,
                        "image_id": i,
                        "question_type": "what",
                        "answer_type": "number" if a == "1" else "other",
                        "multiple_choice_answer": a,
                        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)],
                    }
                    for i, a in zip(ids, answers)
                ],
                "info": {},
                "license": {},
                "data_subtype": "",
            }
        )
    )
    (tmp_path / "r.json").write_text(json.dumps([{"question_id": i, "answer": p} for i, p in zip(ids, predictions)]))
    vqa = VQA(str(tmp_path / "a.json"), str(tmp_path / "q.json"))
    evaluator = VQAEval(vqa, vqa.loadRes(str(tmp_path / "r.json"), str(tmp_path / "q.json")), n=2)
    evaluator.evaluate()
    assert evaluator.accuracy["overall"] == 100.0


def test_stage1_checkpoint_initialises_qformer_and_queries(lavis_ready, tmp_path, fresh_model):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    from blip2_internlm.checkpoint import CheckpointError

    torch.manual_seed(1)
    stage1 = Blip2Qformer.from_pretrained("tiny")
    trainable = {k: v for k, v in stage1.state_dict().items() if not k.startswith("visual_encoder")}
    torch.save({"model": trainable}, tmp_path / "stage1.pth")
    report = fresh_model.load_from_pretrained(str(tmp_path / "stage1.pth"))
    assert torch.equal(fresh_model.query_tokens, stage1.query_tokens)
    assert all(k.startswith(("visual_encoder.", "llm_model.", "llm_proj.")) for k in report.missing)
    assert {"vision_proj.weight", "text_proj.weight", "itm_head.weight"} <= set(report.unexpected)  # stage-1 heads

    torch.save({"model": {"ln_vision.weight": trainable["ln_vision.weight"]}}, tmp_path / "not_stage1.pth")
    with pytest.raises(CheckpointError, match="not_stage1.pth does not initialise"):
        fresh_model.load_from_pretrained(str(tmp_path / "not_stage1.pth"))


def test_unknown_model_config_keys_are_errors(lavis_ready):
    from omegaconf import OmegaConf

    from blip2_internlm.models.blip2_internlm import Blip2InternLM

    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    cfg.num_query_tokens = 8  # typo of num_query_token
    with pytest.raises(ValueError, match="unknown keys .*num_query_tokens"):
        Blip2InternLM.from_config(cfg)


def test_notebook_loading_works_offline_from_any_directory(tmp_path):
    code = (
        "import blip2_internlm, torch\n"
        "from lavis.models import load_model_and_preprocess\n"
        "from PIL import Image\n"
        "model, vis, txt = load_model_and_preprocess('blip2_internlm', 'tiny', is_eval=True)\n"
        "image = vis['eval'](Image.new('RGB', (80, 80), (200, 30, 30))).unsqueeze(0)\n"
        "print(type(model.generate({'image': image}, max_length=5)[0]).__name__)"
    )
    result = run_python("-c", code, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("str")
