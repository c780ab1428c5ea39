"""blip2_internlm_instruct: the instruction reaches the Q-Former, conversations render as the LLM's chat
template says, only the assistant's turns carry the loss, and LoRA adapts the frozen LLM and nothing
else of it."""

import pytest
import torch

CONVERSATION = [
    {"role": "system", "content": "你是一个看图回答问题的助手。"},
    {"role": "user", "content": "图里有圆形吗？"},
    {"role": "assistant", "content": "是"},
    {"role": "user", "content": "它是什么颜色？"},
    {"role": "assistant", "content": "红色"},
]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def images(n=2, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def build(**options):
    from blip2_internlm.factory import build_model

    torch.manual_seed(0)
    return build_model("blip2_internlm_instruct", "tiny", options=options, is_eval=False)


@pytest.fixture(scope="module")
def model(lavis_ready):
    return build().eval()


@pytest.fixture(scope="module")
def lora_model(lavis_ready):
    model = build(llm_lora=LORA)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters away from their zero start, so that they change the logits
        for name, param in model.llm_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


# --- loading -----------------------------------------------------------------------------------------


def test_lavis_loads_it_by_name_with_its_processors(lavis_ready):
    from lavis.models import load_model_and_preprocess

    model, vis, txt = load_model_and_preprocess("blip2_internlm_instruct", "tiny", is_eval=True)
    assert type(model).__name__ == "Blip2InternLMInstruct"
    assert model.template.name == "internlm2_chat"
    assert vis["eval"] is not None and txt["eval"] is not None
    assert isinstance(model.chat(images(1)[0], [{"role": "user", "content": "图里有什么？"}], max_length=4), str)


# --- the chat template -------------------------------------------------------------------------------


def test_internlm2_chat_history_renders_as_the_tokenizers_own_template(model):
    """The tiny tokenizer carries InternLM2-chat's jinja template (tokenizer_config.json): ours renders the same
    string for a whole conversation and for a history waiting for the assistant."""
    tokenizer = model.llm_tokenizer
    assert "<|im_start|>" in tokenizer.chat_template
    for messages, generation in ((CONVERSATION, False), (CONVERSATION[:4], True)):
        ours = model.template.render(messages, add_generation_prompt=generation, tokenizer=tokenizer)
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert ours == theirs
    assert model.template.render(CONVERSATION[:4], True, tokenizer) == (
        "<s><|im_start|>system\n你是一个看图回答问题的助手。<|im_end|>\n"
        "<|im_start|>user\n图里有圆形吗？<|im_end|>\n<|im_start|>assistant\n是<|im_end|>\n"
        "<|im_start|>user\n它是什么颜色？<|im_end|>\n<|im_start|>assistant\n"
    )


def test_plain_template_is_the_blip2_layout_turn_after_turn(model):
    from blip2_internlm.models.chat_template import ChatTemplate

    plain = ChatTemplate.for_tokenizer("plain", model.llm_tokenizer)
    assert plain.render(CONVERSATION, tokenizer=model.llm_tokenizer) == (
        "<s>你是一个看图回答问题的助手。图里有圆形吗？是</s>它是什么颜色？红色</s>"
    )
    assert plain.stop_token_ids == [model.llm_tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "messages, error",
    [
        ([], "non-empty list"),
        ([{"role": "assistant", "content": "是"}], "where a system or user message belongs"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "where a assistant message"),
        ([{"role": "user", "content": "  "}], "non-empty string"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a user"),
    ],
)
def test_a_malformed_history_is_refused_with_the_reason(model, messages, error):
    from blip2_internlm.models.chat_template import ConversationError

    with pytest.raises(ConversationError, match=error):
        model.template.generation_segments(messages)


def test_internlm2_chat_needs_the_chat_tokens_as_single_tokens(model):
    from blip2_internlm.models.chat_template import ChatTemplate

    class SplitsEverything:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": list(range(len(text)))})

    with pytest.raises(ValueError, match="use chat_template: plain"):
        ChatTemplate.for_tokenizer("internlm2_chat", SplitsEverything())


# --- the loss --------------------------------------------------------------------------------------------


def test_multi_turn_labels_are_the_assistant_turns_and_their_end_markers_only(model):
    from blip2_internlm.models.llm_inputs import conversation_tokens

    tokenizer = model.llm_tokenizer
    rows = [model.template.training_segments(CONVERSATION), model.template.training_segments(CONVERSATION[1:3])]
    input_ids, mask, labels = conversation_tokens(tokenizer, rows, max_len=200)

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, messages in enumerate((CONVERSATION, CONVERSATION[1:3])):
        expected = [token for m in messages if m["role"] == "assistant" for token in ids(m["content"]) + [im_end]]
        labelled = labels[row][labels[row] != -100].tolist()
        assert labelled == expected
        # the labels sit on those very tokens of the input, the rest of the row is the rendered context
        keep = labels[row] != -100
        assert input_ids[row][keep].tolist() == expected
        # token for token what the chat model's own template gives when it tokenizes the whole conversation
        assert input_ids[row][mask[row].bool()].tolist() == tokenizer.apply_chat_template(messages, tokenize=True)
    assert mask[1].sum() < mask[0].sum() and (labels[1][mask[1] == 0] == -100).all()


def test_single_turn_plain_tokens_equal_the_stage2_tokens(model):
    """One assembly rule: a plain one-turn conversation is exactly blip2_internlm's ``<s> prompt text </s>``."""
    from blip2_internlm.models.chat_template import ChatTemplate
    from blip2_internlm.models.llm_inputs import conversation_tokens, training_tokens

    tokenizer = model.llm_tokenizer
    plain = ChatTemplate.for_tokenizer("plain", tokenizer)
    prompts, texts = ["问题：图中是什么形状？ 简短回答：", "A short caption:"], ["圆形", "a red circle on the left"]
    rows = [
        plain.training_segments([{"role": "user", "content": p}, {"role": "assistant", "content": t}])
        for p, t in zip(prompts, texts)
    ]
    for max_len in (64, 12):
        ours = conversation_tokens(tokenizer, rows, max_len)
        stage2 = training_tokens(tokenizer, prompts, texts, max_len)
        for a, b in zip(ours, stage2):
            assert torch.equal(a, b)


def test_loss_is_the_cross_entropy_of_the_assistant_tokens(model):
    samples = {"image": images(2), "messages": [CONVERSATION, CONVERSATION[1:3]]}
    out = model(samples)
    # reference: the LLM's logits over the same inputs, cross-entropy over the labelled positions
    from blip2_internlm.models.chat_template import user_turns
    from blip2_internlm.models.llm_inputs import conversation_tokens

    conversations = model.conversations(samples, 2, with_answers=True)
    queries = model.query_embeds(image_embeds=model.image_embeds(samples), instructions=map(user_turns, conversations))
    rows = [model.template.training_segments(c) for c in conversations]
    ids, mask, labels = conversation_tokens(model.llm_tokenizer, rows, model.max_txt_len)
    embeds = torch.cat([queries, model.llm_model.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), mask], dim=1)
    full_labels = torch.cat([torch.full(queries.shape[:2], -100), labels], dim=1)
    logits = model.llm_model(inputs_embeds=embeds, attention_mask=full_mask).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), full_labels[:, 1:].flatten())
    assert out["loss_tokens"] == (full_labels[:, 1:] != -100).sum()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)


