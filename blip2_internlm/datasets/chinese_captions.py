"""Chinese caption corpora, read from their files as distributed, and their LAVIS builders.

Builders: ``coco_cn_caption``, ``flickr8k_cn_caption``, ``flickr30k_cn_caption``, ``aic_caption``
(AI Challenger 2017), ``zh_caption_json`` (LAVIS caption JSON, the generic format that
``python -m blip2_internlm.tools.convert_corpus`` writes) and ``zh_caption_wds`` (webdataset shards,
Wukong/LAION style).  The file formats, with their sources, are in docs/chinese_data.md.

Every corpus reader turns its files into *items* ``(where, record, problem)``: ``record`` is
``{"image": path relative to the image root, "caption": str | list[str], "image_id": str}``,
``where`` names the file and line (or JSON record) it came from, and ``problem`` is a parse
problem found while reading (or None).  The same readers feed the builders and the converter.
``checked`` then applies the project's rule for bad records (``datasets/records.py``): an error
naming file and record, or, with ``skip_invalid: true``, a counted skip.

Each split's ``build_info.annotations.<split>.storage`` is a list of files (which ones depends on
the corpus: a split list, then caption files); ``build_info.images.storage`` is the image root.
Relative paths resolve under LAVIS's ``cache_root``, as for LAVIS's own datasets.  A corpus
builder also reads its splits already converted to the generic format: a split whose files are
all ``.json`` (text corpora), or AI Challenger records that carry ``image`` (convert.py output).

A builder builds the splits whose files exist.  A split with a missing file is an error naming
its config key and the file only when the run uses it (``run.train_splits``, ``valid_splits``,
``test_splits``; ``run_splits``); otherwise it is left out, so a run that gives only a train file
does not need the val/test files the default configs list.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import OrderedDict
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from lavis.common import utils
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.datasets.datasets.laion_dataset import LaionDataset
from PIL import Image

from blip2_internlm.datasets.records import (
    BadRecordError,
    CheckedMixin,
    builder_name,
    load_annotation_file,
    open_rgb,
    record_problem,
)
from blip2_internlm.ids import stable_image_id
from blip2_internlm.paths import DATASET_CONFIG_DIR

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- file readers


def _lines(path):
    """(line number, stripped line) of a UTF-8 text file, blank lines left out."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if line:
                    yield number, line
    except FileNotFoundError:
        raise BadRecordError(f"annotation file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise BadRecordError(f"{path} is not UTF-8 text: {err}") from None


def read_split_ids(path) -> list[tuple[str, str]]:
    """``(image key, where)`` per line of a split list (one image id or file name a line)."""
    seen, ids = set(), []
    for number, line in _lines(path):
        key = line.split()[0]
        if key not in seen:
            seen.add(key)
            ids.append((key, f"{path}, line {number}"))
    return ids


def read_hash_captions(path, key_of=lambda head: head.split("#", 1)[0], text_of=lambda text: text):
    """``image key -> [(caption, where, problem)]`` from ``<image>#...<TAB or space><caption>`` lines.

    COCO-CN, Flickr8k-CN and Flickr30k-CN all write one caption a line, its id first (the image
    id or file name, ``#``, a caption number, sometimes a language tag between), then the text.
    """
    captions: dict[str, list] = {}
    for number, line in _lines(path):
        where = f"{path}, line {number}"
        head, _, text = line.partition("\t") if "\t" in line else line.partition(" ")
        if "#" not in head:
            problem = f"is not '<image id>#<n><TAB><caption>': {line[:80]!r}"
            captions.setdefault(f"?{number}", []).append(("", where, problem))
            continue
        captions.setdefault(key_of(head), []).append((text_of(text.strip()), f"{where} ({head})", None))
    return captions


def _split_items(split_file, caption_files, image_of, id_of=lambda key: key, **caption_kw):
    """Items for the images a split list names, with their captions from ``caption_files``.

    ``image_of``/``id_of`` map a split-list entry to the image path and id; ``caption_kw`` goes
    to ``read_hash_captions`` (its ``key_of`` must map caption ids to ``id_of``'s keys).
    """
    by_key: dict[str, list] = {}
    for path in caption_files:
        for key, caps in read_hash_captions(path, **caption_kw).items():
            by_key.setdefault(key, []).extend(caps)
    items = [
        (where, {"image": "", "caption": "", "image_id": ""}, problem)
        for key, caps in by_key.items()
        if key.startswith("?")
        for _, where, problem in caps
    ]
    for key, split_where in read_split_ids(split_file):
        caps = by_key.get(id_of(key), [])
        record = {"image": image_of(key), "image_id": id_of(key)}
        if not caps:
            problem = f"image {key} has no caption in {list(map(str, caption_files))}"
            items.append((split_where, {**record, "caption": None}, problem))
        for text, where, problem in caps:
            items.append((where, {**record, "caption": text}, problem))
    return items


_COCO_ID = re.compile(r"COCO_(train|val)2014_\d{12}")


def coco_cn_image(key: str) -> str:
    """COCO-CN ids name the COCO 2014 file: ``COCO_val2014_000000000042`` -> ``val2014/<id>.jpg``."""
    match = _COCO_ID.fullmatch(key)
    if not match:
        return f"<not a COCO 2014 id: {key}>"  # record_problem reports it as a missing image
    return f"{match.group(1)}2014/{key}.jpg"


def read_coco_cn(files, image_root=None):
    """COCO-CN: ``[coco-cn_<split>.txt, caption file, ...]`` (human-written and/or manually translated)."""
    split_file, *caption_files = files
    return _split_items(split_file, caption_files, coco_cn_image)


def _flickr_key(name: str) -> str:
    return name[:-4] if name.lower().endswith(".jpg") else name


def read_flickr8k_cn(files, image_root=None):
    """Flickr8k-CN: ``[Flickr_8k.<split>Images.txt, flickr8kzhc.caption.txt, ...]``; ids ``<file>.jpg#zhc#<n>``."""
    split_file, *caption_files = files
    return _split_items(
        split_file,
        caption_files,
        lambda key: f"{_flickr_key(key)}.jpg",
        _flickr_key,
        key_of=lambda head: _flickr_key(head.split("#", 1)[0]),
    )


# Some copies of the Flickr30k-CN release tag every token with its part of speech (``警车:n``).
_POS_TAGGED = re.compile(r"(\S+):[a-z]{1,3}")


def _drop_pos_tags(text: str) -> str:
    tokens = text.split()
    if tokens and all(_POS_TAGGED.fullmatch(t) for t in tokens):
        return " ".join(_POS_TAGGED.fullmatch(t).group(1) for t in tokens)
    return text


def read_flickr30k_cn(files, image_root=None):
    """Flickr30k-CN: ``[<set>/ImageSets/<set>.txt, <set>/TextData/seg.<set>.caption.txt]``; ids ``<n>#zhb#<i>``."""
    split_file, *caption_files = files
    return _split_items(
        split_file,
        caption_files,
        lambda key: f"{_flickr_key(key)}.jpg",
        _flickr_key,
        key_of=lambda head: _flickr_key(head.split("#", 1)[0]),
        text_of=_drop_pos_tags,
    )


def aic_image_dir(annotation_file) -> str:
    """The image folder that the AI Challenger zip unpacks next to a split's annotation file."""
    folder, name = os.path.split(str(annotation_file))
    return os.path.join(folder, os.path.splitext(name)[0].replace("_annotations_", "_images_"))


def read_aic(files, image_root=None):
    """AI Challenger 2017: a JSON list of ``{"url", "image_id": "<sha>.jpg", "caption": [5 strings]}``.

    ``image`` is the file name, relative to ``image_root`` or, with none, to the folder the zip
    unpacks next to the annotation file (``aic_image_dir``).
    """
    items = []
    for where, obj in _json_objects(files, items):
        if "image" in obj:  # already converted to the generic format (convert.py output)
            items.append((where, _generic_record(obj), None))
            continue
        name = obj.get("image_id")
        if not isinstance(name, str) or not name:
            items.append((where, {"image": "", "caption": None}, "has no 'image_id' file name"))
            continue
        record = {"image": name, "caption": obj.get("caption"), "image_id": os.path.splitext(name)[0]}
        items.append((f"{where} ({name})", record, None))
    return items


def read_caption_json(files, image_root=None):
    """LAVIS caption JSON: a list of ``{"image", "caption": str or list, "image_id"}`` (``image_id``
    defaults to ``image``)."""
    items = []
    for where, obj in _json_objects(files, items):
        items.append((where, _generic_record(obj), None))
    return items


def _json_objects(files, items):
    """(where, record) for each object of the JSON list files; a non-object goes to ``items`` as a problem."""
    for path in files:
        for index, obj in enumerate(load_annotation_file(path)):
            where = f"{path}, record {index}"
            if isinstance(obj, dict):
                yield where, obj
            else:
                items.append((where, {"image": "", "caption": None}, f"is a {type(obj).__name__}, not an object"))


def _generic_record(obj) -> dict:
    return {
        "image": obj.get("image"),
        "caption": obj.get("caption"),
        "image_id": str(obj.get("image_id", obj.get("image"))),
    }


_TEXT_READERS = (read_coco_cn, read_flickr8k_cn, read_flickr30k_cn)
READERS = {
    "coco_cn_caption": read_coco_cn,
    "flickr8k_cn_caption": read_flickr8k_cn,
    "flickr30k_cn_caption": read_flickr30k_cn,
    "aic_caption": read_aic,
    "zh_caption_json": read_caption_json,
}


# ----------------------------------------------------------------------------- checks, records


def checked(items, vis_root: str, skip_invalid: bool, what: str = "annotations"):
    """The usable records of ``items``, each with its ``where``; bad ones raise or are counted.

    Returns ``(records, skipped)``.
    """
    kept, skipped = [], 0
    for where, record, problem in items:
        problem = problem or record_problem(record, vis_root, "caption")
        if problem is None:
            kept.append({**record, "where": where})
        elif skip_invalid:
            skipped += 1
        else:
            raise BadRecordError(f"{where}: {problem} (set skip_invalid: true to skip such records)")
    if skipped:
        logger.warning("Skipped %d invalid caption records of %s (skip_invalid: true)", skipped, what)
    if not kept:
        raise BadRecordError(f"no usable caption records in {what}")
    return kept, skipped


def per_caption(records) -> list[dict]:
    """Training records: one per caption."""
    out = []
    for record in records:
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        out.extend({**record, "caption": caption} for caption in captions)
    return out


def per_image(records) -> list[dict]:
    """Evaluation records: one per image (first-seen order), with all its captions as a list."""
    images: OrderedDict[str, dict] = OrderedDict()
    for record in records:
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        entry = images.setdefault(record["image_id"], {**record, "caption": []})
        entry["caption"].extend(captions)
    return list(images.values())


class ZhCaptionDataset(CheckedMixin, BaseDataset):
    """Training samples ``{"image", "text_input", "image_id"}``, one per caption."""

    def __init__(self, vis_processor, text_processor, vis_root, records, skip_invalid=False, skipped=0):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths=[])
        self.annotation = per_caption(records)
        self.skip_invalid, self.skipped_records = skip_invalid, skipped
        self._add_instance_ids()

    def image(self, index):
        ann = self.annotation[index]
        return self.vis_processor(open_rgb(os.path.join(self.vis_root, ann["image"]), ann["where"]))

    def load(self, index):
        ann = self.annotation[index]
        return {
            "image": self.image(index),
            "text_input": self.text_processor(ann["caption"]),
            "image_id": ann["image_id"],
        }


