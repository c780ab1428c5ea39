"""Spec: the Chinese caption builders run nothing that the data or a shard URL carries, and a run
needs only the files of the splits it uses.

Webdataset shards are tar files written under tmp_path; their samples carry, besides a valid
image and caption, members whose decoding would run code (a pickle, a torch file).  The split
specs register a LAVIS run configuration the way ``train.py`` does, with LAVIS's cache root moved
under tmp_path, so the default configs' val/test files are absent there.
"""

import io
import itertools
import json
import logging
import pathlib
import pickle
import re
import shlex
import tarfile
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from blip2_internlm.datasets.records import BadRecordError

SIZE = 64


class TouchOnLoad:
    """Loading its pickle creates ``path``: a stand-in for whatever code a pickle can run."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def pickled(obj) -> bytes:
    return pickle.dumps(obj)


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


#: member extension -> how a shard author writes it
PAYLOADS = {"pyd": pickled, "pth": torch_saved}


def image_bytes(fmt="JPEG", mode="RGB", color=(10, 10, 200)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (32, 32), color if mode == "RGB" else (*color, 128)[: len(mode)]).save(out, format=fmt)
    return out.getvalue()


def shard(path, members):
    """A tar shard of ``(member name, bytes)`` in order (a sample is the members sharing a key)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def wds_builder(storage, **overrides):
    from lavis.common.registry import registry

    cls = registry.get_builder_class("zh_caption_wds")
    cfg = OmegaConf.load(cls.default_config_path()).datasets.zh_caption_wds
    cfg.vis_processor = {"train": {"name": "blip_image_eval", "image_size": SIZE}}
    cfg.shuffle_buffer = 0
    cfg.build_info.storage = str(storage)
    return cls(OmegaConf.merge(cfg, overrides))


def first(pipeline, n=2):
    return list(itertools.islice(iter(pipeline), n))  # resampled shards repeat endlessly


@pytest.fixture
def outside_a_run(lavis_ready, monkeypatch):
    """No LAVIS run configuration registered, whatever an earlier spec registered."""
    from lavis.common.registry import registry

    monkeypatch.setitem(registry.mapping["state"], "configuration", None)


# ---------------------------------------------------------------- shard members


@pytest.mark.parametrize("member", sorted(PAYLOADS))
def test_shard_members_other_than_image_and_caption_are_never_decoded(outside_a_run, tmp_path, member):
    from webdataset.autodecode import decoders

    # the payload is live: webdataset's default decoder for this member runs it
    control = tmp_path / "control"
    decoders[member](PAYLOADS[member](TouchOnLoad(control)))
    assert control.exists()

    ran = tmp_path / "ran"
    tar = shard(
        tmp_path / "000.tar",
        [
            ("a0.jpg", image_bytes()),
            ("a0.txt", "一只 猫 .".encode()),
            (f"a0.{member}", PAYLOADS[member](TouchOnLoad(ran))),
        ],
    )
    samples = first(wds_builder(tar).build_datasets()["train"])
    assert not ran.exists()
    # webdataset's map adds __key__ back
    assert [{k for k in s if not k.startswith("__")} for s in samples] == [{"image", "text_input", "image_id"}] * 2
    assert [(s["image_id"], s["text_input"]) for s in samples] == [("a0", "一只猫。")] * 2
    assert samples[0]["image"].shape == (3, SIZE, SIZE)


def test_png_and_webp_members_decode_to_rgb_and_json_captions_are_read(outside_a_run, tmp_path):
    tar = shard(
        tmp_path / "000.tar",
        [
            ("a0.png", image_bytes("PNG", "RGBA")),
            ("a0.txt", "透明的 方块".encode()),
            ("b0.webp", image_bytes("WEBP")),
            ("b0.json", json.dumps({"caption": "蓝色 的 方块"}).encode()),
        ],
    )
    samples = first(wds_builder(tar).build_datasets()["train"])
    assert [(s["image_id"], s["text_input"]) for s in samples] == [("a0", "透明的方块"), ("b0", "蓝色的方块")]
    assert all(s["image"].shape == (3, SIZE, SIZE) for s in samples)


def test_an_image_member_in_another_format_is_an_error_naming_shard_key_and_member(outside_a_run, tmp_path):
    # PIL would open many formats whatever the name says (EPS, say, through Ghostscript)
    tar = shard(tmp_path / "000.tar", [("a0.jpg", image_bytes("GIF", "P")), ("a0.txt", "好".encode())])
    with pytest.raises(BadRecordError, match=r"000\.tar, sample a0: \.jpg is not a readable JPEG/PNG/WebP image"):
        first(wds_builder(tar).build_datasets()["train"])


# ---------------------------------------------------------------- pipe: URLs


