"""Spec: LLaVA-format conversation JSON becomes chat-message samples (builder ``llava_conversations``).

Records in LLaVA-Instruct-150K's format, Chinese and English, are written under tmp_path with
three small PNGs; the pure conversion, the record loader, the dataset's collater and the
registered builder (from its default config, paths moved under tmp_path) are checked on them.
"""

import json
import logging
import re

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from blip2_internlm.datasets.records import BadRecordError

SIZE = 32
COLORS = {"red.png": (220, 20, 20), "green.png": (20, 220, 20), "blue.png": (20, 20, 220)}

CHINESE = {
    "id": "zh-000001",
    "image": "red.png",
    "conversations": [
        {"from": "human", "value": "<image>\n图片里有什么？"},
        {"from": "gpt", "value": "一个红色的方块。\n它的边缘很整齐。"},
        {"from": "human", "value": "它是什么颜色的？"},
        {"from": "gpt", "value": "红色。"},
    ],
}
ENGLISH = {
    "id": 33471,
    "image": "green.png",
    "conversations": [
        {"from": "human", "value": "What is the color of the square?\n<image>"},
        {"from": "gpt", "value": "The square is green."},
    ],
}
WITH_SYSTEM = {
    "image": "blue.png",
    "conversations": [
        {"from": "system", "value": "你是一个乐于助人的助手。"},
        {"from": "user", "value": "<image>描述这张图片。"},
        {"from": "assistant", "value": "  一个蓝色的方块。 \n"},
    ],
}


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, color in COLORS.items():
        Image.new("RGB", (40, 40), color).save(root / name, format="PNG")
    return root


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def builder(train, images, **overrides):
    """The registered builder from its default config, train storage ``train`` and images ``images``."""
    from lavis.common.registry import registry

    cls = registry.get_builder_class("llava_conversations")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.llava_conversations
    cfg.build_info.annotations.train.storage = [str(p) for p in train] if isinstance(train, list) else str(train)
    cfg.build_info.images.storage = str(images)
    eval_proc = {"name": "blip_image_eval", "image_size": SIZE}
    cfg.vis_processor = {"train": eval_proc, "eval": eval_proc}
    return cls(OmegaConf.merge(cfg, overrides))


# ---------------------------------------------------------------- LLaVA records to messages


def test_a_two_turn_chinese_record_becomes_alternating_messages_without_the_image_placeholder(lavis_ready):
    from blip2_internlm.datasets.conversations import llava_record_to_messages

    assert llava_record_to_messages(CHINESE) == [
        {"role": "user", "content": "图片里有什么？"},
        {"role": "assistant", "content": "一个红色的方块。\n它的边缘很整齐。"},
        {"role": "user", "content": "它是什么颜色的？"},
        {"role": "assistant", "content": "红色。"},
    ]
    assert CHINESE["conversations"][0]["value"] == "<image>\n图片里有什么？"  # the record is left as it was


def test_an_english_record_with_the_placeholder_after_the_question_loses_it_and_its_newline(lavis_ready):
    from blip2_internlm.datasets.conversations import llava_record_to_messages

    assert llava_record_to_messages(ENGLISH) == [
        {"role": "user", "content": "What is the color of the square?"},
        {"role": "assistant", "content": "The square is green."},
    ]


def test_a_first_system_turn_becomes_the_system_message_and_contents_are_stripped(lavis_ready):
    from blip2_internlm.datasets.conversations import llava_record_to_messages

    assert llava_record_to_messages(WITH_SYSTEM) == [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "描述这张图片。"},
        {"role": "assistant", "content": "一个蓝色的方块。"},
    ]


def test_max_turns_keeps_the_first_pairs_and_the_system_turn(lavis_ready):
    from blip2_internlm.datasets.conversations import llava_record_to_messages

    assert [m["content"] for m in llava_record_to_messages(CHINESE, max_turns=1)] == [
        "图片里有什么？",
        "一个红色的方块。\n它的边缘很整齐。",
    ]
    assert len(llava_record_to_messages(CHINESE, max_turns=5)) == 4
    assert [m["role"] for m in llava_record_to_messages(WITH_SYSTEM, max_turns=1)] == ["system", "user", "assistant"]


