"""Spec: the Chinese caption corpora load from files in their distributed formats.

Each test writes a tiny corpus (32x32 JPEGs, a handful of captions) in that corpus's real file
layout under tmp_path, builds it with the registered builder from its default config (paths
moved under tmp_path), and checks images, processed captions, ids and references.
"""

import io
import itertools
import json
import logging
import sys
import tarfile

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from blip2_internlm.datasets.records import BadRecordError

SIZE = 64  # the tiny model's image size


def jpeg(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path, format="JPEG")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def builder(name, root, **overrides):
    """The builder with its default config, relative paths moved under ``root``."""
    from lavis.common.registry import registry

    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.default_config_path()).datasets[name]
    info = cfg.build_info
    for split in info.get("annotations", {}):
        storage = info.annotations[split].storage
        paths = [storage] if isinstance(storage, str) else list(storage)
        info.annotations[split].storage = [str(root / p) for p in paths]
    if info.get("images") and info.images.storage is not None:
        info.images.storage = str(root / info.images.storage)
    eval_proc = {"name": "blip_image_eval", "image_size": SIZE}
    cfg.vis_processor = {"train": eval_proc, "eval": eval_proc}
    return cls(OmegaConf.merge(cfg, overrides))


# ---------------------------------------------------------------- corpora in their release formats

COCO_TRAIN, COCO_VAL = "COCO_train2014_000000000009", "COCO_val2014_000000000042"


def coco_cn(root):
    release = root / "coco-cn" / "coco-cn-version1805v1.1"
    write(release / "coco-cn_train.txt", f"{COCO_TRAIN}\n{COCO_VAL}\n")
    write(release / "coco-cn_val.txt", "COCO_train2014_000000000025\n")
    write(release / "coco-cn_test.txt", "COCO_val2014_000000000073\n")
    write(
        release / "imageid.human-written-caption.txt",
        f"{COCO_TRAIN}#0\t一个男人在骑自行车.\n"
        f"{COCO_VAL}#0\t桌子 上 有 一盘 ＡＢＣ 饼干\n"
        f"{COCO_VAL}#1\t两个 盘子 , 一杯 咖啡\n"
        "COCO_train2014_000000000025#0\t草地上的长颈鹿\n"
        "COCO_val2014_000000000073#0\t一辆 红色 的 摩托车 。\n",
    )
    write(release / "imageid.manually-translated-caption.txt", "COCO_val2014_000000000073#0\t停在路边的摩托车\n")
    for name in (COCO_TRAIN, "COCO_train2014_000000000025"):
        jpeg(root / "coco" / "images" / "train2014" / f"{name}.jpg")
    for name in (COCO_VAL, "COCO_val2014_000000000073"):
        jpeg(root / "coco" / "images" / "val2014" / f"{name}.jpg", (20, 200, 20))
    return release


def flickr8k_cn(root):
    text = root / "flickr8k" / "Flickr8k_text"
    write(text / "Flickr_8k.trainImages.txt", "1000268201_693b08cb0e.jpg\n1001773457_577c3a7d70.jpg\n")
    write(text / "Flickr_8k.devImages.txt", "1002674143_1b742ab4b8.jpg\n")
    write(text / "Flickr_8k.testImages.txt", "1003163366_44323f5815.jpg\n")
    write(
        root / "flickr8k-cn" / "data" / "flickr8kzhc.caption.txt",
        "1000268201_693b08cb0e.jpg#zhc#0 一个穿着粉色裙子的小女孩走进木屋。\n"
        "1000268201_693b08cb0e.jpg#zhc#1 小女孩 爬 楼梯\n"
        "1001773457_577c3a7d70.jpg#zhc#0 一只黑狗和一只花狗在路上打架\n"
        "1002674143_1b742ab4b8.jpg#zhc#0 一个小女孩在画画\n"
        "1003163366_44323f5815.jpg#zhc#0 一个人躺在长椅上,狗坐在旁边\n",
    )
    for name in ("1000268201_693b08cb0e", "1001773457_577c3a7d70", "1002674143_1b742ab4b8", "1003163366_44323f5815"):
        jpeg(root / "flickr8k" / "Flicker8k_Dataset" / f"{name}.jpg")


