"""Spec: a bad sample never kills a training run, never passes unnoticed, and never drops an
evaluation question.

LAVIS's own caption, Visual Genome and VQA datasets are built on a few generated images and an
annotation JSON under tmp_path, with LAVIS's processors, and wrapped by the guard.  Each kind of
bad sample (a corrupt JPEG, a truncated PNG, a decompression bomb, a record without image_id, a
caption the text processor empties) is replaced under ``skip`` and named under ``error``.
"""

import json
import logging
import pickle
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFile

from blip2_internlm.datasets.guard import (
    BadDataError,
    BadSampleError,
    BadSampleTally,
    GuardedDataset,
    guard_datasets,
    set_epoch,
)

IMAGE_SIZE = 48  # pixels a side: 2304 pixels, under the bomb limit set below
BOMB_SIZE = 64  # 4096 pixels: over that limit, under twice it, where PIL only warns
BOMB_LIMIT = 3000
BAD_INDEX = 2


@pytest.fixture(scope="module")
def fixes(lavis_ready):
    from blip2_internlm.compat import datasets

    datasets.truncated_images_are_errors()
    datasets.caption_image_ids_read_per_sample()
    return True


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """good_0..good_5.jpg, and one file of each bad kind, in one image root."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(root / f"good_{i}.jpg")
    noise = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    noise.save(root / "whole.png")
    png = (root / "whole.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "corrupt.jpg").write_bytes((root / "good_0.jpg").read_bytes()[:20] + b"\x00not a jpeg" * 20)
    Image.new("RGB", (BOMB_SIZE, BOMB_SIZE), (10, 200, 10)).save(root / "bomb.png")
    return root


@pytest.fixture(scope="module")
def processors(fixes):
    from lavis.common.registry import registry

    def build(name, **cfg):
        return registry.get_processor_class(name).from_config(OmegaConf.create(cfg))

    return {
        "image": build("blip_image_train", image_size=32),
        "caption": build("blip_caption"),
        "question": build("blip_question"),
    }


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def caption_records(n=5):
    return [{"image": f"good_{i}.jpg", "caption": f"a picture number {i}", "image_id": f"coco_{i}"} for i in range(n)]


def coco_caption(records, images, processors, tmp_path):
    from lavis.common.registry import registry

    cls = registry.get_builder_class("coco_caption").train_dataset_cls  # COCOCapDataset, i.e. CaptionDataset
    ann = write_json(tmp_path / "coco_karpathy_train.json", records)
    return cls(processors["image"], processors["caption"], str(images), [ann])


def vg_caption(records, images, processors, tmp_path):
    from lavis.common.registry import registry

    cls = registry.get_builder_class("vg_caption").train_dataset_cls
    ann = write_json(tmp_path / "vg_caption.json", records)
    return cls(processors["image"], processors["caption"], str(images), [ann])


def vqa_records(n=5):
    return [
        {
            "image": f"good_{i}.jpg",
            "question": f"what is in picture {i}?",
            "question_id": 100 + i,
            "answer": ["a cat", "a cat", "a dog"],
        }
        for i in range(n)
    ]


def coco_vqa(records, images, processors, tmp_path):
    from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset

    ann = write_json(tmp_path / "vqa_train.json", records)
    return COCOVQADataset(processors["image"], processors["question"], str(images), [ann])


def coco_vqa_eval(records, images, processors, tmp_path):
    from lavis.datasets.datasets.coco_vqa_datasets import COCOVQAEvalDataset

    ann = write_json(tmp_path / "vqa_val.json", records)
    answers = write_json(tmp_path / "answer_list.json", ["a cat", "a dog"])
    return COCOVQAEvalDataset(processors["image"], processors["question"], str(images), [ann, answers])


def one_batch(dataset, num_workers=0, batch_size=None):
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size or len(dataset),
        num_workers=num_workers,
        collate_fn=dataset.collater,
    )
    return next(iter(loader))


BAD_FILES = {"corrupt jpeg": "corrupt.jpg", "truncated png": "truncated.png", "decompression bomb": "bomb.png"}


def with_bad_record(records, kind):
    """``records`` with the record at BAD_INDEX made bad in the way ``kind`` says."""
    records = [dict(record) for record in records]
    bad = records[BAD_INDEX]
    if kind in BAD_FILES:
        bad["image"] = BAD_FILES[kind]
    elif kind == "missing image_id":  # builds at all thanks to caption_image_ids_read_per_sample
        del bad["image_id"]
    elif kind == "caption of punctuation only":
        bad["caption"] = "!!! ... !!!"
    return records


#: kind of bad record -> what the report's reason says
REASONS = {
    "corrupt jpeg": r"UnidentifiedImageError: cannot identify image file",
    "truncated png": r"OSError: image file is truncated",
    "decompression bomb": r"DecompressionBombWarning: .*could be decompression bomb",
    "missing image_id": r"the record has no key 'image_id'",
    "caption of punctuation only": r"'text_input' is empty after text processing",
}


@pytest.fixture
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)


# ----------------------------------------------------------------------------- skip and error


@pytest.mark.parametrize("kind", list(REASONS))
def test_a_bad_training_sample_is_replaced_and_reported_with_file_record_and_reason(
    kind, images, processors, tmp_path, small_bomb_limit
):
    records = with_bad_record(caption_records(), kind)
    dataset = GuardedDataset(coco_caption(records, images, processors, tmp_path), "skip", "coco_caption", "train")

    batch = one_batch(dataset)

    assert batch["image"].shape == (5, 3, 32, 32)  # the batch keeps its size
    assert len(batch["text_input"]) == 5 and all(batch["text_input"])
    assert "a picture number 2" not in batch["text_input"]  # another record stood in
    (report,) = batch["bad_samples"]
    assert (report["dataset"], report["split"], report["index"]) == ("coco_caption", "train", BAD_INDEX)
    assert report["file"] == str(images / records[BAD_INDEX]["image"])
    assert report["ids"].get("image_id") == records[BAD_INDEX].get("image_id")
    assert report["ids"]["instance_id"] == str(BAD_INDEX)
    assert re.search(REASONS[kind], report["reason"]), report["reason"]


@pytest.mark.parametrize("kind", list(REASONS))
def test_under_the_error_policy_a_bad_sample_is_an_error_naming_file_record_and_cause(
    kind, images, processors, tmp_path, small_bomb_limit
):
    records = with_bad_record(caption_records(), kind)
    dataset = GuardedDataset(coco_caption(records, images, processors, tmp_path), "error", "coco_caption", "train")

    with pytest.raises(BadSampleError) as caught:
        dataset[BAD_INDEX]

    message = str(caught.value)
    assert f"coco_caption train, record {BAD_INDEX}" in message
    assert str(images / records[BAD_INDEX]["image"]) in message
    assert "instance_id='2'" in message and repr(records[BAD_INDEX]["caption"]) in message
    assert "run.bad_samples: skip" in message
    assert re.search(REASONS[kind], message)
    assert [dataset[i]["text_input"] for i in (0, 1)] == ["a picture number 0", "a picture number 1"]


@pytest.mark.parametrize("family", ["vg_caption", "coco_vqa"])
def test_visual_genome_and_vqa_training_samples_with_a_corrupt_image_are_replaced(family, images, processors, tmp_path):
    build, records = {"vg_caption": (vg_caption, caption_records()), "coco_vqa": (coco_vqa, vqa_records())}[family]
    records[BAD_INDEX]["image"] = "corrupt.jpg"
    dataset = GuardedDataset(build(records, images, processors, tmp_path), "skip", family, "train")

    batch = one_batch(dataset)

    assert batch["image"].shape[0] == 5
    (report,) = batch["bad_samples"]
    assert report["file"] == str(images / "corrupt.jpg") and report["kind"] == "UnidentifiedImageError"
    if family == "coco_vqa":  # LAVIS's VQA collater built the batch: answers of five questions
        assert batch["n_answers"].tolist() == [2] * 5
        assert report["ids"]["question_id"] == 100 + BAD_INDEX


def test_a_question_the_text_processor_empties_is_replaced(images, processors, tmp_path):
    records = vqa_records()
    records[BAD_INDEX]["question"] = "!!! ..."
    dataset = GuardedDataset(coco_vqa(records, images, processors, tmp_path), "skip", "coco_vqa", "train")

    (report,) = one_batch(dataset)["bad_samples"]

    assert report["reason"] == "'text_input' is empty after text processing"


def test_an_evaluation_split_errors_on_a_bad_question_even_when_training_skips(images, processors, tmp_path):
    train, val = vqa_records(), vqa_records()
    train[BAD_INDEX]["image"] = val[BAD_INDEX]["image"] = "corrupt.jpg"
    datasets = {
        "coco_vqa": {
            "train": coco_vqa(train, images, processors, tmp_path),
            "val": coco_vqa_eval(val, images, processors, tmp_path),
        }
    }
    guarded = guard_datasets(datasets, policy="skip", train_splits=["train"], seed=7)["coco_vqa"]

    assert guarded["train"].policy == "skip" and guarded["val"].policy == "error"
    assert one_batch(guarded["train"])["bad_samples"][0]["index"] == BAD_INDEX
    with pytest.raises(
        BadSampleError,
        match=r"coco_vqa val, record 2 \(.*corrupt\.jpg; question_id=102.*"
        r"evaluation never skips a sample",
    ):
        one_batch(guarded["val"])


def test_the_error_policy_applies_to_training_splits_when_configured(images, processors, tmp_path):
    records = with_bad_record(caption_records(), "corrupt jpeg")
    datasets = {"coco_caption": {"train": coco_caption(records, images, processors, tmp_path)}}

    guarded = guard_datasets(datasets, policy="error", train_splits=["train"], seed=0)

    with pytest.raises(BadSampleError, match="corrupt.jpg"):
        one_batch(guarded["coco_caption"]["train"])


def test_an_unknown_policy_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"run.bad_samples must be one of \['skip', 'error'\], got 'drop'"):
        guard_datasets({}, policy="drop", train_splits=[], seed=0)


def test_when_every_substitute_is_bad_too_the_error_lists_each_attempt(images, processors, tmp_path):
    records = [{"image": "corrupt.jpg", "caption": f"caption {i}", "image_id": i} for i in range(4)]
    dataset = GuardedDataset(
        coco_caption(records, images, processors, tmp_path), "skip", "coco_caption", "train", max_substitutes=3
    )

    with pytest.raises(BadSampleError, match=r"record 1 is bad and so were its 3 substitutes") as caught:
        dataset[1]

    listed = [line for line in str(caught.value).splitlines() if line.startswith("  - ")]
    assert len(listed) == 4 and all("corrupt.jpg" in line for line in listed)


def test_samples_need_an_image_unless_they_carry_cached_vit_features():
    class Samples(torch.utils.data.Dataset):
        def __init__(self, samples):
            self.samples = samples

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, index):
            return self.samples[index]

    cached = GuardedDataset(Samples([{"vit_embeds": torch.zeros(4, 8), "text_input": "a cat"}]), "error")
    imageless = GuardedDataset(Samples([{"text_input": "a cat"}]), "error", "plain", "train")

    assert cached[0]["vit_embeds"].shape == (4, 8)
    with pytest.raises(BadSampleError, match="plain train, record 0: the sample has no image"):
        imageless[0]


# ----------------------------------------------------------------------------- the compat fix


def test_without_the_fix_a_truncated_png_trains_silently_as_a_partly_blank_image(
    images, processors, tmp_path, monkeypatch
):
    records = with_bad_record(caption_records(), "truncated png")
    dataset = GuardedDataset(coco_caption(records, images, processors, tmp_path), "skip", "coco_caption", "train")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what importing LAVIS leaves behind

    batch = one_batch(dataset)

    assert batch["bad_samples"] == []
    with Image.open(images / "truncated.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels[-1] == 0).all() and pixels[0].std() > 0  # the missing lower rows are filled in black


def test_the_fix_leaves_truncated_images_an_error_after_lavis_has_set_them_loadable(fixes):
    import lavis.datasets.datasets.coco_caption_datasets  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------- per-sample seeding


def augmented_dataset(images, processors, tmp_path, n=6, bad=(BAD_INDEX,)):
    records = caption_records(n)
    for index in bad:
        records[index]["image"] = "corrupt.jpg"
    return GuardedDataset(coco_caption(records, images, processors, tmp_path), "skip", "coco_caption", "train", seed=3)


def test_workers_give_the_same_batches_as_the_main_process_for_the_same_epoch(images, processors, tmp_path):
    dataset = augmented_dataset(images, processors, tmp_path)
    dataset.set_epoch(1)

    def batches(num_workers):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=3, num_workers=num_workers, collate_fn=dataset.collater
        )
        return list(loader)

    in_process, in_workers = batches(0), batches(2)

    assert len(in_process) == len(in_workers) == 2
    for one, other in zip(in_process, in_workers):
        assert torch.equal(one["image"], other["image"])
        assert one["text_input"] == other["text_input"] and one["bad_samples"] == other["bad_samples"]


def test_an_index_gives_the_same_tensor_within_an_epoch_and_another_augmentation_in_the_next(
    images, processors, tmp_path
):
    dataset = augmented_dataset(images, processors, tmp_path)
    dataset.set_epoch(0)
    first, again = dataset[4]["image"], dataset[4]["image"]
    dataset.set_epoch(1)
    next_epoch = dataset[4]["image"]

    assert torch.equal(first, again)
    assert not torch.equal(first, next_epoch)


def test_the_substitute_for_a_bad_sample_depends_on_the_epoch_not_on_the_reader(images, processors, tmp_path):
    dataset = augmented_dataset(images, processors, tmp_path, n=30)
    substitutes = {}
    for epoch in (0, 1, 2, 3):
        dataset.set_epoch(epoch)
        substitutes[epoch] = dataset[BAD_INDEX]["text_input"]
        assert dataset[BAD_INDEX]["text_input"] == substitutes[epoch]

    assert len(set(substitutes.values())) > 1
    assert "a picture number 2" not in substitutes.values()


def test_drawing_a_sample_leaves_the_callers_random_state_alone(images, processors, tmp_path):
    dataset = augmented_dataset(images, processors, tmp_path)
    dataset.set_epoch(0)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)

    dataset[0]

    assert torch.equal(torch.rand(3), expected)


def test_set_epoch_reaches_guarded_datasets_inside_lavis_concatenation(images, processors, tmp_path):
    from lavis.datasets.datasets.base_dataset import ConcatDataset

    (tmp_path / "vg").mkdir()
    coco = augmented_dataset(images, processors, tmp_path)
    vg_dataset = vg_caption(caption_records(), images, processors, tmp_path / "vg")
    vg = GuardedDataset(vg_dataset, "skip", "vg_caption", "train")
    concat = ConcatDataset([coco, vg])

    set_epoch(concat, 5)

    assert coco.epoch == vg.epoch == 5


# ----------------------------------------------------------------------------- the run's datasets


def test_reports_survive_lavis_concatenation_of_training_datasets(images, processors, tmp_path):
    from lavis.datasets.datasets.base_dataset import ConcatDataset

    (tmp_path / "vg").mkdir()
    coco = augmented_dataset(images, processors, tmp_path, n=4, bad=())
    vg_records = caption_records(4)
    vg_records[1]["image"] = "corrupt.jpg"
    vg = GuardedDataset(vg_caption(vg_records, images, processors, tmp_path / "vg"), "skip", "vg_caption", "train")
    concat = ConcatDataset([coco, vg])

    batch = next(iter(torch.utils.data.DataLoader(concat, batch_size=8, collate_fn=concat.collater)))

    assert batch["image"].shape[0] == 8
    assert [(r["dataset"], r["index"]) for r in batch["bad_samples"]] == [("vg_caption", 1)]


def test_iterable_datasets_are_left_as_they_are(images, processors, tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    stream = Stream()
    caption = coco_caption(caption_records(), images, processors, tmp_path)
    datasets = {"laion": {"train": stream}, "coco_caption": {"train": caption}}

    guard_datasets(datasets, policy="skip", train_splits=["train"], seed=0)

    assert datasets["laion"]["train"] is stream
    assert isinstance(datasets["coco_caption"]["train"], GuardedDataset)
    assert datasets["coco_caption"]["train"].dataset is caption


def test_a_guarded_dataset_answers_for_the_wrapped_one_and_survives_pickling(images, processors, tmp_path):
    val = vqa_records()
    dataset = GuardedDataset(coco_vqa_eval(val, images, processors, tmp_path), "error", "coco_vqa", "val")

    copy = pickle.loads(pickle.dumps(dataset))

    assert copy.answer_list == ["a cat", "a dog"] and copy.vis_root == str(images)
    assert len(copy) == 5 and copy[1]["question_id"] == 101
    with pytest.raises(AttributeError):
        _ = copy.no_such_attribute


# ----------------------------------------------------------------------------- counting


def report(index, kind="UnidentifiedImageError", file=None):
    return {
        "dataset": "coco_caption",
        "split": "train",
        "index": index,
        "file": file or f"/data/bad_{index}.jpg",
        "ids": {"image_id": index},
        "kind": kind,
        "reason": f"{kind}: cannot read",
        "record": None,
    }


def test_too_many_bad_samples_stop_the_run_with_their_list(images, processors, tmp_path):
    records = caption_records(6) * 4  # 24 records, 4 of them bad
    for index in (1, 7, 13, 19):
        records[index] = {**records[index], "image": "corrupt.jpg"}
    dataset = GuardedDataset(coco_caption(records, images, processors, tmp_path), "skip", "coco_caption", "train")
    tally = BadSampleTally(max_fraction=0.1, min_seen=10)

    with pytest.raises(BadDataError) as caught:
        for batch in torch.utils.data.DataLoader(dataset, batch_size=6, collate_fn=dataset.collater):
            tally.add(len(batch["text_input"]), batch["bad_samples"])
            tally.check()

    message = str(caught.value)
    assert "run.max_bad_sample_fraction = 0.1" in message
    listed = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(listed) == tally.bad == 2 and all("corrupt.jpg" in line for line in listed)
    assert "record 1 (" in listed[0] and "record 7 (" in listed[1]


def test_a_bad_sample_among_the_first_reads_does_not_stop_the_run_before_the_epoch_ends():
    tally = BadSampleTally(max_fraction=0.01, min_seen=100)
    tally.add(4, [report(3)])

    tally.check()  # 1 of 5 read, but too few reads to judge

    with pytest.raises(BadDataError, match=r"1 of 5 samples read \(20.00%\) were bad"):
        tally.check(epoch_end=True)


def test_the_tally_logs_each_bad_sample_once_and_summarises_the_epoch_by_reason(caplog):
    tally = BadSampleTally()
    with caplog.at_level(logging.WARNING, logger="blip2_internlm.datasets.guard"):
        tally.add(8, [report(3), report(5, kind="missing key")])
        tally.add(8, [report(3)])

    logged = [record.getMessage() for record in caplog.records]
    assert len(logged) == 2 and "/data/bad_3.jpg" in logged[0] and "image_id=3" in logged[0]
    assert tally.summary() == (
        "bad samples: 3 of 19 read (15.79%), skipped: 2 UnidentifiedImageError, 1 missing key; "
        "/data/bad_3.jpg, /data/bad_5.jpg"
    )
    tally.reset()
    assert tally.summary() == "bad samples: none of 0 read"


def _ranks_add_and_reduce(rank, rendezvous, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        tally = BadSampleTally()
        tally.add(10 * (rank + 1), [report(rank)] * (rank + 1))
        total = tally.all_reduce()
        if rank == 0:
            out.write_text(
                json.dumps(
                    {
                        "seen": total.seen,
                        "bad": total.bad,
                        "kinds": dict(total.kinds),
                        "indices": [r["index"] for r in total.reports],
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def test_ranks_add_up_their_counts_so_rank_zero_reports_the_global_one(tmp_path):
    out = tmp_path / "total.json"
    torch.multiprocessing.start_processes(
        _ranks_add_and_reduce,
        args=(tmp_path / "rendezvous", out),
        nprocs=2,
        start_method="fork",
    )

    assert json.loads(out.read_text()) == {
        "seen": 33,
        "bad": 3,
        "kinds": {"UnidentifiedImageError": 3},
        "indices": [0, 1, 1],
    }
