"""task: captioning_offline scores captions locally: characters or jieba words for Chinese,
PTB-style words for English, BLEU/ROUGE-L/CIDEr-D by pycocoevalcap's scorers, no Java needed."""

import json
import math
import shutil
from collections import Counter
from types import SimpleNamespace

import pytest

from blip2_internlm.tasks.captioning import OfflineCaptionTask, caption_scores, reference_source, tokenize

# --- tokenisation ----------------------------------------------------------------------------


def test_chinese_is_scored_on_characters_without_punctuation():
    assert tokenize("左边有一个红色的圆形。", "char") == "左 边 有 一 个 红 色 的 圆 形"


def test_char_mode_keeps_ascii_runs_whole_and_folds_full_width_forms():
    assert tokenize("T恤", "char") == "t 恤"
    assert tokenize("3个", "char") == "3 个"
    assert tokenize("一个穿着ＮＢＡ球衣的男人，在打篮球！", "char") == "一 个 穿 着 nba 球 衣 的 男 人 在 打 篮 球"
    assert tokenize("“好”（是的）、ok! 12.5", "char") == "好 是 的 ok 12 5"


def test_jieba_mode_segments_words_with_the_same_normalisation():
    assert tokenize("一个穿着T恤的男人在踢足球。", "jieba") == "一个 穿着 t恤 的 男人 在 踢足球"
    assert tokenize("3个红色的圆形，在左边！", "jieba") == "3 个 红色 的 圆形 在 左边"
    assert tokenize("ＡＴＭ机旁边", "jieba") == "atm 机 旁边"


def test_jieba_is_initialised_quietly_with_its_cache_in_the_project_cache(tmp_path, monkeypatch, capfd):
    import tempfile

    from blip2_internlm.tasks import captioning

    monkeypatch.setenv("BLIP2_INTERNLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))
    (tmp_path / "systmp").mkdir()
    captioning._jieba.cache_clear()
    try:
        assert tokenize("两个人在公园里散步", "jieba") == "两个 人 在 公园 里 散步"
    finally:
        captioning._jieba.cache_clear()
    assert (tmp_path / "cache" / "jieba" / "jieba.cache").is_file()
    assert not any((tmp_path / "systmp").iterdir()), "jieba wrote to the system temp dir"
    out, err = capfd.readouterr()
    assert "prefix dict" not in out + err


def test_english_is_scored_on_lowercased_words_without_punctuation():
    assert tokenize("A red circle, on the left.", "words") == "a red circle on the left"


@pytest.mark.parametrize(
    "caption, tokens",
    [
        ("A man's dog doesn't like cats, isn't it?", "a man 's dog does n't like cats is n't it"),
        ("I can't and won't; they'd've gone. We cannot.", "i ca n't and wo n't they 'd 've gone we can not"),
        ("A 3-year-old boy at a hot-dog stand.", "a 3-year-old boy at a hot-dog stand"),
        ("Kids' toys -- what a mess!?", "kids toys what a mess !?"),
        ("The U.S. flag at 5 p.m. near Mr. Smith's house.", "the u.s. flag at 5 p.m. near mr. smith 's house"),
        ("Broccoli & rice for $12.99, 50% off at 10:30.", "broccoli & rice for $ 12.99 50 % off at 10:30"),
        ("A \u201cSTOP\u201d sign\u2014it\u2019s red...", "a stop sign it 's red"),
        ("rock 'n' roll at 9 o'clock in the '90s", "rock 'n' roll at 9 o'clock in the '90s"),
    ],
)
def test_words_mode_splits_clitics_and_drops_punctuation_like_cocoevalcaps_ptb_tokenizer(caption, tokens):
    assert tokenize(caption, "words") == tokens


TYPICAL_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "The man's bicycle is leaning against a red-brick wall, isn't it?",
    "Two dogs don't want to share the frisbee; they're playing tug-of-war.",
    "A 10-year-old girl eats a hot dog at 3:30 p.m. in the U.S.",
    "A cat sitting on a laptop computer's keyboard...",
    "Kids' toys scattered on the floor -- what a mess!",
    'A "STOP" sign on the corner of Main St. and 5th Ave.',
    "A plate with broccoli, carrots & rice for $12.99.",
    "A pizza cut into 8 slices, with 1/2 of it eaten!?",
    "He can't believe it's 2 o'clock; we'll go at 10:45.",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference (Stanford PTBTokenizer) needs java")
def test_words_mode_agrees_with_stanford_ptbtokenizer_on_typical_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    stanford = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(TYPICAL_CAPTIONS)})
    assert [tokenize(c, "words") for c in TYPICAL_CAPTIONS] == [stanford[i][0] for i in range(len(TYPICAL_CAPTIONS))]