def test_a_caption_sample_becomes_a_one_turn_conversation_with_the_prompt_as_instruction(model):
    samples = {"image": images(2), "prompt": ["图片描述：", "A short caption:"], "text_input": ["红色", "red"]}
    conversations = model.conversations(samples, 2, with_answers=True)
    assert conversations[1] == [
        {"role": "user", "content": "A short caption:"},
        {"role": "assistant", "content": "red"},
    ]
    from blip2_internlm.models.chat_template import ConversationError

    with pytest.raises(ConversationError, match="no instruction"):
        model.conversations({"image": images(1), "text_input": ["x"]}, 1, with_answers=True)


# --- the instruction-aware Q-Former ------------------------------------------------------------------------


def test_the_instruction_tokens_reach_the_qformer_and_change_the_soft_prompt(model):
    seen = []
    hook = model.Qformer.bert.embeddings.word_embeddings.register_forward_hook(
        lambda module, args, output: seen.append(args[0].clone())
    )
    try:
        image_embeds = model.image_embeds({"image": images(1).expand(2, -1, -1, -1)})
        queries = model.query_embeds(image_embeds=image_embeds, instructions=["图里有圆形吗？", "它是什么颜色？"])
    finally:
        hook.remove()
    expected = model.tokenizer(["图里有圆形吗？", "它是什么颜色？"], padding="longest", return_tensors="pt").input_ids
    assert torch.equal(seen[0], expected)
    assert queries.shape == (2, model.query_tokens.shape[1], model.llm_model.config.hidden_size)
    assert not torch.allclose(queries[0], queries[1])  # same image, another instruction