def flickr30k_cn(root):
    for split, (ids, lines) in {
        "flickr30kzhbbosontrain": (
            ["1000092795"],
            ["1000092795#zhb#0 两个 年轻 的 男子 在 院子里 。", "1000092795#zhb#1 两个:m 男人:n 在:p 院子:n 里:f"],
        ),
        "flickr30kzhbbosonval": (["10002456"], ["10002456#zhb#0 几个 工人 在 施工"]),
        "flickr30kzhmbosontest": (["1007129816"], ["1007129816#zhm#0 一个 戴 帽子 的 男人"]),
    }.items():
        write(root / "flickr30k-cn" / split / "ImageSets" / f"{split}.txt", "\n".join(ids) + "\n")
        write(root / "flickr30k-cn" / split / "TextData" / f"seg.{split}.caption.txt", "\n".join(lines) + "\n")
        for image in ids:
            jpeg(root / "flickr30k" / "flickr30k-images" / f"{image}.jpg")


AIC_CAPTIONS = [
    "一个穿着红色衣服的女人在草地上奔跑",
    "草地 上 有 一个 女人",
    "女人在跑步",
    "阳光下的女人",
    "一个人在户外\n",
]


def aic(root, train=None, val=None):
    base = root / "aic"
    train = (
        train
        if train is not None
        else [{"url": "http://img.example/a.jpg", "image_id": "8f00b204e9800998ecf8427e.jpg", "caption": AIC_CAPTIONS}]
    )
    val = (
        val
        if val is not None
        else [
            {"url": "http://img.example/b.jpg", "image_id": "3cc4f7dd0b1d1d0a4b1b1a5e.jpg", "caption": AIC_CAPTIONS[:2]}
        ]
    )
    for split, date, records in (("train", "20170902", train), ("validation", "20170910", val)):
        folder = base / f"ai_challenger_caption_{split}_{date}"
        write(folder / f"caption_{split}_annotations_{date}.json", json.dumps(records, ensure_ascii=False))
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("image_id"), str):
                jpeg(folder / f"caption_{split}_images_{date}" / record["image_id"])
    return base


# ---------------------------------------------------------------- each builder on its fixture


def test_coco_cn_yields_one_training_sample_per_caption_through_the_chinese_processor(lavis_ready, tmp_path):
    coco_cn(tmp_path)
    datasets = builder("coco_cn_caption", tmp_path).build_datasets()
    assert sorted(datasets) == ["test", "train", "val"]
    train = datasets["train"]
    samples = [train[i] for i in range(len(train))]
    assert [s["text_input"] for s in samples] == ["一个男人在骑自行车。", "桌子上有一盘 ABC 饼干", "两个盘子，一杯咖啡"]
    assert [s["image_id"] for s in samples] == [COCO_TRAIN, COCO_VAL, COCO_VAL]
    assert all(s["image"].shape == (3, SIZE, SIZE) for s in samples)
    # the val2014 image is read from val2014/ (green), the train2014 one from train2014/ (red)
    assert samples[1]["image"][1].mean() > samples[1]["image"][0].mean()
    assert samples[0]["image"][0].mean() > samples[0]["image"][1].mean()


def test_eval_splits_give_one_sample_per_image_and_references_keyed_by_its_integer_id(lavis_ready, tmp_path):
    from blip2_internlm.ids import stable_image_id

    release = coco_cn(tmp_path)
    test_files = [
        str(release / "coco-cn_test.txt"),
        str(release / "imageid.human-written-caption.txt"),
        str(release / "imageid.manually-translated-caption.txt"),
    ]
    test = builder(
        "coco_cn_caption",
        tmp_path,
        build_info={"annotations": {"test": {"storage": test_files}}},
        text_processor={"eval": {"name": "chinese_caption", "prompt": "图片描述："}},
    ).build_datasets()["test"]
    assert len(test) == 1
    sample = test[0]
    assert set(sample) == {"image", "image_id", "instance_id"}
    assert sample["image_id"] == stable_image_id("COCO_val2014_000000000073")
    # both caption files, normalised, and without the prompt
    assert test.references() == {sample["image_id"]: ["一辆红色的摩托车。", "停在路边的摩托车"]}
    batch = test.collater([sample])
    assert batch["image_id"].tolist() == [sample["image_id"]]


