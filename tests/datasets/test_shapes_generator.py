"""Specification of the synthetic shapes dataset (blip2_internlm.datasets.shapes).

The images are checked against their captions from the pixels, the captions across
languages against a word table written here, and the VQA files by LAVIS's own VQA and
VQAEval code, loaded from its files because ``import lavis`` needs the full stack.
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _load_shapes_module():
    # By file, not through the package: ``import blip2_internlm`` pulls in LAVIS and
    # transformers (seconds), while shapes.py promises to need only numpy and Pillow.
    path = Path(__file__).resolve().parents[2] / "blip2_internlm" / "datasets" / "shapes.py"
    spec = importlib.util.spec_from_file_location("_shapes_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes = _load_shapes_module()
generate_shapes = shapes.generate_shapes
SMALL = {"train": 40, "val": 24, "test": 24}
LANGS = ("en", "zh")
EVAL_SPLITS = ("val", "test")

# Written independently of the generator: what the Chinese words mean.
ZH_TO_EN = {
    "红色": "red",
    "绿色": "green",
    "蓝色": "blue",
    "黄色": "yellow",
    "圆形": "circle",
    "正方形": "square",
    "三角形": "triangle",
    "左边": "left",
    "中间": "center",
    "右边": "right",
    "是": "yes",
    "否": "no",
}
EN_POSITIONS = {"on the left": "left", "in the center": "center", "on the right": "right"}
# What the colour words mean, as hue ranges in degrees.
HUES = {
    "red": (-15, 15),
    "orange": (20, 40),
    "yellow": (45, 65),
    "green": (90, 150),
    "blue": (200, 250),
    "purple": (260, 300),
}
_EN_OBJECT = (
    r"a (red|green|blue|yellow) (circle|square|triangle)"
    r" (on the left|in the center|on the right)"
)
_ZH_COLOR, _ZH_SHAPE, _ZH_POS = "(红色|绿色|蓝色|黄色)", "(圆形|正方形|三角形)", "(左边|中间|右边)"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("single"), splits=SMALL, seed=3)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("multi"), splits=SMALL, seed=4, max_objects=3)


@pytest.fixture(scope="module")
def lavis_vqa():
    """LAVIS's VQA and VQAEval classes, loaded from their files (they need only json/re)."""
    spec = importlib.util.find_spec("lavis")  # locates the package without running it
    if spec is None:
        pytest.skip("salesforce-lavis is not installed")
    tools = Path(spec.submodule_search_locations[0]) / "common" / "vqa_tools"
    loaded = []
    for name in ("vqa", "vqa_eval"):
        module_spec = importlib.util.spec_from_file_location(f"_lavis_{name}", tools / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0].VQA, loaded[1].VQAEval


def load(manifest, rel_path):
    with open(os.path.join(manifest["root"], rel_path), encoding="utf-8") as f:
        return json.load(f)


def files(manifest, split, lang):
    return manifest["files"][split][lang]


def canonical(record):
    return record["caption"] if isinstance(record["caption"], str) else record["caption"][0]


def parse_en(caption):
    """[(color, shape, position)] from an English caption, left to right."""
    assert re.fullmatch(rf"(there is )?{_EN_OBJECT}((, | and ){_EN_OBJECT})*", caption), caption
    return [(c, s, EN_POSITIONS[p]) for c, s, p in re.findall(_EN_OBJECT, caption)]


def parse_zh(caption):
    """[(color, shape, position)] in English words from either Chinese caption form."""
    objects = []
    for clause in caption.split("，"):
        if m := re.fullmatch(f"{_ZH_POS}有一个{_ZH_COLOR}的{_ZH_SHAPE}", clause):
            pos, color, shape = m.groups()
        else:
            m = re.fullmatch(f"一个{_ZH_COLOR}的{_ZH_SHAPE}在{_ZH_POS}", clause)
            assert m, f"unexpected Chinese caption {caption!r}"
            color, shape, pos = m.groups()
        objects.append((ZH_TO_EN[color], ZH_TO_EN[shape], ZH_TO_EN[pos]))
    return objects