def test_an_unknown_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="caption_tokenizer"):
        tokenize("x", "jieba-typo")


# --- metrics, worked by hand ---------------------------------------------------------------


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


def test_bleu_2_is_the_geometric_mean_of_clipped_precisions_over_the_corpus():
    # image 1: "a a a b" vs "a b c d": unigrams a x3 clipped to 1, b 1 -> 2/4; bigrams aa aa ab -> ab only, 1/3
    # image 2: "e f g h" vs "e f g x": unigrams 3/4; bigrams ef fg gh -> 2/3
    # corpus counts: p1 = (2 + 3) / 8, p2 = (1 + 2) / 6; lengths equal, BP = 1
    scores = caption_scores({1: "a a a b", 2: "e f g h"}, {1: ["a b c d"], 2: ["e f g x"]}, "words")
    assert scores["Bleu_1"] == pytest.approx(100 * 5 / 8, rel=1e-6)
    assert scores["Bleu_2"] == pytest.approx(100 * math.sqrt(5 / 8 * 3 / 6), rel=1e-6)


def test_bleu_brevity_penalty_uses_the_reference_length_closest_to_the_prediction():
    # refs of 5 and 8 words for a 4-word prediction: r = 5, BP = exp(1 - 5/4); every unigram matches
    scores = caption_scores({1: "a b c d"}, {1: ["a b c d e", "a b c d e f g h"]}, "words")
    assert scores["Bleu_1"] == pytest.approx(100 * math.exp(1 - 5 / 4), rel=1e-6)


def test_rouge_l_is_the_lcs_f_measure_with_beta_1_2_from_the_best_precision_and_recall():
    beta2 = 1.2**2

    def f(p, r):
        return (1 + beta2) * p * r / (r + beta2 * p)

    # image 1: LCS("a b c d e", "a x c y e z") = "a c e": P = 3/5, R = 3/6
    # image 2: refs give (P, R) = (2/2, 2/4) and (1/2, 1/1); pycocoevalcap takes max P and max R separately
    scores = caption_scores(
        {1: "a b c d e", 2: "p q"}, {1: ["a x c y e z"], 2: ["p q r s", "q"]}, "words", ["Bleu", "ROUGE_L", "CIDEr"]
    )
    assert scores["ROUGE_L"] == pytest.approx(100 * (f(3 / 5, 3 / 6) + f(1.0, 1.0)) / 2, rel=1e-9)