def test_flickr8k_cn_reads_the_zhc_caption_file_with_flickr8k_splits(lavis_ready, tmp_path):
    flickr8k_cn(tmp_path)
    datasets = builder("flickr8k_cn_caption", tmp_path).build_datasets()
    train = datasets["train"]
    assert [train[i]["text_input"] for i in range(len(train))] == [
        "一个穿着粉色裙子的小女孩走进木屋。",
        "小女孩爬楼梯",
        "一只黑狗和一只花狗在路上打架",
    ]
    assert train[0]["image_id"] == "1000268201_693b08cb0e"
    assert list(datasets["test"].references().values()) == [["一个人躺在长椅上，狗坐在旁边"]]
    assert len(datasets["val"]) == 1


def test_flickr30k_cn_joins_segmented_words_and_drops_part_of_speech_tags(lavis_ready, tmp_path):
    flickr30k_cn(tmp_path)
    datasets = builder("flickr30k_cn_caption", tmp_path).build_datasets()
    train = datasets["train"]
    assert [train[i]["text_input"] for i in range(len(train))] == ["两个年轻的男子在院子里。", "两个男人在院子里"]
    assert list(datasets["test"].references().values()) == [["一个戴帽子的男人"]]
    assert datasets["val"][0]["image"].shape == (3, SIZE, SIZE)


def test_ai_challenger_finds_images_next_to_each_split_and_uses_all_five_captions(lavis_ready, tmp_path):
    aic(tmp_path)
    datasets = builder("aic_caption", tmp_path).build_datasets()
    assert sorted(datasets) == ["train", "val"]
    train = datasets["train"]
    assert len(train) == 5 and {train[i]["image_id"] for i in range(5)} == {"8f00b204e9800998ecf8427e"}
    assert [train[i]["text_input"] for i in range(5)] == [
        "一个穿着红色衣服的女人在草地上奔跑",
        "草地上有一个女人",
        "女人在跑步",
        "阳光下的女人",
        "一个人在户外",
    ]
    val = datasets["val"]
    assert list(val.references().values()) == [["一个穿着红色衣服的女人在草地上奔跑", "草地上有一个女人"]]


# ---------------------------------------------------------------- converter and generic format


def test_converter_output_round_trips_through_zh_caption_json(lavis_ready, tmp_path, capsys):
    from blip2_internlm.tools.convert_corpus import main

    coco_cn(tmp_path)
    out = tmp_path / "converted"
    for split in ("train", "val"):
        assert (
            main(["--from", "coco-cn", "--root", str(tmp_path), "--split", split, "--out", str(out / f"{split}.json")])
            == 0
        )
    assert "wrote 3 records" in capsys.readouterr().out
    train_json = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert train_json[0] == {
        "image": f"train2014/{COCO_TRAIN}.jpg",
        "caption": "一个男人在骑自行车.",
        "image_id": COCO_TRAIN,
    }
    val_json = json.loads((out / "val.json").read_text(encoding="utf-8"))
    assert val_json == [
        {
            "image": "train2014/COCO_train2014_000000000025.jpg",
            "caption": ["草地上的长颈鹿"],
            "image_id": "COCO_train2014_000000000025",
        }
    ]

    original = builder("coco_cn_caption", tmp_path).build_datasets()
    generic = builder(
        "zh_caption_json",
        tmp_path,
        build_info={
            "annotations": {
                "train": {"storage": [str(out / "train.json")]},
                "val": {"storage": [str(out / "val.json")]},
                "test": None,
            },
            "images": {"storage": str(tmp_path / "coco" / "images")},
        },
    ).build_datasets()
    for split in ("train", "val"):
        a, b = original[split], generic[split]
        assert len(a) == len(b)
        for i in range(len(a)):
            assert {k: v for k, v in a[i].items() if k != "image"} == {k: v for k, v in b[i].items() if k != "image"}
            assert torch.equal(a[i]["image"], b[i]["image"])
    assert original["val"].references() == generic["val"].references()
    # the corpus builder itself also takes converted splits
    converted = builder(
        "coco_cn_caption",
        tmp_path,
        build_info={"annotations": {"train": {"storage": [str(out / "train.json")]}, "val": None, "test": None}},
    ).build_datasets()["train"]
    assert [converted[i]["text_input"] for i in range(len(converted))] == [
        original["train"][i]["text_input"] for i in range(3)
    ]