class ZhCaptionEvalDataset(ZhCaptionDataset):
    """Evaluation samples ``{"image", "image_id", "instance_id"}``, one per image (as LAVIS's
    ``COCOCapEvalDataset``), and ``references()`` for ``task: captioning_offline``."""

    def __init__(self, vis_processor, text_processor, vis_root, records, skip_invalid=False, skipped=0):
        BaseDataset.__init__(self, vis_processor, text_processor, vis_root, ann_paths=[])
        self.annotation = per_image(records)
        self.skip_invalid, self.skipped_records = skip_invalid, skipped
        self._add_instance_ids()

    def load(self, index):
        ann = self.annotation[index]
        return {
            "image": self.image(index),
            "image_id": stable_image_id(ann["image_id"]),
            "instance_id": ann["instance_id"],
        }

    def references(self) -> dict[int, list[str]]:
        """Reference captions by the integer ``image_id`` of the samples, normalised as the eval
        text processor does but without its prompt."""
        normalize = getattr(self.text_processor, "normalize", self.text_processor)
        return {stable_image_id(ann["image_id"]): [normalize(c) for c in ann["caption"]] for ann in self.annotation}


# ----------------------------------------------------------------------------- builders


def resolve(path) -> str:
    """A config path: absolute as given, relative under LAVIS's ``cache_root`` (as LAVIS does)."""
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else utils.get_cache_path(path)


