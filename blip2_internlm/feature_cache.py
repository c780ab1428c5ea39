"""Frozen-ViT feature cache: compute the ViT once per image (and augmentation view), train
and evaluate from a memory-mapped store.

What is cached is the frozen ``visual_encoder``'s output, *before* ``ln_vision``: stage 2
trains ``ln_vision`` (as LAVIS's BLIP-2 does), so its output changes every step and cannot be
stored; the LayerNorm is applied live by ``Blip2InternLM.image_embeds`` (negligible cost).
Wrapped datasets return ``vit_embeds`` ((N_tokens, width), in the dtype the ViT produced)
in place of ``image``; every other key of the sample is kept.

Store layout (one directory per dataset split)::

    header.json                      format, content hash, the hashed identity, shapes, dtype,
                                     views, image count, shard table; written last
    shard-{r:05d}-of-{W:05d}.npy     rank r's images r::W, shape (n_r, views, tokens, width)

Shards are ``.npy`` files written with ``numpy.lib.format.open_memmap``: the format carries
its own shape/dtype header, can be filled incrementally batch by batch (safetensors cannot)
and is read back with ``np.load(mmap_mode="r")`` by every rank and DataLoader worker
without loading it into memory.  numpy has no bfloat16, hence ``fp16`` or ``fp32`` on disk.

A store is built in ``<dir>.partial`` and renamed into place after its header is written, so a
crashed build never looks complete; a missing/short shard or a header whose content hash
differs from the current setup is rebuilt, with the reason logged.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER = "header.json"
#: On-disk dtypes.  fp16 halves the disk and page-cache footprint; it is exact when the ViT
#: itself runs in fp16 (``vit_precision: fp16``, the real configs), and otherwise rounds each
#: feature to 11 significant bits (relative error <= 2**-11 ~ 4.9e-4).
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
CONFIG_KEYS = {"enabled", "dir", "views", "dtype", "splits", "seed", "batch_size", "num_workers"}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class FeatureCacheError(RuntimeError):
    pass


# --- identity: what the cached features depend on ---------------------------------------


def tensors_digest(modules) -> str:
    """sha256 over names, dtypes, shapes and bytes of the modules' parameters and buffers, in name order."""
    digest = hashlib.sha256()
    for prefix, module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.device.type == "meta":
                raise FeatureCacheError(f"{prefix}.{name} is on the meta device: load real weights before caching")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{prefix}.{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe(obj, depth: int = 0) -> str:
    """A stable text of a processor's configuration: reprs without memory addresses, and
    objects with no repr of their own (LAVIS's ``RandomAugment``) by class and attributes."""
    if depth > 6:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(describe(item, depth + 1) for item in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{key!r}: {describe(obj[key], depth + 1)}" for key in sorted(obj, key=str)) + "}"
    transforms = getattr(obj, "transforms", None)
    if isinstance(transforms, (list, tuple)):  # torchvision Compose
        return f"{type(obj).__qualname__}({describe(list(transforms), depth + 1)})"
    if type(obj).__repr__ is object.__repr__ and hasattr(obj, "__dict__"):
        return f"{type(obj).__module__}.{type(obj).__qualname__}({describe(vars(obj), depth + 1)})"
    return f"{type(obj).__module__}.{type(obj).__qualname__}:" + _ADDRESS.sub("", repr(obj))


def dataset_digest(dataset) -> str:
    """The dataset's identity: class, image root and annotation records (image paths included)."""
    annotation = getattr(dataset, "annotation", None)
    if annotation is None:
        raise FeatureCacheError(
            f"{type(dataset).__name__} has no 'annotation' list to identify its images; the feature cache needs one"
        )
    digest = hashlib.sha256()
    digest.update(f"{type(dataset).__module__}.{type(dataset).__qualname__}|".encode())
    digest.update(str(os.path.abspath(str(getattr(dataset, "vis_root", "")))).encode() + b"|")
    digest.update(json.dumps(annotation, sort_keys=True, default=str, ensure_ascii=False).encode())
    return digest.hexdigest()


def image_index(dataset) -> tuple[list[int], list[int]]:
    """(record -> image, image -> first record).  Records naming the same ``image`` file (COCO
    has five captions per image, VQAv2 several questions) share one cached image."""
    annotation = dataset.annotation
    if not all(isinstance(ann, dict) and isinstance(ann.get("image"), str) for ann in annotation):
        return list(range(len(dataset))), list(range(len(dataset)))
    first, of_record = {}, []
    for record, ann in enumerate(annotation):
        of_record.append(first.setdefault(ann["image"], len(first)))
    representative = [0] * len(first)
    for record in reversed(range(len(annotation))):
        representative[of_record[record]] = record
    return of_record, representative


def view_seed(base_seed: int, image: int, view: int) -> int:
    """The seed under which view ``view`` of image ``image`` is processed."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{image}:{view}".encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int):
    """Python, numpy and torch (CPU) RNGs seeded for the block, the caller's states restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _Views(torch.utils.data.Dataset):
    """Processed image tensors of (image, view) pairs, each under its own seed."""

    def __init__(self, dataset, items, representative, views, seed):
        self.dataset, self.items, self.representative, self.views, self.seed = dataset, items, representative, views, seed

    def __len__(self):
        return len(self.items) * self.views

    def __getitem__(self, position):
        image, view = self.items[position // self.views], position % self.views
        with seeded(view_seed(self.seed, image, view)):
            return self.dataset[self.representative[image]]["image"]


# --- distributed helpers ------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world():
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _barrier():
    dist = _dist()
    if dist:
        dist.barrier()


def _broadcast(obj):
    dist = _dist()
    if not dist:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- the store ----------------------------------------------------------------------------


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.npy"


@dataclass
class FeatureStore:
    """A complete store opened for reading: ``features(image, view)`` -> tensor (tokens, width)."""

    directory: Path
    header: dict
    shards: list

    @property
    def views(self) -> int:
        return int(self.header["views"])

    @property
    def num_images(self) -> int:
        return int(self.header["images"])

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.header["compute_dtype"])

    def features(self, image: int, view: int = 0) -> torch.Tensor:
        if not 0 <= image < self.num_images or not 0 <= view < self.views:
            raise IndexError(f"{self.directory}: image {image}, view {view} outside {self.num_images} images x {self.views} views")
        world = len(self.shards)
        row = np.array(self.shards[image % world][image // world, view])  # copy out of the read-only map
        return torch.from_numpy(row).to(self.compute_dtype)

    # construction

    @classmethod
    def open(cls, directory, expected_hash: str | None = None) -> "FeatureStore":
        """Open a complete store; ``FeatureCacheError`` (with the reason) if it is absent,
        partial, of another format or, given ``expected_hash``, built for another setup."""
        directory = Path(directory)
        try:
            header = json.loads((directory / HEADER).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FeatureCacheError(f"no store at {directory}") from None
        except (OSError, json.JSONDecodeError) as err:
            raise FeatureCacheError(f"unreadable header {directory / HEADER}: {err}") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise FeatureCacheError(f"store format {header.get('format_version')!r}, this code writes {FORMAT_VERSION}")
        if expected_hash is not None and header.get("content_hash") != expected_hash:
            raise FeatureCacheError("content hash differs")
        shards = []
        tokens, width = header["shape"]
        for entry in header["shards"]:
            path = directory / entry["file"]
            expected = (entry["rows"], header["views"], tokens, width)
            if entry["rows"] == 0:
                shards.append(np.zeros(expected, dtype=STORE_DTYPES[header["dtype"]]))
                continue
            try:
                shard = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise FeatureCacheError(f"shard {path} is missing or truncated: {err}") from None
            if shard.shape != expected or shard.dtype != STORE_DTYPES[header["dtype"]]:
                raise FeatureCacheError(f"shard {path} holds {shard.dtype}{shard.shape}, the header says {header['dtype']}{expected}")
            shards.append(shard)
        return cls(directory, header, shards)

    @staticmethod
    def identity(model, dataset, views: int = 1, dtype: str = "fp16", seed: int = 0) -> dict:
        """Everything the cached features depend on; its sha256 is the store's content hash."""
        if dtype not in STORE_DTYPES:
            raise ValueError(f"feature cache dtype {dtype!r}; expected one of {sorted(STORE_DTYPES)}")
        if int(views) < 1:
            raise ValueError(f"feature cache views must be >= 1, got {views!r}")
        vit = model.visual_encoder
        with seeded(view_seed(seed, 0, 0)):
            probe = dataset[0]["image"]  # record 0 is image 0's representative
        device = next(vit.parameters()).device
        return {
            "format_version": FORMAT_VERSION,
            "cached": "visual_encoder output (before ln_vision)",
            "vit": tensors_digest([("visual_encoder", vit)]),
            "vit_img_size": _plain(getattr(getattr(vit, "patch_embed", None), "img_size", None)),
            "image_shape": list(probe.shape),
            "processor": describe(getattr(dataset, "vis_processor", None)),
            "device_type": device.type,
            # the model's autocast region (model.autocast_dtype) sets the ViT's arithmetic
            "autocast_dtype": str(getattr(model, "autocast_dtype", None)),
            "views": int(views),
            "seed": int(seed),
            "dtype": dtype,
            "dataset": dataset_digest(dataset),
            "records": len(dataset),
        }

    @classmethod
    def build(cls, model, dataset, directory, views: int = 1, dtype: str = "fp16", seed: int = 0,
              batch_size: int = 32, num_workers: int = 0) -> "FeatureStore":
        """The store of ``dataset`` under ``model``'s frozen ViT at ``directory``: reused when its
        content hash matches, else (re)built, each rank computing images ``rank::world``."""
        check_frozen_vit(model)
        directory = Path(directory)
        identity = cls.identity(model, dataset, views, dtype, seed)
        content_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        rank, world = _rank_world()
        if rank == 0 and int(views) == 1 and _processor_is_random(dataset, seed):
            logger.warning(
                "Feature cache %s: the vis_processor is random but views is 1, so every epoch sees the same "
                "crop of each image; set run.feature_cache.views to keep augmentation", directory,
            )

        reason = None
        if rank == 0:
            try:
                cls.open(directory, content_hash)
            except FeatureCacheError as err:
                reason = _why_rebuild(directory, identity, err)
        reason = _broadcast(reason)
        if reason is None:
            logger.info("Feature cache: reusing %s", directory)
            return cls.open(directory, content_hash)

        logger.info("Feature cache: building %s (%s)", directory, reason)
        partial = directory.with_name(directory.name + ".partial")
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        of_record, representative = image_index(dataset)
        n_images = len(representative)
        shape, compute_dtype = _write_shard(model, dataset, partial, representative, rank, world, views, dtype, seed, batch_size, num_workers)
        gathered = [(shape, compute_dtype)]
        dist = _dist()
        if dist:
            gathered = [None] * world
            dist.all_gather_object(gathered, (shape, compute_dtype))
        _barrier()
        if rank == 0:
            shape, compute_dtype = next(item for item in gathered if item[0] is not None)
            header = {
                "format_version": FORMAT_VERSION,
                "content_hash": content_hash,
                "identity": identity,
                "shape": list(shape),
                "dtype": dtype,
                "compute_dtype": compute_dtype,
                "views": int(views),
                "images": n_images,
                "records": len(of_record),
                "world_size": world,
                "shards": [{"file": shard_name(r, world), "rows": len(range(r, n_images, world))} for r in range(world)],
            }
            # The header is the completion marker: written last, then the directory swapped in.
            (partial / HEADER).write_text(json.dumps(header, indent=1, sort_keys=True), encoding="utf-8")
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(partial, directory)
        _barrier()
        try:
            return cls.open(directory, content_hash)
        except FeatureCacheError as err:
            raise FeatureCacheError(
                f"rank {rank} cannot read the store rank 0 just wrote at {directory} ({err}); "
                "run.feature_cache.dir must be on a filesystem every rank shares"
            ) from None


def _processor_is_random(dataset, seed: int) -> bool:
    with seeded(view_seed(seed, 0, 0)):  # record 0 is image 0's representative
        one = dataset[0]["image"]
    with seeded(view_seed(seed, 0, 1)):
        other = dataset[0]["image"]
    return not torch.equal(one, other)


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _why_rebuild(directory: Path, identity: dict, err: FeatureCacheError) -> str:
    try:
        old = json.loads((directory / HEADER).read_text(encoding="utf-8")).get("identity", {})
    except (OSError, ValueError):
        return str(err)
    changed = sorted(key for key in set(old) | set(identity) if old.get(key) != identity.get(key))
    return f"{err}; changed: {', '.join(changed)}" if changed else str(err)


def _write_shard(model, dataset, partial, representative, rank, world, views, dtype, seed, batch_size, num_workers):
    """Compute this rank's images into its shard; returns ((tokens, width) or None, compute dtype name)."""
    mine = list(range(rank, len(representative), world))
    if not mine:
        return None, None
    loader = torch.utils.data.DataLoader(
        _Views(dataset, mine, representative, views, seed), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    device = next(model.visual_encoder.parameters()).device
    shard, rows, filled, compute_dtype = None, None, 0, None
    with torch.no_grad():
        for images in loader:
            features = vit_features(model, images.to(device))
            if shard is None:
                compute_dtype = str(features.dtype).removeprefix("torch.")
                shard = np.lib.format.open_memmap(
                    partial / shard_name(rank, world), mode="w+", dtype=STORE_DTYPES[dtype],
                    shape=(len(mine), views, *features.shape[1:]),
                )
                rows = shard.reshape(-1, *features.shape[1:])  # (image, view) pairs in loader order
            rows[filled: filled + len(features)] = features.float().cpu().numpy()
            filled += len(features)
    shard.flush()
    tokens, width = shard.shape[2:]
    del rows, shard
    return (tokens, width), compute_dtype


def vit_features(model, images: torch.Tensor) -> torch.Tensor:
    """The frozen ViT's output for a batch, under the model's own precision/autocast."""
    with torch.no_grad(), model.maybe_autocast():
        return model.visual_encoder(images)


def check_frozen_vit(model) -> None:
    vit = getattr(model, "visual_encoder", None)
    if vit is None or not hasattr(model, "image_embeds"):
        raise FeatureCacheError(
            f"{type(model).__name__} cannot train from cached ViT features (it needs visual_encoder and image_embeds())"
        )
    if any(p.requires_grad for p in vit.parameters()):
        raise FeatureCacheError(
            "the feature cache needs a frozen ViT (model.freeze_vit: True): a trained ViT's features change every step"
        )


# --- the dataset wrapper --------------------------------------------------------------------


class _NoImage:
    """Stands in for the vis_processor when only the non-image keys of a sample are needed."""

    def __call__(self, image):
        return None


class CachedFeatures(torch.utils.data.Dataset):
    """``dataset`` with ``vit_embeds`` from ``store`` instead of ``image``.

    ``train=True`` draws the view of each sample from torch's RNG (reseeded per epoch by the
    runner, and per DataLoader worker by torch), so epochs see different crops.
    """

    def __init__(self, dataset, store: FeatureStore, train: bool = False):
        if store.header["records"] != len(dataset):
            raise FeatureCacheError(f"{store.directory} holds {store.header['records']} records, the dataset {len(dataset)}")
        self.dataset, self.store, self.train = dataset, store, train
        self.image_of = image_index(dataset)[0]
        self._text_only = copy.copy(dataset)
        self._text_only.vis_processor = _NoImage()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = dict(self._text_only[index])
        sample.pop("image", None)
        view = int(torch.randint(self.store.views, ())) if self.train and self.store.views > 1 else 0
        sample["vit_embeds"] = self.store.features(self.image_of[index], view)
        return sample

    def collater(self, samples):
        # The wrapped collater stacks "image" its own way (LAVIS's VQA collater builds its
        # batch by hand): hand it the features under that name and rename them back.
        renamed = [{("image" if key == "vit_embeds" else key): value for key, value in s.items()} for s in samples]
        collate = getattr(self.dataset, "collater", None) or torch.utils.data.default_collate
        batch = collate(renamed)
        batch["vit_embeds"] = batch.pop("image")
        return batch

    def __getattr__(self, name):
        # answer_list, gt_file, coco_fmt_qust_file, ... of the wrapped dataset
        if name in ("dataset", "store", "train", "image_of", "_text_only"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


# --- the run.feature_cache config -------------------------------------------------------------


def default_dir() -> Path:
    from blip2_internlm.assets import cache_dir

    return cache_dir() / "features"


def apply_feature_cache(cfg, model, datasets):
    """``run.feature_cache: {enabled: true, ...}``: wrap the configured splits of every dataset
    in ``CachedFeatures`` (building stores as needed); otherwise ``datasets`` unchanged."""
    options = cfg.run_cfg.get("feature_cache", None)
    if not options or not options.get("enabled", False):
        return datasets
    options = dict(options)
    unknown = sorted(set(options) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown keys in run.feature_cache: {unknown}; known: {sorted(CONFIG_KEYS)}")
    run = cfg.run_cfg
    root = Path(os.path.expanduser(str(options.get("dir") or default_dir())))
    train_splits = set(run.get("train_splits", []))
    # only splits this run reads: evaluation-only runs build no train store and vice versa
    used = train_splits | set(run.get("valid_splits", [])) | set(run.get("test_splits", []))
    splits = set(options.get("splits", ["train", "val", "test"])) & used
    check_frozen_vit(model)
    model.to(torch.device(run.get("device", "cpu")))
    for name, by_split in datasets.items():
        for split in list(by_split):
            if split not in splits:
                continue
            is_train = split in train_splits
            store = FeatureStore.build(
                model, by_split[split], root / name / split,
                # eval processors are deterministic: more views would be identical copies
                views=int(options.get("views", 1)) if is_train else 1,
                dtype=str(options.get("dtype", "fp16")),
                seed=int(options.get("seed", 0)),
                batch_size=int(options.get("batch_size") or run.get("batch_size_eval", 32)),
                num_workers=int(options.get("num_workers") or 0),
            )
            by_split[split] = CachedFeatures(by_split[split], store, train=is_train)
    return datasets