def test_converter_cli_writes_ai_challenger_images_relative_to_the_root(lavis_ready, tmp_path, monkeypatch):
    import runpy

    aic(tmp_path)
    out = tmp_path / "aic_val.json"
    # `python -m blip2_internlm.tools.convert_corpus ...`, in this interpreter (a fresh one takes ~15 s to import)
    monkeypatch.delitem(sys.modules, "blip2_internlm.tools.convert_corpus", raising=False)
    monkeypatch.setattr(
        "sys.argv", ["convert", "--from", "aic", "--root", str(tmp_path), "--split", "val", "--out", str(out)]
    )
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("blip2_internlm.tools.convert_corpus", run_name="__main__")
    assert exit_.value.code == 0
    converted = json.loads(out.read_text(encoding="utf-8"))
    assert converted == [
        {
            "image": "aic/ai_challenger_caption_validation_20170910/caption_validation_images_20170910/"
            "3cc4f7dd0b1d1d0a4b1b1a5e.jpg",
            "caption": AIC_CAPTIONS[:2],
            "image_id": "3cc4f7dd0b1d1d0a4b1b1a5e",
        }
    ]
    val = builder(
        "aic_caption",
        tmp_path,
        build_info={
            "annotations": {"train": None, "val": {"storage": [str(out)]}},
            "images": {"storage": str(tmp_path)},
        },
    ).build_datasets()["val"]
    assert list(val.references().values()) == [["一个穿着红色衣服的女人在草地上奔跑", "草地上有一个女人"]]
    monkeypatch.setattr(
        "sys.argv", ["convert", "--from", "aic", "--root", str(tmp_path), "--split", "test", "--out", str(out)]
    )
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("blip2_internlm.tools.convert_corpus", run_name="__main__")
    assert exit_.value.code == 1  # AI Challenger's release has no test captions


# ---------------------------------------------------------------- malformed annotation files


def _broken_coco_cn(root, line):
    release = coco_cn(root)
    path = release / "imageid.human-written-caption.txt"
    path.write_text(path.read_text(encoding="utf-8") + line, encoding="utf-8")
    return path


def test_bad_json_is_an_error_naming_the_file(lavis_ready, tmp_path):
    base = aic(tmp_path)
    bad = base / "ai_challenger_caption_train_20170902" / "caption_train_annotations_20170902.json"
    bad.write_text('[{"image_id": "a.jpg", "caption": ["x"]', encoding="utf-8")
    with pytest.raises(BadRecordError, match=rf"{bad} is not valid JSON"):
        builder("aic_caption", tmp_path, skip_invalid=True).build_datasets()


@pytest.mark.parametrize("case", ["missing image", "caption not a string", "empty caption"])
def test_a_bad_record_is_an_error_naming_file_and_record(lavis_ready, tmp_path, case):
    if case == "caption not a string":
        aic(
            tmp_path,
            train=[
                {"url": "u", "image_id": "8f00b204e9800998ecf8427e.jpg", "caption": AIC_CAPTIONS},
                {"url": "u", "image_id": "0a0b.jpg", "caption": ["好", 7]},
            ],
        )
        name, where, problem = (
            "aic_caption",
            r"caption_train_annotations_20170902\.json, record 1 \(0a0b\.jpg\)",
            "'caption' is not a string",
        )
    else:
        line = f"{COCO_TRAIN}#1\t\n" if case == "empty caption" else "COCO_train2014_000000000099#0\t一只猫\n"
        _broken_coco_cn(tmp_path, line)
        write(
            tmp_path / "coco-cn" / "coco-cn-version1805v1.1" / "coco-cn_train.txt",
            f"{COCO_TRAIN}\n{COCO_VAL}\nCOCO_train2014_000000000099\n",
        )
        name = "coco_cn_caption"
        if case == "empty caption":
            where, problem = rf"imageid\.human-written-caption\.txt, line 6 \({COCO_TRAIN}#1\)", "'caption' is empty"
        else:
            where = r"imageid\.human-written-caption\.txt, line 6 \(COCO_train2014_000000000099#0\)"
            problem = "names the missing image .*COCO_train2014_000000000099.jpg"
    with pytest.raises(BadRecordError, match=rf"{where}: {problem} \(set skip_invalid: true"):
        builder(name, tmp_path).build_datasets()