def run_splits() -> dict[str, str] | None:
    """``split -> the run key that uses it`` for the LAVIS run being set up, or None outside a run.

    LAVIS's ``Config`` registers itself as ``configuration`` before any builder runs.  An
    evaluate-only run never trains, so its ``train_splits`` are not used; its valid and test
    splits are evaluated.
    """
    configuration = registry.get("configuration", no_warning=True)
    config = getattr(configuration, "config", None)
    run = config.get("run", None) if config is not None else None
    if run is None:
        return None
    keys = ("valid_splits", "test_splits")
    if not run.get("evaluate", False):
        keys = ("train_splits", *keys)
    used = {}
    for key in keys:
        for split in run.get(key, None) or []:
            used.setdefault(str(split), f"run.{key}")
    return used


def missing_split(key: str, split: str, path: str, used: dict[str, str] | None, nothing_else: bool) -> None:
    """A configured split with no file at ``path``: an error where the run uses it, else left out.

    Outside a run (``used`` None) which splits matter is unknown: the split is left out with a
    warning, unless no split of the dataset can be built (``nothing_else``).
    """
    where = f"{key}: no file at {path}"
    hint = "(see docs/chinese_data.md for where each corpus's files go)"
    if used is not None and split in used:
        raise BadRecordError(
            f"{where}, and {used[split]} uses the {split!r} split: point the key at the file "
            f"or drop {split!r} from {used[split]} {hint}"
        )
    if used is None and nothing_else:
        raise BadRecordError(f"{where} {hint}")
    if used is None:
        logger.warning("%s; split %r is not built", where, split)
    else:
        logger.info("%s; split %r is not built (the run does not use it)", where, split)