def independent_cider_d(predictions, references, sigma=6.0):
    """CIDEr-D from its definition (Vedantam et al. 2015, as the coco-caption code defines tf: raw counts).

    Per n = 1..4: tf-idf vectors with idf = log(#images / df), df = images whose references
    contain the n-gram; similarity to each reference = clipped dot product min(g_c, g_r) . g_r
    over |g_c| |g_r|, times exp(-(len_c - len_r)^2 / (2 sigma^2)); mean over references and
    over n, times 10; then the mean over images.
    """

    def grams(tokens, n):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    images = sorted(references)
    df = {n: Counter() for n in range(1, 5)}
    for i in images:
        for n in range(1, 5):
            df[n].update(set().union(*(grams(r.split(), n) for r in references[i])))

    def vector(tokens, n):
        return {g: c * math.log(len(images) / max(1.0, df[n][g])) for g, c in grams(tokens, n).items()}

    def norm(v):
        return math.sqrt(sum(x * x for x in v.values()))

    per_image = []
    for i in images:
        cand = predictions[i].split()
        total = 0.0
        for n in range(1, 5):
            gc = vector(cand, n)
            for ref in references[i]:
                gr = vector(ref.split(), n)
                dot = sum(min(w, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, w in gc.items())
                cos = dot / (norm(gc) * norm(gr)) if norm(gc) and norm(gr) else 0.0
                total += cos * math.exp(-((len(cand) - len(ref.split())) ** 2) / (2 * sigma**2))
        per_image.append(10 * total / (4 * len(references[i])))
    return sum(per_image) / len(per_image)


def test_cider_d_matches_an_independent_implementation_on_character_tokens():
    predictions = {
        1: "左边有一个红色的圆形。",
        2: "右边有一个蓝色的正方形",
        3: "中间有一个绿色的三角形和一个红色的圆形",
        4: "红色红色红色的圆形",  # repeated n-grams: the clipping matters
        5: "一只猫",
    }
    references = {
        1: ["左边有一个红色的圆形", "一个红色的圆形在左边"],
        2: ["右边有一个蓝色的正方形", "一个蓝色正方形在右边", "右侧是蓝色的方块"],
        3: ["中间有一个绿色的三角形"],
        4: ["上面有一个红色的圆形", "红色的圆形在上面"],
        5: ["下面有一个黄色的星形", "一颗黄色的星星"],
    }
    # pure CJK: the char tokens are just the characters, punctuation removed
    chars = {i: " ".join(c for c in p if c != "。") for i, p in predictions.items()}
    ref_chars = {i: [" ".join(r) for r in refs] for i, refs in references.items()}
    expected = independent_cider_d(chars, ref_chars)
    scores = caption_scores(predictions, references, "char")
    assert scores["CIDEr"] == pytest.approx(100 * expected, rel=1e-9)
    assert 0 < expected < 10


def test_cider_rewards_the_right_caption_over_a_wrong_one():
    refs = {
        i: [c]
        for i, c in enumerate(
            ["a red circle on the left", "a blue square on the right", "a green triangle in the center"]
        )
    }
    right = caption_scores({i: r[0] for i, r in refs.items()}, refs, "words")
    wrong = caption_scores({0: refs[1][0], 1: refs[2][0], 2: refs[0][0]}, refs, "words")
    assert right["CIDEr"] > wrong["CIDEr"] and right["exact_match"] == 100.0 and wrong["exact_match"] == 0.0


def test_scores_are_pycocoevalcaps_scorers_on_the_same_pre_tokenised_input():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {1: ["a man riding a wave on a surfboard"], 2: ["two dogs play with a frisbee"], 3: ["a plate of food"]}
    gts = {
        1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave"],
        2: ["two dogs playing with a frisbee in the grass", "a couple of dogs fight over a frisbee"],
        3: ["a plate of broccoli and rice", "a white plate topped with food", "food on a plate"],
    }
    assert all(tokenize(c, "words") == c for caps in list(res.values()) + list(gts.values()) for c in caps)
    scores = caption_scores({i: c[0] for i, c in res.items()}, gts, "words")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [scores[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx([100 * b for b in bleu], rel=1e-12)
    assert scores["ROUGE_L"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert scores["CIDEr"] == pytest.approx(100 * Cider().compute_score(gts, res)[0], rel=1e-12)


def test_meteor_and_spice_are_skipped_with_a_note_without_java(monkeypatch, caplog):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    refs = {1: ["a man riding a wave"], 2: ["two dogs play"]}
    scores = caption_scores(
        {1: "a man on a wave", 2: "two dogs"}, refs, "words", ["Bleu", "ROUGE_L", "CIDEr", "METEOR", "SPICE"]
    )
    assert scores["skipped"] == {"METEOR": "needs java on PATH", "SPICE": "needs java on PATH"}
    assert "METEOR" not in scores and "SPICE" not in scores and {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores)
    assert "METEOR skipped: needs java on PATH" in caplog.text


def test_meteor_and_spice_are_skipped_for_chinese_tokens():
    scores = caption_scores({1: "红色的圆形"}, {1: ["红色的圆形"]}, "char", ["Bleu", "CIDEr", "METEOR"])
    assert "English-only" in scores["skipped"]["METEOR"] and "METEOR" not in scores


def test_the_offline_metrics_are_the_default_and_nothing_is_skipped():
    scores = caption_scores({1: "a b"}, {1: ["a b"]}, "words")
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "exact_match"}


def test_metric_lists_must_be_known_and_include_the_aggregate():
    assert set(caption_scores({1: "a"}, {1: ["a"]}, "words", "Bleu, CIDEr")) == {f"Bleu_{n}" for n in range(1, 5)} | {
        "CIDEr",
        "exact_match",
    }
    with pytest.raises(ValueError, match="run.caption_metrics: unknown metric 'BLEURT'"):
        caption_scores({1: "a"}, {1: ["a"]}, "words", ["Bleu", "CIDEr", "BLEURT"])
    with pytest.raises(ValueError, match="must include Bleu and CIDEr"):
        caption_scores({1: "a"}, {1: ["a"]}, "words", ["Bleu", "ROUGE_L"])


def test_every_image_needs_a_prediction():
    with pytest.raises(ValueError, match="no prediction for 1 images"):
        caption_scores({1: "a"}, {1: ["a"], 2: ["b"]}, "words")


def test_a_prediction_for_an_image_without_references_is_an_error():
    with pytest.raises(ValueError, match="1 predictions for images without references, e.g. \\[7\\]"):
        caption_scores({1: "a", 7: "b"}, {1: ["a"]}, "words")


# --- references and the task ----------------------------------------------------------------


def write_coco_gt(path, pairs):
    path.write_text(json.dumps({"annotations": [{"image_id": i, "caption": c} for i, c in pairs]}), encoding="utf-8")
    return str(path)


def test_references_from_the_dataset_are_preferred_over_its_gt_file(tmp_path):
    dataset = SimpleNamespace(
        references=lambda: {3: ["来自数据集的参考"]}, gt_file=write_coco_gt(tmp_path / "gt.json", [(3, "来自文件")])
    )
    assert reference_source(dataset)() == {3: ["来自数据集的参考"]}
    assert reference_source(SimpleNamespace(gt_file=dataset.gt_file))() == {3: ["来自文件"]}
    assert reference_source(SimpleNamespace()) is None


def test_coco_karpathy_references_come_from_the_local_annotations_under_the_samples_image_ids(tmp_path):
    from lavis.datasets.datasets.coco_caption_datasets import COCOCapEvalDataset
    from PIL import Image

    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    records = [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man riding a bike.", "A biker."]}]
    (tmp_path / "karpathy_test.json").write_text(json.dumps(records))
    dataset = COCOCapEvalDataset(
        lambda image: image, lambda text: text, str(tmp_path), [str(tmp_path / "karpathy_test.json")]
    )
    references = reference_source(dataset)()
    assert references == {391895: ["A man riding a bike.", "A biker."]}
    assert int(dataset[0]["image_id"]) in references  # what CaptionTask.valid_step records


def test_an_evaluated_split_without_references_is_an_error_naming_dataset_and_split(monkeypatch):
    from lavis.tasks.base_task import BaseTask

    datasets = {"my_captions": {"train": SimpleNamespace(), "val": SimpleNamespace()}}
    monkeypatch.setattr(BaseTask, "build_datasets", lambda self, cfg: datasets)
    task = OfflineCaptionTask(3, 20, 1, True)
    task.eval_splits = {"test"}
    assert task.build_datasets(None) is datasets  # train and val are not evaluated
    task.eval_splits = {"val"}
    with pytest.raises(ValueError, match="dataset 'my_captions', split 'val'"):
        task.build_datasets(None)


def test_setup_reads_the_tokenizer_and_metrics_from_the_run_config():
    from omegaconf import OmegaConf

    run = {"num_beams": 3, "max_len": 20, "min_len": 1, "evaluate": True, "test_splits": ["test"]}
    cfg = SimpleNamespace(
        run_cfg=OmegaConf.create({**run, "caption_tokenizer": "jieba", "caption_metrics": ["Bleu", "CIDEr", "METEOR"]})
    )
    task = OfflineCaptionTask.setup_task(cfg)
    assert (task.tokenizer, task.metrics, task.eval_splits) == ("jieba", ("Bleu", "CIDEr", "METEOR"), {"test"})
    default = OfflineCaptionTask.setup_task(SimpleNamespace(run_cfg=OmegaConf.create(run)))
    assert (default.tokenizer, default.metrics) == ("char", ("Bleu", "ROUGE_L", "CIDEr"))
    with pytest.raises(ValueError, match="run.caption_tokenizer = 'whitespace'"):
        OfflineCaptionTask.setup_task(
            SimpleNamespace(run_cfg=OmegaConf.create({**run, "caption_tokenizer": "whitespace"}))
        )


def test_each_evaluation_appends_its_split_scores_and_tokenizer_to_evaluate_txt(tmp_path, monkeypatch, capsys):
    from lavis.common.registry import registry

    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    task = OfflineCaptionTask(3, 20, 1, True, tokenizer="jieba")
    task.reference_sources = {"test": [("zh_captions", lambda: {1: ["一个男人在骑自行车"], 2: ["两只狗在草地上玩"]})]}
    results = tmp_path / "test_epochbest.json"
    results.write_text(
        json.dumps([{"image_id": 1, "caption": "一个男人在骑自行车。"}, {"image_id": 2, "caption": "两只猫"}])
    )
    metrics = task._report_metrics(str(results), "test")
    task._report_metrics(str(results), "test")
    lines = (tmp_path / "evaluate.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"test": metrics}
    assert metrics["tokenizer"] == "jieba" and metrics["exact_match"] == 50.0
    assert metrics["agg_metrics"] == metrics["CIDEr"] + metrics["Bleu_4"]
    assert "test captions scored on jieba tokens" in capsys.readouterr().out


def test_references_of_two_datasets_on_one_split_must_not_share_image_ids():
    task = OfflineCaptionTask(3, 20, 1, True)
    task.reference_sources = {"val": [("a", lambda: {1: ["x"]}), ("b", lambda: {1: ["y"]})]}
    with pytest.raises(ValueError, match="image id 1 is in both 'a' and 'b'"):
        task.references("val")
    with pytest.raises(ValueError, match="no dataset gives references for split 'test'"):
        task.references("test")