@pytest.mark.parametrize("form", ["pipe URL", "pipe URL after a shard", "truthy string instead of true"])
def test_pipe_urls_are_refused_naming_the_key_that_allows_them(outside_a_run, tmp_path, form):
    tar = shard(tmp_path / "000.tar", [("a0.jpg", image_bytes()), ("a0.txt", "好".encode())])
    ran = tmp_path / "ran"
    command = f"pipe:touch {shlex.quote(str(ran))}; cat {shlex.quote(str(tar))}"
    storage = f"{tar}::{command}" if form == "pipe URL after a shard" else command
    overrides = {"build_info": {"allow_pipe_urls": "yes"}} if form == "truthy string instead of true" else {}
    with pytest.raises(
        ValueError,
        match=r"datasets\.zh_caption_wds\.build_info\.storage: 'pipe:touch .*shell command; "
        r"set datasets\.zh_caption_wds\.build_info\.allow_pipe_urls: true to allow",
    ):
        wds_builder(storage, **overrides).build_datasets()
    assert not ran.exists()


def test_a_pipe_url_streams_the_shard_when_the_config_allows_it(outside_a_run, tmp_path):
    tar = shard(tmp_path / "000.tar", [("a0.jpg", image_bytes()), ("a0.txt", "一只 猫".encode())])
    train = wds_builder(f"pipe:cat {shlex.quote(str(tar))}", build_info={"allow_pipe_urls": True}).build_datasets()
    assert [s["text_input"] for s in first(train["train"])] == ["一只猫"] * 2


# ---------------------------------------------------------------- splits a run does not use


def generic_corpus(root):
    """A zh_caption_json annotation file and its image; nothing at the default config's paths."""
    (root / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "images" / "a.jpg")
    records = root / "records.json"
    record = {"image": "a.jpg", "caption": "红色的方块", "image_id": "a"}
    records.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    return records


@pytest.fixture
def lavis_cache(lavis_ready, tmp_path, monkeypatch):
    """LAVIS's cache root under tmp_path (where the default configs' relative paths resolve)."""
    from lavis.common.registry import registry

    cache = tmp_path / "cache"
    monkeypatch.setitem(registry.mapping["paths"], "cache_root", str(cache))
    return cache


@pytest.fixture
def run_datasets(lavis_cache, tmp_path, monkeypatch):
    """``(run, datasets)`` -> what LAVIS's task builds for a run of that ``run`` section and
    ``datasets`` section, its Config registered as ``train.py`` registers it."""
    from lavis.common.config import Config
    from lavis.common.registry import registry
    from lavis.tasks.base_task import BaseTask

    monkeypatch.setitem(registry.mapping["state"], "configuration", None)  # restored afterwards

    def build(run, datasets):
        path = tmp_path / "run.yaml"
        OmegaConf.save(
            {
                "model": {"arch": "blip2_internlm", "model_type": "tiny"},
                "datasets": datasets,
                "run": {"task": "captioning", **run},
            },
            path,
        )
        return BaseTask().build_datasets(Config(SimpleNamespace(cfg_path=str(path), options=None)))

    return build


def generic_config(root, **annotations):
    eval_proc = {"name": "blip_image_eval", "image_size": SIZE}
    return {
        "zh_caption_json": {
            "vis_processor": {"train": eval_proc, "eval": eval_proc},
            "build_info": {
                "annotations": {split: {"storage": str(path)} for split, path in annotations.items()},
                "images": {"storage": str(root / "images")},
            },
        }
    }


def test_a_run_that_trains_on_the_train_file_alone_builds_without_the_default_val_and_test_files(
    run_datasets, tmp_path
):
    train = generic_corpus(tmp_path)
    built = run_datasets({"train_splits": ["train"]}, generic_config(tmp_path, train=train))
    assert sorted(built["zh_caption_json"]) == ["train"]
    assert built["zh_caption_json"]["train"][0]["text_input"] == "红色的方块"


def test_a_missing_split_that_the_run_uses_is_an_error_naming_key_file_and_run_key(run_datasets, lavis_cache, tmp_path):
    train = generic_corpus(tmp_path)
    val = re.escape(str(lavis_cache / "zh_caption" / "annotations" / "val.json"))  # the default config's val file
    with pytest.raises(
        BadRecordError,
        match=rf"datasets\.zh_caption_json\.build_info\.annotations\.val\.storage: "
        rf"no file at {val}, and run\.valid_splits uses the 'val' split",
    ):
        run_datasets({"train_splits": ["train"], "valid_splits": ["val"]}, generic_config(tmp_path, train=train))