def color_name(rgb):
    """The colour word for a saturated RGB colour, by hue."""
    r, g, b = (float(v) / 255 for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    assert hi - lo > 0.4, f"{rgb} is too grey to name"
    if hi == r:
        hue = 60 * (g - b) / (hi - lo)
    elif hi == g:
        hue = 60 * (2 + (b - r) / (hi - lo))
    else:
        hue = 60 * (4 + (r - g) / (hi - lo))
    hue = hue - 360 if hue > 330 else hue
    names = [name for name, (low, high) in HUES.items() if low <= hue <= high]
    assert len(names) == 1, f"{rgb} (hue {hue:.0f}) is not clearly one colour"
    return names[0]


def objects_in_pixels(path):
    """[(color, shape, position)] found in the image, left to right.

    Objects are runs of columns holding non-background pixels; colour is named from the
    hue of their median, shape from how much of the bounding box they fill.
    """
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    size = pixels.shape[1]
    foreground = np.abs(pixels - np.array(shapes.BACKGROUND)).max(axis=2) > 40
    columns = np.flatnonzero(foreground.any(axis=0))
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    found = []
    for run in runs:
        mask = np.zeros_like(foreground)
        mask[:, run] = foreground[:, run]
        rows = np.flatnonzero(mask.any(axis=1))
        median = np.median(pixels[mask], axis=0)
        color = color_name(median)
        fill = mask.sum() / (len(run) * (rows[-1] - rows[0] + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        position = ("left", "center", "right")[int(3 * run.mean() / size)]
        found.append((color, shape, position))
    return found


def referenced(objects, where):
    """The objects a question can mean: the one at ``where`` ("on the left"), or the only one."""
    if where is None:
        assert len(objects) == 1, "with several objects the question must say which"
        return objects
    return [o for o in objects if o[2] == EN_POSITIONS[where]]


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


# --- images and captions -------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["single", "multi"])
def test_caption_describes_the_objects_drawn(dataset, request):
    manifest = request.getfixturevalue(dataset)
    for split in SMALL:
        for record in load(manifest, files(manifest, split, "en")["caption"]):
            drawn = objects_in_pixels(os.path.join(manifest["root"], record["image"]))
            assert parse_en(canonical(record)) == drawn, record["image"]


def test_multi_object_data_has_one_to_three_objects_in_distinct_positions(multi):
    records = load(multi, files(multi, "train", "en")["caption"])
    counts = {len(parse_en(r["caption"])) for r in records}
    assert counts == {1, 2, 3}
    for r in records:
        positions = [p for _, _, p in parse_en(r["caption"])]
        assert len(set(positions)) == len(positions)


def test_every_palette_colour_is_clearly_its_name_and_far_from_the_others():
    for name, (rgb, _) in shapes.PALETTE.items():
        assert color_name(rgb) == name
        assert max(abs(c - b) for c, b in zip(rgb, shapes.BACKGROUND)) > 100
    rgbs = [np.array(rgb) for rgb, _ in shapes.PALETTE.values()]
    assert min(np.abs(a - b).max() for i, a in enumerate(rgbs) for b in rgbs[i + 1 :]) > 60


def test_default_task_is_one_object_from_four_colours_three_shapes_three_positions(single):
    seen = [parse_en(r["caption"]) for r in load(single, files(single, "train", "en")["caption"])]
    assert all(len(objects) == 1 for objects in seen)
    colors, shape_names, positions = (set(v) for v in zip(*(o[0] for o in seen)))
    assert colors == {"red", "green", "blue", "yellow"}
    assert shape_names == {"circle", "square", "triangle"}
    assert positions == {"left", "center", "right"}


@pytest.mark.parametrize("dataset", ["single", "multi"])
def test_chinese_and_english_captions_describe_the_same_objects(dataset, request):
    manifest = request.getfixturevalue(dataset)
    for split in SMALL:
        en = load(manifest, files(manifest, split, "en")["caption"])
        zh = load(manifest, files(manifest, split, "zh")["caption"])
        assert [r["image"] for r in en] == [r["image"] for r in zh]
        for e, z in zip(en, zh):
            refs_en = [e["caption"]] if split == "train" else e["caption"]
            refs_zh = [z["caption"]] if split == "train" else z["caption"]
            objects = parse_en(refs_en[0])
            assert all(parse_en(ref) == objects for ref in refs_en)
            assert all(parse_zh(ref) == objects for ref in refs_zh)


def test_train_has_one_canonical_caption_and_eval_splits_have_distinct_references(single):
    for lang in LANGS:
        train = load(single, files(single, "train", lang)["caption"])
        assert all(isinstance(r["caption"], str) for r in train)
        assert all(re.fullmatch(r"shapes_train_\d{5}", r["image_id"]) for r in train)
        for split in EVAL_SPLITS:
            for r in load(single, files(single, split, lang)["caption"]):
                assert len(r["caption"]) == len(set(r["caption"])) == 2
                assert isinstance(r["image_id_int"], int)


@pytest.mark.parametrize("dataset", ["single", "multi"])
def test_the_canonical_caption_is_a_function_of_the_content(dataset, request):
    # Needed for exact match: the same objects must always get the same training caption,
    # and it is the first eval reference, in its short form ("a red circle on the left").
    manifest = request.getfixturevalue(dataset)
    for lang, parse in (("en", parse_en), ("zh", parse_zh)):
        caption_of = {}
        for split in SMALL:
            for r in load(manifest, files(manifest, split, lang)["caption"]):
                content = tuple(parse(canonical(r)))
                assert caption_of.setdefault(content, canonical(r)) == canonical(r)
                assert not canonical(r).startswith(("there is", "一个"))


def test_coco_ground_truth_matches_the_eval_records(single):
    coco_module = pytest.importorskip("pycocotools.coco")
    for lang in LANGS:
        for split in EVAL_SPLITS:
            records = load(single, files(single, split, lang)["caption"])
            gt_path = os.path.join(single["root"], files(single, split, lang)["caption_gt"])
            coco = coco_module.COCO(gt_path)
            assert sorted(coco.getImgIds()) == sorted(r["image_id_int"] for r in records)
            for r in records:
                anns = coco.loadAnns(coco.getAnnIds(imgIds=r["image_id_int"]))
                assert [a["caption"] for a in anns] == r["caption"]
            # What the caption task writes as results must load against this ground truth.
            coco.loadRes([{"image_id": r["image_id_int"], "caption": r["caption"][0]} for r in records])


# --- splits, ids, determinism ----------------------------------------------------------


def test_splits_share_no_images_or_ids(single):
    image_ids, int_ids, pixel_hashes = [], [], []
    for split in SMALL:
        records = load(single, files(single, split, "en")["caption"])
        assert len(records) == SMALL[split]
        assert all(r["image"].startswith(f"images/{split}/") for r in records)
        image_ids += [r["image_id"] for r in records]
        int_ids += list({q["image_id"] for q in load(single, files(single, split, "en")["vqa"])})
        for r in records:
            pixels = np.asarray(Image.open(os.path.join(single["root"], r["image"])))
            pixel_hashes.append(hashlib.sha256(pixels.tobytes()).hexdigest())
    for ids in (image_ids, int_ids, pixel_hashes):
        assert len(set(ids)) == len(ids) == sum(SMALL.values())


def test_question_ids_are_unique_across_splits_and_languages(single):
    qids = [
        q["question_id"] for split in SMALL for lang in LANGS for q in load(single, files(single, split, lang)["vqa"])
    ]
    assert len(set(qids)) == len(qids) == 5 * 2 * sum(SMALL.values())


def test_same_seed_and_args_give_byte_identical_files(tmp_path):
    args = dict(splits={"train": 12, "val": 6, "test": 6}, seed=7, max_objects=2)
    first = all_files(generate_shapes(tmp_path / "a", **args)["root"])
    second = all_files(generate_shapes(tmp_path / "b", **args)["root"])
    other_seed = all_files(generate_shapes(tmp_path / "c", **{**args, "seed": 8})["root"])
    assert "manifest.json" in first and len(first) > 24
    assert first == second
    assert first["images/val/val_00000.png"] != other_seed["images/val/val_00000.png"]


def test_changing_one_split_size_leaves_other_splits_images_alone(tmp_path):
    a = all_files(generate_shapes(tmp_path / "a", splits={"train": 5, "val": 3})["root"])
    b = all_files(generate_shapes(tmp_path / "b", splits={"train": 9, "val": 3})["root"])
    assert all(a[k] == b[k] for k in a if k.startswith("images/"))


# --- VQA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["single", "multi"])
def test_vqa_answers_are_true_of_the_caption(dataset, request):
    manifest = request.getfixturevalue(dataset)
    for split in SMALL:
        captions = {r["image"]: parse_en(canonical(r)) for r in load(manifest, files(manifest, split, "en")["caption"])}
        en = load(manifest, files(manifest, split, "en")["vqa"])
        zh = load(manifest, files(manifest, split, "zh")["vqa"])
        for q_en, q_zh in zip(en, zh):
            objects, answer = captions[q_en["image"]], q_en["answer"][0]
            by_position = {p: (c, s) for c, s, p in objects}
            question = q_en["question"]
            if m := re.fullmatch(r"what color is the shape(?: (.+))?\?", question):
                [(color, _, _)] = referenced(objects, m[1])
                assert answer == color
            elif m := re.fullmatch(r"what shape is (?:it|(.+))\?", question):
                [(_, shape, _)] = referenced(objects, m[1])
                assert answer == shape
            elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
                assert by_position[answer] == (m[1], m[2])
            elif m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
                assert answer == ("yes" if (m[1], m[2]) in by_position.values() else "no")
            else:
                assert question == "how many shapes are there?"
                assert answer == str(len(objects))
            # The Chinese question is about the same image and has the same answer.
            assert (q_zh["image"], q_zh["image_id"]) == (q_en["image"], q_en["image_id"])
            assert ZH_TO_EN.get(q_zh["answer"][0], q_zh["answer"][0]) == answer


def test_yes_no_questions_are_balanced(single, multi):
    for manifest in (single, multi):
        for split in SMALL:
            for lang in LANGS:
                yes, no = shapes.YES_NO[lang]
                answers = [
                    q["answer"][0]
                    for q in load(manifest, files(manifest, split, lang)["vqa"])
                    if q["answer"][0] in (yes, no)
                ]
                assert abs(answers.count(yes) - answers.count(no)) <= 1
                assert len(answers) == SMALL[split]


@pytest.mark.parametrize("dataset", ["single", "multi"])
def test_vqa_files_are_well_formed_and_consistent(dataset, request):
    manifest = request.getfixturevalue(dataset)
    for lang in LANGS:
        answer_list = load(manifest, manifest["files"]["answer_list"][lang])
        assert len(set(answer_list)) == len(answer_list)
        for split in SMALL:
            vqa = load(manifest, files(manifest, split, lang)["vqa"])
            for q in vqa:
                assert set(q) == {"question_id", "question", "answer", "image", "image_id", "dataset"}
                assert len(q["answer"]) == 10 and len(set(q["answer"])) == 1
                assert q["answer"][0] in answer_list and q["dataset"] == "shapes"
                assert isinstance(q["image_id"], int) and isinstance(q["question_id"], int)
            if split == "train":
                continue
            questions = load(manifest, files(manifest, split, lang)["vqa_questions"])
            annotations = load(manifest, files(manifest, split, lang)["vqa_annotations"])
            assert questions["task_type"] == "Open-Ended"
            assert [(q["question_id"], q["question"], q["image_id"]) for q in vqa] == [
                (q["question_id"], q["question"], q["image_id"]) for q in questions["questions"]
            ]
            assert {a["answer_type"] for a in annotations["annotations"]} == {"yes/no", "number", "other"}
            for q, a in zip(vqa, annotations["annotations"]):
                assert (a["question_id"], a["image_id"]) == (q["question_id"], q["image_id"])
                assert a["multiple_choice_answer"] == q["answer"][0]
                assert [x["answer"] for x in a["answers"]] == q["answer"]
                assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))


@pytest.mark.parametrize("dataset", ["single", "multi"])
@pytest.mark.parametrize("lang", LANGS)
def test_lavis_vqaeval_scores_truth_100_and_wrong_answers_0(dataset, lang, request, lavis_vqa, tmp_path):
    manifest = request.getfixturevalue(dataset)
    VQA, VQAEval = lavis_vqa
    answer_list = load(manifest, manifest["files"]["answer_list"][lang])
    for split in EVAL_SPLITS:
        paths = {k: os.path.join(manifest["root"], v) for k, v in files(manifest, split, lang).items()}
        truth = {q["question_id"]: q["answer"][0] for q in load(manifest, files(manifest, split, lang)["vqa"])}
        # Another answer from the list: plausible, and wrong for every question.
        wrong = {qid: answer_list[(answer_list.index(a) + 1) % len(answer_list)] for qid, a in truth.items()}
        scores = []
        for name, predictions in (("truth", truth), ("wrong", wrong)):
            result_file = tmp_path / f"{split}_{name}.json"  # what VQATask.after_evaluation writes
            result_file.write_text(json.dumps([{"question_id": k, "answer": v} for k, v in predictions.items()]))
            vqa = VQA(paths["vqa_annotations"], paths["vqa_questions"])
            scorer = VQAEval(vqa, vqa.loadRes(str(result_file), paths["vqa_questions"]), n=2)
            scorer.evaluate()
            scores.append(scorer.accuracy)
        assert scores[0]["overall"] == 100
        assert scores[0]["perAnswerType"] == {"yes/no": 100, "number": 100, "other": 100}
        assert scores[1]["overall"] == 0


def test_answers_are_unchanged_by_vqaeval_normalisation(single, multi, lavis_vqa):
    # VQAEval normalises only the prediction, so ground truth must already be normalised.
    evaluator = lavis_vqa[1]()
    for manifest in (single, multi):
        for lang in LANGS:
            for answer in load(manifest, manifest["files"]["answer_list"][lang]):
                normalised = evaluator.processDigitArticle(evaluator.processPunctuation(answer))
                assert normalised == answer


# --- reuse, CLI, timing ------------------------------------------------------------------


def test_same_args_reuse_the_dataset_and_new_args_replace_it(tmp_path):
    first = generate_shapes(tmp_path, splits={"train": 8, "val": 4})
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = generate_shapes(tmp_path, splits={"val": 4, "train": 8, "test": 0})
    assert (first["reused"], again["reused"]) == (False, True)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes
    assert {k: v for k, v in again.items() if k not in ("seconds", "reused")} == {
        k: v for k, v in first.items() if k not in ("seconds", "reused")
    }

    image = tmp_path / "images" / "val" / "val_00000.png"
    before = image.read_bytes()
    reseeded = generate_shapes(tmp_path, splits={"train": 8, "val": 4}, seed=1)
    assert not reseeded["reused"] and image.read_bytes() != before

    smaller = generate_shapes(tmp_path, splits={"train": 3, "test": 2}, seed=1)
    assert not smaller["reused"]
    assert sorted(p.name for p in (tmp_path / "images").rglob("*.png")) == [
        "test_00000.png",
        "test_00001.png",
        "train_00000.png",
        "train_00001.png",
        "train_00002.png",
    ]
    assert not list((tmp_path / "annotations").glob("*_val*"))
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["args"]["seed"] == 1 and on_disk["counts"]["train"]["images"] == 3
    assert "seconds" not in on_disk  # timing would break byte-identical reruns

    (tmp_path / "images" / "train" / "train_00001.png").unlink()
    assert not generate_shapes(tmp_path, splits={"train": 3, "test": 2}, seed=1)["reused"]
    assert (tmp_path / "images" / "train" / "train_00001.png").is_file()


def test_an_interrupted_regeneration_is_not_mistaken_for_a_finished_one(tmp_path, monkeypatch):
    generate_shapes(tmp_path / "fresh", splits={"train": 4})
    generate_shapes(tmp_path / "out", splits={"train": 4})
    write_json = shapes._write_json

    def crash_on_final_manifest(path, obj):
        if path.endswith("manifest.json") and obj.get("complete"):
            raise KeyboardInterrupt
        write_json(path, obj)

    # All files of the seed-1 data are written, then the run dies before its manifest.
    monkeypatch.setattr(shapes, "_write_json", crash_on_final_manifest)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "out", splits={"train": 4}, seed=1)
    monkeypatch.undo()

    again = generate_shapes(tmp_path / "out", splits={"train": 4})
    assert not again["reused"]
    assert all_files(tmp_path / "out") == all_files(tmp_path / "fresh")


