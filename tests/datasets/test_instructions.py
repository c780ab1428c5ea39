"""Instruction data: templates per task and language with held-out ones, caption and VQA datasets phrased
as instructions, and the shapes conversations whose second turn needs the first."""

import pytest


def test_every_task_has_training_and_held_out_templates_in_both_languages_and_they_differ(lavis_ready):
    from blip2_internlm.datasets.instructions import INSTRUCTION_TASKS, INSTRUCTION_TEMPLATES

    for task in INSTRUCTION_TASKS:
        for lang in ("zh", "en"):
            sets = INSTRUCTION_TEMPLATES[task][lang]
            assert len(sets["train"]) >= 3 and len(sets["heldout"]) >= 1
            assert not set(sets["train"]) & set(sets["heldout"])
            needs_question = {"{}" in t for t in sets["train"] + sets["heldout"]}
            assert needs_question == ({True} if task == "vqa" else {False})


def test_instruction_fills_the_question_and_names_bad_arguments(lavis_ready):
    from blip2_internlm.datasets.instructions import INSTRUCTION_TEMPLATES, instruction

    first = INSTRUCTION_TEMPLATES["vqa"]["zh"]["train"][0]
    assert instruction("vqa", "zh", 0, "图中有几个形状？") == first.format("图中有几个形状？")
    assert instruction("caption", "en", 1) == INSTRUCTION_TEMPLATES["caption"]["en"]["train"][1]
    with pytest.raises(ValueError, match="needs a question"):
        instruction("vqa", "en", 0)
    with pytest.raises(ValueError, match="instruction task 'ocr'"):
        instruction("ocr", "en", 0)
    with pytest.raises(ValueError, match="instruction language 'fr'"):
        instruction("caption", "fr", 0)


class Captions:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return dict(self.samples[index])

    def collater(self, samples):
        return {"text_input": [s["text_input"] for s in samples], "image_id": [s["image_id"] for s in samples]}


def test_a_caption_dataset_becomes_one_turn_conversations_drawn_per_example_and_epoch(lavis_ready):
    from blip2_internlm.datasets.instructions import INSTRUCTION_TEMPLATES, InstructionDataset

    inner = Captions([{"text_input": f"caption {i}", "image_id": i} for i in range(40)])
    data = InstructionDataset(inner, "caption", "en", seed=7)
    first = [data[i]["messages"] for i in range(40)]
    assert first == [data[i]["messages"] for i in range(40)]  # a function of (seed, epoch, index)
    assert all(m[1] == {"role": "assistant", "content": f"caption {i}"} for i, m in enumerate(first))
    drawn = {m[0]["content"] for m in first}
    assert drawn == set(INSTRUCTION_TEMPLATES["caption"]["en"]["train"])  # every template, none held out
    data.set_epoch(1)
    assert [data[i]["messages"] for i in range(40)] != first
    batch = data.collater([data[0], data[1]])
    assert batch["messages"][1][1]["content"] == "caption 1" and batch["image_id"].tolist() == [0, 1]


def test_a_vqa_dataset_answers_with_its_most_weighted_answer(lavis_ready):
    from blip2_internlm.datasets.instructions import InstructionDataset

    inner = Captions([{"text_input": "what color?", "answers": ["red", "blue"], "weights": [0.3, 0.7]}])
    sample = InstructionDataset(inner, "vqa", "en", templates="heldout")[0]
    assert "what color?" in sample["messages"][0]["content"]
    assert sample["messages"][1]["content"] == sample["text_input"] == "blue"
    assert "answers" not in sample


