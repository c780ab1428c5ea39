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

Shards are memory-mapped ``.npy`` files: the format carries its own shape/dtype header, can be
filled incrementally batch by batch (safetensors cannot) and is read back with
``np.load(mmap_mode="r")`` by every rank and DataLoader worker without loading it into memory.
numpy has no bfloat16, hence ``fp16`` or ``fp32`` on disk.  Each shard's blocks are allocated
(``posix_fallocate``) before it is mapped, and the whole store's size is checked against the
free space first: a full disk is an error naming the file, never a SIGBUS on a write to the map.

A store is built in ``<dir>.partial-<host>-<pid>-<random>`` (one name per job) and renamed into
place after its header is written, so a crashed build never looks complete; a missing/short
shard or a header whose content hash differs from the current setup is rebuilt, with the reason
logged.  The building job's rank 0 holds an exclusive ``flock`` on ``<dir>.lock``: a second job
building the same store waits, then reuses it; partial directories found under the lock are
those of dead jobs and are removed.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blip2_internlm.seeding import derived_seed, seeded
from blip2_internlm.settings import Boolean, Choice, Integer, Nullable, Splits, Text, setting

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER = "header.json"
#: On-disk dtypes.  fp16 halves the disk and page-cache footprint; it is exact when the ViT
#: itself runs in fp16 (``vit_precision: fp16``, the real configs), and otherwise rounds each
#: feature to 11 significant bits (relative error <= 2**-11 ~ 4.9e-4).
STORE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class FeatureCacheError(RuntimeError):
    pass


@dataclass(frozen=True)
class FeatureCacheSettings:
    """``run.feature_cache``: the frozen-ViT feature cache of a run."""

    enabled: bool = setting(False, Boolean(), "build and read the frozen-ViT feature cache")
    dir: str | None = setting(None, Nullable(Text()), "where the stores live; null: <cache dir>/features")
    views: int = setting(1, Integer(1, cast=True), "augmented views cached per training image")
    dtype: str = setting("fp16", Choice(*STORE_DTYPES), "on-disk dtype of the features")
    splits: tuple = setting(("train", "val", "test"), Splits(), "splits to cache (of those the run reads)")
    seed: int = setting(0, Integer(0, cast=True), "seed of the augmentations drawn for the views")
    batch_size: int | None = setting(
        None, Nullable(Integer(1, cast=True)), "batch size of the build; null: run.batch_size_eval"
    )
    num_workers: int = setting(0, Nullable(Integer(0, cast=True)), "loader workers of the build")


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


def stable_repr(obj, depth: int = 0) -> str:
    """A stable text of a processor's configuration: reprs without memory addresses, and
    objects with no repr of their own (LAVIS's ``RandomAugment``) by class and attributes."""
    if depth > 6:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(stable_repr(item, depth + 1) for item in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{key!r}: {stable_repr(obj[key], depth + 1)}" for key in sorted(obj, key=str)) + "}"
    transforms = getattr(obj, "transforms", None)
    if isinstance(transforms, (list, tuple)):  # torchvision Compose
        return f"{type(obj).__qualname__}({stable_repr(list(transforms), depth + 1)})"
    if type(obj).__repr__ is object.__repr__ and hasattr(obj, "__dict__"):
        return f"{type(obj).__module__}.{type(obj).__qualname__}({stable_repr(vars(obj), depth + 1)})"
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
    for ann in annotation:
        of_record.append(first.setdefault(ann["image"], len(first)))
    representative = [0] * len(first)
    for record in reversed(range(len(annotation))):
        representative[of_record[record]] = record
    return of_record, representative


def view_seed(base_seed: int, image: int, view: int) -> int:
    """The seed under which view ``view`` of image ``image`` is processed."""
    return derived_seed(base_seed, image, view)