# ---------------------------------------------------------------- malformed records

USER = {"from": "human", "value": "<image>\n这是什么？"}
ASSISTANT = {"from": "gpt", "value": "一个方块。"}


def bad(**fields):
    return {"id": "bad-7", "image": "green.png", "conversations": [USER, ASSISTANT], **fields}


MALFORMED = {
    "not an object": (["image", "conversations"], "is a list, not an object"),
    "no image": ({"id": "bad-7", "conversations": [USER, ASSISTANT]}, "has no 'image' path"),
    "image not a string": (bad(image=["green.png"]), "has no 'image' path"),
    "no conversations": ({"id": "bad-7", "image": "green.png"}, "has no 'conversations'"),
    "conversations not a list": (bad(conversations="你好"), "'conversations' is a str, not a list"),
    "empty conversations": (bad(conversations=[]), "'conversations' is empty"),
    "turn not an object": (bad(conversations=["你好", ASSISTANT]), r"conversations\[0\] is a str, not an object"),
    "turn without a value": (bad(conversations=[{"from": "human"}, ASSISTANT]), r"conversations\[0\] has no string"),
    "value not a string": (
        bad(conversations=[USER, {"from": "gpt", "value": 42}]),
        r"conversations\[1\] has no string 'value'",
    ),
    "unknown role": (
        bad(conversations=[USER, {"from": "bot", "value": "好"}]),
        r"conversations\[1\] is from the unknown 'bot'",
    ),
    "assistant first": (
        bad(conversations=[ASSISTANT, USER, ASSISTANT]),
        r"conversations\[0\] is from the assistant where the user's turn belongs",
    ),
    "two user turns in a row": (
        bad(conversations=[USER, {"from": "human", "value": "还有呢？"}, ASSISTANT]),
        r"conversations\[1\] is from the user where the assistant's turn belongs",
    ),
    "system turn not first": (
        bad(conversations=[USER, {"from": "system", "value": "规则"}, ASSISTANT]),
        r"conversations\[1\] is from the system where the assistant's turn belongs",
    ),
    "ends with the user": (
        bad(conversations=[USER, ASSISTANT, {"from": "human", "value": "还有呢？"}]),
        "does not end with an assistant turn",
    ),
    "empty after stripping": (
        bad(conversations=[{"from": "human", "value": "<image>\n  "}, ASSISTANT]),
        r"conversations\[0\] is empty",
    ),
    "placeholder in an answer": (
        bad(conversations=[USER, {"from": "gpt", "value": "见 <image>"}]),
        r"conversations\[1\] holds <image>: only the first user turn may",
    ),
    "placeholder in a later question": (
        bad(conversations=[USER, ASSISTANT, {"from": "human", "value": "<image>\n再看看"}, ASSISTANT]),
        r"conversations\[2\] holds <image>: only the first user turn may",
    ),
    "placeholder twice": (
        bad(conversations=[{"from": "human", "value": "<image>\n<image>\n哪张更亮？"}, ASSISTANT]),
        r"conversations\[0\] holds <image> 2 times",
    ),
    "missing image file": (bad(image="train2017/000000000009.jpg"), "names the missing image .*000000000009.jpg"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_record_is_an_error_naming_file_record_and_id_or_a_counted_skip(
    lavis_ready, tmp_path, images, caplog, kind
):
    from blip2_internlm.datasets.conversations import load_conversation_records

    record, reason = MALFORMED[kind]
    path = write_json(tmp_path / "instruct.json", [CHINESE, record, ENGLISH])
    where = re.escape(f"{path}, record 1") + ("" if kind == "not an object" else r" \(id 'bad-7'\)")
    with pytest.raises(BadRecordError, match=rf"^{where}: {reason}.*\(set skip_invalid: true"):
        load_conversation_records(path, str(images), skip_invalid=False)

    with caplog.at_level(logging.WARNING):
        records, skipped = load_conversation_records(path, str(images), skip_invalid=True)
    assert skipped == 1
    assert [r["image_id"] for r in records] == ["zh-000001", "33471"]
    assert re.search(rf"Skipped 1 invalid conversation records of {re.escape(str(path))}.*first: {where}", caplog.text)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("中文说明".encode("gbk"), "is not UTF-8 text"),
        (b'[{"id": "1", "image": "red.png"', "is not valid JSON"),
        (b'{"id": "1", "image": "red.png"}', "must hold a JSON list"),
    ],
    ids=["gbk", "truncated", "object"],
)
def test_a_file_that_is_not_a_utf8_json_list_is_an_error_naming_it_even_when_skipping(
    lavis_ready, tmp_path, images, content, problem
):
    from blip2_internlm.datasets.conversations import load_conversation_records

    path = tmp_path / "instruct_zh.json"
    path.write_bytes(content)
    with pytest.raises(BadRecordError, match=re.escape(str(path)) + f".* {problem}"):
        load_conversation_records(path, str(images), skip_invalid=True)
    with pytest.raises(BadRecordError, match=re.escape(str(path)) + f".* {problem}"):
        builder(path, images, skip_invalid=True).build_datasets()