def test_the_qformer_reads_every_user_turn_latest_last(model):
    from blip2_internlm.models.chat_template import user_turns

    assert user_turns(CONVERSATION) == "图里有圆形吗？\n它是什么颜色？"
    assert model.tokenizer.truncation_side == "left"  # a long history keeps its latest turn


def test_without_qformer_text_input_the_instruction_does_not_change_the_queries(lavis_ready):
    model = build(qformer_text_input=False).eval()
    image_embeds = model.image_embeds({"image": images(1).expand(2, -1, -1, -1)})
    queries = model.query_embeds(image_embeds=image_embeds, instructions=["a", "b"])
    assert torch.equal(queries[0], queries[1])
    assert model.Qformer.bert.embeddings.word_embeddings is None


# --- LoRA --------------------------------------------------------------------------------------------


def test_with_lora_only_the_adapters_and_the_bridge_get_gradients(lora_model):
    lora_model.train()
    lora_model.zero_grad()
    lora_model({"image": images(2), "messages": [CONVERSATION, CONVERSATION[1:3]]})["loss"].backward()
    graded = {name for name, param in lora_model.named_parameters() if param.grad is not None}
    lora_model.eval()
    llm = {name for name in graded if name.startswith("llm_model.")}
    assert llm and all(".lora_A." in name or ".lora_B." in name for name in llm)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in llm}
    assert adapted == {"wqkv", "wo", "w1", "w2", "w3"}
    others = {name.split(".")[0] for name in graded - llm}
    assert others == {"Qformer", "query_tokens", "llm_proj", "ln_vision"}
    assert not any(name.startswith("visual_encoder") for name in graded)
    trainable = {name for name, param in lora_model.named_parameters() if param.requires_grad}
    assert graded <= trainable and {n for n in trainable if n.startswith("llm_model.")} == llm


def test_adapter_dropout_follows_the_model_while_the_llm_stays_in_eval(lavis_ready):
    from blip2_internlm.models.lora import lora_layers

    model = build(llm_lora={**LORA, "dropout": 0.1})
    model.train()
    assert not model.llm_model.training
    assert all(layer.lora_dropout.training for layer in lora_layers(model.llm_model))
    model.eval()
    assert not any(layer.lora_dropout.training for layer in lora_layers(model.llm_model))


def test_merged_adapters_give_the_logits_of_the_unmerged_ones(lora_model):
    """Merged, each adapted linear computes (W + s B A) x instead of W x + s B (A x): the same sums in another
    order, so in fp32 the logits agree to a few units of the last place of their own scale."""
    import copy

    from blip2_internlm.models.lora import lora_layers, merge_lora

    samples = {"image": images(2), "messages": [CONVERSATION[:4], CONVERSATION[1:2]]}
    inputs_embeds, mask = lora_model.generation_inputs(samples)
    with torch.no_grad():
        unmerged = lora_model.llm_model(inputs_embeds=inputs_embeds, attention_mask=mask).logits
        merged_llm = copy.deepcopy(lora_model.llm_model)
        assert merge_lora(merged_llm) == len(lora_layers(lora_model.llm_model)) > 0
        assert not lora_layers(merged_llm)
        merged = merged_llm(inputs_embeds=inputs_embeds, attention_mask=mask).logits
        plain = copy.deepcopy(lora_model.llm_model)
        for layer in lora_layers(plain):
            layer.enable_adapters(False)
        without = plain(inputs_embeds=inputs_embeds, attention_mask=mask).logits
    scale = unmerged.abs().max()
    tolerance = 64 * torch.finfo(torch.float32).eps * scale
    assert (merged - unmerged).abs().max() <= tolerance
    assert (without - unmerged).abs().max() > 1000 * tolerance  # the adapters do change the logits
    # the merged LLM's weight names are the base model's again
    assert set(merged_llm.state_dict()) == set(build().llm_model.state_dict())


