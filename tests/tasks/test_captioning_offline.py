"""task: captioning_offline scores captions locally: characters for Chinese, words for English."""

import pytest

from blip2_internlm.tasks.captioning import caption_scores, tokenize


def test_chinese_is_scored_on_characters_without_punctuation():
    assert tokenize("左边有一个红色的圆形。", "char") == "左 边 有 一 个 红 色 的 圆 形"


def test_english_is_scored_on_lowercased_words_without_punctuation():
    assert tokenize("A red circle, on the left.", "words") == "a red circle on the left"


def test_an_unknown_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="caption_tokenizer"):
        tokenize("x", "jieba-typo")


def test_exact_match_counts_any_reference():
    refs = {1: ["左边有一个红色的圆形", "一个红色的圆形在左边"], 2: ["右边有一个蓝色的正方形"]}
    scores = caption_scores({1: "一个红色的圆形在左边。", 2: "右边有一个红色的正方形"}, refs, "char")
    assert scores["exact_match"] == 50.0


def test_bleu_1_is_clipped_unigram_precision_times_brevity_penalty():
    # hand-worked: 3 of 4 predicted words appear in the same-length reference, BP = 1
    scores = caption_scores({1: "a b c d", 2: "e f g h"}, {1: ["a b c x"], 2: ["e f g y"]}, "words")
    assert scores["Bleu_1"] == pytest.approx(75.0, abs=1e-6)
    # a prediction half the reference length: BP = exp(1 - 8/4)
    short = caption_scores({1: "a b c d", 2: "e f g h"}, {1: ["a b c d i j k l"], 2: ["e f g h m n o p"]}, "words")
    assert short["Bleu_1"] == pytest.approx(100 * 2.718281828 ** (1 - 2), rel=1e-4)


def test_cider_rewards_the_right_caption_over_a_wrong_one():
    refs = {i: [c] for i, c in enumerate(["a red circle on the left", "a blue square on the right", "a green triangle in the center"])}
    right = caption_scores({i: r[0] for i, r in refs.items()}, refs, "words")
    wrong = caption_scores({0: refs[1][0], 1: refs[2][0], 2: refs[0][0]}, refs, "words")
    assert right["CIDEr"] > wrong["CIDEr"] and right["exact_match"] == 100.0 and wrong["exact_match"] == 0.0


def test_every_image_needs_a_prediction():
    with pytest.raises(ValueError, match="no prediction for 1 images"):
        caption_scores({1: "a"}, {1: ["a"], 2: ["b"]}, "words")