class ZhCaptionBuilder(BaseDatasetBuilder):
    """Builds each split named under ``build_info.annotations`` with the corpus's reader."""

    train_dataset_cls = ZhCaptionDataset
    eval_dataset_cls = ZhCaptionEvalDataset
    images_required = True

    def _download_data(self):
        """Nothing to fetch: the corpora are downloaded by hand (docs/chinese_data.md); ``build``
        reports missing files by config key."""

    def image_root(self):
        images = self.config.build_info.get("images", None) or {}
        storage = images.get("storage", None)
        if storage is None:
            if self.images_required:
                raise ValueError(f"datasets.{builder_name(self)}.build_info.images.storage is not set")
            return None
        return resolve(storage)

    def split_files(self, split) -> list[str]:
        storage = self.config.build_info.annotations[split].storage
        return [resolve(p) for p in ([storage] if isinstance(storage, str) else list(storage))]

    def present_splits(self, name) -> dict[str, list[str]]:
        """``split -> files`` of the configured splits whose files all exist (``missing_split``
        decides about the others); a split set to null is left out."""
        configured = {
            split: self.split_files(split)
            for split, info in self.config.build_info.annotations.items()
            if split in SPLITS and info is not None
        }
        absent = {split: next((p for p in files if not os.path.exists(p)), None) for split, files in configured.items()}
        present = {split: files for split, files in configured.items() if absent[split] is None}
        used = run_splits()
        for split, path in absent.items():
            if path is not None:
                missing_split(
                    f"datasets.{name}.build_info.annotations.{split}.storage",
                    split,
                    path,
                    used,
                    nothing_else=not present,
                )
        return present

    def build(self):
        self.build_processors()
        name = builder_name(self)
        reader = READERS[name]
        skip_invalid = bool(self.config.get("skip_invalid", False))
        image_root = self.image_root()
        datasets = {}
        for split, files in self.present_splits(name).items():
            # A split given as converter output (.json files) is read as the generic format.
            use = read_caption_json if reader in _TEXT_READERS and all(f.endswith(".json") for f in files) else reader
            items = use(files, image_root)
            vis_root = image_root or aic_image_dir(files[0])
            records, skipped = checked(items, vis_root, skip_invalid, what=f"datasets.{name} {split} ({files})")
            is_train = split == "train"
            kind = "train" if is_train else "eval"
            datasets[split] = (self.train_dataset_cls if is_train else self.eval_dataset_cls)(
                vis_processor=self.vis_processors[kind],
                text_processor=self.text_processors[kind],
                vis_root=vis_root,
                records=records,
                skip_invalid=skip_invalid,
                skipped=skipped,
            )
        return datasets