def test_an_image_that_cannot_be_decoded_is_an_error_naming_file_and_record_at_load_time(lavis_ready, tmp_path, images):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    train = write_json(tmp_path / "train.json", [CHINESE, {**ENGLISH, "image": "broken.png"}])
    dataset = builder(train, images).build_datasets()["train"]
    assert dataset[0]["image_id"] == "zh-000001"
    with pytest.raises(BadRecordError, match=re.escape(f"{train}, record 1 (id 33471): cannot decode image")):
        dataset[1]


# ---------------------------------------------------------------- samples, batches, builder


def test_the_builder_builds_train_from_several_files_into_the_sample_contract(lavis_ready, tmp_path, images):
    first = write_json(tmp_path / "llava_instruct_150k.json", [CHINESE, ENGLISH])
    second = write_json(tmp_path / "instruct_zh.json", [WITH_SYSTEM])
    datasets = builder([first, second], images).build_datasets()
    assert list(datasets) == ["train"]
    train = datasets["train"]
    assert len(train) == 3
    samples = [train[i] for i in range(3)]
    assert all(set(s) == {"image", "messages", "text_input", "image_id"} for s in samples)
    assert all(s["image"].shape == (3, SIZE, SIZE) for s in samples)
    for sample, channel in zip(samples, (0, 1, 2)):  # red.png, green.png, blue.png, in file order
        assert sample["image"][channel].mean() == max(sample["image"][c].mean() for c in range(3))
    assert samples[0]["messages"] == [
        {"role": "user", "content": "图片里有什么？"},
        {"role": "assistant", "content": "一个红色的方块。\n它的边缘很整齐。"},
        {"role": "user", "content": "它是什么颜色的？"},
        {"role": "assistant", "content": "红色。"},
    ]
    assert [s["text_input"] for s in samples] == ["红色。", "The square is green.", "一个蓝色的方块。"]
    # the record's id as text; without one, the image path
    assert [s["image_id"] for s in samples] == ["zh-000001", "33471", "blue.png"]
    samples[0]["messages"][0]["content"] = "changed"
    assert train[0]["messages"][0]["content"] == "图片里有什么？"  # a sample is a copy