@pytest.mark.parametrize("foreign", ["images/mine.png", "annotations/mine.json", "manifest.json"])
def test_refuses_to_overwrite_files_it_did_not_write(foreign, tmp_path):
    (tmp_path / foreign).parent.mkdir(exist_ok=True)
    (tmp_path / foreign).write_text('{"not": "ours"}')
    with pytest.raises(FileExistsError):
        generate_shapes(tmp_path, splits={"train": 2})
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == [foreign]
    assert (tmp_path / foreign).read_text() == '{"not": "ours"}'


def test_leaves_other_files_in_out_dir_alone(tmp_path):
    (tmp_path / "README").write_text("kept")
    generate_shapes(tmp_path, splits={"train": 2})
    generate_shapes(tmp_path, splits={"train": 3})
    assert (tmp_path / "README").read_text() == "kept"


@pytest.mark.parametrize(
    "bad",
    [
        dict(splits={"dev": 3}),
        dict(splits={"train": -1}),
        dict(colors=["red", "pink"]),
        dict(max_objects=4),
        dict(colors=["red"], shapes=["circle"]),
        dict(image_size=8),
        dict(seed=-1),
    ],
)
def test_invalid_arguments_are_rejected(bad, tmp_path):
    with pytest.raises(ValueError):
        generate_shapes(tmp_path, **{"splits": {"train": 2}, **bad})
    assert not any(tmp_path.iterdir())


def test_cli_writes_the_dataset_without_importing_torch_or_lavis(tmp_path):
    # Runs the module file as __main__ in a fresh interpreter, bypassing the package
    # __init__, so only shapes.py's own imports are checked.
    script = (
        "import runpy, sys\n"
        "sys.argv = ['shapes', '--out', sys.argv[1], '--train', '6', '--val', '2', '--test', '2',"
        " '--max-objects', '2', '--seed', '5']\n"
        f"try:\n    runpy.run_path({shapes.__file__!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = {'torch', 'lavis'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["val"]["images"] == 2
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["args"]["max_objects"] == 2 and manifest["args"]["seed"] == 5
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 6


def test_the_default_size_is_2400_images_and_its_generation_time_is_printed(tmp_path, capsys):
    started = time.perf_counter()
    manifest = generate_shapes(tmp_path)
    elapsed = time.perf_counter() - started
    n = sum(c["images"] for c in manifest["counts"].values())
    assert n == 2400
    with capsys.disabled():
        print(f"\n[shapes] generated {n} images of 64 px with annotations in {elapsed:.2f} s")