def test_a_follow_up_names_the_object_only_through_the_first_turn(lavis_ready):
    from blip2_internlm.datasets.instructions import follow_up

    scene = [
        {"shape": "circle", "color": "red", "position": "left"},
        {"shape": "square", "color": "blue", "position": "right"},
    ]
    answers = {}
    for shape in ("circle", "square"):
        turns, answer = follow_up(scene, shape, "color", "zh")
        answers[shape] = (turns[1][0], answer)
        assert turns[0][1] == "是"
    # the same second question, two answers: only the first turn tells them apart
    assert answers["circle"][0] == answers["square"][0] == "它是什么颜色？"
    assert (answers["circle"][1], answers["square"][1]) == ("红色", "蓝色")
    with pytest.raises(ValueError, match="exactly one triangle"):
        follow_up(scene, "triangle", "position", "en")


def test_shapes_conversations_are_llava_records_the_conversation_builder_reads(lavis_ready, small_shapes_root):
    import json
    from pathlib import Path

    from blip2_internlm.datasets.conversations import llava_record_to_messages
    from blip2_internlm.datasets.instructions import shapes_conversations
    from blip2_internlm.datasets.shapes import scene_texts

    manifest = json.loads((Path(small_shapes_root) / "manifest.json").read_text())
    for lang in ("zh", "en"):
        records = shapes_conversations(*scene_texts(manifest["args"], "train", lang), lang)
        assert {r["image"] for r in records} == {f"images/train/train_{i:05d}.png" for i in range(12)}
        for record in records:
            assert (Path(small_shapes_root) / record["image"]).is_file()
            messages = llava_record_to_messages(record)
            assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"
        yes_no = [llava_record_to_messages(r)[1]["content"] for r in records if "-exist" in r["id"]]
        assert set(yes_no) == ({"是", "否"} if lang == "zh" else {"yes", "no"})
        assert any(len(r["conversations"]) == 4 for r in records)


def test_scene_texts_match_the_written_annotations(lavis_ready, small_shapes_root):
    import json
    from pathlib import Path

    from blip2_internlm.datasets.shapes import scene_texts

    root = Path(small_shapes_root)
    manifest = json.loads((root / "manifest.json").read_text())
    _, captions, questions, images = scene_texts(manifest["args"], "train", "zh")
    written = json.loads((root / "annotations" / "caption_zh_train.json").read_text())
    assert captions == [r["caption"] for r in written] and images == [r["image"] for r in written]
    vqa = json.loads((root / "annotations" / "vqa_zh_train.json").read_text())
    assert [q for qa in questions for q, _ in qa] == [r["question"] for r in vqa]


def test_the_instruction_tuning_task_wraps_the_datasets_that_ask_for_it(
    lavis_ready, small_shapes_root, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from lavis.common.config import Config
    from lavis.common.registry import registry

    # LAVIS's Config registers itself as the running configuration: restored after this spec
    monkeypatch.setitem(registry.mapping["state"], "configuration", None)

    from blip2_internlm.datasets.instructions import InstructionDataset

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        "model: {arch: blip2_internlm_instruct, model_type: tiny}\n"
        "datasets:\n"
        "  shapes_caption:\n"
        "    lang: zh\n"
        "    generator: {seed: 0, train: 12, val: 4, test: 4, image_size: 64, max_objects: 1}\n"
        "    instruction: {task: caption, lang: zh}\n"
        "    vis_processor: {train: {name: blip_image_eval, image_size: 64}, eval: {name: blip_image_eval, "
        "image_size: 64}}\n"
        "    text_processor: {train: {name: chinese_caption}, eval: {name: chinese_caption}}\n"
        "run: {task: instruction_tuning, seed: 3}\n"
    )
    cfg = Config(SimpleNamespace(cfg_path=str(cfg_path), options=None))
    task = registry.get_task_class("instruction_tuning").setup_task(cfg=cfg)
    datasets = task.build_datasets(cfg)
    train = datasets["shapes_caption"]["train"]
    assert isinstance(train, InstructionDataset) and not isinstance(
        datasets["shapes_caption"]["val"], InstructionDataset
    )
    sample = train[0]
    assert sample["messages"][1]["content"] == sample["text_input"]