def test_with_skip_invalid_bad_records_are_skipped_and_counted(lavis_ready, tmp_path, caplog):
    _broken_coco_cn(tmp_path, f"{COCO_TRAIN}#1\t  \nno-hash-here 一只猫\n")
    with caplog.at_level(logging.WARNING):
        train = builder("coco_cn_caption", tmp_path, skip_invalid=True).build_datasets()["train"]
    assert len(train) == 3 and train.skipped_records == 2
    assert "Skipped 2 invalid caption records" in caplog.text
    generic_bad = tmp_path / "bad.json"
    write(
        generic_bad,
        json.dumps(
            [
                {"image": f"train2014/{COCO_TRAIN}.jpg", "caption": "好", "image_id": "a"},
                {"image": f"train2014/{COCO_TRAIN}.jpg", "caption": None, "image_id": "b"},
            ]
        ),
    )
    config = {
        "annotations": {"train": {"storage": [str(generic_bad)]}, "val": None, "test": None},
        "images": {"storage": str(tmp_path / "coco" / "images")},
    }
    with pytest.raises(BadRecordError, match=r"bad\.json, record 1: 'caption' is not a string"):
        builder("zh_caption_json", tmp_path, build_info=config).build_datasets()
    assert (
        builder("zh_caption_json", tmp_path, build_info=config, skip_invalid=True)
        .build_datasets()["train"]
        .skipped_records
        == 1
    )


# ---------------------------------------------------------------- webdataset shards


def shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, ext, caption in samples:
            image = io.BytesIO()
            Image.new("RGB", (32, 32), (10, 10, 200)).save(image, format="JPEG")
            text = json.dumps({"caption": caption}, ensure_ascii=False) if ext == "json" else caption
            for name, data in ((f"{key}.jpg", image.getvalue()), (f"{key}.{ext}", text.encode("utf-8"))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_yield_images_and_processed_captions(lavis_ready, tmp_path):
    shard(tmp_path / "000.tar", [("a0", "txt", "一只 猫 ."), ("a1", "json", "两只狗!")])
    shard(tmp_path / "001.tar", [("b0", "txt", "ＣＣＴＶ 新闻"), ("b1", "json", "蓝天 白云")])
    pipeline = builder(
        "zh_caption_wds", tmp_path, build_info={"storage": str(tmp_path / "{000..001}.tar")}, shuffle_buffer=0
    ).build_datasets()["train"]
    samples = list(itertools.islice(iter(pipeline), 12))  # resampled: shards repeat endlessly
    assert {s["text_input"] for s in samples} <= {"一只猫。", "两只狗！", "CCTV 新闻", "蓝天白云"}
    assert {s["image_id"] for s in samples} <= {"a0", "a1", "b0", "b1"}
    assert all(s["image"].shape == (3, SIZE, SIZE) for s in samples)


def test_webdataset_empty_caption_names_shard_and_key_or_is_skipped(lavis_ready, tmp_path, caplog):
    shard(tmp_path / "000.tar", [("a0", "json", " "), ("a1", "txt", "好")])
    config = {"build_info": {"storage": str(tmp_path / "000.tar")}, "shuffle_buffer": 0}
    with pytest.raises(BadRecordError, match=r"000\.tar, sample a0: caption is empty"):
        next(iter(builder("zh_caption_wds", tmp_path, **config).build_datasets()["train"]))
    skipping = builder("zh_caption_wds", tmp_path, skip_invalid=True, **config).build_datasets()["train"]
    with caplog.at_level(logging.WARNING):
        kept = list(itertools.islice(iter(skipping), 3))
    assert [s["text_input"] for s in kept] == ["好"] * 3
    assert "Skipped (skip_invalid: true)" in caplog.text and "000.tar, sample a0: caption is empty" in caplog.text


# ---------------------------------------------------------------- into the model


@pytest.fixture(scope="module")
def tiny_model(lavis_ready):
    from lavis.models import load_model_and_preprocess

    torch.manual_seed(0)
    return load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]


