"""Spec: MMBench-format benchmarks (MMBench, MMBench-CN, CCBench): the TSV reader and its circular rotations
(builder ``mmbench``), the answer extraction and circular scoring of ``task: mmbench``, and an evaluation of
the synthetic shapes TSV through LAVIS's evaluate on the tiny model, on two ranks.

Small TSVs are written under tmp_path in the benchmarks' own layout (pandas-style quoting, base64 PNGs,
NaN hints, Chinese text); the end-to-end run uses ``configs/tiny/mmbench.yaml`` as shipped.
"""

import base64
import csv
import io
import json
import logging

import pytest
from conftest import torchrun
from omegaconf import OmegaConf
from PIL import Image
from spec_helpers import REPO

from blip2_internlm.datasets.mmbench import read_mmbench_tsv, rotate, rotation_records
from blip2_internlm.datasets.mmbench_shapes import write_shapes_tsv
from blip2_internlm.datasets.records import BadRecordError
from blip2_internlm.tasks.mmbench import build_prompt, extract_choice, score

HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image", "split"]


def png_base64(color=(200, 30, 30), size=8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


RED, BLUE = png_base64((220, 30, 30)), png_base64((30, 30, 220))


def row(index, question="图中是什么颜色？", hint="nan", options=("红色", "绿色", "蓝色", "黄色"), answer="A", **cells):
    values = {
        "index": str(index),
        "question": question,
        "hint": hint,
        **{letter: text for letter, text in zip("ABCD", options)},
        "answer": answer,
        "category": "color",
        "l2-category": "perception",
        "image": RED,
        "split": "dev",
        **cells,
    }
    return [values.get(column, "") for column in HEADER]


def write_tsv(path, rows, header=HEADER):
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- rotations


def test_every_option_takes_every_position_once_and_each_rotation_maps_back_to_the_original_letters():
    options = ["circle", "square", "triangle", "star"]
    shown = [rotate(options, "C", r) for r in range(4)]
    assert shown[1][0] == ["square", "triangle", "star", "circle"]  # A B C D -> B C D A
    for position in range(4):
        assert sorted(texts[position] for texts, _, _ in shown) == sorted(options)
    for texts, original, answer in shown:
        # the shown answer letter still points at "triangle", and maps back to C
        assert texts["ABCD".index(answer)] == "triangle"
        assert original["ABCD".index(answer)] == "C"
        assert [options["ABCD".index(letter)] for letter in original] == texts


def test_a_file_without_copies_is_expanded_into_one_record_per_rotation(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [row(7, answer="B"), row(8, options=("是", "否"), answer="B")])
    rows, _, report = read_mmbench_tsv(path)
    records = rotation_records(rows, circular=True)
    assert report["has_answers"] and not report["has_copies"]
    assert [(r["qid"], r["answer"]) for r in records] == [
        ("7:0", "B"),
        ("7:1", "A"),
        ("7:2", "D"),
        ("7:3", "C"),
        ("8:0", "B"),
        ("8:1", "A"),
    ]
    assert records[1]["options"] == [["A", "绿色"], ["B", "蓝色"], ["C", "黄色"], ["D", "红色"]]
    assert records[1]["original_letters"] == ["B", "C", "D", "A"]
    assert records[0]["hint"] == "" and records[0]["question"] == "图中是什么颜色？"  # NaN hint: none
    assert [r["qid"] for r in rotation_records(rows, circular=False)] == ["7:0", "8:0"]


def test_a_file_that_already_holds_the_rotated_copies_is_grouped_not_expanded_again(tmp_path):
    # VLMEvalKit's layout: copy r of question i is row r * 1_000_000 + i, its options rotated
    rows = [row(3, answer="A")]
    rows += [row(1_000_003, options=("绿色", "蓝色", "黄色", "红色"), answer="D", image="3")]
    path = write_tsv(tmp_path / "circular.tsv", rows)
    records = rotation_records(read_mmbench_tsv(path)[0], circular=True)
    assert [(r["qid"], r["index"], r["row_index"], r["answer"]) for r in records] == [
        ("3:0", 3, 3, "A"),
        ("3:1", 3, 1_000_003, "D"),
    ]
    assert records[1]["original_letters"] == ["B", "C", "D", "A"]


def test_a_copy_whose_answer_disagrees_with_its_original_is_an_error(tmp_path):
    rows = [row(3, answer="A"), row(1_000_003, options=("绿色", "蓝色", "黄色", "红色"), answer="A")]
    with pytest.raises(BadRecordError, match=r"row 2 \(index 1000003\): its answer is '绿色', index 3's is '红色'"):
        read_mmbench_tsv(write_tsv(tmp_path / "bad.tsv", rows))


# ---------------------------------------------------------------- malformed rows


BAD_ROWS = {
    "a missing column": (row(2)[:-3], "has 9 fields where the header has 12 columns"),
    "bad base64": (row(2, image="iVBORw0KGgo***notbase64"), "'image' is not valid base64"),
    "base64 of no image": (row(2, image=base64.b64encode(b"plain text, no image").decode()), "not an image"),
    "a missing answer in a dev split": (row(2, answer=""), "has no answer"),
    "an answer not among the options": (row(2, options=("是", "否"), answer="C"), "its answer 'C' is not one of"),
    "a gap in the options": (row(2, options=("红色", "", "蓝色")), "option C is given but option B is empty"),
    "an index that is not a number": (row("x2"), "'index' is 'x2', not an integer"),
    "a repeated index": (row(1), "repeats the index of"),
    "a reference to a missing image": (row(2, image="99"), "refers to index 99, which has no image data"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_malformed_row_is_an_error_naming_file_and_row(tmp_path, case):
    bad, reason = BAD_ROWS[case]
    path = write_tsv(tmp_path / "dev.tsv", [row(1), bad, row(3)])
    with pytest.raises(BadRecordError) as error:
        read_mmbench_tsv(path)
    message = str(error.value)
    assert f"{path}, row 2" in message and reason in message and "skip_invalid" in message


def test_with_skip_invalid_bad_rows_are_left_out_and_counted(tmp_path, caplog):
    rows = [row(1), row(2, answer="E"), row(3, image="not base64!"), row(4, image="1")]
    with caplog.at_level(logging.WARNING):
        kept, images, report = read_mmbench_tsv(write_tsv(tmp_path / "dev.tsv", rows), skip_invalid=True)
    assert [r["index"] for r in kept] == [1, 4] and set(images) == {1}  # row 4 shares row 1's image
    assert (report["skipped_rows"], report["skipped_questions"]) == (2, 2)
    assert "Skipped 2 questions (2 bad rows)" in caplog.text and "row 2 (index 2)" in caplog.text


def test_a_file_without_a_required_column_is_an_error_naming_it(tmp_path):
    header = [column for column in HEADER if column != "image"]
    path = write_tsv(tmp_path / "dev.tsv", [row(1)[:-2] + ["dev"]], header=header)
    with pytest.raises(BadRecordError, match=r"dev\.tsv: no column 'image'"):
        read_mmbench_tsv(path)


def test_a_file_without_answers_is_read_as_a_test_split_asked_once_per_row(tmp_path):
    rows = [row(1, answer="", split="test"), row(2, answer="", split="test", hint="看颜色。\n只有一个形状")]
    rows_read, _, report = read_mmbench_tsv(write_tsv(tmp_path / "test.tsv", rows))
    records = rotation_records(rows_read, circular=True)
    assert not report["has_answers"] and [r["qid"] for r in records] == ["1:0", "2:0"]
    assert records[1]["hint"] == "看颜色。\n只有一个形状"  # quoted newline kept


# ---------------------------------------------------------------- prompts and answer extraction


def test_the_prompt_lists_hint_question_and_options_in_the_datasets_language():
    options = [["A", "红色"], ["B", "蓝色"]]
    assert build_prompt("图中是什么颜色？", "只有一个形状。", options, "zh") == (
        "提示：只有一个形状。\n问题：图中是什么颜色？\n选项：\nA. 红色\nB. 蓝色\n请直接回答选项字母。\n答案："
    )
    assert build_prompt("What color?", "", [["A", "red"], ["B", "blue"]], "en", chat=True) == (
        "Question: What color?\nOptions:\nA. red\nB. blue\n"
        "Answer with the option's letter from the given choices directly."
    )


ZH_OPTIONS = {"A": "正方形", "B": "圆形", "C": "三角形", "D": "五边形"}
EN_OPTIONS = {"A": "circle", "B": "square", "C": "triangle", "D": "semicircle"}
COLORS_ZH = {"A": "红色", "B": "深红色", "C": "蓝色", "D": "绿色"}

EXTRACTION = [
    # a bare letter, decorated or not
    ("B", ZH_OPTIONS, "B"),
    ("(C)", ZH_OPTIONS, "C"),
    ("D.", ZH_OPTIONS, "D"),
    ("b", ZH_OPTIONS, "B"),
    ("Ａ", ZH_OPTIONS, "A"),  # full width
    # explicit statements
    ("答案是A", ZH_OPTIONS, "A"),
    ("答案：C。", ZH_OPTIONS, "C"),
    ("我选B", ZH_OPTIONS, "B"),
    ("答案是A，不是B", ZH_OPTIONS, "A"),
    ("The answer is B.", EN_OPTIONS, "B"),
    ("The answer is (D) semicircle", EN_OPTIONS, "D"),
    ("Option C is right", EN_OPTIONS, "C"),
    # a letter standing alone; "A" before a lower-case word is the article
    ("我认为是C", ZH_OPTIONS, "C"),
    ("(A) a circle", EN_OPTIONS, "A"),
    ("A is correct", EN_OPTIONS, "A"),
    # the option's text, exact or contained
    ("圆形", ZH_OPTIONS, "B"),
    ("图中是一个三角形", ZH_OPTIONS, "C"),
    ("Circle.", EN_OPTIONS, "A"),
    ("A red circle on the left", EN_OPTIONS, "A"),
    ("It is a semicircle", EN_OPTIONS, "D"),  # "circle" inside "semicircle" is not the word circle
    ("深红色", COLORS_ZH, "B"),  # holds 红色 too: the longer option wins
    # no choice: ambiguous, unanswerable, or a letter that is not an option
    ("A或B", ZH_OPTIONS, None),
    ("A or B", EN_OPTIONS, None),
    ("B and C are both possible", EN_OPTIONS, None),
    ("既有圆形也有三角形", ZH_OPTIONS, None),
    ("I don't know", EN_OPTIONS, None),
    ("左边有一个", ZH_OPTIONS, None),
    ("", ZH_OPTIONS, None),
    ("E", ZH_OPTIONS, None),
]


@pytest.mark.parametrize("answer, options, choice", EXTRACTION, ids=[repr(case[0]) for case in EXTRACTION])
def test_the_chosen_letter_is_read_from_chinese_and_english_answers(answer, options, choice):
    assert extract_choice(answer, options) == choice


# ---------------------------------------------------------------- scoring


def result(index, rotation, choice, answer, category="color", l2="perception"):
    return {"index": index, "rotation": rotation, "choice": choice, "answer": answer, "category": category,
            "l2_category": l2, "original_letters": None}  # fmt: skip


def test_three_of_four_rotations_right_scores_zero_circular_and_one_vanilla_when_the_first_is_right():
    results = [result(1, 0, "A", "A"), result(1, 1, "D", "D"), result(1, 2, "C", "C"), result(1, 3, "A", "B")]
    metrics, questions = score(results)
    assert (metrics["circular_accuracy"], metrics["vanilla_accuracy"], metrics["agg_metrics"]) == (0.0, 100.0, 0.0)
    assert questions[0]["circular"] is False and questions[0]["vanilla"] is True
    wrong_first = [result(1, 0, "B", "A")] + results[1:3] + [result(1, 3, "B", "B")]
    assert score(wrong_first)[0]["vanilla_accuracy"] == 0.0


def test_scores_are_given_per_category_and_l2_category_with_no_choice_counted():
    results = [result(1, r, "AB"[r], "AB"[r], "color") for r in range(2)]  # right in both rotations
    results += [result(2, 0, "A", "A", "shape"), result(2, 1, None, "B", "shape")]  # vanilla only
    results += [result(3, 0, None, "B", "shape", "reasoning"), result(3, 1, "A", "A", "shape", "reasoning")]
    metrics, _ = score(results)
    assert metrics["questions"] == 3 and metrics["rotations"] == 6 and metrics["no_choice"] == 2
    assert metrics["circular_accuracy"] == pytest.approx(100 / 3)
    assert metrics["vanilla_accuracy"] == pytest.approx(200 / 3)
    assert metrics["by_category"]["color"] == {"circular_accuracy": 100.0, "vanilla_accuracy": 100.0, "questions": 1}
    assert metrics["by_category"]["shape"] == {"circular_accuracy": 0.0, "vanilla_accuracy": 50.0, "questions": 2}
    assert metrics["by_l2_category"]["reasoning"]["questions"] == 1
    assert metrics["by_l2_category"]["perception"]["circular_accuracy"] == 50.0


# ---------------------------------------------------------------- the builder and the task with the tiny models


@pytest.fixture
def outside_a_run(lavis_ready, monkeypatch):
    """No LAVIS run configuration registered, whatever an earlier spec registered."""
    from lavis.common.registry import registry

    monkeypatch.setitem(registry.mapping["state"], "configuration", None)


def builder(**overrides):
    from lavis.common.registry import registry

    cls = registry.get_builder_class("mmbench")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.mmbench
    cfg.vis_processor = {"eval": {"name": "blip_image_eval", "image_size": 64}}
    return cls(OmegaConf.merge(cfg, overrides))


def test_the_builder_reads_its_splits_from_config_and_decodes_images_only_when_read(outside_a_run, tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [row(1, answer="C"), row(2, image=BLUE, options=("是", "否"), answer="A")])
    datasets = builder(lang="en", build_info={"annotations": {"val": {"storage": str(path)}}}).build()
    data = datasets["val"]
    assert len(data) == 6 and all(isinstance(value, str) for value in data.images.values())
    batch = data.collater([data[0], data[5]])
    assert batch["image"].shape == (2, 3, 64, 64)
    assert batch["qid"] == ["1:0", "2:1"] and batch["options"][1] == [["A", "否"], ["B", "是"]]
    assert batch["lang"] == ["en", "en"] and batch["answer"] == ["C", "B"]


def test_a_chat_model_gets_the_prompt_as_its_user_turn_and_its_answers_are_read(outside_a_run, monkeypatch):
    from blip2_internlm.factory import build_model
    from blip2_internlm.tasks.mmbench import MMBenchTask

    data = builder(synthetic={"images": 2, "split": "val"}).build()["val"]
    model = build_model("blip2_internlm_instruct", "tiny", is_eval=True)
    prompts = []
    generate = model.generate

    def spy(samples, **kwargs):
        prompts.extend(samples["prompt"])
        return generate(samples, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    samples = data.collater([data[k] for k in range(4)])
    results = MMBenchTask(num_beams=1, max_len=3).valid_step(model, samples)
    assert [r["qid"] for r in results] == samples["qid"]
    assert all(r["choice"] in (None, "A", "B", "C", "D") and isinstance(r["prediction"], str) for r in results)
    assert prompts[0].startswith("提示：图中只有一个形状。\n问题：图中形状是什么颜色？\n选项：\nA. ")
    assert prompts[0].endswith("请直接回答选项字母。")  # no "答案：" after a chat model's user turn


def test_answers_merged_from_the_ranks_are_scored_once_each_and_a_missing_one_is_an_error(
    lavis_ready, tmp_path, monkeypatch
):
    from lavis.common.registry import registry

    from blip2_internlm.tasks.mmbench import MMBenchTask

    for key in ("result_dir", "output_dir"):
        monkeypatch.setitem(registry.mapping["paths"], key, str(tmp_path))
    answers = [
        {**result(1, r, "AB"[r], "AB"[r]), "qid": f"1:{r}", "row_index": 1, "prediction": "AB"[r]} for r in range(2)
    ]
    task = MMBenchTask()
    task.expected["val"] = 2
    # the distributed sampler pads the last batch by repeating samples: the repeat is not a second answer
    metrics = task.after_evaluation(answers + answers[:1], "val")
    assert (metrics["rotations"], metrics["circular_accuracy"]) == (2, 100.0)
    task.expected["val"] = 3
    with pytest.raises(ValueError, match=r"split 'val': 2 distinct answers for 3 questions asked"):
        task.after_evaluation(answers, "val")


def test_the_synthetic_tsv_evaluates_through_lavis_on_two_ranks_and_a_file_without_answers_gets_a_submission(
    tiny_trained_checkpoint, tmp_path
):
    _, checkpoint, _ = tiny_trained_checkpoint
    unanswered = write_shapes_tsv(tmp_path / "test_no_answers.tsv", images=3, seed=5, answers=False)["path"]
    torchrun(
        "-m",
        "blip2_internlm.evaluate",
        "--cfg-path",
        str(REPO / "configs/tiny/mmbench.yaml"),
        "--options",
        f"model.finetuned={checkpoint}",
        f"run.output_dir={tmp_path / 'out'}",
        "datasets.mmbench.synthetic.images=5",  # 10 questions, 40 rotations: 20 a rank
        f"datasets.mmbench.build_info.annotations.val.storage={unanswered}",
        "run.test_splits=[test,val]",
        "run.batch_size_eval=8",
    )
    (job,) = (tmp_path / "out").iterdir()
    scored = json.loads((job / "result" / "mmbench_test_metrics.json").read_text(encoding="utf-8"))
    assert scored["questions"] == 10 and scored["rotations"] == 40
    assert set(scored["by_category"]) == {"color", "shape"} and set(scored["by_l2_category"]) == {"perception"}
    assert scored["agg_metrics"] == scored["circular_accuracy"] <= scored["vanilla_accuracy"]
    assert sum(c["questions"] for c in scored["by_category"].values()) == 10
    logged = [json.loads(line) for line in (job / "evaluate.txt").read_text(encoding="utf-8").splitlines()]
    assert logged[0]["test"] == scored
    questions = [json.loads(line) for line in (job / "result" / "mmbench_test_questions.jsonl").open(encoding="utf-8")]
    assert [q["index"] for q in questions] == list(range(10)) and all(len(q["rotations"]) == 4 for q in questions)
    assert sum(q["circular"] for q in questions) * 10 == pytest.approx(scored["circular_accuracy"])
    # the file without answers: one prediction per row, nothing scored
    submitted = (job / "result" / "mmbench_val_submission.tsv").read_text(encoding="utf-8").splitlines()
    assert submitted[0] == "index\tprediction" and [line.split("\t")[0] for line in submitted[1:]] == [
        str(i) for i in range(6)
    ]
    assert all(line.split("\t")[1] in ("", "A", "B", "C", "D") for line in submitted[1:])
    assert "agg_metrics" not in logged[1]["val"] and logged[1]["val"]["rows"] == 6