class _Views(torch.utils.data.Dataset):
    """Processed image tensors of (image, view) pairs, each under its own seed."""

    def __init__(self, dataset, items, representative, views, seed):
        self.dataset, self.items, self.representative = dataset, items, representative
        self.views, self.seed = views, seed

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
            raise IndexError(
                f"{self.directory}: image {image}, view {view} outside {self.num_images} images x {self.views} views"
            )
        world = len(self.shards)
        row = np.array(self.shards[image % world][image // world, view])  # copy out of the read-only map
        return torch.from_numpy(row).to(self.compute_dtype)

    # construction

    @classmethod
    def open(cls, directory, expected_hash: str | None = None) -> FeatureStore:
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
                raise FeatureCacheError(
                    f"shard {path} holds {shard.dtype}{shard.shape}, the header says {header['dtype']}{expected}"
                )
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
            "processor": stable_repr(getattr(dataset, "vis_processor", None)),
            "device_type": device.type,
            # the model's autocast region (model.autocast_dtype) sets the ViT's arithmetic; "auto" resolves
            # per machine (bf16 on CPUs with native bf16 only), so the resolved dtype counts too
            "autocast_dtype": str(getattr(model, "autocast_dtype", None)),
            "autocast": _resolved_autocast(model, device),
            # outside autocast on a CPU, the kernel of the ViT's fp32 linears (the last bits of the features)
            "cpu_fp32_linear": _resolved_fp32_linear(model, device),
            "views": int(views),
            "seed": int(seed),
            "dtype": dtype,
            "dataset": dataset_digest(dataset),
            "records": len(dataset),
        }

    @classmethod
    def build(
        cls,
        model,
        dataset,
        directory,
        views: int = 1,
        dtype: str = "fp16",
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> FeatureStore:
        """The store of ``dataset`` under ``model``'s frozen ViT at ``directory``: reused when its
        content hash matches, else (re)built, each rank computing images ``rank::world``.

        Rank 0 holds ``lock_path(directory)`` from its decision to rebuild until the store is in
        place, so a job that finds another one building waits, then reuses what that one built."""
        check_frozen_vit(model)
        directory = Path(directory)
        identity = cls.identity(model, dataset, views, dtype, seed)
        content_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        rank, world = _rank_world()
        if rank == 0 and int(views) == 1 and _processor_is_random(dataset, seed):
            logger.warning(
                "Feature cache %s: the vis_processor is random but views is 1, so every epoch sees the same "
                "crop of each image; set run.feature_cache.views to keep augmentation",
                directory,
            )

        lock, plan = None, None
        try:
            if rank == 0:
                try:
                    lock, plan = cls._decide(model, dataset, directory, identity, content_hash, world)
                except (FeatureCacheError, OSError) as err:
                    _share_plan({"error": f"rank 0: {err}"})  # the other ranks fail with it instead of waiting
                    raise
            plan = _share_plan(plan)
            if "error" in plan:
                raise FeatureCacheError(plan["error"])
            if "partial" in plan:
                _build_in(Path(plan["partial"]), plan["header"], model, dataset, directory, batch_size, num_workers)
        finally:
            if lock is not None:
                lock.close()
        try:
            return cls.open(directory, content_hash)
        except FeatureCacheError as err:
            raise FeatureCacheError(
                f"rank {rank} cannot read the store rank 0 just wrote at {directory} ({err}); "
                "run.feature_cache.dir must be on a filesystem every rank shares"
            ) from None

    @classmethod
    def _decide(cls, model, dataset, directory: Path, identity: dict, content_hash: str, world: int):
        """Rank 0: ``(lock, plan)``; the plan is ``{}`` to reuse the store, or the partial directory
        and header of a build, with the lock (an open file) held and the free space checked."""
        try:
            cls.open(directory, content_hash)
            logger.info("Feature cache: reusing %s", directory)
            return None, {}
        except FeatureCacheError:
            pass
        lock, waited = _lock(directory)
        try:
            try:
                cls.open(directory, content_hash)
                logger.info("Feature cache: reusing %s, which another job built while this one waited", directory)
                return lock, {}
            except FeatureCacheError as err:
                reason = _why_rebuild(directory, identity, err)
            logger.info("Feature cache: building %s (%s)", directory, reason)
            _remove_leftovers(directory)
            header = _header(model, dataset, identity, content_hash, world)
            _check_free_space(directory, header)
            # secrets, not random: the random module is seeded alike in every job and rank
            tag = f"{_HOST.sub('_', socket.gethostname())}-{os.getpid()}-{secrets.token_hex(4)}"
            partial = directory.with_name(f"{directory.name}.partial-{tag}")
            partial.mkdir()
            return lock, {"partial": str(partial), "header": header}
        except BaseException:
            lock.close()
            raise


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


# --- building: lock, disk space, shards ---------------------------------------------------------

#: Seconds between a waiting job's attempts at the lock; each attempt also tells the job's other
#: ranks that rank 0 is still waiting, so their collective (with its timeout) completes.
LOCK_POLL_SECONDS = 10.0
_WAITING = "rank 0 is waiting for the lock"
_HOST = re.compile(r"[^A-Za-z0-9.-]")
#: Files take whole blocks: the free-space check rounds each file up to this.
_BLOCK = 4096


def lock_path(directory) -> Path:
    """The file beside ``directory`` on which the job building it holds an exclusive ``flock``."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".lock")


def _lock(directory: Path):
    """Rank 0: ``(lock, waited)``, the lock of ``directory`` taken (an open file, released when
    closed or when the process dies) and whether another job held it first."""
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Never deleted: a job could otherwise lock a fresh file while another still holds the old one.
    lock = open(path, "a")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock, False
        except BlockingIOError:
            pass
        logger.info("Feature cache: another job is building %s (it holds %s); waiting for it", directory, path)
        if _dist() is None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return lock, True
        while True:
            _broadcast(_WAITING)
            logger.debug("Feature cache: still waiting for %s", path)
            time.sleep(LOCK_POLL_SECONDS)
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock, True
    except BaseException:
        lock.close()
        raise


def _share_plan(plan):
    """Rank 0's plan on every rank; the other ranks pass over the heartbeats of a waiting rank 0."""
    if _rank_world()[0] == 0:
        return _broadcast(plan)
    while True:
        plan = _broadcast(None)
        if plan != _WAITING:
            return plan


def _remove_leftovers(directory: Path) -> None:
    """Rank 0, lock held: partial and replaced stores of ``directory`` are those of jobs that died,
    since only the job holding the lock writes them."""
    for path in directory.parent.iterdir():
        suffix = path.name[len(directory.name) :] if path.name.startswith(directory.name) else ""
        if suffix == ".partial" or suffix.startswith((".partial-", ".old-")):
            logger.info("Feature cache: removing %s, left by a build that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def _header(model, dataset, identity: dict, content_hash: str, world: int) -> dict:
    """The header of the store to build; the ViT runs on image 0 once for the feature shape."""
    of_record, representative = image_index(dataset)
    n_images, views = len(representative), identity["views"]
    with seeded(view_seed(identity["seed"], 0, 0)):
        probe = dataset[representative[0]]["image"]
    features = vit_features(model, probe[None].to(next(model.visual_encoder.parameters()).device))
    return {
        "format_version": FORMAT_VERSION,
        "content_hash": content_hash,
        "identity": identity,
        "shape": list(features.shape[1:]),
        "dtype": identity["dtype"],
        "compute_dtype": str(features.dtype).removeprefix("torch."),
        "views": views,
        "images": n_images,
        "records": len(of_record),
        "world_size": world,
        "shards": [{"file": shard_name(r, world), "rows": len(range(r, n_images, world))} for r in range(world)],
    }


def _header_text(header: dict) -> str:
    return json.dumps(header, indent=1, sort_keys=True)


def _shard_shape(header: dict, rows: int) -> tuple:
    return (rows, header["views"], *header["shape"])


def _store_bytes(header: dict) -> int:
    """Disk bytes the store of ``header`` takes, each file rounded up to whole blocks."""
    dtype = STORE_DTYPES[header["dtype"]]
    sizes = [len(_header_text(header).encode())]
    for entry in header["shards"]:
        if entry["rows"]:
            shape = _shard_shape(header, entry["rows"])
            sizes.append(len(_npy_header(shape, dtype)) + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return sum(-(-size // _BLOCK) * _BLOCK for size in sizes)


def _check_free_space(directory: Path, header: dict) -> None:
    needed, free = _store_bytes(header), shutil.disk_usage(directory.parent).free
    if needed <= free:
        return
    old = sum(path.stat().st_size for path in directory.iterdir()) if (directory / HEADER).is_file() else 0
    raise FeatureCacheError(
        f"not enough disk space to build the feature cache {directory}: it needs {needed} bytes ({_human(needed)}), "
        f"its filesystem has {free} bytes ({_human(free)}) available"
        + (f"; the store there now ({_human(old)}) is replaced only once the new one is complete" if old else "")
    )


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _build_in(partial: Path, header: dict, model, dataset, directory: Path, batch_size: int, num_workers: int):
    """Every rank writes its shard into ``partial``; rank 0 then writes the header and swaps the
    directory into place, or on any rank's failure removes ``partial`` and every rank raises."""
    rank, world = _rank_world()
    done = False
    try:
        error = None
        try:
            _write_shard(model, dataset, partial, header, rank, world, batch_size, num_workers)
        except (OSError, FeatureCacheError) as err:
            error = f"rank {rank}: {err}" if world > 1 else str(err)
        errors = [e for e in _gather(error) if e]
        if rank == 0 and not errors:
            try:
                # The header is the completion marker: written last, then the directory swapped in.
                (partial / HEADER).write_text(_header_text(header), encoding="utf-8")
                _swap_in(partial, directory)
                done = True
            except OSError as err:
                errors.append(f"cannot write {partial / HEADER} or move it to {directory}: {err}")
        errors = _broadcast(errors)
        if errors:
            raise FeatureCacheError(
                f"building the feature cache {directory} failed and left no store: {'; '.join(errors)}"
            )
    finally:
        if rank == 0 and not done:
            shutil.rmtree(partial, ignore_errors=True)


def _swap_in(partial: Path, directory: Path) -> None:
    # Readers find either the old store or the new one, never a half-deleted one.
    old = None
    if directory.exists():
        old = directory.with_name(f"{directory.name}.old-{secrets.token_hex(4)}")
        os.rename(directory, old)
    os.replace(partial, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _gather(obj) -> list:
    dist = _dist()
    if not dist:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _write_shard(model, dataset, partial: Path, header: dict, rank: int, world: int, batch_size: int, num_workers: int):
    """Compute this rank's images ``rank::world`` into its shard, reserved on disk in full first."""
    representative = image_index(dataset)[1]
    mine = list(range(rank, len(representative), world))
    if not mine:
        return
    views, (tokens, width) = header["views"], header["shape"]
    path = partial / shard_name(rank, world)
    shard = _reserved_npy(path, _shard_shape(header, len(mine)), STORE_DTYPES[header["dtype"]])
    rows = shard.reshape(-1, tokens, width)  # (image, view) pairs in loader order
    loader = torch.utils.data.DataLoader(
        _Views(dataset, mine, representative, views, int(header["identity"]["seed"])),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    device = next(model.visual_encoder.parameters()).device
    filled = 0
    with torch.no_grad():
        for images in loader:
            features = vit_features(model, images.to(device))
            if list(features.shape[1:]) != [tokens, width]:
                raise FeatureCacheError(
                    f"{path}: the ViT gave features of shape {tuple(features.shape[1:])}, on image 0 {(tokens, width)}"
                )
            rows[filled : filled + len(features)] = features.float().cpu().numpy()
            filled += len(features)
    shard.flush()
    del rows, shard


def _npy_header(shape, dtype) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    )
    return buffer.getvalue()


def _reserved_npy(path: Path, shape: tuple, dtype) -> np.memmap:
    """An ``.npy`` file of ``shape`` mapped for writing, its blocks allocated before the map exists:
    a disk that is full (or a quota, or a file size limit) fails here with an error naming the
    file, where writes into a sparse map would kill the process with SIGBUS."""
    header = _npy_header(shape, dtype)
    size = len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        with open(path, "wb") as file:
            file.write(header)
            file.flush()
            _allocate(file, size)
    except OSError as err:
        raise FeatureCacheError(
            f"cannot allocate {size} bytes for the feature cache shard {path}: {err.strerror or err}"
        ) from None
    return np.memmap(path, dtype=dtype, mode="r+", offset=len(header), shape=shape)


def _allocate(file, size: int) -> None:
    try:
        os.posix_fallocate(file.fileno(), 0, size)
        return
    except AttributeError:  # macOS has no posix_fallocate
        pass
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    # Writing the zeros allocates as well, and fails with the same OSError.
    zeros = bytes(1 << 20)
    file.seek(0, os.SEEK_END)
    while file.tell() < size:
        file.write(zeros[: size - file.tell()])
    file.flush()
    os.fsync(file.fileno())


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
            raise FeatureCacheError(
                f"{store.directory} holds {store.header['records']} records, the dataset {len(dataset)}"
            )
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


def apply_feature_cache(run, model, datasets):
    """Wrap the configured splits of every dataset in ``CachedFeatures`` (building stores as needed)
    when ``run.feature_cache.enabled``; otherwise ``datasets`` unchanged.

    ``run`` is the typed ``run:`` section (``run_config.RunSettings``): its ``feature_cache``, and the
    splits, device and evaluation batch size of its ``runner``."""
    options, loop = run.feature_cache, run.runner
    if options is None or not options.enabled:
        return datasets
    root = Path(os.path.expanduser(str(options.dir or default_dir())))
    train_splits = set(loop.train_splits)
    # only splits this run reads: evaluation-only runs build no train store and vice versa
    splits = set(options.splits) & (train_splits | set(loop.valid_splits) | set(loop.test_splits))
    check_frozen_vit(model)
    model.to(torch.device(loop.device))
    for name, by_split in datasets.items():
        for split in list(by_split):
            if split not in splits:
                continue
            is_train = split in train_splits
            store = FeatureStore.build(
                model,
                by_split[split],
                root / name / split,
                # eval processors are deterministic: more views would be identical copies
                views=options.views if is_train else 1,
                dtype=options.dtype,
                seed=options.seed,
                batch_size=options.batch_size or loop.batch_size_eval,
                num_workers=options.num_workers,
            )
            by_split[split] = CachedFeatures(by_split[split], store, train=is_train)
    return datasets


def _resolved_fp32_linear(model, device: torch.device) -> str | None:
    """The kernel ``model.cpu_fp32_linear`` gives fp32 linears on ``device`` (None: a model without the key)."""
    from blip2_internlm.models.cpu_linear import resolve_cpu_fp32_linear

    setting = getattr(getattr(model, "model_config", None), "cpu_fp32_linear", None)
    return None if setting is None else resolve_cpu_fp32_linear(setting, device)


def _resolved_autocast(model, device: torch.device) -> str | None:
    """The dtype the model's autocast setting gives on ``device`` (None: no autocast region)."""
    from blip2_internlm.models.config import AUTOCAST_DTYPES
    from blip2_internlm.models.llm_inputs import resolve_autocast_dtype

    setting = getattr(model, "autocast_dtype", None)
    if setting not in AUTOCAST_DTYPES:
        return None
    return str(resolve_autocast_dtype(setting, device))