def _defaults(name):
    return {"default": os.path.join(DATASET_CONFIG_DIR, name, "defaults.yaml")}


@registry.register_builder("coco_cn_caption")
class CocoCnCaptionBuilder(ZhCaptionBuilder):
    DATASET_CONFIG_DICT = _defaults("coco_cn_caption")


@registry.register_builder("flickr8k_cn_caption")
class Flickr8kCnCaptionBuilder(ZhCaptionBuilder):
    DATASET_CONFIG_DICT = _defaults("flickr8k_cn_caption")


@registry.register_builder("flickr30k_cn_caption")
class Flickr30kCnCaptionBuilder(ZhCaptionBuilder):
    DATASET_CONFIG_DICT = _defaults("flickr30k_cn_caption")


@registry.register_builder("aic_caption")
class AicCaptionBuilder(ZhCaptionBuilder):
    """``images.storage`` null: each split's images sit where the zip put them, next to its
    annotation file; set it to one folder that holds the images of every split."""

    DATASET_CONFIG_DICT = _defaults("aic_caption")
    images_required = False


@registry.register_builder("zh_caption_json")
class ZhCaptionJsonBuilder(ZhCaptionBuilder):
    DATASET_CONFIG_DICT = _defaults("zh_caption_json")


# ----------------------------------------------------------------------------- webdataset

#: Shard members that are decoded, and the PIL formats an image member may hold.  Every other
#: member (.pyd/.pickle, .pth, .npy, ...) is never decoded: webdataset's default decoders would
#: unpickle such members, which runs whatever code the shard's author put there.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


class SkipWithinLimit:
    """The webdataset handler of ``skip_invalid``: log a failure and go on, until ``limit`` failures
    in a row with no readable sample between them.  Resampled shards never run out, so a stream
    whose every shard is gone or broken would otherwise retry for ever; it stops instead, listing
    the distinct failures."""

    def __init__(self, limit: int = 1000):
        self.limit, self.failures = limit, []

    def __call__(self, error: Exception) -> bool:
        self.failures.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300])
        if len(self.failures) >= self.limit:
            distinct = list(dict.fromkeys(self.failures))
            raise BadRecordError(
                f"{len(self.failures)} failures in a row reading the shards, with no readable sample between them "
                f"(skip_invalid: true skips bad samples, not a stream with none); {len(distinct)} distinct: "
                + "; ".join(distinct[:10])
            )
        logger.warning("Skipped (skip_invalid: true): %s", self.failures[-1])
        return True

    def readable(self) -> None:
        """A sample was read: the streak of failures ends."""
        self.failures.clear()


class ZhCaptionWdsDataset(LaionDataset):
    """LAVIS's ``LaionDataset`` pipeline for Chinese pairs: shards of ``<key>.jpg`` (or png/webp)
    with ``<key>.txt`` or ``<key>.json`` (``caption_key``, default ``caption``), as img2dataset
    writes Wukong/LAION-style data.  Only the image and the caption member are decoded (PIL to
    RGB, UTF-8 text, JSON); the other members of a sample are dropped undecoded.  A sample that
    cannot be decoded or has no usable caption is an error naming shard and key, or with
    ``skip_invalid`` a logged skip.

    ``location``: a list of shard URLs, or a brace pattern as webdataset expands it.
    """

    def __init__(
        self,
        vis_processor,
        text_processor,
        location,
        caption_key="caption",
        skip_invalid=False,
        shuffle=1000,
        resampled=True,
    ):
        BaseDataset.__init__(self, vis_processor=vis_processor, text_processor=text_processor)
        self.caption_key, self.skip_invalid = caption_key, skip_invalid
        self.skips = SkipWithinLimit() if skip_invalid else None
        handler = self.skips or wds.reraise_exception
        shards = wds.ResampledShards(location) if resampled else wds.SimpleShardList(location)
        stages = [shards, wds.tarfile_to_samples(handler=handler)]
        if shuffle:
            stages.append(wds.shuffle(shuffle, handler=handler))
        stages.append(wds.map(self.to_dict, handler=handler))
        self.inner_dataset = wds.DataPipeline(*stages)

    @staticmethod
    def image(sample, where):
        member = next((ext for ext in IMAGE_MEMBERS if ext in sample), None)
        if member is None:
            raise BadRecordError(f"{where}: has no jpg/png/webp image")
        try:
            with Image.open(io.BytesIO(sample[member]), formats=IMAGE_FORMATS) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadRecordError(f"{where}: .{member} is not a readable JPEG/PNG/WebP image: {err}") from None

    def caption(self, sample, where) -> str:
        try:
            if "txt" in sample:
                text = sample["txt"].decode("utf-8")
            elif "json" in sample:
                meta = json.loads(sample["json"])
                text = meta.get(self.caption_key) if isinstance(meta, dict) else None
            else:
                raise BadRecordError(f"{where}: has no .txt or .json caption")
        except UnicodeDecodeError as err:
            raise BadRecordError(f"{where}: caption is not UTF-8 text: {err}") from None
        except json.JSONDecodeError as err:
            raise BadRecordError(f"{where}: .json is not valid JSON: {err}") from None
        if not isinstance(text, str):
            raise BadRecordError(f"{where}: caption is not a string")
        if not text.strip():
            raise BadRecordError(f"{where}: caption is empty")
        return text

    def to_dict(self, sample):
        where = f"{sample.get('__url__')}, sample {sample.get('__key__')}"
        item = {
            "image": self.vis_processor(self.image(sample, where)),
            "text_input": self.text_processor(self.caption(sample, where)),
            "image_id": sample["__key__"],
        }
        if self.skips is not None:
            self.skips.readable()
        return item


