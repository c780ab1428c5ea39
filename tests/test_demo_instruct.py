"""The instruction demo's data: training conversations the LLaVA builder reads, held-out templates only in the
evaluation, and follow-ups whose "it" is only defined by the first turn."""

import pytest

SINGLE = {"seed": 0, "train": 12, "val": 0, "test": 6, "image_size": 64, "max_objects": 1}
PAIRS = {"seed": 0, "train": 12, "val": 0, "test": 12, "image_size": 64, "max_objects": 2}


@pytest.fixture
def small_demo(lavis_ready, monkeypatch):
    from blip2_internlm.tools import demo_instruct

    monkeypatch.setattr(demo_instruct, "SINGLE", SINGLE)
    monkeypatch.setattr(demo_instruct, "PAIRS", PAIRS)
    return demo_instruct


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_the_training_conversations_load_through_the_llava_builder(small_demo, tmp_path, lang):
    from blip2_internlm.datasets.conversations import load_conversation_records

    path = small_demo.prepare_data(lang, tmp_path)
    records, skipped = load_conversation_records(str(path), str(path.parent), skip_invalid=False)
    assert skipped == 0 and len(records) >= 12 * 3 + 12
    kinds = {record["image_id"].split("-", 1)[1].rstrip("0123456789") for record in records}
    assert kinds == {"caption", "vqa", "exist", "follow"}
    assert max(len(record["messages"]) for record in records) == 4


def test_evaluation_uses_held_out_templates_and_follow_ups_that_need_the_first_turn(small_demo):
    from blip2_internlm.datasets.instructions import INSTRUCTION_TEMPLATES
    from blip2_internlm.datasets.shapes import scene_texts

    heldout, follow_ups = small_demo.evaluation_sets("zh")
    assert len(heldout) == 6 * 6  # a caption and five questions per one-object test image
    trained = INSTRUCTION_TEMPLATES["vqa"]["zh"]["train"] + INSTRUCTION_TEMPLATES["caption"]["zh"]["train"]
    for row in heldout:
        prompt = row["prompt"]
        assert not any(prompt == t or (t != "{}" and t.replace("{}", "") in prompt) for t in trained), prompt
    by_image = {}
    for row in follow_ups:
        by_image.setdefault(row["image"], []).append(row)
    root, args = small_demo.shapes(PAIRS)
    scenes = {str(root / image): scene for scene, *_, image in zip(*scene_texts(args, "test", "zh"))}
    two_objects = [rows for image, rows in by_image.items() if len(scenes[image]["objects"]) == 2]
    assert two_objects  # the same second question about two objects, told apart only by the first turn
    answers = [{row["answer"] for row in rows if row["second"] == "它在哪里？"} for rows in two_objects]
    assert all(len(positions) == len({row["first"] for row in rows}) for positions, rows in zip(answers, two_objects))