def generic_json(root):
    jpeg(root / "images" / "a.jpg")
    jpeg(root / "images" / "b.jpg", color=(30, 30, 200))
    records = [
        {"image": "a.jpg", "caption": "红色的 方块 。", "image_id": "a"},
        {"image": "b.jpg", "caption": "蓝色的方块", "image_id": "b"},
    ]
    write(root / "train.json", json.dumps(records, ensure_ascii=False))
    return {
        "build_info": {
            "annotations": {"train": {"storage": [str(root / "train.json")]}, "val": None, "test": None},
            "images": {"storage": str(root / "images")},
        }
    }


#: builder -> writes its fixture under root (the generic format's writer returns its config overrides)
CORPORA = {
    "coco_cn_caption": coco_cn,
    "flickr8k_cn_caption": flickr8k_cn,
    "flickr30k_cn_caption": flickr30k_cn,
    "aic_caption": aic,
    "zh_caption_json": generic_json,
}


@pytest.mark.parametrize("name", sorted(CORPORA) + ["zh_caption_wds"])
def test_a_batch_of_every_builder_passes_through_the_tiny_model(tiny_model, tmp_path, name):
    if name == "zh_caption_wds":
        shard(tmp_path / "000.tar", [("a0", "txt", "一只 猫 ."), ("a1", "json", "两只狗!")])
        train = builder(
            name, tmp_path, build_info={"storage": str(tmp_path / "000.tar")}, shuffle_buffer=0
        ).build_datasets()["train"]
        samples = list(itertools.islice(iter(train), 2))
        batch = {"image": torch.stack([s["image"] for s in samples]), "text_input": [s["text_input"] for s in samples]}
    else:
        written = CORPORA[name](tmp_path)
        overrides = written if isinstance(written, dict) else {}
        train = builder(name, tmp_path, **overrides).build_datasets()["train"]
        batch = train.collater([train[i] for i in range(min(len(train), 4))])
    assert batch["image"].shape[1:] == (3, SIZE, SIZE)
    assert all(isinstance(t, str) and t.strip() for t in batch["text_input"])
    loss = tiny_model({**batch, "prompt": "图片描述："})["loss"]
    assert torch.isfinite(loss) and loss > 0


# ---------------------------------------------------------------- the real-size Chinese configs

ZH_CONFIGS = [
    "pretrain_stage2_zh_internlm2_1.8b",
    "pretrain_stage2_wukong_wds_internlm2_1.8b",
    "caption_coco_cn_zh_ft_internlm2_1.8b",
    "caption_coco_cn_zh_eval_internlm2_1.8b",
    "caption_aic_zh_ft_internlm2_1.8b",
    "caption_aic_zh_eval_internlm2_1.8b",
]


@pytest.mark.parametrize("name", ZH_CONFIGS)
def test_chinese_configs_use_the_chinese_prompt_processor_and_offline_scoring(lavis_ready, name):
    from types import SimpleNamespace

    from lavis.common.config import Config
    from lavis.common.registry import registry
    from spec_helpers import REPO

    cfg = Config(
        SimpleNamespace(cfg_path=str(REPO / "configs" / "blip2_internlm" / f"{name}.yaml"), options=None)
    ).config
    assert cfg.model.prompt == "图片描述："
    for dataset, dataset_cfg in cfg.datasets.items():
        builder = registry.get_builder_class(dataset)(dataset_cfg)
        builder.build_processors()  # the processors the run would use, from the merged config
        used = [p for p in builder.text_processors.values() if p is not None and type(p).__name__ != "BaseProcessor"]
        assert used and all(type(p).__name__ == "ChineseCaptionProcessor" and p.prompt == "" for p in used)
    if "caption_" in name:
        assert cfg.run.task == "captioning_offline" and cfg.run.caption_tokenizer == "char"