def shard_urls(location: str, key: str, allow_pipe_urls: bool) -> list[str]:
    """The shard URLs of a ``build_info.storage`` value (``key``), expanded as webdataset does.

    Local paths resolve like the other builders' paths.  A ``pipe:`` URL is a shell command that
    webdataset runs, so it is refused unless the config allows it; the URLs are expanded here,
    once, so the check sees exactly what webdataset will open.
    """
    urls = []
    for url in wds.shardlists.expand_urls(location):
        scheme = urlparse(url).scheme
        if scheme == "pipe" and not allow_pipe_urls:
            allow = key.rsplit(".", 1)[0] + ".allow_pipe_urls"
            raise ValueError(
                f"{key}: {url!r} is a pipe: URL, which webdataset runs as a shell command; set "
                f"{allow}: true to allow pipe: URLs (only in configs whose commands you trust)"
            )
        urls.append(resolve(url) if scheme == "" else url)
    return urls


def local_path(url: str) -> str | None:
    """The file a shard URL names on this machine, or None for remote and pipe: URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None


@registry.register_builder("zh_caption_wds")
class ZhCaptionWdsBuilder(BaseDatasetBuilder):
    """Like LAVIS's ``laion2B_multi``: ``build_info.storage`` is a brace pattern of shards; the
    train split is the (infinite, resampled) ``wds.DataPipeline``.  Local shards must exist:
    if none does, the split is missing (``missing_split``); if some are missing, that is an error,
    or with ``skip_invalid`` a warning and the rest are used."""

    train_dataset_cls = ZhCaptionWdsDataset
    DATASET_CONFIG_DICT = _defaults("zh_caption_wds")

    def _download_data(self):
        pass

    def build(self):
        self.build_processors()
        name = builder_name(self)
        key = f"datasets.{name}.build_info.storage"
        skip_invalid = bool(self.config.get("skip_invalid", False))
        # only a YAML true allows shell commands, not any truthy string
        allow_pipe_urls = self.config.build_info.get("allow_pipe_urls", False) is True
        urls = shard_urls(str(self.config.build_info.storage), key, allow_pipe_urls)
        absent = [url for url in urls if local_path(url) is not None and not os.path.exists(local_path(url))]
        if absent and len(absent) == len(urls):
            missing_split(key, "train", absent[0], run_splits(), nothing_else=True)
            return {}
        if absent:
            where = f"{key}: {len(absent)} of {len(urls)} shards are missing, e.g. {absent[0]}"
            if not skip_invalid:
                raise BadRecordError(f"{where} (set skip_invalid: true to train on the others)")
            logger.warning("%s; training on the other %d (skip_invalid: true)", where, len(urls) - len(absent))
            urls = [url for url in urls if url not in absent]
        return {
            "train": self.train_dataset_cls(
                vis_processor=self.vis_processors["train"],
                text_processor=self.text_processors["train"],
                location=urls,
                caption_key=str(self.config.get("caption_key", "caption")),
                skip_invalid=skip_invalid,
                shuffle=int(self.config.get("shuffle_buffer", 1000)),
            ).inner_dataset
        }
