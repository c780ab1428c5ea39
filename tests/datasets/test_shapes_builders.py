"""The registered shapes builders, and what happens to bad records."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from blip2_internlm.datasets.records import BadRecordError

SMALL = {"seed": 3, "train": 12, "val": 4, "test": 4, "image_size": 32, "max_objects": 1}


def builder(name, lang="zh", **overrides):
    from lavis.common.registry import registry

    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.default_config_path()).datasets[name]
    cfg.lang = lang
    cfg.generator = dict(SMALL)
    cfg.vis_processor = {
        "train": {"name": "blip_image_eval", "image_size": 32},
        "eval": {"name": "blip_image_eval", "image_size": 32},
    }
    cfg.text_processor = {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}}
    return cls(OmegaConf.merge(cfg, overrides))


def test_caption_builder_yields_images_captions_and_string_ids(lavis_ready):
    datasets = builder("shapes_caption").build_datasets()
    assert sorted(datasets) == ["test", "train", "val"]
    sample = datasets["train"][0]
    assert sample["image"].shape == (3, 32, 32)
    assert sample["image_id"].startswith("shapes_train_") and any(
        "\u4e00" <= ch <= "\u9fff" for ch in sample["text_input"]
    )
    assert isinstance(datasets["val"][0]["image_id"], int)


def test_vqa_builder_gives_lavis_vqa_task_its_files(lavis_ready):
    datasets = builder("shapes_vqa", lang="en").build_datasets()
    val = datasets["val"]
    with open(val.coco_fmt_qust_file) as questions, open(val.coco_fmt_anno_file) as annotations:
        assert len(json.load(questions)["questions"]) == len(val) == len(json.load(annotations)["annotations"])
    batch = val.collater([val[0], val[1]])
    assert batch["question_id"].tolist() == [val.annotation[0]["question_id"], val.annotation[1]["question_id"]]
    train_batch = datasets["train"].collater([datasets["train"][0]])
    assert train_batch["answer"] and train_batch["weight"].sum() == pytest.approx(1.0)


def test_an_unknown_language_is_a_config_error(lavis_ready):
    with pytest.raises(ValueError, match="datasets.shapes_caption.lang = 'fr'"):
        builder("shapes_caption", lang="fr").build_datasets()


@pytest.fixture
def broken_copy(lavis_ready, tmp_path):
    """A copy of generated shapes data, for breaking."""
    source = builder("shapes_caption")
    source.build_datasets()
    root = tmp_path / "shapes"
    shutil.copytree(source.data_root(), root)
    return root


def rebuild(root, skip_invalid=False):
    return builder("shapes_caption", build_info={"root": str(root)}, skip_invalid=skip_invalid).build()


def edit_train_records(root, edit):
    path = root / "annotations" / "caption_zh_train.json"
    records = json.loads(path.read_text())
    edit(records)
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r[2].update(caption=""), "record 2: 'caption' is empty"),
        (lambda r: r[2].update(caption=7), "record 2: 'caption' is not a string"),
        (lambda r: r[2].update(image="images/train/nope.png"), "record 2: names the missing image"),
    ],
)
def test_bad_records_are_errors_naming_file_and_record(broken_copy, edit, message):
    path = edit_train_records(broken_copy, edit)
    with pytest.raises(BadRecordError, match=message) as err:
        rebuild(broken_copy)
    assert str(path) in str(err.value)


def test_bad_records_can_be_skipped_and_are_counted(broken_copy, caplog):
    edit_train_records(broken_copy, lambda r: (r[0].update(caption=" "), r[1].update(caption=None)))
    datasets = rebuild(broken_copy, skip_invalid=True)
    assert len(datasets["train"]) == SMALL["train"] - 2
    assert "Skipped 2 invalid records" in caplog.text


def test_invalid_json_names_the_file(broken_copy):
    path = broken_copy / "annotations" / "caption_zh_train.json"
    path.write_text("[{oops")
    with pytest.raises(BadRecordError, match=f"{path} is not valid JSON"):
        rebuild(broken_copy)


def test_a_corrupt_image_is_an_error_or_a_counted_substitution(broken_copy):
    records = json.loads((broken_copy / "annotations" / "caption_zh_train.json").read_text())
    (broken_copy / records[0]["image"]).write_bytes(b"not a png")
    with pytest.raises(BadRecordError, match="record 0: cannot decode image"):
        rebuild(broken_copy)["train"][0]
    lenient = rebuild(broken_copy, skip_invalid=True)["train"]
    assert lenient[0]["image_id"] == records[1]["image_id"]
    assert lenient.skipped_at_load == 1