def test_the_collater_keeps_messages_per_sample_and_stacks_the_images(lavis_ready, tmp_path, images):
    from blip2_internlm.datasets.guard import GuardedDataset

    train = builder(write_json(tmp_path / "train.json", [CHINESE, ENGLISH, WITH_SYSTEM]), images).build_datasets()[
        "train"
    ]
    samples = [train[i] for i in range(3)]
    batch = train.collater(samples)
    assert set(batch) == {"image", "messages", "text_input", "image_id"}
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    assert torch.equal(batch["image"][1], samples[1]["image"])
    assert batch["messages"] == [s["messages"] for s in samples]
    assert batch["text_input"] == ["红色。", "The square is green.", "一个蓝色的方块。"]
    assert batch["image_id"] == ["zh-000001", "33471", "blue.png"]
    # as training reads it: through the sample guard and a DataLoader
    guarded = GuardedDataset(train, policy="error", name="llava_conversations", split="train")
    loader = torch.utils.data.DataLoader(guarded, batch_size=2, collate_fn=guarded.collater)
    first = next(iter(loader))
    assert first["messages"] == batch["messages"][:2] and first["bad_samples"] == []


def test_max_turns_in_the_config_truncates_every_conversation(lavis_ready, tmp_path, images):
    train = write_json(tmp_path / "train.json", [CHINESE, WITH_SYSTEM])
    dataset = builder(train, images, max_turns=1).build_datasets()["train"]
    assert [len(dataset[i]["messages"]) for i in range(2)] == [2, 3]
    assert dataset[0]["text_input"] == "一个红色的方块。\n它的边缘很整齐。"
    with pytest.raises(ValueError, match=r"datasets\.llava_conversations\.max_turns = 0"):
        builder(train, images, max_turns=0).build_datasets()


def test_skip_invalid_drops_bad_train_records_but_never_evaluation_ones(lavis_ready, tmp_path, images, caplog):
    broken = bad(conversations=[USER])
    train = write_json(tmp_path / "train.json", [CHINESE, broken, ENGLISH])
    val = write_json(tmp_path / "val.json", [WITH_SYSTEM, broken])
    with caplog.at_level(logging.WARNING):
        trained = builder(train, images, skip_invalid=True).build_datasets()["train"]
    assert len(trained) == 2 and trained.skipped_records == 1
    assert "Skipped 1 invalid conversation records" in caplog.text
    with_val = {"annotations": {"val": {"storage": str(val)}}}
    with pytest.raises(BadRecordError, match=re.escape(f"{val}, record 1 (id 'bad-7'): does not end with")):
        builder(train, images, skip_invalid=True, build_info=with_val).build_datasets()
    with pytest.raises(BadRecordError, match=r"no usable records in datasets\.llava_conversations train"):
        builder(write_json(tmp_path / "all_bad.json", [broken]), images, skip_invalid=True).build_datasets()


def test_a_missing_path_is_an_error_naming_its_config_key_and_the_path(lavis_ready, tmp_path, images, monkeypatch):
    from lavis.common.registry import registry

    monkeypatch.setitem(registry.mapping["state"], "configuration", None)  # outside a run; restored afterwards
    train = write_json(tmp_path / "train.json", [CHINESE])
    absent = tmp_path / "nowhere" / "llava_instruct_150k.json"
    with pytest.raises(
        BadRecordError,
        match=re.escape(f"datasets.llava_conversations.build_info.annotations.train.storage: no file at {absent}"),
    ):
        builder([train, absent], images).build_datasets()
    with pytest.raises(
        BadRecordError,
        match=re.escape(f"datasets.llava_conversations.build_info.images.storage: no folder at {tmp_path / 'coco'}"),
    ):
        builder(train, tmp_path / "coco").build_datasets()


def test_the_default_config_reads_llava_instruct_under_coco_train2017_with_nothing_skipped(lavis_ready):
    from lavis.common.registry import registry

    cls = registry.get_builder_class("llava_conversations")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.llava_conversations
    assert cfg.skip_invalid is False and cfg.max_turns is None
    assert cfg.build_info.annotations.train.storage == "llava/llava_instruct_150k.json"
    assert cfg.build_info.images.storage == "coco/images/train2017/"
    assert "text_processor" not in cfg
