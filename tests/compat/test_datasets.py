"""LAVIS's dataset builders: Visual Genome's real layout, no hidden downloads, real image ids."""

import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from blip2_internlm.assets import AssetMissingError


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


@pytest.fixture
def vg_root(tmp_path):
    """VG as download_vg.py leaves it: images.zip -> VG_100K/, images2.zip -> VG_100K_2/."""
    root = tmp_path / "vg" / "images"
    write_image(root / "VG_100K" / "1.jpg")
    write_image(root / "VG_100K_2" / "2.jpg")
    write_image(root / "3.jpg")  # a user who merged the folders
    return root


def vg_dataset(vg_root, images, tmp_path):
    from lavis.datasets.builders.image_text_pair_builder import VGCaptionBuilder

    ann = tmp_path / "vg_caption.json"
    ann.write_text(json.dumps([{"image": image, "caption": f"caption {i}"} for i, image in enumerate(images)]))
    return VGCaptionBuilder.train_dataset_cls(
        vis_processor=lambda image: image.size, text_processor=str, vis_root=str(vg_root), ann_paths=[str(ann)]
    )


def test_vg_images_are_found_in_either_download_folder_or_flat(lavis_ready, vg_root, tmp_path):
    dataset = vg_dataset(vg_root, ["1.jpg", "VG_100K_2/2.jpg", "visual-genome/image/3.jpg"], tmp_path)
    assert [dataset[i]["image"] for i in range(3)] == [(8, 8)] * 3
    assert [dataset[i]["image_id"] for i in range(3)] == ["vg_1", "vg_2", "vg_3"]


def test_missing_vg_images_are_one_clear_error(lavis_ready, vg_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images .* not found under .*VG_100K.*404.jpg"):
        vg_dataset(vg_root, ["1.jpg", "404.jpg"], tmp_path)


def test_annotation_urls_are_not_fetched_offline(lavis_ready, tmp_path, monkeypatch):
    from lavis.common.registry import registry

    COCOCapBuilder = registry.get_builder_class("coco_caption")
    monkeypatch.delenv("BLIP2_INTERNLM_ALLOW_DOWNLOADS", raising=False)
    cfg = OmegaConf.load(COCOCapBuilder.default_config_path()).datasets.coco_caption
    cfg.build_info.annotations.train.storage = str(tmp_path / "coco_karpathy_train.json")
    with pytest.raises(AssetMissingError, match=r"datasets\.coco_caption\.build_info\.annotations\.train\.storage"):
        COCOCapBuilder(cfg)._download_ann()


def test_caption_samples_carry_the_annotations_own_image_id(lavis_ready, tmp_path):
    from lavis.datasets.datasets.caption_datasets import CaptionDataset

    write_image(tmp_path / "img.jpg")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "img.jpg", "caption": "c", "image_id": "coco_42"}]))
    dataset = CaptionDataset(lambda image: 0, str, str(tmp_path), [str(ann)])
    assert dataset[0]["image_id"] == "coco_42"