def test_lora_settings_are_checked_with_the_key_named(lavis_ready):
    from blip2_internlm.models.lora import LoraSettings

    assert LoraSettings.from_config(None) is None
    with pytest.raises(ValueError, match=r"model.llm_lora: unknown keys \['rank'\]"):
        LoraSettings.from_config({"rank": 8})
    with pytest.raises(ValueError, match="model.llm_lora.r"):
        LoraSettings.from_config({"r": 0})
    with pytest.raises(ValueError, match=r"\['q_proj'\] name no linear layer"):
        build(llm_lora={"r": 2, "target_modules": ["q_proj"]})


def test_an_instruct_checkpoint_holds_and_needs_the_adapters(lora_model, tmp_path):
    from blip2_internlm.checkpoint import CheckpointError, load_weights, required_prefixes, save_checkpoint_file

    trainable = {name for name, param in lora_model.named_parameters() if param.requires_grad}
    state = {name: tensor for name, tensor in lora_model.state_dict().items() if name in trainable}
    assert any(".lora_B." in name for name in state)
    path = tmp_path / "instruct.pth"
    save_checkpoint_file({"model": state}, path)
    fresh = build(llm_lora=LORA)
    load_weights(fresh, path, required_prefixes=required_prefixes(fresh, finetuned=True))
    for name, tensor in state.items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    without_adapters = {name: t for name, t in state.items() if "lora_" not in name}
    save_checkpoint_file({"model": without_adapters}, tmp_path / "no_adapters.pth")
    with pytest.raises(CheckpointError, match="does not initialise"):
        load_weights(fresh, tmp_path / "no_adapters.pth", required_prefixes=required_prefixes(fresh, finetuned=True))
    # as the starting point of instruction tuning (pretrained), the adapters may be missing
    load_weights(fresh, tmp_path / "no_adapters.pth", required_prefixes=required_prefixes(fresh))


def test_a_stage2_checkpoint_initialises_the_query_path_and_leaves_the_instruction_path_to_bert(
    lavis_ready, tiny_trained_checkpoint
):
    from blip2_internlm.checkpoint import load_weights, required_prefixes

    stage2, path, state = tiny_trained_checkpoint
    model = build()
    report = load_weights(model, path, required_prefixes=required_prefixes(model))
    assert torch.equal(model.query_tokens, stage2.query_tokens)
    assert not report.unexpected
    missing = set(report.missing)
    assert "Qformer.bert.embeddings.word_embeddings.weight" in missing
    assert not any(name.startswith(("Qformer.bert.encoder.layer.0.crossattention", "llm_proj")) for name in missing)


# --- chat ----------------------------------------------------------------------------------------------


def test_chat_stream_writes_the_answer_chat_gives(lavis_ready):
    model = build(decode_implementation="transformers").eval()
    history = CONVERSATION[1:4]
    image = images(1)[0]
    answer = model.chat(image, history, max_length=12)
    pieces = list(model.chat_stream(image, history, max_length=12))
    assert answer and len(pieces) > 1
    assert "".join(pieces).strip() == answer
    with pytest.raises(ValueError, match=r"does not take \['length_penalty'\]"):
        next(model.chat_stream(image, history, length_penalty=2.0))


def test_chat_answers_the_history_as_generate_does_for_a_batch(model):
    image = images(1)
    history = CONVERSATION[:4]
    batch = model.generate({"image": image.expand(2, -1, -1, -1), "messages": [history, history[1:2]]}, num_beams=1)
    assert model.chat(image[0], history, max_length=30) == batch[0]
    with pytest.raises(ValueError, match="one processed image"):
        model.chat(images(2), history)
