"""A stage-2 run over LAVIS's own coco_caption builder counts a corrupt JPEG, a truncated PNG and a
caption that preprocessing empties, and completes; data broken at scale stops it with the list."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from spec_helpers import REPO, run_python

GOOD = 30


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(GOOD):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"good_{i}.jpg")
        records.append({"image": f"good_{i}.jpg", "caption": "一个红色的圆形", "image_id": f"coco_{i}"})
    (images / "corrupt.jpg").write_bytes((images / "good_0.jpg").read_bytes()[:40] + b"\x00" * 200)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / "whole.png")
    (images / "truncated.png").write_bytes((images / "whole.png").read_bytes()[:3000])
    records += [
        {"image": "corrupt.jpg", "caption": "一个蓝色的方形", "image_id": "coco_corrupt"},
        {"image": "truncated.png", "caption": "一个绿色的三角形", "image_id": "coco_truncated"},
        {"image": "good_1.jpg", "caption": "!!! ...", "image_id": "coco_emptied"},  # blip_caption strips it all
    ]
    annotations = root / "train.json"
    annotations.write_text(json.dumps(records), encoding="utf-8")
    return root, annotations


def config(tmp_path, coco_like, stage1_checkpoint):
    root, annotations = coco_like
    cfg = yaml.safe_load((REPO / "configs/tiny/pretrain_stage2.yaml").read_text())
    cfg["model"]["pretrained"] = str(stage1_checkpoint)
    cfg["datasets"] = {
        "coco_caption": {
            "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64}},
            "text_processor": {"train": {"name": "blip_caption"}},
            "build_info": {
                "annotations": {split: {"storage": str(annotations)} for split in ("train", "val", "test")},
                "images": {"storage": str(root / "images")},
            },
        }
    }
    cfg["run"].update(max_epoch=1, batch_size_train=4, output_dir=str(tmp_path / "out"), distributed=False)
    path = tmp_path / "stage2_coco_like.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def train(cfg_path, *options):
    return run_python("-m", "blip2_internlm.train", "--cfg-path", str(cfg_path), "--options", *options, timeout=600)


def test_bad_samples_are_counted_named_and_the_run_completes(tmp_path, coco_like, stage1_run):
    result = train(config(tmp_path, coco_like, stage1_run[0] / "checkpoint_2.pth"), "run.max_bad_sample_fraction=0.2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job_dir,) = (tmp_path / "out").iterdir()
    (stats,) = [
        json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines() if line.startswith('{"train_')
    ]
    # 33 records, batch 4: 8 batches of 32 draws; how many bad ones a shuffle draws varies, none is lost silently
    log = result.stdout + result.stderr
    named = [name for name in ("corrupt.jpg", "truncated.png", "coco_emptied") if name in log]
    assert int(stats["train_bad_samples"]) == len(named) >= 2
    assert "Bad samples this epoch" in log


def test_data_broken_at_scale_stops_the_run_with_the_list(tmp_path, coco_like, stage1_run):
    result = train(config(tmp_path, coco_like, stage1_run[0] / "checkpoint_2.pth"), "run.max_bad_sample_fraction=0.01")
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "max_bad_sample_fraction" in log and (
        "corrupt.jpg" in log or "truncated.png" in log or "coco_emptied" in log
    )