def test_an_evaluate_only_run_does_not_need_the_train_file(run_datasets, tmp_path):
    test = generic_corpus(tmp_path)
    built = run_datasets(
        {"evaluate": True, "train_splits": ["train"], "test_splits": ["test"]},
        generic_config(tmp_path, train=tmp_path / "absent.json", test=test),
    )
    assert sorted(built["zh_caption_json"]) == ["test"]


def test_outside_a_run_missing_splits_are_left_out_with_a_warning_unless_none_is_left(
    outside_a_run, lavis_cache, tmp_path, caplog
):
    from lavis.common.registry import registry

    cls = registry.get_builder_class("zh_caption_json")
    cfg = OmegaConf.merge(
        OmegaConf.load(cls.default_config_path()).datasets.zh_caption_json,
        generic_config(tmp_path, train=generic_corpus(tmp_path))["zh_caption_json"],
    )
    with caplog.at_level(logging.WARNING):
        assert sorted(cls(cfg).build_datasets()) == ["train"]
    default_test = lavis_cache / "zh_caption" / "annotations" / "test.json"
    assert f"annotations.test.storage: no file at {default_test}" in caplog.text
    absent = tmp_path / "absent.json"
    cfg.build_info.annotations.train.storage = str(absent)
    with pytest.raises(
        BadRecordError,
        match=rf"annotations\.train\.storage: no file at {re.escape(str(absent))} "
        r"\(see docs",
    ):
        cls(cfg).build_datasets()


def test_missing_shards_are_an_error_naming_key_and_path_or_with_skip_invalid_left_out(outside_a_run, tmp_path, caplog):
    shard(tmp_path / "000.tar", [("a0.jpg", image_bytes()), ("a0.txt", "好".encode())])
    absent = re.escape(str(tmp_path / "005.tar"))
    with pytest.raises(BadRecordError, match=rf"datasets\.zh_caption_wds\.build_info\.storage: no file at {absent}"):
        wds_builder(tmp_path / "{005..006}.tar").build_datasets()
    pattern = tmp_path / "{000..001}.tar"
    absent = re.escape(str(tmp_path / "001.tar"))
    with pytest.raises(BadRecordError, match=rf"storage: 1 of 2 shards are missing, e\.g\. {absent}"):
        wds_builder(pattern).build_datasets()
    with caplog.at_level(logging.WARNING):
        train = wds_builder(pattern, skip_invalid=True).build_datasets()["train"]
    assert "1 of 2 shards are missing" in caplog.text
    assert [s["image_id"] for s in first(train, 3)] == ["a0"] * 3


@pytest.mark.parametrize("member", sorted(PAYLOADS))
def test_lavis_laion_shards_never_decode_members_other_than_image_and_caption(lavis_ready, tmp_path, member):
    import json

    from lavis.datasets.datasets.laion_dataset import LaionDataset
    from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor

    ran = tmp_path / "ran"
    tar = shard(
        tmp_path / "000.tar",
        [
            ("a0.jpg", image_bytes()),
            ("a0.json", json.dumps({"caption": "a cat"}).encode()),
            (f"a0.{member}", PAYLOADS[member](TouchOnLoad(ran))),
        ],
    )
    dataset = LaionDataset(BlipImageEvalProcessor(SIZE), BlipCaptionProcessor(), str(tar))
    sample = first(dataset.inner_dataset, 1)[0]
    assert not ran.exists()
    assert sample["text_input"] == "a cat" and sample["image"].shape == (3, SIZE, SIZE)


def test_with_skip_invalid_a_stream_with_no_readable_sample_stops_listing_the_failures(outside_a_run, tmp_path):
    from blip2_internlm.datasets.records import BadRecordError

    tar = shard(tmp_path / "000.tar", [("a0.jpg", image_bytes()), ("a0.txt", "红色 的 方块".encode())])
    pipeline = wds_builder(tar, skip_invalid=True).build_datasets()["train"]
    assert first(pipeline, 1)[0]["image_id"] == "a0"
    tar.write_bytes(b"not a tar any more")  # the shard went bad under a running job: resampling retries it
    with pytest.raises(BadRecordError, match=r"1000 failures in a row reading the shards.*1 distinct: ReadError"):
        first(pipeline, 2)


def test_with_skip_invalid_a_bad_sample_between_good_ones_is_skipped(outside_a_run, tmp_path):
    tar = shard(
        tmp_path / "000.tar",
        [("a0.jpg", image_bytes()), ("a0.txt", "红色 的 方块".encode()), ("b0.jpg", b"broken"), ("b0.txt", b"x")],
    )
    samples = first(wds_builder(tar, skip_invalid=True).build_datasets()["train"], 3)
    assert [s["image_id"] for s in samples] == ["a0", "a0", "a0"]  # b0 skipped each time round
