"""Annotation checks shared by this package's datasets.

Bad records are an error naming the file and the record, or, with ``skip_invalid: true``
in the dataset config, skipped with a count in the log.  Images that fail to decode at
load time follow the same rule: an error, or a logged, counted substitution by the next
good sample.
"""

from __future__ import annotations

import json
import logging
import os

from PIL import Image

logger = logging.getLogger(__name__)


class BadRecordError(ValueError):
    pass


def load_annotation_file(path) -> list:
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except FileNotFoundError:
        raise BadRecordError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise BadRecordError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise BadRecordError(f"{path} must hold a JSON list of records, found {type(records).__name__}")
    return records


def record_problem(record, vis_root: str, text_key: str) -> str | None:
    """Why a caption/VQA record is unusable, or None."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    image = record.get("image")
    if not isinstance(image, str) or not image:
        return "has no 'image' path"
    if not os.path.isfile(os.path.join(vis_root, image)):
        return f"names the missing image {os.path.join(vis_root, image)}"
    text = record.get(text_key)
    texts = text if isinstance(text, list) else [text]
    if not texts or not all(isinstance(t, str) for t in texts):
        return f"'{text_key}' is not a string"
    if not all(t.strip() for t in texts):
        return f"'{text_key}' is empty"
    return None


def checked_records(ann_paths, vis_root: str, text_key: str, skip_invalid: bool) -> list:
    kept, skipped = [], 0
    for path in ann_paths:
        for index, record in enumerate(load_annotation_file(path)):
            problem = record_problem(record, vis_root, text_key)
            if problem is None:
                kept.append(record)
            elif skip_invalid:
                skipped += 1
            else:
                raise BadRecordError(f"{path}, record {index}: {problem} (set skip_invalid: true to skip such records)")
    if skipped:
        logger.warning("Skipped %d invalid records of %s (skip_invalid: true)", skipped, list(map(str, ann_paths)))
    if not kept:
        raise BadRecordError(f"no usable records in {list(map(str, ann_paths))}")
    return kept


def open_rgb(path: str, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BadRecordError(f"{where}: cannot decode image {path}: {err}") from None


class CheckedMixin:
    """``__getitem__`` with a decode-failure policy; subclasses implement ``load(index)``."""

    skip_invalid = False
    skipped_at_load = 0

    def __getitem__(self, index):
        for attempt in range(len(self)):
            try:
                return self.load((index + attempt) % len(self))
            except BadRecordError as err:
                if not self.skip_invalid:
                    raise
                self.skipped_at_load += 1
                logger.warning("%s; substituted the next record (%d skipped in this worker)", err, self.skipped_at_load)
        raise BadRecordError(f"no image of {type(self).__name__} could be decoded")


def builder_name(builder) -> str:
    """The registry name of a builder instance (LAVIS does not store it on the builder)."""
    from lavis.common.registry import registry

    names = [name for name, cls in registry.mapping["builder_name_mapping"].items() if cls is type(builder)]
    return names[0] if names else type(builder).__name__
