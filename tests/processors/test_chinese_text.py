"""Spec: ``chinese_caption`` / ``chinese_question`` normalise Chinese text and truncate it."""

import pytest
from lavis.common.registry import registry
from omegaconf import OmegaConf

import blip2_internlm  # noqa: F401  (registers the processors)


def processor(name="chinese_caption", **cfg):
    return registry.get_processor_class(name).from_config(OmegaConf.create(cfg))


@pytest.mark.parametrize(
    "raw, expected",
    [
        # word-segmented corpus text: spaces between CJK characters/punctuation go
        ("一个 男人 在 骑 自行车 。", "一个男人在骑自行车。"),
        # full-width letters, digits and the ideographic space become half-width
        ("ＡＢＣ１２３\u3000猫", "ABC123 猫"),
        # Chinese punctuation stays full-width (NFKC alone would fold ， and （）)
        ("他说：“你好”，然后（笑）走了。", "他说：“你好”，然后（笑）走了。"),
        ("ｅｘａｍｐｌｅ，例子", "example，例子"),
        # half-width marks right after CJK become full-width, runs included
        ("一只猫在睡觉.", "一只猫在睡觉。"),
        ("看,一只狗!", "看，一只狗！"),
        ("好?!", "好？！"),
        ("时间 : 三点", "时间：三点"),
        # ...but not after digits or Latin, and an ASCII ellipsis is left alone
        ("长 3.5 米", "长 3.5 米"),
        ("OK, 好的", "OK, 好的"),
        ("一个人...", "一个人..."),
        # whitespace runs collapse; a space next to a Latin word is kept
        ("  一个\t\n人  穿着 NBA  球衣 ", "一个人穿着 NBA 球衣"),
        ("…… 好", "……好"),
    ],
)
def test_normalisation_folds_widths_keeps_chinese_punctuation_and_drops_spaces_between_cjk(raw, expected):
    assert processor()(raw) == expected


def test_ascii_is_lowercased_only_when_asked():
    assert processor()("一件 T恤 ＡＢ") == "一件 T恤 AB"
    assert processor(lowercase=True)("一件 T恤 ＡＢ") == "一件 t恤 ab"


def test_prompt_is_prefixed_verbatim_and_not_counted_in_max_chars():
    proc = processor(prompt="图片描述：", max_chars=4)
    assert proc("一个 男人 在 骑 自行车 。") == "图片描述：一个男人"
    assert proc.normalize("一个 男人 在 骑 自行车 。") == "一个男人"


def test_max_chars_truncates_normalised_characters_and_trailing_space():
    assert processor(max_chars=3)("ＡＢ 猫咪") == "AB"
    assert processor(max_chars=100)("一只猫") == "一只猫"


def test_max_tokens_keeps_the_longest_prefix_within_the_tokenizer_budget():
    proc = processor(max_tokens=5, tokenizer="tiny")
    # the tiny InternLM2 tokenizer splits this as 一个 / 男 / 人 / 在 / 骑 / 自 / 行 / 车 / 。
    assert proc.truncate.tokenizer.tokenize("一个男人在骑自行车。")[:5] == ["一个", "男", "人", "在", "骑"]
    assert proc("一个 男人 在 骑 自行车 。") == "一个男人在骑"
    assert proc("一只猫") == "一只猫"


def test_both_truncations_or_a_bad_limit_are_config_errors():
    with pytest.raises(ValueError, match="max_chars or max_tokens, not both"):
        processor(max_chars=10, max_tokens=10, tokenizer="tiny")
    with pytest.raises(ValueError, match="needs 'tokenizer'"):
        processor(max_tokens=10)
    with pytest.raises(ValueError, match="positive integer"):
        processor(max_chars=0)


def test_question_processor_normalises_without_a_prompt():
    proc = processor("chinese_question", prompt="ignored")
    assert proc("图中 有 几只 猫 ?") == "图中有几只猫？"


def test_a_non_string_caption_is_a_type_error():
    with pytest.raises(TypeError, match="caption string"):
        processor()(["一只猫"])


def test_on_the_synthetic_shapes_text_it_agrees_with_lavis_blip_processors_in_both_languages(tmp_path):
    """The tiny configs and the demo switched from blip_caption/blip_question to these
    processors; on the shapes captions and questions (zh and en) nothing changes."""
    import json

    from blip2_internlm.datasets.shapes import generate_shapes

    generate_shapes(tmp_path, splits={"train": 300, "val": 0, "test": 0}, max_objects=3)
    empty = OmegaConf.create({})
    blip_caption, blip_question, caption, question = (
        registry.get_processor_class(name).from_config(empty)
        for name in ("blip_caption", "blip_question", "chinese_caption", "chinese_question")
    )
    checked = 0
    for lang in ("zh", "en"):
        for record in json.loads((tmp_path / "annotations" / f"caption_{lang}_train.json").read_text()):
            assert caption(record["caption"]) == blip_caption(record["caption"])
            checked += 1
        for record in json.loads((tmp_path / "annotations" / f"vqa_{lang}_train.json").read_text()):
            assert question(record["question"]) == blip_question(record["question"])
            checked += 1
    assert checked > 1000
