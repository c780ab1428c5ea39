"""LAVIS builders for the synthetic shapes data: ``shapes_caption`` and ``shapes_vqa``.

The data is generated on first use (by rank 0; the others wait at LAVIS's barrier) into
``build_info.root``, or by default into the asset cache under a name derived from the
generator settings, so two configs with different settings never share files.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.datasets.datasets.vqa_datasets import VQADataset

from blip2_internlm.assets import cache_dir
from blip2_internlm.datasets.records import CheckedMixin, builder_name, checked_records, open_rgb
from blip2_internlm.datasets.shapes import generate_shapes
from blip2_internlm.paths import SHAPES_DATASET_CONFIG_DIR

LANGS = ("en", "zh")


class ShapesDataset(CheckedMixin, BaseDataset):
    """Records of one annotation file, checked up front; ``text_key`` names their text."""

    text_key = "caption"

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths, skip_invalid=False):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths=[])
        self.ann_paths = list(ann_paths)
        self.skip_invalid = skip_invalid
        self.annotation = checked_records(self.ann_paths[:1], vis_root, self.text_key, skip_invalid)
        self._add_instance_ids()

    def image(self, index):
        path = os.path.join(self.vis_root, self.annotation[index]["image"])
        return self.vis_processor(open_rgb(path, f"{self.ann_paths[0]}, record {index}"))


class ShapesCaptionDataset(ShapesDataset):
    def load(self, index):
        ann = self.annotation[index]
        return {
            "image": self.image(index),
            "text_input": self.text_processor(ann["caption"]),
            "image_id": ann["image_id"],
        }


class ShapesCaptionEvalDataset(ShapesDataset):
    @property
    def gt_file(self):
        """COCO-format references, read by ``task: captioning_offline``."""
        return self.ann_paths[1]

    def load(self, index):
        ann = self.annotation[index]
        return {"image": self.image(index), "image_id": ann["image_id_int"], "instance_id": ann["instance_id"]}


class ShapesVQADataset(ShapesDataset, VQADataset):
    text_key = "question"

    def load(self, index):
        ann = self.annotation[index]
        answers = list(dict.fromkeys(ann["answer"]))
        weights = [ann["answer"].count(a) / len(ann["answer"]) for a in answers]
        return {
            "image": self.image(index),
            "text_input": self.text_processor(ann["question"]),
            "answers": answers,
            "weights": weights,
        }


class ShapesVQAEvalDataset(ShapesDataset):
    """What LAVIS's ``VQATask`` reads: VQAv2 question/annotation files and an answer list."""

    text_key = "question"

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths, skip_invalid=False):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths, skip_invalid)
        with open(self.ann_paths[1], encoding="utf-8") as handle:
            self.answer_list = json.load(handle)
        self.coco_fmt_qust_file, self.coco_fmt_anno_file = self.ann_paths[2], self.ann_paths[3]

    def load(self, index):
        ann = self.annotation[index]
        return {
            "image": self.image(index),
            "text_input": self.text_processor(ann["question"]),
            "question_id": ann["question_id"],
            "instance_id": ann["instance_id"],
        }

    def collater(self, samples):
        batch = super().collater(samples)
        batch["question_id"] = torch.as_tensor(batch["question_id"])
        return batch


def generator_args(generator_cfg) -> dict:
    """``generate_shapes`` keyword arguments from a dataset config's ``generator`` block."""
    gen = dict(generator_cfg)
    return {
        "splits": {
            split: int(gen.get(split, default)) for split, default in (("train", 2000), ("val", 200), ("test", 200))
        },
        "image_size": int(gen.get("image_size", 64)),
        "seed": int(gen.get("seed", 0)),
        "max_objects": int(gen.get("max_objects", 1)),
    }


def default_data_root(args: dict) -> str:
    """Where data generated with ``args`` lives when no ``build_info.root`` is given."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    return str(cache_dir() / f"shapes-{digest}")


class ShapesBuilder(BaseDatasetBuilder):
    """Generates the data if needed, then builds train/val/test datasets for ``lang``."""

    def generator_args(self) -> dict:
        return generator_args(self.config.get("generator", {}) or {})

    def data_root(self) -> str:
        root = self.config.build_info.get("root", None)
        return os.path.abspath(os.path.expanduser(str(root))) if root else default_data_root(self.generator_args())

    def lang(self) -> str:
        lang = str(self.config.get("lang", "zh"))
        if lang not in LANGS:
            raise ValueError(f"datasets.{builder_name(self)}.lang = {lang!r}; expected one of {LANGS}")
        return lang

    def _download_data(self):
        generate_shapes(self.data_root(), **self.generator_args())

    def build(self):
        self.build_processors()
        root, lang = self.data_root(), self.lang()
        skip_invalid = bool(self.config.get("skip_invalid", False))
        datasets = {}
        for split in ("train", "val", "test"):
            if self.generator_args()["splits"][split] == 0:
                continue
            is_train = split == "train"
            datasets[split] = (self.train_dataset_cls if is_train else self.eval_dataset_cls)(
                vis_processor=self.vis_processors["train" if is_train else "eval"],
                text_processor=self.text_processors["train" if is_train else "eval"],
                vis_root=root,
                ann_paths=[os.path.join(root, "annotations", name) for name in self.annotation_files(lang, split)],
                skip_invalid=skip_invalid,
            )
        return datasets


@registry.register_builder("shapes_caption")
class ShapesCaptionBuilder(ShapesBuilder):
    train_dataset_cls = ShapesCaptionDataset
    eval_dataset_cls = ShapesCaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(SHAPES_DATASET_CONFIG_DIR, "defaults_caption.yaml")}

    @staticmethod
    def annotation_files(lang, split):
        return [f"caption_{lang}_{split}.json", f"caption_{lang}_{split}_gt.json"]


@registry.register_builder("shapes_vqa")
class ShapesVQABuilder(ShapesBuilder):
    train_dataset_cls = ShapesVQADataset
    eval_dataset_cls = ShapesVQAEvalDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(SHAPES_DATASET_CONFIG_DIR, "defaults_vqa.yaml")}

    @staticmethod
    def annotation_files(lang, split):
        return [
            f"vqa_{lang}_{split}.json",
            f"answer_list_{lang}.json",
            f"vqa_{lang}_{split}_questions.json",
            f"vqa_{lang}_{split}_annotations.json",
        ]
